import Foundation
@testable import ExactlyOnceRedis
import TestSupport
import Testing

/// The coupon demo as real processes on one throwaway redis-server: several consumer processes
/// sharing a sale, one killed with SIGKILL and replaced; a whole run killed and rerun; a run
/// during which redis-server is killed and restarted. Every scenario ends with the demo's audit
/// (ledger read back from Redis against the requests regenerated from the seed) and an
/// independent check of the ledger file.
@Suite("Redis multi-process", .serialized, .timeLimit(.minutes(5)))
struct RedisMultiProcessTests {
    static var demo: URL { ChildProcess.builtProduct("coupon-demo") }

    static func scratch() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("eo-multi-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir
    }

    /// How many records the sale's consumer group has committed, read straight from Redis.
    static func committed(_ server: RedisTestServer) throws -> Int {
        let c = try RedisConnection.connect(server.unixConfiguration)
        guard case .array(let keys) = try c.command(["KEYS", "coupon-demo:*:committed"].map { Array($0.utf8) }) else { return 0 }
        var total = 0
        for case .string(let key) in keys {
            guard case .array(let fields) = try c.command([Array("HVALS".utf8), key]) else { continue }
            for case .string(let v) in fields { total += Int(String(decoding: v, as: UTF8.self)) ?? 0 }
        }
        return total
    }

    /// Runs the audit role and checks its verdict and the ledger file independently.
    static func audit(_ sale: [String], requests: Int, coupons: Int64, stock: Int64, in dir: URL) async throws {
        let ledger = dir.appendingPathComponent("ledger.jsonl").path
        let requestsOut = dir.appendingPathComponent("requests.jsonl").path
        let auditor = try ChildProcess(Self.demo, sale + ["--role", "audit", "--json", "--ledger", ledger, "--requests-out", requestsOut], outputIn: dir, name: "audit")
        let status = await auditor.wait()
        #expect(status == 0, "audit failed: \(auditor.stdout) \(auditor.stderr)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(auditor.stdout.utf8)) as? [String: Any], "\(auditor.stderr)")
        for field in ["overIssued", "doubleIssued", "lost", "fcfsViolations"] {
            #expect(json[field] as? Int == 0, "\(field) in \(auditor.stdout)")
        }
        #expect(json["requests"] as? Int == requests)
        // The audit times no sale: its rate is null, its elapsed time its own (small).
        #expect(json["recordsPerSecond"] is NSNull, "audit rate: \(String(describing: json["recordsPerSecond"]))")
        #expect((json["elapsedSeconds"] as? Double ?? 99) < 30)

        // Independently of the demo's audit: the winners in serial order are the first `stock`
        // distinct members of each coupon in publish order, and nobody holds a coupon twice.
        let check = try DemoLedgerCheck(requestsPath: requestsOut, ledgerPath: ledger, stock: stock)
        let issued = check.issued
        #expect(check.actualWinners == check.expectedWinners)
        #expect(issued.count == Int(coupons * stock), "demand exceeds stock, so everything sells")
    }

    func saleArguments(_ server: RedisTestServer, seed: Int, requests: Int, extra: [String] = []) -> [String] {
        ["--store", "redis", "--transport", "redis-streams", "--redis-url", "unix://\(server.socketPath)",
         "--requests", "\(requests)", "--coupons", "4", "--stock", "150", "--members", "3000", "--partitions", "4",
         "--seed", "\(seed)", "--session-timeout", "2"] + extra
    }

