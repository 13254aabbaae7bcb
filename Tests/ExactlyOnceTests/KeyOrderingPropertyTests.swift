import CouponKit
import ExactlyOnce
import ExactlyOnceTestKit
import Foundation
import PropertyBased
import Synchronization
import Testing

/// The simulated flash sale with key ordering: one or two partitions, so several coupons share
/// a partition and run concurrently, with crashes at every failure point, rebalances, an
/// unreachable store, zombies and poison records. The same checks as in partition mode: no
/// double issuance, nothing lost, and FCFS winners exact per coupon.
/// `SIMULATION_SEED=<n> swift test --filter replaysOneKeyOrderedSeed` replays one run.
@Suite struct KeyOrderingPropertyTests {
    static func simulate(seed: UInt64, heavy: Bool = false, batched: Bool = false) async throws -> (SimulationReport, [String]) {
        let workload = FlashSaleWorkload(seed: seed)
        var config = SimulationConfiguration(seed: seed)
        config.partitions = 1 + Int(seed % 2)
        config.ordering = .key(maxConcurrency: 2 + Int(seed % 5))
        config.maxPollRecords = 12
        if heavy {
            config.crashRate = 0.06
            config.zombieRate = 0.04
            config.storeFaultRate = 0.08
            config.rebalanceRate = 0.08
        }
        if batched {
            let sim = try Simulator<BatchingStore>(configuration: config)
            let (report, store) = try await sim.run(
                records: workload.requests.map(\.outgoing), partitioning: .modulo,
                makeStore: { clock in BatchingStore(base: try InMemoryDedupeStore(clock: clock), limit: Int(seed % 5) + 2) },
                key: CouponRequest.keyExtractor, handler: workload.handler())
            return (report, try await checkSale(workload, report: report, store: store, maxAttempts: config.maxAttempts))
        }
        let sim = try Simulator<InMemoryDedupeStore>(configuration: config)
        let (report, store) = try await sim.run(
            records: workload.requests.map(\.outgoing), partitioning: .modulo,
            makeStore: { clock in try InMemoryDedupeStore(clock: clock) },
            key: CouponRequest.keyExtractor, handler: workload.handler())
        return (report, try await checkSale(workload, report: report, store: store, maxAttempts: config.maxAttempts))
    }

    static var seedCount: Int { Int(ProcessInfo.processInfo.environment["KEY_SIMULATION_SEEDS"] ?? "") ?? 1000 }

    @Test func keyOrderingKeepsEveryInvariant() async throws {
        await checkSeeds(count: Self.seedCount, replay: " (key ordering)") { try await Self.simulate(seed: $0) }
    }

    @Test func keyOrderingUnderHeavyFaults() async throws {
        await checkSeeds(count: Self.seedCount / 2, replay: " (key ordering, heavy)") { try await Self.simulate(seed: $0, heavy: true) }
    }

    @Test func keyOrderingWithBatchedCompletions() async throws {
        await checkSeeds(count: Self.seedCount / 2, replay: " (key ordering, batched)") { try await Self.simulate(seed: $0, batched: true) }
    }

