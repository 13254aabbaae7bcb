import ExactlyOnce
import ExactlyOnceTestKit
import Logging
import Synchronization
import TestSupport
import Testing
@testable import ExactlyOnceRedis

@Suite("Redis dedupe store", .serialized, .timeLimit(.minutes(1)))
struct RedisDedupeStoreTests {
    static func key(_ s: String) throws -> IdempotencyKey { try IdempotencyKey(parts: ["coupon", s]) }
    static let fpA = PayloadFingerprint.of(Array("payload-a".utf8))
    static let fpB = PayloadFingerprint.of(Array("payload-b".utf8))

    @Test func claimCompleteReplayAndConflict() async throws {
        try await RedisTestServer.with { server in
            let clock = ManualClock()
            let store = try RedisDedupeStore.testing(server, clock: clock)
            let k = try Self.key("1:100")
            guard case .new(let claim) = try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(10))) else {
                Issue.record("first claim must be new")
                return
            }
            #expect(claim.attempt == 1)
            #expect(claim.leaseExpiresAt == clock.now().advanced(by: .seconds(10)))
            #expect(try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(10)))
                == .inProgress(leaseExpiresAt: claim.leaseExpiresAt))
            #expect(try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpB, lease: .seconds(10)))
                == .conflict(stored: Self.fpA, outcome: nil))

            try await store.complete(Completion(claim: claim, outcome: .rejected("sold out")))
            // G4: a duplicate gets the stored (negative) outcome.
            #expect(try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(10))) == .completed(.rejected("sold out")))
            // G5: same key, different payload, after completion: conflict with the outcome.
            #expect(try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpB, lease: .seconds(10)))
                == .conflict(stored: Self.fpA, outcome: .rejected("sold out")))
            // Completing again with the same token is an idempotent success.
            try await store.complete(Completion(claim: claim, outcome: .rejected("sold out")))

            let record = try #require(try await store.records(for: [k])[k])
            #expect(record.phase == .completed)
            #expect(record.attempts == 1)
            #expect(record.token == claim.token)
            #expect(record.outcome == .rejected("sold out"))
            #expect(record.fingerprint == Self.fpA)
            #expect(try await store.records(for: [try Self.key("absent")]).isEmpty)
        }
    }

    @Test func leaseExpiryTakeoverFencesTheZombie() async throws {
        try await RedisTestServer.with { server in
            let clock = ManualClock()
            let store = try RedisDedupeStore.testing(server, clock: clock)
            let k = try Self.key("2:200")
            guard case .new(let first) = try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(5))) else {
                Issue.record("expected new")
                return
            }
            clock.advance(by: .seconds(5))
            // F11: the lease lapsed; completing now is refused and writes nothing.
            let late = await #expect(throws: ExactlyOnceError.self) {
                try await store.complete(Completion(claim: first, outcome: .applied(), effects: EffectWrites(reads: [:], writes: ["stock": Array("9".utf8)])))
            }
            #expect(late?.code == .fenced)
            #expect(try await store.readState("stock") == VersionedValue(value: nil, version: 0))

            guard case .new(let second) = try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(5))) else {
                Issue.record("an expired lease must be taken over")
                return
            }
            #expect(second.attempt == 2)
            #expect(second.token > first.token)
            let zombie = await #expect(throws: ExactlyOnceError.self) { try await store.complete(Completion(claim: first, outcome: .applied())) }
            #expect(zombie?.code == .fenced)
            let zombieRelease = await #expect(throws: ExactlyOnceError.self) { try await store.release(first, reason: "late") }
            #expect(zombieRelease?.code == .fenced)
            try await store.complete(Completion(claim: second, outcome: .applied("ok")))
            #expect(try await store.records(for: [k])[k]?.outcome == .applied("ok"))
        }
    }

    @Test func releaseKeepsAttemptsAndReason() async throws {
        try await RedisTestServer.with { server in
            let clock = ManualClock()
            let store = try RedisDedupeStore.testing(server, clock: clock)
            let k = try Self.key("3:300")
            for expected in 1...3 {
                guard case .new(let c) = try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(30))) else {
                    Issue.record("a released key must be claimable")
                    return
                }
                #expect(c.attempt == expected)
                try await store.release(c, reason: "handler threw #\(expected)")
                try await store.release(c, reason: "again")  // releasing twice is harmless
                let r = try #require(try await store.records(for: [k])[k])
                #expect(r.phase == .released)
                #expect(r.attempts == expected)
                #expect(r.lastFailure == "handler threw #\(expected)")
                let completeReleased = await #expect(throws: ExactlyOnceError.self) { try await store.complete(Completion(claim: c, outcome: .applied())) }
                #expect(completeReleased?.code == .fenced)
            }
        }
    }

    @Test func effectsCommitAtomicallyWithTheCompletion() async throws {
        try await RedisTestServer.with { server in
            let clock = ManualClock()
            let store = try RedisDedupeStore.testing(server, clock: clock)
            guard case .new(let c1) = try await store.claim(ClaimRequest(key: try Self.key("4:1"), fingerprint: Self.fpA, lease: .seconds(30))),
                  case .new(let c2) = try await store.claim(ClaimRequest(key: try Self.key("4:2"), fingerprint: Self.fpA, lease: .seconds(30))) else {
                Issue.record("expected new claims")
                return
            }
            var t1 = EffectTransaction(store: store)
            var t2 = EffectTransaction(store: store)
            #expect(try await t1.getInt("stock:4") == nil)
            #expect(try await t2.getInt("stock:4") == nil)
            t1.setInt("stock:4", 99)
            t1.set("issued:4:1", [0, 1, 2, 255])
            t2.setInt("stock:4", 98)
            try await store.complete(Completion(claim: c1, outcome: .applied("s1"), effects: t1.effects))
            #expect(try await store.readState("stock:4") == VersionedValue(value: Array("99".utf8), version: 1))
            #expect(try await store.readState("issued:4:1") == VersionedValue(value: [0, 1, 2, 255], version: 1))

            // t2 read version 0 of stock:4, which t1 changed: the completion and its writes are refused.
            let conflict = await #expect(throws: ExactlyOnceError.self) {
                try await store.complete(Completion(claim: c2, outcome: .applied("s2"), effects: t2.effects))
            }
            #expect(conflict?.code == .transactionConflict)
            #expect(try await store.readState("stock:4").value == Array("99".utf8))
            #expect(try await store.records(for: [c2.key])[c2.key]?.phase == .inProgress)

            var t3 = EffectTransaction(store: store)
            let stock = try #require(try await t3.getInt("stock:4"))
            t3.setInt("stock:4", stock - 1)
            t3.remove("issued:4:1")
            try await store.complete(Completion(claim: c2, outcome: .applied("s2"), effects: t3.effects))
            let state = try await store.readState(["stock:4", "issued:4:1", "never"])
            #expect(state["stock:4"] == VersionedValue(value: Array("98".utf8), version: 2))
            #expect(state["issued:4:1"] == VersionedValue(value: nil, version: 2))
            #expect(state["never"] == VersionedValue(value: nil, version: 0))
            // A repeat of a successful completion does not apply its writes again.
            try await store.complete(Completion(claim: c2, outcome: .applied("s2"), effects: EffectWrites(reads: [:], writes: ["stock:4": Array("0".utf8)])))
            #expect(try await store.readState("stock:4") == VersionedValue(value: Array("98".utf8), version: 2))
        }
    }

    @Test func partitionFences() async throws {
        try await RedisTestServer.with { server in
            let clock = ManualClock()
            let store = try RedisDedupeStore.testing(server, clock: clock)
            let old = PartitionFence(scope: "group/coupons/1", epoch: 4)
            let new = PartitionFence(scope: "group/coupons/1", epoch: 5)
            let k = try Self.key("5:500")
            guard case .new(let oldClaim) = try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(60), fence: old)) else {
                Issue.record("expected new")
                return
            }
            // A higher epoch takes over the in-progress claim of a lower epoch, lease or not.
            guard case .new(let newClaim) = try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(60), fence: new)) else {
                Issue.record("a newer owner must take over")
                return
            }
            #expect(newClaim.attempt == 2)
            #expect(newClaim.fence == new)
            // The old epoch is now refused for the whole batch, even for untouched keys.
            let other = try Self.key("5:501")
            let batch = await #expect(throws: ExactlyOnceError.self) {
                try await store.claim([ClaimRequest(key: other, fingerprint: Self.fpA, lease: .seconds(1)),
                                       ClaimRequest(key: other, fingerprint: Self.fpA, lease: .seconds(1), fence: old)])
            }
            #expect(batch?.code == .fenced)
            #expect(try await store.records(for: [other]).isEmpty)
            let completeOld = await #expect(throws: ExactlyOnceError.self) { try await store.complete(Completion(claim: oldClaim, outcome: .applied())) }
            #expect(completeOld?.code == .fenced)
            // Another scope is independent; no fence at all is never fenced.
            #expect(try await store.claim(ClaimRequest(key: other, fingerprint: Self.fpA, lease: .seconds(1),
                                                        fence: PartitionFence(scope: "group/coupons/2", epoch: 1))).isNew)
            try await store.complete(Completion(claim: newClaim, outcome: .applied()))
            let r = try #require(try await store.records(for: [k])[k])
            #expect(r.fence == new)
            #expect(r.phase == .completed)
        }
    }

    @Test func retentionExpiresCompletedRecords() async throws {
        try await RedisTestServer.with { server in
            let clock = ManualClock()
            let store = try RedisDedupeStore.testing(server, clock: clock, retention: .seconds(60))
            let k = try Self.key("6:600")
            guard case .new(let c) = try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(5))) else {
                Issue.record("expected new")
                return
            }
            try await store.complete(Completion(claim: c, outcome: .applied()))
            let r = try #require(try await store.records(for: [k])[k])
            #expect(r.expiresAt == clock.now().advanced(by: .seconds(60)))
            // Redis frees it by itself too.
            let client = try RedisClient(configuration: server.unixConfiguration, logger: Logger(label: "test"))
            let ttl = try #require(try await client.command([Array("PTTL".utf8), store.recordKey(k)]).int64)
            #expect(ttl > 0 && ttl <= 60_000)
            #expect(try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(5))) == .completed(.applied()))
            clock.advance(by: .seconds(60))
            guard case .new(let again) = try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(5))) else {
                Issue.record("a record past its retention is forgotten")
                return
            }
            #expect(again.attempt == 1)
            #expect(again.token > c.token)
        }
    }

    @Test func hugeRetentionIsCapped() async throws {
        try await RedisTestServer.with { server in
            let store = try RedisDedupeStore.testing(server, clock: ManualClock(), retention: .seconds(Int64.max))
            let k = try Self.key("14:1")
            guard case .new(let c) = try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(5))) else {
                Issue.record("expected new")
                return
            }
            try await store.complete(Completion(claim: c, outcome: .applied()))
            #expect(try await store.records(for: [k])[k]?.phase == .completed)
        }
    }

    @Test func largeBatchesAreOneScriptCall() async throws {
        try await RedisTestServer.with { server in
            let store = try RedisDedupeStore.testing(server, clock: ManualClock())
            let keys = try (0..<2000).map { try Self.key("7:\($0)") }
            let requests = keys.map { ClaimRequest(key: $0, fingerprint: Self.fpA, lease: .seconds(5)) }
                + [ClaimRequest(key: keys[0], fingerprint: Self.fpA, lease: .seconds(5))]
            let results = try await store.claim(requests)
            #expect(results.count == 2001)
            let tokens = results.prefix(2000).compactMap { r -> UInt64? in if case .new(let c) = r { c.token.rawValue } else { nil } }
            #expect(tokens == Array(1...2000).map(UInt64.init))
            #expect(results[2000] == .inProgress(leaseExpiresAt: ManualClock().now().advanced(by: .seconds(5))))
        }
    }

    @Test func scriptCacheFlushFallsBackToEval() async throws {
        try await RedisTestServer.with { server in
            let store = try RedisDedupeStore.testing(server, clock: ManualClock())
            #expect(try await store.claim(ClaimRequest(key: try Self.key("8:1"), fingerprint: Self.fpA, lease: .seconds(5))).isNew)
            let client = try RedisClient(configuration: server.unixConfiguration, logger: Logger(label: "test"))
            #expect(try await client.command("SCRIPT", "FLUSH") == .status("OK"))
            #expect(try await store.claim(ClaimRequest(key: try Self.key("8:2"), fingerprint: Self.fpA, lease: .seconds(5))).isNew)
        }
    }

    @Test func concurrentClaimersGetOneClaim() async throws {
        try await RedisTestServer.with { server in
            var c = RedisDedupeStore.Configuration(redis: server.unixConfiguration)
            c.redis.poolSize = 4
            c.keyPrefix = "concurrent:"
            let store = try RedisDedupeStore(configuration: c, clock: SystemWallClock())
            let k = try Self.key("9:900")
            let results = try await withThrowingTaskGroup(of: ClaimResult.self) { group in
                for _ in 0..<64 { group.addTask { try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(60))) } }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(results.filter(\.isNew).count == 1)
            #expect(results.filter { if case .inProgress = $0 { true } else { false } }.count == 63)
        }
    }

    @Test func storeFromURL() async throws {
        try await RedisTestServer.with { server in
            let store = try RedisDedupeStore(url: "unix://\(server.socketPath)?db=2", keyPrefix: "url:", clock: ManualClock())
            let k = try Self.key("13:1")
            #expect(try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(5))).isNew)
            var db2 = server.unixConfiguration
            db2.database = 2
            let client = try RedisClient(configuration: db2, logger: Logger(label: "test"))
            #expect(try await client.command([Array("EXISTS".utf8), store.recordKey(k)]) == .integer(1))
            #expect(try await client.command("EXISTS", "url:token") == .integer(1))
        }
    }

    @Test func prefixesIsolateTenants() async throws {
        try await RedisTestServer.with { server in
            let a = try RedisDedupeStore.testing(server, clock: ManualClock())
            let b = try RedisDedupeStore.testing(server, clock: ManualClock())
            let k = try Self.key("10:1")
            #expect(try await a.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(5))).isNew)
            #expect(try await b.claim(ClaimRequest(key: k, fingerprint: Self.fpB, lease: .seconds(5))).isNew)
            #expect(try await a.removeAll() == 2)  // token counter and one record
            #expect(try await a.records(for: [k]).isEmpty)
            #expect(try await b.records(for: [k]).count == 1)
        }
    }

    /// F8: the server dies mid-run; operations fail with the retriable storeUnavailable (never a
    /// made-up "new"), then recover by themselves once the server is back.
    @Test func serverRestartFailsThenRecovers() async throws {
        try await RedisTestServer.with { server in
            let clock = ManualClock()
            let store = try RedisDedupeStore.testing(server, clock: clock)
            guard case .new(let held) = try await store.claim(ClaimRequest(key: try Self.key("11:0"), fingerprint: Self.fpA, lease: .seconds(30))) else {
                Issue.record("expected new")
                return
            }
            await server.stop()
            for i in 1...4 {
                let error = await #expect(throws: ExactlyOnceError.self) {
                    try await store.claim(ClaimRequest(key: try Self.key("11:\(i)"), fingerprint: Self.fpA, lease: .seconds(30)))
                }
                #expect(error?.code == .storeUnavailable)
                #expect(error?.isRetriable == true)
            }
            let completion = await #expect(throws: ExactlyOnceError.self) { try await store.complete(Completion(claim: held, outcome: .applied())) }
            #expect(completion?.code == .storeUnavailable)
            let read = await #expect(throws: ExactlyOnceError.self) { try await store.readState(["x"]) }
            #expect(read?.code == .storeUnavailable)

            try await server.start()
            // The server lost its data (no persistence in this test) and its script cache: the
            // store reconnects, falls back to EVAL, and claims for real.
            let k = try Self.key("11:5")
            guard case .new(let fresh) = try await store.claim(ClaimRequest(key: k, fingerprint: Self.fpA, lease: .seconds(30))) else {
                Issue.record("claims must work again after the restart")
                return
            }
            try await store.complete(Completion(claim: fresh, outcome: .applied("back")))
            #expect(try await store.records(for: [k])[k]?.outcome == .applied("back"))
            for _ in 0..<4 { try await store.ping() }  // every pooled connection recovered
        }
    }
}


