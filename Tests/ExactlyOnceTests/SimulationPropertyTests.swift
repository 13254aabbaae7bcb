import CouponKit
import ExactlyOnce
import ExactlyOnceTestKit
import Foundation
import PropertyBased
import Testing

/// Property tests: thousands of seeded flash sales with duplicates, crashes at every failure
/// point, rebalances, an unreachable store, zombies and poison records. A failure prints the
/// seed; `SIMULATION_SEED=<n> swift test --filter replaysOneSeed` replays exactly that run.
@Suite struct SimulationPropertyTests {
    static func simulate(seed: UInt64, heavy: Bool = false) async throws -> (SimulationReport, [String]) {
        let workload = FlashSaleWorkload(seed: seed)
        var config = SimulationConfiguration(seed: seed)
        if heavy {
            config.crashRate = 0.06
            config.zombieRate = 0.04
            config.storeFaultRate = 0.08
            config.rebalanceRate = 0.08
        }
        let sim = try Simulator<InMemoryDedupeStore>(configuration: config)
        let (report, store) = try await sim.run(
            records: workload.requests.map(\.outgoing), partitioning: .modulo,
            makeStore: { clock in try InMemoryDedupeStore(clock: clock) },
            key: CouponRequest.keyExtractor, handler: workload.handler())
        return (report, try await checkSale(workload, report: report, store: store, maxAttempts: config.maxAttempts))
    }

    static func simulateBatched(seed: UInt64) async throws -> (SimulationReport, [String]) {
        let workload = FlashSaleWorkload(seed: seed)
        var config = SimulationConfiguration(seed: seed)
        config.crashRate = 0.03
        config.zombieRate = 0.02
        config.storeFaultRate = 0.05
        let sim = try Simulator<BatchingStore>(configuration: config)
        let (report, store) = try await sim.run(
            records: workload.requests.map(\.outgoing), partitioning: .modulo,
            makeStore: { clock in BatchingStore(base: try InMemoryDedupeStore(clock: clock), limit: Int(seed % 7) + 2) },
            key: CouponRequest.keyExtractor, handler: workload.handler())
        return (report, try await checkSale(workload, report: report, store: store, maxAttempts: config.maxAttempts))
    }

    static var seedCount: Int { Int(ProcessInfo.processInfo.environment["SIMULATION_SEEDS"] ?? "") ?? 2000 }

    @Test func noCouponIsEverIssuedTwiceOverSeededSchedules() async throws {
        await checkSeeds(count: Self.seedCount, replay: "") { try await Self.simulate(seed: $0) }
    }

    @Test func heavyFaultsStillKeepTheInvariants() async throws {
        await checkSeeds(count: Self.seedCount / 2, replay: " SIMULATION_HEAVY=1") { try await Self.simulate(seed: $0, heavy: true) }
    }

    /// The same properties when completions are buffered and sent in batches (file and Redis stores).
    @Test func batchedCompletionsKeepTheInvariants() async throws {
        await checkSeeds(count: Self.seedCount / 2, replay: " SIMULATION_BATCHED=1") { try await Self.simulateBatched(seed: $0) }
    }

    /// The simulator must actually reach every failure point and fault kind, or the properties above prove little.
    @Test func faultsReachEveryFailurePoint() async throws {
        var total: [String: Int] = [:]
        var zombies = 0, fenced = 0, crashes = 0, storeFaults = 0, republished = 0, dlq = 0
        for seed in UInt64(0)..<200 {
            let (report, problems) = try await Self.simulate(seed: seed, heavy: true)
            #expect(problems.isEmpty, "seed \(seed): \(problems)")
            for (k, v) in report.faultsByPoint { total[k, default: 0] += v }
            zombies += report.zombies; fenced += report.fencedLanes; crashes += report.crashes
            storeFaults += report.storeFaults; republished += report.republished; dlq += report.deadLetters.count
        }
        for point in FailurePoint.all { #expect(total[point.name, default: 0] > 0, "no crash injected at \(point)") }
        #expect(zombies > 0 && fenced > 0, "zombies \(zombies), fenced lanes \(fenced)")
        #expect(crashes > 0 && storeFaults > 0 && republished > 0 && dlq > 0)
    }

    @Test func aSeedReplaysIdentically() async throws {
        let a = try await Self.simulate(seed: 4242, heavy: true)
        let b = try await Self.simulate(seed: 4242, heavy: true)
        #expect(a.0.summary == b.0.summary)
        #expect(a.0.log == b.0.log)
        #expect(a.0.deadLetters == b.0.deadLetters)
    }

    /// Replays one seed from the environment (`SIMULATION_SEED=<n>`, plus `SIMULATION_HEAVY=1`).
    @Test func replaysOneSeed() async throws {
        let env = ProcessInfo.processInfo.environment
        let seed = UInt64(env["SIMULATION_SEED"] ?? "") ?? 1
        let (report, problems) = env["SIMULATION_BATCHED"] == "1"
            ? try await Self.simulateBatched(seed: seed)
            : try await Self.simulate(seed: seed, heavy: env["SIMULATION_HEAVY"] == "1")
        print("simulation \(report.summary) faults=\(report.faultsByPoint.sorted { $0.key < $1.key })")
        #expect(problems.isEmpty, "\(problems)")
    }
}
