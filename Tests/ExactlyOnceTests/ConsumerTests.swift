import CouponKit
import ExactlyOnce
import ExactlyOnceTestKit
import Logging
import ServiceLifecycle
import Synchronization
import Testing

final class Outcomes: Sendable {
    let seen = Mutex<[(String, Outcome, Bool)]>([])
    var observer: OutcomeObserver {
        { record, outcome, replayed in self.seen.withLock { $0.append((String(decoding: record.payload, as: UTF8.self), outcome, replayed)) } }
    }
    var all: [(String, Outcome, Bool)] { seen.withLock { $0 } }
}

let quietLogger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

/// Runs sessions until the group has committed the whole topic (bounded).
func drive<S: DedupeStore>(_ sessions: [ConsumerSession<InMemoryTransport, S>], transport: InMemoryTransport, topic: String, group: String) async throws {
    for _ in 0..<500 where !transport.isFullyCommitted(group: group, topic: topic) {
        for s in sessions { try await s.step() }
    }
    #expect(transport.isFullyCommitted(group: group, topic: topic))
}

func config(_ member: String, topic: String = "coupons") -> ConsumerConfiguration {
    var c = ConsumerConfiguration(topic: topic, group: "g", memberID: member)
    c.pollWait = .zero  // tests drive sessions step by step: an empty poll returns at once
    c.retryBackoff = .none
    c.unavailableBackoff = .none
    c.maxAttempts = 3
    return c
}

@Suite struct ConsumerTests {
    @Test func duplicatesGetTheStoredOutcomeIncludingSoldOut() async throws {
        let t = try InMemoryTransport(topics: ["coupons": 3, "coupons.dlq": 1])
        let store = try InMemoryDedupeStore()
        let outcomes = Outcomes()
        // Stock 1: member 1 wins, member 2 is sold out; both click twice.
        for m in [1, 2, 1, 2] as [Int64] {
            _ = try await t.publish(CouponRequest(requestId: m, couponId: 7, memberId: m).outgoing, to: "coupons", partitioning: .modulo)
        }
        let consumer = try ExactlyOnceConsumer(transport: t, store: store, configuration: config("a"), logger: quietLogger,
                                               key: CouponRequest.keyExtractor, observer: outcomes.observer,
                                               handler: CouponIssuer(stock: [7: 1]).handler)
        try await drive([try await consumer.makeSession()], transport: t, topic: "coupons", group: "g")
        let seen = outcomes.all
        #expect(seen.map(\.1) == [.applied("1"), .rejected("sold out"), .applied("1"), .rejected("sold out")])
        #expect(seen.map(\.2) == [false, false, true, true], "the repeats are replays of the stored outcome (G4)")
        let ledger = try await CouponLedger.read(from: store, coupons: [7])
        #expect(ledger == [LedgerEntry(couponId: 7, memberId: 1, serial: 1)])
    }

    @Test func conflictingPayloadIsDeadLetteredNotTreatedAsDuplicate() async throws {
        let t = try InMemoryTransport(topics: ["coupons": 1, "coupons.dlq": 1])
        let store = try InMemoryDedupeStore()
        _ = try await t.publish(CouponRequest(requestId: 1, couponId: 1, memberId: 5).outgoing, to: "coupons", partitioning: .modulo)
        _ = try await t.publish(CouponRequest(requestId: 2, couponId: 1, memberId: 5, variant: 9).outgoing, to: "coupons", partitioning: .modulo)
        let consumer = try ExactlyOnceConsumer(transport: t, store: store, configuration: config("a"), logger: quietLogger,
                                               key: CouponRequest.keyExtractor, handler: CouponIssuer(stock: [1: 10]).handler)
        let session = try await consumer.makeSession()
        var conflicts = 0
        for _ in 0..<5 { conflicts += try await session.step().conflicts }
        #expect(conflicts == 1)
        let dlq = t.records(topic: "coupons.dlq", partition: 0)
        #expect(dlq.count == 1)
        #expect(dlq.first?.headers["x-dead-letter-reason"]?.hasPrefix("conflict") == true)
        #expect(dlq.first?.payload == Array("1,5,9".utf8))
        #expect(try await CouponLedger.read(from: store, coupons: [1]).count == 1)
    }

