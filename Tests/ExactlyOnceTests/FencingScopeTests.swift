import CouponKit
import ExactlyOnce
import ExactlyOnceTestKit
import Logging
import Metrics
import MetricsTestKit
import Synchronization
import Testing

/// The process's metrics go to one `TestMetrics` (swift-metrics bootstraps once per process).
enum ProcessMetrics {
    static let test: TestMetrics = {
        let m = TestMetrics()
        MetricsSystem.bootstrap(m)
        return m
    }()
}

/// A transport whose subscriptions all claim one fixed fencing scope, whatever their instance:
/// what a transport whose epochs restart low in a scope a store already knows looks like (a
/// Kafka group deleted and created again under the same scope).
final class FixedScopeTransport: MessageTransport {
    let base: InMemoryTransport
    let scope: String
    init(base: InMemoryTransport, scope: String) {
        self.base = base
        self.scope = scope
    }
    func partitionCount(of topic: String) async throws -> Int { try await base.partitionCount(of: topic) }
    func publish(_ record: OutgoingRecord, to topic: String, partitioning: Partitioning) async throws -> RecordPosition {
        try await base.publish(record, to: topic, partitioning: partitioning)
    }
    func partitionStatus(group: String, topic: String) async throws -> [PartitionStatus] { try await base.partitionStatus(group: group, topic: topic) }
    func read(topic: String, partition: PartitionID, from offset: Offset, maxRecords: Int) async throws -> [ConsumedRecord] {
        try await base.read(topic: topic, partition: partition, from: offset, maxRecords: maxRecords)
    }
    func subscribe(topic: String, group: String, memberID: String) async throws -> Sub {
        Sub(base: try await base.subscribe(topic: topic, group: group, memberID: memberID), fencingScope: scope)
    }
    struct Sub: TransportSubscription {
        let base: InMemoryTransport.Subscription
        let fencingScope: String
        var memberID: String { base.memberID }
        func poll(maxRecords: Int, maxWait: Duration) async throws -> PollResult { try await base.poll(maxRecords: maxRecords, maxWait: maxWait) }
        func commit(_ offsets: [PartitionID: Offset], generation: UInt64) async throws { try await base.commit(offsets, generation: generation) }
        func seek(_ partition: PartitionID, to offset: Offset) async throws { try await base.seek(partition, to: offset) }
        func committedOffset(_ partition: PartitionID) async throws -> Offset? { try await base.committedOffset(partition) }
        func close() async throws { try await base.close() }
    }
}

