import CouponKit
import ExactlyOnce
import ExactlyOnceTestKit
import MetricsTestKit
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

        // Replayed again after it was processed: --all skips it (its key holds an outcome), so
        // nothing grows; named by key it is republished and only answered.
        let published = t.records(topic: "coupons", partition: 1).count
        let third = try await dlq.replay(.all)
        #expect(third.replayed.isEmpty && third.reopened.isEmpty)
        #expect(third.skipped.map(\.reason) == [.answered])
        #expect(third.skipped.first?.why.contains("already processed: its key holds the outcome applied (4)") == true, "\(third.skipped)")
        #expect(t.records(topic: "coupons", partition: 1).count == published, "a skipped entry is not republished")
        let byKey = try await dlq.replay(.key(key))
        #expect(byKey.replayed.count == 1 && byKey.reopened.isEmpty, "a key named explicitly is replayed whatever it holds")
        try await Self.drain(consumer, t)
        #expect(try await CouponLedger.read(from: store, coupons: [1]).filter { $0.memberId == 66 }.count == 1)
        #expect(try await store.records(for: [key])[key]?.outcome == .applied("4"), "answered with the first replay's outcome")
        #expect(t.records(topic: "coupons.dlq", partition: 0).count == 1)
    }

    @Test func aReplayedConflictIsStillAConflict() async throws {
        let (t, store, consumer) = try Self.sale(poison: -1, fixed: Switch())
        _ = try await t.publish(CouponRequest(requestId: 1, couponId: 2, memberId: 5).outgoing, to: "coupons", partitioning: .modulo)
        _ = try await t.publish(CouponRequest(requestId: 2, couponId: 2, memberId: 5, variant: 7).outgoing, to: "coupons", partitioning: .modulo)
        try await Self.drain(consumer, t)
        let dlq = DeadLetterQueue(transport: t, store: store, topic: "coupons.dlq")
        #expect(try await dlq.list().map(\.isConflict) == [true])
        let key = IdempotencyKey.coupon(couponId: 2, memberId: 5)

        // Chosen by reason (or --all), a conflict is skipped: its key holds the first payload's outcome.
        let byReason = try await dlq.replay(.reason(containing: "conflict"))
        #expect(byReason.replayed.isEmpty && byReason.skipped.map(\.reason) == [.answered])
        #expect(byReason.skipped.first?.why.contains("a conflict") == true, "\(byReason.skipped)")
        #expect(t.records(topic: "coupons", partition: 0).count == 2, "nothing republished")

        // Chosen by key, it is replayed, and is a conflict again.
        let report = try await dlq.replay(.key(key))
        #expect(report.replayed.count == 1 && report.reopened.isEmpty, "a conflict's key holds the first payload's outcome: nothing to release")
        try await Self.drain(consumer, t)
        let again = try await dlq.list()
        #expect(again.count == 2 && again.allSatisfy(\.isConflict), "the replay is dead-lettered as a conflict again")
        #expect(again[1].record.headers[DeadLetterHeaders.replayedFrom] == "coupons.dlq/0@0")
        #expect(try await store.records(for: [key])[key]?.outcome == .applied("1"), "the first payload's outcome is untouched")
        #expect(try await CouponLedger.read(from: store, coupons: [2]).count == 1)

        // --all now skips both: the first came back as the second, the second is answered.
        let all = try await dlq.replay(.all)
        #expect(all.replayed.isEmpty)
        #expect(all.skipped.map(\.reason) == [.replayedBefore, .answered])
        #expect(all.skipped.first?.why == "replayed before and dead-lettered again as 0@1")
        // With answered entries included, only the latest of the chain goes back.
        let forced = try await dlq.replay(DeadLetterSelection.all.includingAnswered)
        #expect(forced.replayed.map(\.deadLetter.record.offset) == [Offset(1)])
        #expect(forced.skipped.map(\.reason) == [.replayedBefore])
        try await Self.drain(consumer, t)
        #expect(try await dlq.list().count == 3, "one more conflict per replay asked for, never more")
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
        #expect(report.skipped.map(\.reason) == [.noOriginalTopic, .unknownTopic])
    }

    /// The counters Docs/Operations.md tells operators to alert on move with what happened:
    /// a poison record's failed attempts and its dead letter, a conflict.
    @Test func deadLettersConflictsAndRetriesAreCounted() async throws {
        let metrics = ProcessMetrics.test  // bootstrapped before the consumer makes its metrics
        let t = try InMemoryTransport(topics: ["dl-metrics": 2, "dl-metrics.dlq": 1])
        let store = try InMemoryDedupeStore()
        let issuer = CouponIssuer(stock: [1: 10, 2: 10])
        let failures = Atomic<Int>(0)
        struct Boom: Error {}
        let consumer = try ExactlyOnceConsumer(
            transport: t, store: store, configuration: config("a", topic: "dl-metrics"), logger: quietLogger, key: CouponRequest.keyExtractor,
            handler: { ctx in
                if try CouponRequest.decode(ctx.record.payload).memberId == 66 {
                    failures.add(1, ordering: .relaxed)
                    throw Boom()
                }
                return try await issuer.handle(&ctx)
            })
        for r in [CouponRequest(requestId: 1, couponId: 1, memberId: 1), CouponRequest(requestId: 2, couponId: 1, memberId: 66),
                  CouponRequest(requestId: 3, couponId: 2, memberId: 5), CouponRequest(requestId: 4, couponId: 2, memberId: 5, variant: 7)] {
            _ = try await t.publish(r.outgoing, to: "dl-metrics", partitioning: .modulo)
        }
        let session = try await consumer.makeSession()
        for _ in 0..<300 where !t.isFullyCommitted(group: "g", topic: "dl-metrics") { try await session.step() }
        try await session.close()
        #expect(t.isFullyCommitted(group: "g", topic: "dl-metrics"))
        let d = [("group", "g"), ("topic", "dl-metrics")]
        #expect(try metrics.expectCounter("exactly_once_processed_total", d).totalValue == 2, "members 1 and 5")
        // One per failed handler call: at least maxAttempts (3) before the dead letter.
        let retries = try metrics.expectCounter("exactly_once_retries_total", d).totalValue
        #expect(failures.load(ordering: .relaxed) >= 3)
        #expect(retries == Int64(failures.load(ordering: .relaxed)), "one per failed handler call, got \(retries)")
        #expect(try metrics.expectCounter("exactly_once_dead_lettered_total", d).totalValue == 2, "the poison record and the conflict")
        #expect(try metrics.expectCounter("exactly_once_conflicts_total", d).totalValue == 1)
        #expect(t.records(topic: "dl-metrics.dlq", partition: 0).count == 2)
    }

    /// A record dead-lettered twice (same key, same payload) goes back once per replay.
    @Test func aRecordDeadLetteredTwiceIsRepublishedOnce() async throws {
        let t = try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1])
        let store = try InMemoryDedupeStore()
        let request = CouponRequest(requestId: 1, couponId: 1, memberId: 9)
        for offset in [3, 7] {
            _ = try await t.publish(OutgoingRecord(key: request.recordKey, payload: request.payload, headers: [
                DeadLetterHeaders.reason: "gave up after 3 attempts", DeadLetterHeaders.originalTopic: "coupons",
                DeadLetterHeaders.originalPartition: "1", DeadLetterHeaders.originalOffset: "\(offset)",
                DeadLetterHeaders.idempotencyKey: request.key.rawValue,
            ]), to: "coupons.dlq", partitioning: .explicit(0))
        }
        let report = try await DeadLetterQueue(transport: t, store: store, topic: "coupons.dlq").replay(.all)
        #expect(report.replayed.map(\.deadLetter.record.offset) == [Offset(0)])
        #expect(report.skipped.map(\.reason) == [.sameAsAnother])
        #expect(report.skipped.first?.why == "same key and payload as 0@0, republished by this replay")
        #expect(t.records(topic: "coupons", partition: 1).count == 1)
    }

    /// Replay reads the whole dead-letter topic, however long: more than the 10,000 entries a
    /// single listing once stopped at, over two partitions. What it republishes is processed
    /// once; replaying everything again republishes only what the consumer has not processed.
    @Test func replayPagesThroughMoreThanTenThousandEntries() async throws {
        let (t, store, consumer) = try Self.sale(poison: -1, fixed: Switch())
        try t.createTopic("coupons.dlq2", partitions: 2)
        let count = 10_050
        let letters = (0..<count).map { i -> OutgoingRecord in
            let r = CouponRequest(requestId: Int64(i), couponId: 1, memberId: Int64(1_000 + i))
            return OutgoingRecord(key: r.recordKey, payload: r.payload, headers: [
                DeadLetterHeaders.reason: "gave up after 3 attempts", DeadLetterHeaders.originalTopic: "coupons",
                DeadLetterHeaders.originalPartition: "1", DeadLetterHeaders.originalOffset: "\(i)",
                DeadLetterHeaders.idempotencyKey: r.key.rawValue,
            ])
        }
        // 6,000 entries in partition 0, 4,050 in partition 1.
        for start in stride(from: 0, to: count, by: 1_000) {
            let chunk = Array(letters[start..<min(count, start + 1_000)])
            let report = try await t.publish(chunk, to: "coupons.dlq2", partitioning: .explicit(PartitionID(start < 6_000 ? 0 : 1)))
            #expect(report.allAccepted)
        }
        let dlq = DeadLetterQueue(transport: t, store: store, topic: "coupons.dlq2")

        // Pages: 4,000 + 4,000 (across the partition boundary) + 2,050, then no cursor.
        var pages: [Int] = []
        var next: RecordPosition?
        repeat {
            let page = try await dlq.page(from: next, limit: 4_000)
            pages.append(page.letters.count)
            next = page.next
        } while next != nil && pages.count < 10
        #expect(pages == [4_000, 4_000, 2_050])
        #expect(try await dlq.page(from: RecordPosition(partition: PartitionID(1), offset: Offset(4_040)), limit: 10).next == nil,
                "a page that ends at the end of the last partition says so")
        #expect(try await dlq.list().count == count)

        let first = try await dlq.replay(.all)
        #expect(first.replayed.count == count && first.skipped.isEmpty, "every entry, not the first 10,000")
        #expect(t.records(topic: "coupons", partition: 1).count == count)
        try await Self.drain(consumer, t)
        let again = try await dlq.replay(.all)
        #expect(again.replayed.isEmpty, "all processed: nothing goes back twice")
        #expect(again.skipped.count == count && again.skipped.allSatisfy { $0.reason == .answered })
        #expect(t.records(topic: "coupons", partition: 1).count == count)
        let ledger = try await CouponLedger.read(from: store, coupons: [1])
        #expect(ledger.count == 10 && Set(ledger.map(\.memberId)).count == 10, "stock 10: issued once each, the rest sold out")
    }
}
