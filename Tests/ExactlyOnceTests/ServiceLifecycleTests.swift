import CouponKit
import Foundation
import ExactlyOnce
import ExactlyOnceTestKit
import Logging
import ServiceLifecycle
import Synchronization
import Testing

/// A transport that counts joins and leaves (and can fail polls with a chosen error), over the
/// in-memory transport: the consumer must leave the group on every way out of `run()`.
final class CountingTransport: MessageTransport {
    let base: InMemoryTransport
    let joins = Atomic<Int>(0)
    let closes = Atomic<Int>(0)
    let pollError = Mutex<ExactlyOnceError?>(nil)
    /// Thrown by `subscribe` when set (a backend refusing the configuration, say).
    let subscribeError = Mutex<ExactlyOnceError?>(nil)
    init(base: InMemoryTransport) { self.base = base }

    func partitionCount(of topic: String) async throws -> Int { try await base.partitionCount(of: topic) }
    func publish(_ record: OutgoingRecord, to topic: String, partitioning: Partitioning) async throws -> RecordPosition {
        try await base.publish(record, to: topic, partitioning: partitioning)
    }
    func partitionStatus(group: String, topic: String) async throws -> [PartitionStatus] { try await base.partitionStatus(group: group, topic: topic) }
    func read(topic: String, partition: PartitionID, from offset: Offset, maxRecords: Int) async throws -> [ConsumedRecord] {
        try await base.read(topic: topic, partition: partition, from: offset, maxRecords: maxRecords)
    }
    func subscribe(topic: String, group: String, memberID: String) async throws -> Sub {
        if let e = subscribeError.withLock({ $0 }) { throw e }
        joins.add(1, ordering: .relaxed)
        return Sub(base: try await base.subscribe(topic: topic, group: group, memberID: memberID), owner: self)
    }

    struct Sub: TransportSubscription {
        let base: InMemoryTransport.Subscription
        let owner: CountingTransport
        var memberID: String { base.memberID }
        var fencingScope: String { base.fencingScope }
        func poll(maxRecords: Int, maxWait: Duration) async throws -> PollResult {
            if let e = owner.pollError.withLock({ $0 }) { throw e }
            return try await base.poll(maxRecords: maxRecords, maxWait: maxWait)
        }
        func commit(_ offsets: [PartitionID: Offset], generation: UInt64) async throws { try await base.commit(offsets, generation: generation) }
        func seek(_ partition: PartitionID, to offset: Offset) async throws { try await base.seek(partition, to: offset) }
        func committedOffset(_ partition: PartitionID) async throws -> Offset? { try await base.committedOffset(partition) }
        func close() async throws {
            owner.closes.add(1, ordering: .relaxed)
            try await base.close()
        }
    }
}