    /// G1-G3 across processes: three consumer processes and a publisher share one sale; one
    /// consumer is SIGKILLed mid-sale and a replacement (a new member) joins; the dead member's
    /// partitions move on once its session lapses, its unfinished records are read again by
    /// their new owner, and the dedupe store turns repeats into replays.
    @Test func threeConsumerProcessesOneKilledAndReplaced() async throws {
        try await RedisTestServer.with { server in
            let dir = try Self.scratch()
            defer { try? FileManager.default.removeItem(at: dir) }
            let requests = 12_000
            let sale = saleArguments(server, seed: 31, requests: requests, extra: ["--crash-rate", "0.001"])
            var consumers = try (0..<3).map { try ChildProcess(Self.demo, sale + ["--role", "consume", "--member-id", "proc-\($0)"], outputIn: dir, name: "consumer-\($0)") }
            let publisher = try ChildProcess(Self.demo, sale + ["--role", "publish", "--json"], outputIn: dir, name: "publisher")

            // Kill consumer 1 once the sale is well under way, and start its replacement.
            let deadline = ContinuousClock.now + .seconds(90)
            while try Self.committed(server) < requests / 5 && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            let before = try Self.committed(server)
            #expect(before < requests, "the kill must land mid-sale (committed \(before) of \(requests))")
            consumers[1].kill()
            _ = await consumers[1].wait()
            #expect(consumers[1].wasSignalled)
            consumers.append(try ChildProcess(Self.demo, sale + ["--role", "consume", "--member-id", "proc-1-restarted"], outputIn: dir, name: "consumer-1b"))

            #expect(await publisher.wait() == 0, "\(publisher.stderr)")
            for (i, c) in consumers.enumerated() where i != 1 {
                #expect(await c.wait() == 0, "consumer \(i): \(c.stderr)")
            }
            #expect(try Self.committed(server) == requests)
            try await Self.audit(sale, requests: requests, coupons: 4, stock: 150, in: dir)
        }
    }

    /// A whole demo run (publisher and consumers in one process) is SIGKILLed mid-sale and run
    /// again with the same seed: the rerun resumes the publishing, reads the uncommitted records
    /// again, and finishes the sale cleanly.
    @Test func killedRunRerunWithTheSameSeedFinishesCleanly() async throws {
        try await RedisTestServer.with { server in
            let dir = try Self.scratch()
            defer { try? FileManager.default.removeItem(at: dir) }
            let requests = 12_000
            let sale = saleArguments(server, seed: 32, requests: requests, extra: ["--crash-rate", "0.002"])
            let first = try ChildProcess(Self.demo, sale + ["--json"], outputIn: dir, name: "first")
            let killed = await first.kill(when: { ((try? Self.committed(server)) ?? 0) >= requests / 4 })
            _ = await first.wait()
            #expect(killed, "the kill must land mid-sale: \(first.stdout)")
            #expect(try Self.committed(server) < requests)

            let second = try ChildProcess(Self.demo, sale + ["--json"], outputIn: dir, name: "second")
            #expect(await second.wait() == 0, "\(second.stdout) \(second.stderr)")
            try await Self.audit(sale, requests: requests, coupons: 4, stock: 150, in: dir)
        }
    }

    /// F8 for a whole run: redis-server is killed (SIGKILL) mid-sale and started again on the
    /// same socket and data directory (AOF, fsync always). The demo keeps retrying while Redis
    /// is away and finishes the sale cleanly.
    @Test func runSurvivesARedisServerRestart() async throws {
        try await RedisTestServer.with(arguments: ["--appendonly", "yes", "--appendfsync", "always"]) { server in
            let dir = try Self.scratch()
            defer { try? FileManager.default.removeItem(at: dir) }
            let requests = 12_000
            let sale = saleArguments(server, seed: 33, requests: requests, extra: ["--crash-rate", "0.001"])
            let run = try ChildProcess(Self.demo, sale + ["--json"], outputIn: dir, name: "run")
            let deadline = ContinuousClock.now + .seconds(90)
            while try Self.committed(server) < requests / 4 && ContinuousClock.now < deadline && run.isRunning {
                try await Task.sleep(for: .milliseconds(20))
            }
            #expect(run.isRunning, "the restart must land mid-sale: \(run.stdout)")
            await server.stop()
            try await Task.sleep(for: .milliseconds(500))
            try await server.start()
            #expect(await run.wait() == 0, "\(run.stdout) \(run.stderr)")
            let json = try #require(try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any], "\(run.stderr)")
            #expect((json["backendUnavailable"] as? Int ?? 0) > 0, "the run saw Redis go away: \(run.stdout)")
            try await Self.audit(sale, requests: requests, coupons: 4, stock: 150, in: dir)
        }
    }
}
