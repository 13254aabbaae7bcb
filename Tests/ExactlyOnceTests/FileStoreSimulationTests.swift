import CouponKit
import ExactlyOnce
import ExactlyOnceFileStore
import ExactlyOnceTestKit
import Foundation
import PropertyBased
import Testing

/// The seeded flash-sale property test of SimulationPropertyTests, on the file store: every
/// claim and completion goes through the journal and its fsync. Fewer seeds than on the
/// in-memory store (each run syncs a few hundred times); `FILE_SIMULATION_SEEDS=<n>` runs more,
/// `SIMULATION_SEED=<n> swift test --filter replaysOneSeedOnTheFileStore` replays one.
@Suite struct FileStoreSimulationTests {
    static func simulate(seed: UInt64) async throws -> (SimulationReport, [String]) {
        let workload = FlashSaleWorkload(seed: seed)
        var config = SimulationConfiguration(seed: seed)
        config.crashRate = 0.03
        config.zombieRate = 0.02
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("eo-sim-\(seed)-\(UUID().uuidString.prefix(6))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let sim = try Simulator<FileDedupeStore>(configuration: config)
        let (report, store) = try await sim.run(
            records: workload.requests.map(\.outgoing), partitioning: .modulo,
            makeStore: { clock in try await FileDedupeStore.open(FileStoreConfiguration(directory: dir), clock: clock) },
            key: CouponRequest.keyExtractor, handler: workload.handler())
        var problems = try await checkSale(workload, report: report, store: store, maxAttempts: config.maxAttempts)
        // The same checks on what a restarted process would read back from the journal.
        await store.close()
        let reopened = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir))
        problems += try await checkSale(workload, report: report, store: reopened, maxAttempts: config.maxAttempts).map { "after reopen: \($0)" }
        await reopened.close()
        return (report, problems)
    }

    static var seedCount: Int { Int(ProcessInfo.processInfo.environment["FILE_SIMULATION_SEEDS"] ?? "") ?? 500 }

    @Test func noCouponIsEverIssuedTwiceOnTheFileStore() async throws {
        await checkSeeds(count: Self.seedCount, replay: "") { try await Self.simulate(seed: $0) }
    }

    @Test func replaysOneSeedOnTheFileStore() async throws {
        let seed = UInt64(ProcessInfo.processInfo.environment["SIMULATION_SEED"] ?? "") ?? 1
        let (report, problems) = try await Self.simulate(seed: seed)
        print(report.summary)
        #expect(problems.isEmpty, "\(problems)")
    }
}
