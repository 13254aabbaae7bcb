import CouponKit
import ExactlyOnce
import ServiceLifecycle
import Synchronization
import Testing

/// A transport whose polls and commits fail with `transportUnavailable` while `down` is set: the
/// broker (or Redis behind the transport) is unreachable.
final class FlakyTransport: MessageTransport {
    let base: InMemoryTransport
    init(base: InMemoryTransport) { self.base = base }
    let down = Atomic<Int>(0)  // poll failures left to inject
    let commitsDown = Atomic<Int>(0)  // commit failures left to inject
    let failedPolls = Atomic<Int>(0)
    let failedCommits = Atomic<Int>(0)

    func partitionCount(of topic: String) async throws -> Int { try await base.partitionCount(of: topic) }
    func publish(_ record: OutgoingRecord, to topic: String, partitioning: Partitioning) async throws -> RecordPosition {
        try await base.publish(record, to: topic, partitioning: partitioning)
    }
    func partitionStatus(group: String, topic: String) async throws -> [PartitionStatus] { try await base.partitionStatus(group: group, topic: topic) }
    func read(topic: String, partition: PartitionID, from offset: Offset, maxRecords: Int) async throws -> [ConsumedRecord] {
        try await base.read(topic: topic, partition: partition, from: offset, maxRecords: maxRecords)
    }
    func subscribe(topic: String, group: String, memberID: String) async throws -> Sub {
        Sub(base: try await base.subscribe(topic: topic, group: group, memberID: memberID), owner: self)
    }
    func takeFailure(_ counter: borrowing Atomic<Int>) -> Bool {
        var current = counter.load(ordering: .relaxed)
        while current > 0 {
            let (exchanged, original) = counter.compareExchange(expected: current, desired: current - 1, ordering: .relaxed)
            if exchanged { return true }
            current = original
        }
        return false
    }

    struct Sub: TransportSubscription {
        let base: InMemoryTransport.Subscription
        let owner: FlakyTransport
        var memberID: String { base.memberID }
        var fencingScope: String { base.fencingScope }
        func poll(maxRecords: Int, maxWait: Duration) async throws -> PollResult {
            if owner.takeFailure(owner.down) {
                owner.failedPolls.add(1, ordering: .relaxed)
                throw ExactlyOnceError(.transportUnavailable, "broker unreachable (injected)")
            }
            return try await base.poll(maxRecords: maxRecords, maxWait: maxWait)
        }
        func commit(_ offsets: [PartitionID: Offset], generation: UInt64) async throws {
            if owner.takeFailure(owner.commitsDown) {
                owner.failedCommits.add(1, ordering: .relaxed)
                throw ExactlyOnceError(.transportUnavailable, "broker unreachable (injected)")
            }
            try await base.commit(offsets, generation: generation)
        }
        func seek(_ partition: PartitionID, to offset: Offset) async throws { try await base.seek(partition, to: offset) }
        func committedOffset(_ partition: PartitionID) async throws -> Offset? { try await base.committedOffset(partition) }
        func close() async throws { try await base.close() }
    }
}

@Suite struct TransportOutageTests {
    /// F8 on the transport side: polls and commits fail for a while; the service keeps running,
    /// retries with backoff, and finishes every record exactly once.
    @Test func serviceRidesOutTransportFailures() async throws {
        let t = FlakyTransport(base: try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1]))
        let store = try InMemoryDedupeStore()
        for i in 0..<300 as Range<Int64> {
            _ = try await t.publish(CouponRequest(requestId: i, couponId: i % 4, memberId: i).outgoing, to: "coupons", partitioning: .modulo)
        }
        var c = config("svc")
        c.pollWait = .milliseconds(1)
        c.maxPollRecords = 16
        c.unavailableBackoff.initial = .milliseconds(1)
        c.unavailableBackoff.maximum = .milliseconds(4)
        let consumer = try ExactlyOnceConsumer(transport: t, store: store, configuration: c, logger: quietLogger,
                                               key: CouponRequest.keyExtractor,
                                               handler: CouponIssuer(stock: Dictionary(uniqueKeysWithValues: (0..<4).map { ($0, 50) })).handler)
        let group = ServiceGroup(configuration: .init(services: [consumer], logger: quietLogger))
        try await withThrowingTaskGroup(of: Void.self) { tg in
            tg.addTask { try await group.run() }
            // Outages in bursts while the service runs.
            for _ in 0..<2000 where !t.base.isFullyCommitted(group: "g", topic: "coupons") {
                if t.down.load(ordering: .relaxed) == 0 && t.failedPolls.load(ordering: .relaxed) + t.failedCommits.load(ordering: .relaxed) < 40 {
                    t.down.store(5, ordering: .relaxed)
                    t.commitsDown.store(2, ordering: .relaxed)
                }
                try await Task.sleep(for: .milliseconds(2))
            }
            await group.triggerGracefulShutdown()
            try await tg.waitForAll()
        }
        #expect(t.base.isFullyCommitted(group: "g", topic: "coupons"))
        #expect(t.failedPolls.load(ordering: .relaxed) > 0, "polls failed while the service ran")
        #expect(t.failedCommits.load(ordering: .relaxed) > 0, "commits failed while the service ran")
        let ledger = try await CouponLedger.read(from: store, coupons: Array(0..<4))
        #expect(ledger.count == 200)
        #expect(Set(ledger.map { "\($0.couponId):\($0.memberId)" }).count == 200)
    }
}