    @Test func malformedRecordsAreDeadLetteredAndTheLaneMovesOn() async throws {
        let t = try InMemoryTransport(topics: ["coupons": 1, "coupons.dlq": 1])
        let store = try InMemoryDedupeStore()
        _ = try await t.publish(OutgoingRecord(key: Array("1".utf8), payload: Array("not,a,coupon,at all".utf8)), to: "coupons", partitioning: .explicit(0))
        _ = try await t.publish(CouponRequest(requestId: 2, couponId: 1, memberId: 5).outgoing, to: "coupons", partitioning: .explicit(0))
        let consumer = try ExactlyOnceConsumer(transport: t, store: store, configuration: config("a"), logger: quietLogger,
                                               key: CouponRequest.keyExtractor, handler: CouponIssuer(stock: [1: 10]).handler)
        try await drive([try await consumer.makeSession()], transport: t, topic: "coupons", group: "g")
        #expect(t.records(topic: "coupons.dlq", partition: 0).map(\.headers["x-dead-letter-reason"]) == ["malformed record: no valid idempotency key"])
        #expect(try await CouponLedger.read(from: store, coupons: [1]).map(\.memberId) == [5])
    }

    /// F12: a poison record is retried a bounded number of times; the attempt count lives in the
    /// store, so a restart in between does not reset it; then it is dead-lettered with its reason.
    @Test func poisonRecordAttemptsSurviveARestartThenDeadLetter() async throws {
        struct Boom: Error {}
        let t = try InMemoryTransport(topics: ["coupons": 1, "coupons.dlq": 1])
        let store = try InMemoryDedupeStore()
        _ = try await t.publish(CouponRequest(requestId: 1, couponId: 1, memberId: 66).outgoing, to: "coupons", partitioning: .modulo)
        let calls = Mutex(0)
        // First member: attempt 1 fails, attempt 2 crashes the process inside the handler.
        let first = try ExactlyOnceConsumer(
            transport: t, store: store, configuration: config("a"), logger: quietLogger, key: CouponRequest.keyExtractor,
            handler: { _ in
                let n = calls.withLock { $0 += 1; return $0 }
                if n == 2 { throw InjectedCrash(at: .insideEffect) }
                throw Boom()
            })
        let s1 = try await first.makeSession()
        _ = try await s1.step()  // assignment
        await #expect(throws: InjectedCrash.self) { try await s1.step() }
        t.expel(memberID: "a", group: "g", topic: "coupons")
        let key = IdempotencyKey.coupon(couponId: 1, memberId: 66)
        let attemptsAfterCrash = try await store.records(for: [key])[key]?.attempts
        #expect(attemptsAfterCrash == 2)
        // Restart: the count continues from the store, so only one more handler call happens.
        let second = try ExactlyOnceConsumer(transport: t, store: store, configuration: config("b"), logger: quietLogger,
                                             key: CouponRequest.keyExtractor, handler: { _ in calls.withLock { $0 += 1 }; throw Boom() })
        try await drive([try await second.makeSession()], transport: t, topic: "coupons", group: "g")
        #expect(calls.withLock { $0 } == 3, "maxAttempts is 3 across both processes, not 3 per process")
        let record = try await store.records(for: [key])[key]
        #expect(record?.outcome?.status == .deadLettered)
        let dlq = t.records(topic: "coupons.dlq", partition: 0)
        #expect(dlq.count == 1)
        #expect(dlq.first?.headers["x-dead-letter-reason"] == "gave up after 3 attempts")
        #expect(dlq.first?.headers["x-idempotency-key"] == "1:66")
    }

    /// A poison record behind good ones in the same poll is claimed ahead (uncharged); its
    /// handler still runs exactly `maxAttempts` times before it is dead-lettered, not one more.
    @Test func aPoisonRecordBehindGoodOnesRunsExactlyMaxAttemptsTimes() async throws {
        struct Boom: Error {}
        let t = try InMemoryTransport(topics: ["coupons": 1, "coupons.dlq": 1])
        let store = try InMemoryDedupeStore()
        for m in [1, 2, 3, 66] as [Int64] {
            _ = try await t.publish(CouponRequest(requestId: m, couponId: 1, memberId: m).outgoing, to: "coupons", partitioning: .modulo)
        }
        let poisonCalls = Mutex(0)
        let issuer = CouponIssuer(stock: [1: 10])
        let consumer = try ExactlyOnceConsumer(
            transport: t, store: store, configuration: config("a"), logger: quietLogger, key: CouponRequest.keyExtractor,
            handler: { ctx in
                if try CouponRequest.decode(ctx.record.payload).memberId == 66 {
                    poisonCalls.withLock { $0 += 1 }
                    throw Boom()
                }
                return try await issuer.handle(&ctx)
            })
        try await drive([try await consumer.makeSession()], transport: t, topic: "coupons", group: "g")
        #expect(poisonCalls.withLock { $0 } == 3, "maxAttempts is 3: the handler runs 3 times, not 4")
        let key = IdempotencyKey.coupon(couponId: 1, memberId: 66)
        #expect(try await store.records(for: [key])[key]?.outcome?.status == .deadLettered)
        #expect(t.records(topic: "coupons.dlq", partition: 0).first?.headers["x-dead-letter-reason"] == "gave up after 3 attempts")
    }