/// Issue: a durable store remembers the highest epoch per scope and refuses lower ones; a
/// second transport (or one whose epochs restart) must not be fenced forever in silence.
@Suite(.timeLimit(.minutes(2))) struct FencingScopeTests {
    static func publish(_ t: some MessageTransport, _ range: ClosedRange<Int64>) async throws {
        for m in range {
            _ = try await t.publish(CouponRequest(requestId: m, couponId: m % 2, memberId: m).outgoing, to: "coupons", partitioning: .modulo)
        }
    }

    /// The same sale run first on one transport, then on another, with one store: the second
    /// run is served (its scope is its own), and the sale's ledger is consistent.
    @Test func aSecondTransportOnTheSameStoreIsNotFenced() async throws {
        let store = try InMemoryDedupeStore()
        let issuer = CouponIssuer(stock: [0: 100, 1: 100])
        // First transport: many rebalances, so its epochs are high.
        let first = try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1])
        for i in 1...40 { _ = try await first.subscribe(topic: "coupons", group: "g", memberID: String(repeating: "0", count: i)) }
        for i in 1...40 { first.expel(memberID: String(repeating: "0", count: i), group: "g", topic: "coupons") }
        try await Self.publish(first, 1...20)
        let a = try ExactlyOnceConsumer(transport: first, store: store, configuration: config("a"), logger: quietLogger,
                                        key: CouponRequest.keyExtractor, handler: issuer.handler)
        try await drive([try await a.makeSession()], transport: first, topic: "coupons", group: "g")
        // Second transport, epochs from the start, the same store: served, not fenced.
        let second = try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1])
        try await Self.publish(second, 1...30)  // 20 repeats and 10 new clicks
        let b = try ExactlyOnceConsumer(transport: second, store: store, configuration: config("b"), logger: quietLogger,
                                        key: CouponRequest.keyExtractor, handler: issuer.handler)
        let session = try await b.makeSession()
        var fenced = 0, duplicates = 0
        for _ in 0..<200 where !second.isFullyCommitted(group: "g", topic: "coupons") {
            let r = try await session.step()
            fenced += r.fencedLanes
            duplicates += r.duplicates
        }
        #expect(second.isFullyCommitted(group: "g", topic: "coupons"))
        #expect(fenced == 0, "another transport's epochs never fence this one")
        #expect(duplicates == 20, "the first run's clicks are answered from the store")
        #expect(try await CouponLedger.read(from: store, coupons: [0, 1]).count == 30)
    }

    /// When a scope's epochs do restart below what the store saw (simulated here with one fixed
    /// scope for two transports), the consumer says so: an info line at once, a gauge and a
    /// counter, and after `maxFencedDuration` run() stops with `fenced` naming the scope.
    @Test func aConsumerFencedForeverStopsWithAClearError() async throws {
        let metrics = ProcessMetrics.test
        let store = try InMemoryDedupeStore()
        let issuer = CouponIssuer(stock: [0: 100, 1: 100])
        let old = FixedScopeTransport(base: try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1]), scope: "shared-scope")
        for i in 1...40 { _ = try await old.base.subscribe(topic: "coupons", group: "g", memberID: String(repeating: "0", count: i)) }
        for i in 1...40 { old.base.expel(memberID: String(repeating: "0", count: i), group: "g", topic: "coupons") }
        try await Self.publish(old, 1...10)
        let a = try ExactlyOnceConsumer(transport: old, store: store, configuration: config("a"), logger: quietLogger,
                                        key: CouponRequest.keyExtractor, handler: issuer.handler)
        let first = try await a.makeSession()
        for _ in 0..<200 where !old.base.isFullyCommitted(group: "g", topic: "coupons") { try await first.step() }
        #expect(old.base.isFullyCommitted(group: "g", topic: "coupons"))

        let restarted = FixedScopeTransport(base: try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1]), scope: "shared-scope")
        try await Self.publish(restarted, 11...20)
        let logs = CapturingLogs()
        var c = config("stuck")
        c.maxFencedDuration = .milliseconds(300)
        c.pollWait = .milliseconds(5)
        c.unavailableBackoff.initial = .milliseconds(1)
        c.unavailableBackoff.maximum = .milliseconds(5)
        let stuck = try ExactlyOnceConsumer(transport: restarted, store: store, configuration: c, logger: logs.logger,
                                            key: CouponRequest.keyExtractor, handler: issuer.handler)
        let clock = ContinuousClock()
        let start = clock.now
        let error = await #expect(throws: ExactlyOnceError.self) { try await stuck.run() }
        #expect(clock.now - start < .seconds(30), "it gives up after a bounded time")
        #expect(error?.code == .fenced)
        #expect(error?.isRetriable == false)
        #expect(error?.message.contains("shared-scope") == true, "the error names the scope: \(String(describing: error))")
        #expect(logs.entries.withLock { $0 }.contains { $0.0 == .info && $0.1.contains("fence") }, "a log line says the partition is refused")
        #expect(try metrics.expectCounter("exactly_once_fenced_total", [("group", "g"), ("topic", "coupons")]).totalValue > 0)
        #expect(restarted.base.assignment(group: "g", topic: "coupons").isEmpty, "it left the group")
        #expect(!restarted.base.isFullyCommitted(group: "g", topic: "coupons"), "nothing was committed past what it could not process")
    }
}