@Suite("Redis durability and logging", .serialized, .timeLimit(.minutes(1)))
struct RedisDurabilityTests {
    /// With `appendfsync always` (what Docs/Redis.md asks for G3 across crashes) a completion
    /// acknowledged before a SIGKILL of the server is still there after the restart: the
    /// duplicate gets the stored outcome, the effect is not applied again, and tokens keep growing.
    @Test func completionsSurviveAServerCrashWithAOF() async throws {
        try await RedisTestServer.with(arguments: ["--appendonly", "yes", "--appendfsync", "always"]) { server in
            let clock = ManualClock()
            let store = try RedisDedupeStore.testing(server, clock: clock)
            let k = try IdempotencyKey(parts: ["coupon", "12", "1200"])
            let fp = PayloadFingerprint.of([1])
            guard case .new(let c) = try await store.claim(ClaimRequest(key: k, fingerprint: fp, lease: .seconds(30))) else {
                Issue.record("expected new")
                return
            }
            try await store.complete(Completion(claim: c, outcome: .applied("serial-1"),
                                                effects: EffectWrites(reads: ["stock": 0], writes: ["stock": Array("99".utf8)])))
            await server.stop()  // SIGKILL
            try await server.start()
            #expect(try await store.claim(ClaimRequest(key: k, fingerprint: fp, lease: .seconds(30))) == .completed(.applied("serial-1")))
            #expect(try await store.readState("stock") == VersionedValue(value: Array("99".utf8), version: 1))
            guard case .new(let next) = try await store.claim(ClaimRequest(key: try IdempotencyKey(parts: ["coupon", "12", "1201"]), fingerprint: fp, lease: .seconds(30))) else {
                Issue.record("expected new")
                return
            }
            #expect(next.token > c.token)
        }
    }

