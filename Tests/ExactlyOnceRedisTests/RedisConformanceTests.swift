import ExactlyOnce
import ExactlyOnceTestKit
import TestSupport
import Testing
@testable import ExactlyOnceRedis

@Suite("Redis store conformance", .serialized, .timeLimit(.minutes(1)))
struct RedisConformanceTests {
    /// The test kit's store conformance suite, every check on a fresh key prefix.
    @Test func passesStoreConformance() async throws {
        try await RedisTestServer.with { server in
            try await StoreConformance.run { clock in try RedisDedupeStore.testing(server, clock: clock) }
        }
    }

    /// The same random operations against the in-memory store (the reference `DedupeStateMachine`)
    /// and the Redis store, on one manual clock: every answer, record and state value must match,
    /// fencing tokens included.
    @Test(arguments: [1, 2, 3, 4] as [UInt64])
    func matchesTheReferenceStateMachine(seed: UInt64) async throws {
        try await RedisTestServer.with { server in
            let clock = ManualClock()
            let retention = Duration.seconds(40)
            var memoryConfiguration = InMemoryDedupeStore.Configuration()
            memoryConfiguration.retention = retention
            let reference = try InMemoryDedupeStore(configuration: memoryConfiguration, clock: clock)
            let redis = try RedisDedupeStore.testing(server, clock: clock, retention: retention)
            var rng = SeededRandom(seed: seed)
            let keys = try (0..<6).map { try IdempotencyKey(parts: ["diff", "\($0)"]) }
            let fingerprints = [PayloadFingerprint.of([1]), PayloadFingerprint.of([2])]
            let stateKeys = ["stock", "ledger", "other"]
            var claims: [Claim] = []

            var diverged = false
            func same<T: Equatable>(_ body: (any DedupeStore) async throws -> T, _ what: String, step: Int) async throws {
                if diverged { return }  // report the first divergence only
                let a: Result<T, ExactlyOnceError>
                let b: Result<T, ExactlyOnceError>
                do { a = .success(try await body(reference)) } catch let e as ExactlyOnceError { a = .failure(e) }
                do { b = .success(try await body(redis)) } catch let e as ExactlyOnceError { b = .failure(e) }
                switch (a, b) {
                case (.success(let x), .success(let y)):
                    if x != y { diverged = true }
                    #expect(x == y, "step \(step) \(what): reference \(x) vs redis \(y) (seed \(seed))")
                case (.failure(let x), .failure(let y)):
                    if x.code != y.code { diverged = true }
                    #expect(x.code == y.code, "step \(step) \(what): reference \(x) vs redis \(y) (seed \(seed))")
                default:
                    diverged = true
                    Issue.record("step \(step) \(what): reference \(a) vs redis \(b) (seed \(seed))")
                }
            }

            for step in 0..<250 {
                switch Int.random(in: 0..<10, using: &rng) {
                case 0...3:
                    let requests = (0..<Int.random(in: 1...4, using: &rng)).map { _ in
                        ClaimRequest(key: keys.randomElement(using: &rng)!, fingerprint: Int.random(in: 0..<8, using: &rng) == 0 ? fingerprints[1] : fingerprints[0],
                                     lease: .seconds(Int64.random(in: 1...6, using: &rng)),
                                     fence: Bool.random(using: &rng) ? nil : PartitionFence(scope: "p\(Int.random(in: 0...1, using: &rng))", epoch: UInt64.random(in: 1...4, using: &rng)),
                                     prefetch: Bool.random(using: &rng))
                    }
                    var answered: [ClaimResult] = []
                    try await same({ store in
                        let r = try await store.claim(requests)
                        answered = r
                        return r
                    }, "claim", step: step)
                    for case .new(let c) in answered { claims.append(c) }
                case 4...5 where !claims.isEmpty:
                    let claim = claims.randomElement(using: &rng)!
                    var reads: [String: UInt64] = [:]
                    var writes: [String: [UInt8]?] = [:]
                    for k in stateKeys where Bool.random(using: &rng) {
                        let current = try await reference.readState(k).version
                        reads[k] = Int.random(in: 0..<5, using: &rng) == 0 ? current + 1 : current
                    }
                    for k in stateKeys where Bool.random(using: &rng) {
                        writes[k] = Int.random(in: 0..<4, using: &rng) == 0 ? .some(nil) : .some([UInt8(step & 0xFF), 0, 10])
                    }
                    let completion = Completion(claim: claim, outcome: Outcome(status: .init(rawValue: UInt8.random(in: 0...2, using: &rng)), detail: [UInt8(step & 0xFF)]),
                                                effects: EffectWrites(reads: reads, writes: writes))
                    if Bool.random(using: &rng) {
                        try await same({ try await $0.complete(completion); return true }, "complete", step: step)
                    } else {
                        let batch = [completion] + (0..<Int.random(in: 0...2, using: &rng)).map { _ in
                            Completion(claim: claims.randomElement(using: &rng)!, outcome: .applied())
                        }
                        try await same({ let r = try await $0.complete(batch); return "\(r.applied) \(r.failure?.code.name ?? "-")" }, "complete batch", step: step)
                    }
                case 6 where !claims.isEmpty:
                    let claim = claims.randomElement(using: &rng)!
                    try await same({ try await $0.release(claim, reason: "failed at \(step)"); return true }, "release", step: step)
                case 7:
                    clock.advance(by: .milliseconds(Int64.random(in: 0...3000, using: &rng)))
                default:
                    break
                }
                try await same({ try await $0.records(for: keys) }, "records", step: step)
                try await same({ try await $0.readState(stateKeys) }, "state", step: step)
            }
        }
    }

    /// The flash-sale simulator (crashes, rebalances, zombies, store faults) over the Redis store:
    /// every record ends completed or dead-lettered, and no key completes twice.
    @Test(arguments: [11, 12] as [UInt64])
    func simulatedSaleOverRedis(seed: UInt64) async throws {
        try await RedisTestServer.with { server in
            var config = SimulationConfiguration(seed: seed)
            config.maxTicks = 600
            let sim = try Simulator<RedisDedupeStore>(configuration: config)
            // 120 distinct keys, each published twice.
            let records = (0..<240).map { i in
                OutgoingRecord(key: Array("\(i % 3)".utf8), payload: Array("c\(i % 3):m\(i % 40)".utf8))
            }
            let (report, store) = try await sim.run(
                records: records, partitioning: .modulo,
                makeStore: { clock in try RedisDedupeStore.testing(server, clock: clock) },
                key: { record in
                    try IdempotencyKey(parts: String(decoding: record.payload, as: UTF8.self).split(separator: ":").map(String.init))
                },
                handler: { context in
                    let memberKey = "issued:" + context.key.rawValue
                    let count = try await context.transaction.getInt(memberKey) ?? 0
                    context.transaction.setInt(memberKey, count + 1)
                    return .applied()
                })
            #expect(report.drained, "\(report.summary)")
            #expect(report.crashes + report.storeFaults + report.zombies > 0, "the run injected no faults: \(report.summary)")
            let keys = Set(records.map { try! IdempotencyKey(rawValue: String(decoding: $0.payload, as: UTF8.self)) })
            let recs = try await store.records(for: Array(keys))
            for key in keys {
                #expect(recs[key]?.phase == .completed, "\(key) not completed: \(report.summary)")
                let issued = try await store.readState("issued:" + key.rawValue)
                #expect(issued.value.map { String(decoding: $0, as: UTF8.self) } == "1", "\(key) applied \(String(describing: issued.value)) times")
            }
        }
    }
}