    /// Key mode must reach every failure point too, and actually run keys concurrently.
    @Test func keyOrderingReachesEveryFailurePoint() async throws {
        var total: [String: Int] = [:]
        var zombies = 0, fenced = 0
        for seed in UInt64(0)..<200 {
            let (report, problems) = try await Self.simulate(seed: seed, heavy: true)
            #expect(problems.isEmpty, "seed \(seed): \(problems)")
            for (k, v) in report.faultsByPoint { total[k, default: 0] += v }
            zombies += report.zombies
            fenced += report.fencedLanes
        }
        for point in FailurePoint.all { #expect(total[point.name, default: 0] > 0, "no crash injected at \(point)") }
        #expect(zombies > 0 && fenced > 0, "zombies \(zombies), fenced lanes \(fenced)")
    }

    @Test func aKeyOrderedSeedReplaysIdentically() async throws {
        let a = try await Self.simulate(seed: 777, heavy: true)
        let b = try await Self.simulate(seed: 777, heavy: true)
        #expect(a.0.summary == b.0.summary)
        #expect(a.0.log == b.0.log)
    }

    @Test func replaysOneKeyOrderedSeed() async throws {
        let env = ProcessInfo.processInfo.environment
        let seed = UInt64(env["SIMULATION_SEED"] ?? "") ?? 1
        let (report, problems) = try await Self.simulate(seed: seed, heavy: env["SIMULATION_HEAVY"] == "1", batched: env["SIMULATION_BATCHED"] == "1")
        print("simulation \(report.summary)")
        #expect(problems.isEmpty, "\(problems)")
    }
}

/// Key ordering, directly: records of one key stay in publish order, different keys of one
/// partition run at the same time (bounded), and the commit never passes an unfinished record.
@Suite struct KeyOrderingTests {
    @Test func keysOfOnePartitionRunConcurrentlyInOrderPerKey() async throws {
        let t = try InMemoryTransport(topics: ["coupons": 1, "coupons.dlq": 1])
        let store = try InMemoryDedupeStore()
        for i in 0..<64 as Range<Int64> {
            for c in 1...8 as ClosedRange<Int64> {
                _ = try await t.publish(CouponRequest(requestId: i * 8 + c, couponId: c, memberId: i).outgoing, to: "coupons", partitioning: .modulo)
            }
        }
        let live = Live()
        var c = config("k")
        c.ordering = .key(maxConcurrency: 4)
        let consumer = try ExactlyOnceConsumer(
            transport: t, store: store, configuration: c, logger: quietLogger, key: CouponRequest.keyExtractor,
            handler: { ctx in
                let (coupon, member) = try CouponRequest.decode(ctx.record.payload)
                live.enter(coupon: coupon, member: member)
                try await Task.sleep(for: .milliseconds(1))
                live.leave()
                ctx.transaction.setInt("seen:\(coupon):\(member)", 1)
                return .applied()
            })
        try await drive([try await consumer.makeSession()], transport: t, topic: "coupons", group: "g")
        let (maxLive, orders) = live.result
        #expect(maxLive > 1, "different keys of one partition ran at the same time")
        #expect(maxLive <= 4, "at most maxConcurrency keys at once (saw \(maxLive))")
        for (coupon, members) in orders {
            #expect(members == Array(0..<64), "coupon \(coupon) handled in publish order")
        }
    }

    @Test func aPausedKeyHoldsTheCommitBelowItsFirstUnfinishedRecord() async throws {
        let t = try InMemoryTransport(topics: ["coupons": 1, "coupons.dlq": 1])
        let store = try InMemoryDedupeStore()
        // Coupon 1's first record is held by another member; coupon 2's records all finish.
        _ = try await t.publish(CouponRequest(requestId: 1, couponId: 1, memberId: 1).outgoing, to: "coupons", partitioning: .modulo)
        for m in 2...6 as ClosedRange<Int64> {
            _ = try await t.publish(CouponRequest(requestId: m, couponId: 2, memberId: m).outgoing, to: "coupons", partitioning: .modulo)
        }
        _ = try await store.claim(ClaimRequest(key: .coupon(couponId: 1, memberId: 1), fingerprint: .of(CouponRequest(requestId: 1, couponId: 1, memberId: 1).payload), lease: .seconds(60)))
        var c = config("k")
        c.ordering = .key(maxConcurrency: 8)
        let consumer = try ExactlyOnceConsumer(transport: t, store: store, configuration: c, logger: quietLogger,
                                               key: CouponRequest.keyExtractor, handler: CouponIssuer(stock: [1: 5, 2: 5]).handler)
        let session = try await consumer.makeSession()
        var processed = 0
        for _ in 0..<5 { processed += try await session.step().processed }
        #expect(processed == 5, "the other key's records finished")
        #expect((t.committedOffsets(group: "g", topic: "coupons")[0]?.rawValue ?? 0) == 0, "the commit stays below the unfinished record at offset 0")
    }
}

/// Tracks how many handlers run at once and each coupon's member order.
final class Live: Sendable {
    private let state = Mutex<(now: Int, max: Int, orders: [Int64: [Int64]])>((0, 0, [:]))
    func enter(coupon: Int64, member: Int64) {
        state.withLock { s in
            s.now += 1
            s.max = max(s.max, s.now)
            s.orders[coupon, default: []].append(member)
        }
    }
    func leave() { state.withLock { $0.now -= 1 } }
    var result: (Int, [Int64: [Int64]]) { state.withLock { ($0.max, $0.orders) } }
}