    /// Connection events are logged with the endpoint only, never the password.
    @Test func logsNeverCarryThePassword() async throws {
        let secret = "log-SECRET-pw"
        let sink = LogSink()
        let logger = Logger(label: "redis-test") { _ in sink.handler }
        var c = RedisDedupeStore.Configuration(redis: .testing("/nonexistent/eo-redis.sock"))
        c.redis.password = secret
        c.redis.username = "user"
        var withDebug = logger
        withDebug.logLevel = .trace
        let store = try RedisDedupeStore(configuration: c, logger: withDebug)
        let error = await #expect(throws: ExactlyOnceError.self) { try await store.ping() }
        #expect(error.map { !String(describing: $0).contains(secret) } == true)
        let lines = sink.lines
        #expect(!lines.isEmpty, "the failed connection should have been logged")
        #expect(lines.allSatisfy { !$0.contains(secret) })
    }
}

/// Collects log lines (message and metadata) for assertions.
final class LogSink: Sendable {
    private let storage = Mutex<[String]>([])
    var lines: [String] { storage.withLock { $0 } }
    var handler: Handler { Handler(sink: self) }
    func append(_ line: String) { storage.withLock { $0.append(line) } }

    struct Handler: LogHandler {
        let sink: LogSink
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            sink.append("\(event.level) \(event.message) \(metadata.merging(event.metadata ?? [:]) { $1 })")
        }
    }
}

extension ClaimResult {
    var isNew: Bool { if case .new = self { true } else { false } }
}