/// `run()` joins, processes, and leaves the group on every exit path: graceful shutdown,
/// cancellation and errors; it stops (instead of retrying forever) on errors no retry can fix.
@Suite(.timeLimit(.minutes(2))) struct ServiceLifecycleTests {
    static func consumer(_ t: CountingTransport, store: InMemoryDedupeStore = try! InMemoryDedupeStore(),
                         configure: (inout ConsumerConfiguration) -> Void = { _ in }) throws -> ExactlyOnceConsumer<CountingTransport, InMemoryDedupeStore> {
        var c = config("svc")
        c.pollWait = .milliseconds(5)
        configure(&c)
        return try ExactlyOnceConsumer(transport: t, store: store, configuration: c, logger: quietLogger,
                                       key: CouponRequest.keyExtractor, handler: CouponIssuer(stock: [1: 10, 2: 10]).handler)
    }

    static func waitUntil(_ condition: () -> Bool) async throws {
        for _ in 0..<2000 where !condition() { try await Task.sleep(for: .milliseconds(2)) }
        #expect(condition())
    }

    @Test func gracefulShutdownLeavesTheGroup() async throws {
        let t = CountingTransport(base: try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1]))
        let consumer = try Self.consumer(t)
        let group = ServiceGroup(configuration: .init(services: [consumer], logger: quietLogger))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            try await Self.waitUntil { !t.base.assignment(group: "g", topic: "coupons").isEmpty }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        #expect(t.joins.load(ordering: .relaxed) == 1)
        #expect(t.closes.load(ordering: .relaxed) == 1)
        #expect(t.base.assignment(group: "g", topic: "coupons").isEmpty, "no member is left in the group")
    }

    /// A graceful shutdown while the lanes wait out a store outage (a backoff of 30 s here) ends
    /// the wait at once: the service leaves the group in well under the backoff.
    @Test func gracefulShutdownDuringAnOutageBackoffReturnsPromptly() async throws {
        let t = CountingTransport(base: try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1]))
        let claims = Mutex(0)
        let store = FaultyStore(try InMemoryDedupeStore()) { op in
            guard op == .claim else { return .none }
            claims.withLock { $0 += 1 }
            return .failBefore
        }
        var c = config("svc")
        c.pollWait = .milliseconds(5)
        c.unavailableBackoff.initial = .seconds(30)
        c.unavailableBackoff.maximum = .seconds(30)
        let consumer = try ExactlyOnceConsumer(transport: t, store: store, configuration: c, logger: quietLogger,
                                               key: CouponRequest.keyExtractor, handler: CouponIssuer(stock: [1: 10]).handler)
        _ = try await t.publish(CouponRequest(requestId: 1, couponId: 1, memberId: 1).outgoing, to: "coupons", partitioning: .modulo)
        let group = ServiceGroup(configuration: .init(services: [consumer], logger: quietLogger))
        let elapsed = try await ContinuousClock().measure {
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try await group.run() }
                try await Self.waitUntil { claims.withLock { $0 } > 0 }
                try await Task.sleep(for: .milliseconds(200))  // the step is now in its backoff
                await group.triggerGracefulShutdown()
                try await tasks.waitForAll()
            }
        }
        #expect(claims.withLock { $0 } == 1, "one claim, then the backoff")
        #expect(elapsed < .seconds(10), "the shutdown waited out the backoff: \(elapsed)")
        #expect(t.closes.load(ordering: .relaxed) == 1)
    }

    @Test func cancellationLeavesTheGroup() async throws {
        let t = CountingTransport(base: try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1]))
        let consumer = try Self.consumer(t)
        let task = Task { try await consumer.run() }
        try await Self.waitUntil { !t.base.assignment(group: "g", topic: "coupons").isEmpty }
        task.cancel()
        try await task.value  // returns normally on cancellation
        #expect(t.closes.load(ordering: .relaxed) == 1)
        #expect(t.base.assignment(group: "g", topic: "coupons").isEmpty)
    }

    @Test func anErrorNoRetryCanFixStopsRunAndLeavesTheGroup() async throws {
        let t = CountingTransport(base: try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1]))
        let consumer = try Self.consumer(t)
        let task = Task { try await consumer.run() }
        try await Self.waitUntil { !t.base.assignment(group: "g", topic: "coupons").isEmpty }
        t.pollError.withLock { $0 = ExactlyOnceError(.transportFailure, "not authorised (injected)") }
        let error = await #expect(throws: ExactlyOnceError.self) { try await task.value }
        #expect(error?.code == .transportFailure)
        #expect(t.closes.load(ordering: .relaxed) == 1)
        #expect(t.base.assignment(group: "g", topic: "coupons").isEmpty)
    }

    /// A configuration the backend refuses when the consumer joins is not retried: `run()`
    /// throws it at once (within a second, not after rounds of backoff).
    @Test func aConfigurationTheBackendRefusesStopsRunAtOnce() async throws {
        let t = CountingTransport(base: try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1]))
        t.subscribeError.withLock { $0 = ExactlyOnceError(.invalidConfiguration, "session.timeout.ms refused by the broker (injected)") }
        let consumer = try Self.consumer(t) { c in
            c.unavailableBackoff.initial = .seconds(5)
            c.unavailableBackoff.maximum = .seconds(5)
        }
        let start = ContinuousClock.now
        let error = await #expect(throws: ExactlyOnceError.self) { try await consumer.run() }
        #expect(error?.code == .invalidConfiguration && error?.isRetriable == false)
        #expect(ContinuousClock.now - start < .seconds(1), "refused configurations are not waited out")
        #expect(t.joins.load(ordering: .relaxed) == 0)
    }

    @Test func retriableErrorsAreWaitedOutAndStaleMembersRejoin() async throws {
        let t = CountingTransport(base: try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1]))
        let consumer = try Self.consumer(t) { c in
            c.unavailableBackoff.initial = .milliseconds(1)
            c.unavailableBackoff.maximum = .milliseconds(2)
        }
        let task = Task { try await consumer.run() }
        try await Self.waitUntil { !t.base.assignment(group: "g", topic: "coupons").isEmpty }
        // Unreachable for a while: run() keeps going.
        t.pollError.withLock { $0 = ExactlyOnceError(.transportUnavailable, "broker unreachable (injected)") }
        try await Task.sleep(for: .milliseconds(50))
        t.pollError.withLock { $0 = nil }
        // Expelled (its session lapsed): it joins again as the same member.
        t.base.expel(memberID: "svc", group: "g", topic: "coupons")
        try await Self.waitUntil { t.joins.load(ordering: .relaxed) == 2 && !t.base.assignment(group: "g", topic: "coupons").isEmpty }
        _ = try await t.publish(CouponRequest(requestId: 1, couponId: 1, memberId: 7).outgoing, to: "coupons", partitioning: .modulo)
        try await Self.waitUntil { t.base.isFullyCommitted(group: "g", topic: "coupons") }
        task.cancel()
        try await task.value
        #expect(t.base.assignment(group: "g", topic: "coupons").isEmpty)
    }

    /// A dead-letter topic that does not exist is found when the consumer starts, not when the
    /// first poison record arrives.
    @Test func aMissingDeadLetterTopicIsAClearErrorAtStart() async throws {
        let t = CountingTransport(base: try InMemoryTransport(topics: ["coupons": 2]))
        let consumer = try Self.consumer(t)
        let error = await #expect(throws: ExactlyOnceError.self) { try await consumer.run() }
        #expect(error?.code == .unknownTopic)
        #expect(error?.isRetriable == false)
        #expect(error?.message.contains("coupons.dlq") == true, "the error names the missing topic: \(String(describing: error))")
        #expect(error?.cause?.code == "unknownTopic", "the underlying cause is kept")
        #expect(t.joins.load(ordering: .relaxed) == 0, "it never joined the group")
    }

    @Test func anUnknownTopicIsNotRetriedForever() async throws {
        let t = CountingTransport(base: try InMemoryTransport(topics: ["coupons.dlq": 1]))
        let consumer = try Self.consumer(t)
        let error = await #expect(throws: ExactlyOnceError.self) { try await consumer.run() }
        #expect(error?.code == .unknownTopic)
        #expect(error?.message.contains("the topic to consume") == true)
    }

    /// A full store (policy: keep everything) is an answer, not a livelock: run() stops with
    /// `capacityExceeded` after committing what finished.
    @Test func aFullStoreStopsTheConsumerWithAClearError() async throws {
        let t = CountingTransport(base: try InMemoryTransport(topics: ["coupons": 1, "coupons.dlq": 1]))
        var sc = InMemoryDedupeStore.Configuration()
        sc.capacity = 5
        let store = try InMemoryDedupeStore(configuration: sc)
        for m in 1...20 as ClosedRange<Int64> {
            _ = try await t.publish(CouponRequest(requestId: m, couponId: 1, memberId: m).outgoing, to: "coupons", partitioning: .modulo)
        }
        let consumer = try Self.consumer(t, store: store) { $0.maxPollRecords = 4 }
        let error = await #expect(throws: ExactlyOnceError.self) { try await consumer.run() }
        #expect(error?.code == .capacityExceeded)
        #expect(error?.isRetriable == false)
        #expect(t.closes.load(ordering: .relaxed) == 1)
        let committed = t.base.committedOffsets(group: "g", topic: "coupons")[0]?.rawValue ?? 0
        #expect(committed == 4, "the first poll's four records finished and were committed before the store filled up (committed \(committed))")
        #expect(try await CouponLedger.read(from: store, coupons: [1]).count == 4)
    }
}

