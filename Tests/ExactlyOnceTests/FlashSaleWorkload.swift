import CouponKit
import ExactlyOnce
import ExactlyOnceTestKit
import PropertyBased
import Testing

/// A seeded flash-sale workload for the simulator: a few coupons with small stock, more members
/// than stock, repeated clicks, a conflicting payload now and then (F10) and a poison member
/// whose requests always fail (F12).
struct FlashSaleWorkload {
    var requests: [CouponRequest] = []
    var stock: [Int64: Int64] = [:]
    var poisonMember: Int64 = 13

    init(seed: UInt64) {
        var rng = SeededRandom(seed: seed ^ 0x5eed)
        let coupons = Int64(1 + rng.next() % 3)
        for c in 1...coupons { stock[c] = Int64(1 + rng.next() % 6) }
        let members = Int64(4 + rng.next() % 12)
        let count = 20 + Int(rng.next() % 100)
        var id: Int64 = 0
        for _ in 0..<count {
            id += 1
            let c = Int64(1 + rng.next() % UInt64(coupons))
            let m = Int64(1 + rng.next() % UInt64(members))
            let variant: Int64 = rng.chance(0.04) ? 1 : 0
            requests.append(CouponRequest(requestId: id, couponId: c, memberId: m, variant: variant))
            if rng.chance(0.15), let last = requests.last {  // a double click
                id += 1
                requests.append(CouponRequest(requestId: id, couponId: last.couponId, memberId: last.memberId))
            }
        }
        if rng.chance(0.5) {
            id += 1
            requests.append(CouponRequest(requestId: id, couponId: 1, memberId: poisonMember))
        }
    }

    /// The coupon handler, failing always for the poison member.
    func handler() -> RecordHandler<EffectTransaction> {
        let issuer = CouponIssuer(stock: stock)
        let poison = poisonMember
        return { ctx in
            let (_, m) = try CouponRequest.decode(ctx.record.payload)
            if m == poison { throw PoisonError() }
            return try await issuer.handle(&ctx)
        }
    }

    struct PoisonError: Error {}
}

/// The checks a simulated sale must pass, as messages (empty: all good).
func checkSale(_ workload: FlashSaleWorkload, report: SimulationReport, store: some DedupeStore, maxAttempts: Int) async throws -> [String] {
    var problems: [String] = []
    if !report.drained { problems.append("not drained: some records were never committed") }
    // What was actually published (with producer retries), each coupon's in log order.
    let published = try report.log.map { r -> CouponRequest in
        let (c, m) = try CouponRequest.decode(r.payload)
        return CouponRequest(requestId: 0, couponId: c, memberId: m)
    }
    let ledger = try await CouponLedger.read(from: store, coupons: Array(workload.stock.keys))
    let keys = Array(Set(published.map(\.key)))
    let records = try await store.records(for: keys)
    let poisonKeys = Set(published.filter { $0.memberId == workload.poisonMember }.map(\.key))
    // A healthy record may be given up on only when crashes used up its attempts (F12's bound
    // applies to crashes too: a record that kills its consumer every time is poison).
    var givenUp = Set<IdempotencyKey>()
    for (k, r) in records where r.outcome?.status == .deadLettered && !poisonKeys.contains(k) {
        if r.attempts > maxAttempts { givenUp.insert(k) } else {
            problems.append("key \(k) dead-lettered after only \(r.attempts) attempts")
        }
    }
    let audit = CouponAudit.audit(requests: published, ledger: ledger, stock: workload.stock, records: records,
                                  excluded: poisonKeys.union(givenUp))
    if audit.overIssued != 0 { problems.append("over-issued \(audit.overIssued)") }
    if audit.doubleIssued != 0 { problems.append("double-issued \(audit.doubleIssued)") }
    if audit.lost != 0 { problems.append("lost \(audit.lost)") }
    if audit.fcfsViolations != 0 { problems.append("FCFS violated: \(audit.fcfsViolations) winners differ from the first S distinct members") }
    for k in poisonKeys where records[k]?.outcome?.status != .deadLettered {
        problems.append("poison key \(k) not dead-lettered: \(String(describing: records[k]?.outcome))")
    }
    // Every dead letter is poison or a conflicting payload, and carries a reason.
    for d in report.deadLetters {
        let (_, m) = try CouponRequest.decode(d.payload)
        let isConflict = d.payload.split(separator: UInt8(ascii: ",")).count == 3 || d.headers["x-dead-letter-reason"]?.hasPrefix("conflict") == true
        let key = IdempotencyKey.coupon(couponId: try CouponRequest.decode(d.payload).couponId, memberId: m)
        if m != workload.poisonMember && !isConflict && !givenUp.contains(key) { problems.append("unexpected dead letter for member \(m)") }
        if d.headers["x-dead-letter-reason"] == nil { problems.append("dead letter without a reason") }
    }
    return problems
}

/// The in-memory store advertising batched completions, so the consumer's buffered path (lane
/// overlay, one `complete` call per batch, failures in the middle of a batch) is exercised.
final class BatchingStore: DedupeStore {
    let base: InMemoryDedupeStore
    let limit: Int
    init(base: InMemoryDedupeStore, limit: Int) {
        self.base = base
        self.limit = limit
    }
    var completionBatchLimit: Int { limit }
    func claim(_ requests: [ClaimRequest]) async throws -> [ClaimResult] { try await base.claim(requests) }
    func complete(_ completion: Completion) async throws { try await base.complete(completion) }
    func complete(_ completions: [Completion]) async throws -> BatchCompletion { try await base.complete(completions) }
    func release(_ claim: Claim, reason: String) async throws { try await base.release(claim, reason: reason) }
    func readState(_ keys: [String]) async throws -> [String: VersionedValue] { try await base.readState(keys) }
    func records(for keys: [IdempotencyKey]) async throws -> [IdempotencyKey: DedupeRecord] { try await base.records(for: keys) }
    func listRecords(_ query: RecordQuery) async throws -> RecordPage { try await base.listRecords(query) }
    func reopenDeadLettered(_ key: IdempotencyKey) async throws -> Bool { try await base.reopenDeadLettered(key) }
}

/// Runs `simulate` over `count` random seeds (property-based), recording every seed whose sale
/// has problems or throws, with the environment that replays it (`SIMULATION_SEED=<n>` plus
/// `replay`).
func checkSeeds(count: Int, replay: String, _ simulate: @escaping @Sendable (UInt64) async throws -> (SimulationReport, [String])) async {
    await propertyCheck(count: count, input: Gen.uint64(in: 0 ... .max)) { seed in
        // A simulated sale never suspends on the in-memory store: yield between seeds so the
        // suite's other tests (which wait on timers and child processes) get a thread.
        await Task.yield()
        do {
            let (report, problems) = try await simulate(seed)
            #expect(problems.isEmpty, "\(problems) — \(report.summary); replay with SIMULATION_SEED=\(seed)\(replay)")
        } catch {
            Issue.record("seed \(seed) threw \(error); replay with SIMULATION_SEED=\(seed)\(replay)")
        }
    }
}
