import CouponKit
import ExactlyOnce
import ExactlyOnceTestKit
import Synchronization
import Testing

/// Dead-letter replay: listing, replay after a fix, replay twice, replay of a conflict.
@Suite struct DeadLetterReplayTests {
    /// A coupon handler that fails for `poison` members until `fixed` is set.
    final class Switch: Sendable {
        let fixed = Atomic<Bool>(false)
    }

    static func sale(poison: Int64, fixed: Switch) throws -> (InMemoryTransport, InMemoryDedupeStore, ExactlyOnceConsumer<InMemoryTransport, InMemoryDedupeStore>) {
        let t = try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1])
        let store = try InMemoryDedupeStore()
        let issuer = CouponIssuer(stock: [1: 10, 2: 10])
        struct Boom: Error {}
        let consumer = try ExactlyOnceConsumer(
            transport: t, store: store, configuration: config("a"), logger: quietLogger, key: CouponRequest.keyExtractor,
            handler: { ctx in
                let (_, m) = try CouponRequest.decode(ctx.record.payload)
                if m == poison && !fixed.fixed.load(ordering: .relaxed) { throw Boom() }
                return try await issuer.handle(&ctx)
            })
        return (t, store, consumer)
    }

    static func drain(_ c: ExactlyOnceConsumer<InMemoryTransport, InMemoryDedupeStore>, _ t: InMemoryTransport) async throws {
        let s = try await c.makeSession()
        for _ in 0..<300 where !t.isFullyCommitted(group: "g", topic: "coupons") { try await s.step() }
        #expect(t.isFullyCommitted(group: "g", topic: "coupons"))
        try await s.close()
    }

    @Test func aPoisonRecordReplayedAfterTheFixIsIssuedOnceEvenWhenReplayedTwice() async throws {
        let fixed = Switch()
        let (t, store, consumer) = try Self.sale(poison: 66, fixed: fixed)
        for m in [1, 66, 2, 3] as [Int64] {
            _ = try await t.publish(CouponRequest(requestId: m, couponId: 1, memberId: m).outgoing, to: "coupons", partitioning: .modulo)
        }
        try await Self.drain(consumer, t)
        let key = IdempotencyKey.coupon(couponId: 1, memberId: 66)
        #expect(try await store.records(for: [key])[key]?.outcome?.status == .deadLettered)

        let dlq = DeadLetterQueue(transport: t, store: store, topic: "coupons.dlq")
        let letters = try await dlq.list()
        #expect(letters.count == 1)
        #expect(letters[0].key == key && letters[0].reason == "gave up after 3 attempts")
        #expect(letters[0].originalTopic == "coupons" && letters[0].originalPartition == PartitionID(1) && letters[0].originalOffset == Offset(1))
        #expect(try await dlq.show(partition: 0, offset: Offset(0))?.key == key)

        // The handler is fixed; the entry is replayed twice before the consumer runs again.
        fixed.fixed.store(true, ordering: .relaxed)
        let first = try await dlq.replay(.key(key))
        let second = try await dlq.replay(.key(key))
        #expect(first.replayed.count == 1 && first.reopened == [key], "the dead-lettered outcome was released")
        #expect(second.replayed.count == 1 && second.reopened.isEmpty, "nothing left to release the second time")
        let replayedRecord = t.records(topic: "coupons", partition: 1).last!
        #expect(replayedRecord.headers[DeadLetterQueue<InMemoryTransport, InMemoryDedupeStore>.replayedFromHeader] == "coupons.dlq/0@0")
        #expect(replayedRecord.headers[DeadLetterHeaders.reason] == nil)
        try await Self.drain(consumer, t)
        let ledger = try await CouponLedger.read(from: store, coupons: [1])
        #expect(ledger.filter { $0.memberId == 66 }.count == 1, "issued once, however often replayed")
        #expect(ledger.map(\.memberId) == [1, 2, 3, 66], "the replay comes after the clicks already issued")
        #expect(try await store.records(for: [key])[key]?.outcome == .applied("4"))
        #expect(t.records(topic: "coupons.dlq", partition: 0).count == 1, "nothing was dead-lettered again")
    }

    @Test func aReplayedConflictIsStillAConflict() async throws {
        let (t, store, consumer) = try Self.sale(poison: -1, fixed: Switch())
        _ = try await t.publish(CouponRequest(requestId: 1, couponId: 2, memberId: 5).outgoing, to: "coupons", partitioning: .modulo)
        _ = try await t.publish(CouponRequest(requestId: 2, couponId: 2, memberId: 5, variant: 7).outgoing, to: "coupons", partitioning: .modulo)
        try await Self.drain(consumer, t)
        let dlq = DeadLetterQueue(transport: t, store: store, topic: "coupons.dlq")
        #expect(try await dlq.list().map(\.isConflict) == [true])
        let report = try await dlq.replay(.reason(containing: "conflict"))
        #expect(report.replayed.count == 1 && report.reopened.isEmpty, "a conflict's key holds the first payload's outcome: nothing to release")
        try await Self.drain(consumer, t)
        let again = try await dlq.list()
        #expect(again.count == 2 && again.allSatisfy(\.isConflict), "the replay is dead-lettered as a conflict again")
        let key = IdempotencyKey.coupon(couponId: 2, memberId: 5)
        #expect(try await store.records(for: [key])[key]?.outcome == .applied("1"), "the first payload's outcome is untouched")
        #expect(try await CouponLedger.read(from: store, coupons: [2]).count == 1)
    }

    @Test func replayAllSkipsWhatCannotGoBack() async throws {
        let t = try InMemoryTransport(topics: ["coupons": 1, "coupons.dlq": 1])
        let store = try InMemoryDedupeStore()
        _ = try await t.publish(OutgoingRecord(key: nil, payload: [1], headers: [DeadLetterHeaders.reason: "by hand"]), to: "coupons.dlq", partitioning: .explicit(0))
        _ = try await t.publish(OutgoingRecord(key: nil, payload: [2], headers: [DeadLetterHeaders.originalTopic: "gone"]), to: "coupons.dlq", partitioning: .explicit(0))
        let report = try await DeadLetterQueue(transport: t, store: store, topic: "coupons.dlq").replay(.all)
        #expect(report.replayed.isEmpty)
        #expect(report.skipped.map(\.why) == ["no original topic recorded", "original topic gone does not exist"])
    }
}
