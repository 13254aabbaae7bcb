import ExactlyOnce
import ExactlyOnceTestKit
import Testing

@Suite struct InMemoryConformanceTests {
    @Test func inMemoryStorePassesTheStoreConformanceSuite() async throws {
        try await StoreConformance.run { clock in try InMemoryDedupeStore(clock: clock) }
    }

    @Test func inMemoryTransportPassesTheTransportConformanceSuite() async throws {
        try await TransportConformance.run { topic, partitions in try InMemoryTransport(topics: [topic: partitions]) }
    }

    /// The suite must catch a broken store: one that forgets completions.
    @Test func storeConformanceCatchesABrokenStore() async throws {
        await #expect(throws: ConformanceFailure.self) {
            try await StoreConformance.run { clock in ForgetfulStore(base: try InMemoryDedupeStore(clock: clock)) }
        }
    }

    @Test func inMemoryStoreCapacityRejectsOrEvicts() async throws {
        let clock = ManualClock()
        var config = InMemoryDedupeStore.Configuration()
        config.capacity = 2
        let store = try InMemoryDedupeStore(configuration: config, clock: clock)
        let fp = PayloadFingerprint.of([1])
        for i in 0..<2 {
            guard case .new(let c) = try await store.claim(ClaimRequest(key: .coupon(couponId: 1, memberId: Int64(i)), fingerprint: fp, lease: .seconds(5))) else {
                Issue.record("expected new"); return
            }
            try await store.complete(Completion(claim: c, outcome: .applied()))
        }
        await #expect(throws: ExactlyOnceError.self) {
            _ = try await store.claim(ClaimRequest(key: .coupon(couponId: 1, memberId: 9), fingerprint: fp, lease: .seconds(5)))
        }
        config.evictionPolicy = .evictOldestCompleted
        let evicting = try InMemoryDedupeStore(configuration: config, clock: clock)
        for i in 0..<3 {
            guard case .new(let c) = try await evicting.claim(ClaimRequest(key: .coupon(couponId: 1, memberId: Int64(i)), fingerprint: fp, lease: .seconds(5))) else {
                Issue.record("expected new"); return
            }
            try await evicting.complete(Completion(claim: c, outcome: .applied()))
        }
        #expect(evicting.count == 2)
        #expect(try await evicting.records(for: [.coupon(couponId: 1, memberId: 0)]).isEmpty, "the oldest completed record is the one evicted")
    }

    @Test func retentionForgetsCompletedRecordsAfterTheirTime() async throws {
        let clock = ManualClock()
        var config = InMemoryDedupeStore.Configuration()
        config.retention = .seconds(60)
        let store = try InMemoryDedupeStore(configuration: config, clock: clock)
        let key = IdempotencyKey.coupon(couponId: 1, memberId: 1)
        let fp = PayloadFingerprint.of([1])
        guard case .new(let c) = try await store.claim(ClaimRequest(key: key, fingerprint: fp, lease: .seconds(5))) else { Issue.record("new"); return }
        try await store.complete(Completion(claim: c, outcome: .applied()))
        clock.advance(by: .seconds(59))
        #expect(try await store.claim(ClaimRequest(key: key, fingerprint: fp, lease: .seconds(5))) == .completed(.applied()))
        clock.advance(by: .seconds(2))
        #expect(store.purgeExpired() == 1)
        guard case .new(let again) = try await store.claim(ClaimRequest(key: key, fingerprint: fp, lease: .seconds(5))) else { Issue.record("new after retention"); return }
        #expect(again.attempt == 1)
    }

    /// A durable store outlives the in-memory transport: a restarted transport's epochs start
    /// low again, so each instance is its own fencing scope. The store keeps the old instance's
    /// high epoch and still serves the new instance's members (fences never cross scopes), and
    /// a key the dead process held is taken over once its lease lapses.
    @Test func aRestartedTransportIsANewFencingScope() async throws {
        let clock = ManualClock()
        let store = try InMemoryDedupeStore(clock: clock)
        let first = try InMemoryTransport(topics: ["t": 1], clock: clock)
        let a = try await first.subscribe(topic: "t", group: "g", memberID: "a")
        // Each newcomer sorts first, so partition 0 changes owner (and epoch) every time.
        for i in 1...50 { _ = try await first.subscribe(topic: "t", group: "g", memberID: String(repeating: "0", count: i) + "m") }
        let oldEpoch = first.assignment(group: "g", topic: "t")[0]!.epoch
        let fp = PayloadFingerprint.of([1])
        _ = try await store.claim([ClaimRequest(key: .coupon(couponId: 1, memberId: 1), fingerprint: fp, lease: .seconds(30),
                                                fence: PartitionFence(scope: a.fencingScope + "/0", epoch: oldEpoch))])
        let second = try InMemoryTransport(topics: ["t": 1], clock: clock)
        let b = try await second.subscribe(topic: "t", group: "g", memberID: "b")
        let newEpoch = try await b.poll(maxRecords: 1).assignment[0]!
        #expect(newEpoch < oldEpoch, "a new instance counts epochs from the start")
        #expect(b.fencingScope != a.fencingScope)
        let fence = PartitionFence(scope: b.fencingScope + "/0", epoch: newEpoch)
        // Not fenced: other keys are claimed at once...
        guard case .new = try await store.claim([ClaimRequest(key: .coupon(couponId: 1, memberId: 2), fingerprint: fp, lease: .seconds(30), fence: fence)])[0] else {
            Issue.record("a low epoch in a new scope must not be fenced"); return
        }
        // ...and the dead process's key waits for its lease, then is taken over.
        let held = try await store.claim([ClaimRequest(key: .coupon(couponId: 1, memberId: 1), fingerprint: fp, lease: .seconds(30), fence: fence)])
        guard case .inProgress = held[0] else { Issue.record("another scope's live claim is respected, got \(held)"); return }
        clock.advance(by: .seconds(31))
        guard case .new = try await store.claim([ClaimRequest(key: .coupon(couponId: 1, memberId: 1), fingerprint: fp, lease: .seconds(30), fence: fence)])[0] else {
            Issue.record("taken over after the lease"); return
        }
    }

    @Test func transportExpelsMembersWhoseSessionLapsed() async throws {
        let clock = ManualClock()
        var config = InMemoryTransport.Configuration()
        config.sessionTimeout = .seconds(10)
        let t = try InMemoryTransport(topics: ["t": 2], configuration: config, clock: clock)
        let a = try await t.subscribe(topic: "t", group: "g", memberID: "a")
        let b = try await t.subscribe(topic: "t", group: "g", memberID: "b")
        _ = try await a.poll(maxRecords: 1)
        let before = try await b.poll(maxRecords: 1).assignment
        #expect(before.count == 1)
        clock.advance(by: .seconds(6))
        _ = try await b.poll(maxRecords: 1)
        clock.advance(by: .seconds(6))
        let after = try await b.poll(maxRecords: 1).assignment
        #expect(after.count == 2, "a's session lapsed: b owns both partitions")
        let moved = after.keys.first { before[$0] == nil }!
        #expect(after[moved]! > (before.values.max() ?? 0))
        await #expect(throws: ExactlyOnceError.self) { _ = try await a.poll(maxRecords: 1) }
    }
}

/// A deliberately broken store: completions are forgotten. Used to prove the suite has teeth.
final class ForgetfulStore: DedupeStore {
    let base: InMemoryDedupeStore
    init(base: InMemoryDedupeStore) { self.base = base }
    func claim(_ requests: [ClaimRequest]) async throws -> [ClaimResult] { try await base.claim(requests) }
    func complete(_ completion: Completion) async throws { try await base.release(completion.claim, reason: "forgot") }
    func release(_ claim: Claim, reason: String) async throws { try await base.release(claim, reason: reason) }
    func readState(_ keys: [String]) async throws -> [String: VersionedValue] { try await base.readState(keys) }
    func records(for keys: [IdempotencyKey]) async throws -> [IdempotencyKey: DedupeRecord] { try await base.records(for: keys) }
    func listRecords(_ query: RecordQuery) async throws -> RecordPage { try await base.listRecords(query) }
    func reopenDeadLettered(_ key: IdempotencyKey) async throws -> Bool { try await base.reopenDeadLettered(key) }
}