/// Codes compare without strings, say whether a retry can help, and keep their cause.
@Suite struct ErrorCodeTests {
    @Test func codesAreDistinctAndComparable() {
        let all = ExactlyOnceError.Code.allCodes
        #expect(Set(all).count == all.count)
        #expect(Set(all.map(\.name)).count == all.count)
        #expect(ExactlyOnceError.Code.storeUnavailable != .transportUnavailable, "store and transport trouble have their own codes")
        #expect(ExactlyOnceError.Code.storeFailure != .storeUnavailable)
    }

    @Test func onlyCodesARetryCanHelpAreRetriable() {
        let retriable: Set<ExactlyOnceError.Code> = [.storeUnavailable, .transportUnavailable, .transactionConflict, .timeout]
        for code in ExactlyOnceError.Code.allCodes {
            #expect(code.isRetriable == retriable.contains(code), "\(code)")
        }
        #expect(!ExactlyOnceError(.unknownTopic, "x").isRetriable)
        #expect(!ExactlyOnceError(.invalidConfiguration, "x").isRetriable)
        #expect(!ExactlyOnceError(.capacityExceeded, "x").isRetriable)
    }

    @Test func theCauseKeepsTypeAndCodeButNeverTheMessage() {
        struct SecretError: Error, CustomStringConvertible { var description: String { "password=hunter2" } }
        let e = ExactlyOnceError(.storeFailure, "store refused", cause: .init(of: SecretError()))
        #expect(e.cause?.type == "SecretError")
        #expect(!String(describing: e).contains("hunter2"))
        let wrapped = ExactlyOnceError(.fenced, "outer", cause: .init(of: ExactlyOnceError(.storeUnavailable, "inner")))
        #expect(wrapped.cause == .init(type: "ExactlyOnceError", code: "storeUnavailable"))
        #expect(String(describing: wrapped).contains("cause: ExactlyOnceError(storeUnavailable)"))
    }
}