    /// F8: the store is unreachable for a while; the lane pauses, nothing is committed past
    /// unfinished records, and everything completes once it is back.
    @Test func unreachableStorePausesAndLosesNothing() async throws {
        let t = try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1])
        let flag = DownFlag()
        let store = FaultyStore(try InMemoryDedupeStore()) { _ in flag.isDown ? .failBefore : .none }
        for m in 1...20 as ClosedRange<Int64> {
            _ = try await t.publish(CouponRequest(requestId: m, couponId: m % 2, memberId: m).outgoing, to: "coupons", partitioning: .modulo)
        }
        let consumer = try ExactlyOnceConsumer(transport: t, store: store, configuration: config("a"), logger: quietLogger,
                                               key: CouponRequest.keyExtractor, handler: CouponIssuer(stock: [0: 5, 1: 5]).handler)
        let session = try await consumer.makeSession()
        for _ in 0..<5 {
            let r = try await session.step()
            #expect(r.processed == 0)
        }
        #expect(t.committedOffsets(group: "g", topic: "coupons").values.allSatisfy { $0.rawValue == 0 })
        flag.isDown = false
        try await drive([session], transport: t, topic: "coupons", group: "g")
        let ledger = try await CouponLedger.read(from: store.base, coupons: [0, 1])
        #expect(ledger.count == 10)
    }

    /// The service: runs lanes in parallel, stops on graceful shutdown after committing.
    @Test func serviceRunsUntilGracefulShutdownAndCommits() async throws {
        let t = try InMemoryTransport(topics: ["coupons": 4, "coupons.dlq": 1])
        let store = try InMemoryDedupeStore()
        for i in 0..<400 as Range<Int64> {
            _ = try await t.publish(CouponRequest(requestId: i, couponId: i % 8, memberId: i / 2).outgoing, to: "coupons", partitioning: .modulo)
        }
        var c = config("svc")
        c.pollWait = .milliseconds(1)
        let consumer = try ExactlyOnceConsumer(transport: t, store: store, configuration: c, logger: quietLogger,
                                               key: CouponRequest.keyExtractor, handler: CouponIssuer(stock: Dictionary(uniqueKeysWithValues: (0..<8).map { ($0, 10) })).handler)
        let group = ServiceGroup(configuration: .init(services: [consumer], logger: quietLogger))
        try await withThrowingTaskGroup(of: Void.self) { tg in
            tg.addTask { try await group.run() }
            for _ in 0..<2000 where !t.isFullyCommitted(group: "g", topic: "coupons") { try await Task.sleep(for: .milliseconds(2)) }
            await group.triggerGracefulShutdown()
            try await tg.waitForAll()
        }
        #expect(t.isFullyCommitted(group: "g", topic: "coupons"))
        let ledger = try await CouponLedger.read(from: store, coupons: Array(0..<8))
        #expect(ledger.count == 80)
        #expect(Set(ledger.map { "\($0.couponId):\($0.memberId)" }).count == 80)
        #expect(t.assignment(group: "g", topic: "coupons").isEmpty, "the member left the group on shutdown")
    }

    @Test func invalidConfigurationIsAClearError() throws {
        let t = try InMemoryTransport(topics: ["coupons": 1])
        let store = try InMemoryDedupeStore()
        var c = config("a")
        c.maxAttempts = 0
        #expect(throws: ExactlyOnceError.self) {
            _ = try ExactlyOnceConsumer(transport: t, store: store, configuration: c, logger: quietLogger, key: CouponRequest.keyExtractor) { _ in .applied() }
        }
        #expect(throws: ExactlyOnceError.self) { _ = try InMemoryTransport(topics: ["x": 0]) }
        #expect(throws: ExactlyOnceError.self) { _ = try CouponRequest.decode(Array("1,,2".utf8)) }
        #expect(throws: ExactlyOnceError.self) { _ = try CouponRequest.decode(Array("1;2".utf8)) }
        #expect(throws: ExactlyOnceError.self) { _ = try CouponRequest.decode(Array(repeating: UInt8(ascii: "9"), count: 40)) }
    }
}

final class DownFlag: Sendable {
    private let value = Atomic<Bool>(true)
    var isDown: Bool {
        get { value.load(ordering: .relaxed) }
        set { value.store(newValue, ordering: .relaxed) }
    }
}
