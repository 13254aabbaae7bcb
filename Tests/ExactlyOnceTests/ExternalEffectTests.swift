import CouponKit
import ExactlyOnce
import ExactlyOnceTestKit
import Synchronization
import Testing

/// An external "database" the store cannot make atomic with its records: the G3 external-effect case.
final class ExternalTable: Sendable {
    let rows = Mutex<[IdempotencyKey: Int]>([:])
    /// INSERT ... ON CONFLICT (key) DO NOTHING.
    func insertUnique(_ key: IdempotencyKey) { rows.withLock { if $0[key] == nil { $0[key] = 1 } } }
    /// A plain INSERT with no constraint.
    func insertBlind(_ key: IdempotencyKey) { rows.withLock { $0[key, default: 0] += 1 } }
    var maxCopies: Int { rows.withLock { $0.values.max() ?? 0 } }
    var keys: Set<IdempotencyKey> { rows.withLock { Set($0.keys) } }
}

/// Docs/Guarantees.md: with an effect outside the store, exactly-once needs a unique constraint
/// on the idempotency key (or a conditional write on the token); without one, a crash between
/// the write and the completion (F4) repeats the effect. Both halves are checked here.
@Suite struct ExternalEffectTests {
    static func run(seed: UInt64, unique: Bool) async throws -> (ExternalTable, Set<IdempotencyKey>, SimulationReport) {
        let workload = FlashSaleWorkload(seed: seed)
        var config = SimulationConfiguration(seed: seed)
        config.crashRate = 0.05
        let table = ExternalTable()
        let sim = try Simulator<InMemoryDedupeStore>(configuration: config)
        let (report, store) = try await sim.run(
            records: workload.requests.filter { $0.memberId != workload.poisonMember && $0.variant == 0 }.map(\.outgoing),
            partitioning: .modulo, makeStore: { clock in try InMemoryDedupeStore(clock: clock) },
            key: CouponRequest.keyExtractor,
            handler: { ctx in
                if unique { table.insertUnique(ctx.key) } else { table.insertBlind(ctx.key) }
                return .applied()
            })
        let keys = Set(report.log.compactMap { try? CouponRequest.keyExtractor($0) })
        let records = try await store.records(for: Array(keys))
        let applied = Set(records.filter { $0.value.outcome?.status == .applied }.keys)
        return (table, applied, report)
    }

    @Test func uniqueConstraintMakesExternalEffectsExactlyOnce() async throws {
        for seed in UInt64(0)..<300 {
            let (table, applied, report) = try await Self.run(seed: seed, unique: true)
            #expect(report.drained)
            #expect(table.maxCopies <= 1, "seed \(seed)")
            #expect(applied.isSubset(of: table.keys), "seed \(seed): every completed key has its row")
        }
    }

    @Test func withoutAConstraintAnF4CrashRepeatsTheEffect() async throws {
        var doubled = 0
        for seed in UInt64(0)..<300 {
            let (table, _, _) = try await Self.run(seed: seed, unique: false)
            if table.maxCopies > 1 { doubled += 1 }
        }
        #expect(doubled > 0, "the docs say a blind external write is at-least-once; the simulator must be able to show it")
    }
}