/// A log handler that keeps every entry, for checking what the library logs and at which level.
final class CapturingLogs: Sendable {
    let entries = Mutex<[(Logger.Level, String)]>([])
    var logger: Logger {
        var l = Logger(label: "capture", factory: { _ in Handler(owner: self) })
        l.logLevel = .trace
        return l
    }
    struct Handler: LogHandler {
        let owner: CapturingLogs
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            owner.entries.withLock { $0.append((event.level, event.message.description)) }
        }
    }
}

/// swift-log's guidance for libraries: info or below; a per-record event (a retry, a paused
/// lane, a duplicate) is debug plus a metric, never a warning per record.
@Suite struct LoggingTests {
    @Test func aSaleWithConflictsRetriesPausesAndDeadLettersLogsNothingAboveInfo() async throws {
        let logs = CapturingLogs()
        let t = try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1])
        let down = Mutex(3)
        let store = FaultyStore(try InMemoryDedupeStore()) { op in
            op == .claim && down.withLock { n in defer { n -= 1 }; return n > 0 } ? .failBefore : .none
        }
        for m in 1...30 as ClosedRange<Int64> {
            _ = try await t.publish(CouponRequest(requestId: m, couponId: m % 3, memberId: m).outgoing, to: "coupons", partitioning: .modulo)
        }
        _ = try await t.publish(CouponRequest(requestId: 99, couponId: 1, memberId: 1, variant: 5).outgoing, to: "coupons", partitioning: .modulo)
        _ = try await t.publish(OutgoingRecord(key: Array("1".utf8), payload: Array("garbage".utf8)), to: "coupons", partitioning: .modulo)
        struct Flaky: Error {}
        let failures = Mutex(0)
        let issuer = CouponIssuer(stock: [0: 5, 1: 5, 2: 5])
        let consumer = try ExactlyOnceConsumer(
            transport: t, store: store, configuration: config("a"), logger: logs.logger, key: CouponRequest.keyExtractor,
            handler: { ctx in
                if failures.withLock({ n in n += 1; return n % 7 == 0 }) { throw Flaky() }
                return try await issuer.handle(&ctx)
            })
        try await drive([try await consumer.makeSession()], transport: t, topic: "coupons", group: "g")
        let entries = logs.entries.withLock { $0 }
        #expect(!entries.isEmpty)
        let loud = entries.filter { $0.0 > .info }
        #expect(loud.isEmpty, "nothing above info: \(loud)")
        let infos = entries.filter { $0.0 == .info }.map(\.1)
        #expect(infos.count < 10, "per-record events are not info either: \(infos)")
        #expect(entries.contains { $0.0 == .debug && $0.1.contains("retrying") }, "handler retries are logged at debug")
    }

    /// Every library module's log calls, read from the sources: nothing above info, except the
    /// one-time startup warning the guide allows (a file store that recovered with repairs).
    /// A new `logger.warning`/`error`/`critical`/`notice` anywhere in `Sources/` fails here.
    @Test func theLibrariesLogAtInfoOrBelow() throws {
        let sources = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Sources").standardized
        let allowed = ["file store recovered with repairs"]
        let files = try #require(FileManager.default.enumerator(at: sources, includingPropertiesForKeys: nil))
        var scanned = 0
        var loud: [String] = []
        for case let url as URL in files where url.pathExtension == "swift" {
            scanned += 1
            let lines = try String(contentsOf: url, encoding: .utf8).split(separator: "\n", omittingEmptySubsequences: false)
            for (n, line) in lines.enumerated() {
                guard line.range(of: #"logger\??\.(notice|warning|error|critical)\("#, options: .regularExpression) != nil else { continue }
                if allowed.contains(where: { line.contains($0) }) { continue }
                loud.append("\(url.lastPathComponent):\(n + 1): \(line.trimmingCharacters(in: .whitespaces))")
            }
        }
        #expect(scanned > 50, "the library sources were found at \(sources.path)")
        #expect(loud.isEmpty, "log calls above info in the libraries: \(loud)")
    }
}
