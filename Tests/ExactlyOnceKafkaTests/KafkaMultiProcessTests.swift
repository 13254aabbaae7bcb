import ExactlyOnce
import ExactlyOnceKafka
@testable import ExactlyOnceRedis
import Foundation
import TestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The coupon demo as real processes on Kafka: a standalone mock cluster
/// (`coupon-demo kafka-mock`) for the transport and a throwaway redis-server for the shared
/// dedupe store. Several consumer processes share a sale, one is killed with SIGKILL and
/// replaced; a whole run is killed and rerun. Every scenario ends with the demo's audit (ledger
/// read back from Redis against the requests regenerated from the seed) and an independent
/// check of the ledger file, and the mock cluster is stopped with SIGTERM.
@Suite("Kafka multi-process", .serialized, .timeLimit(.minutes(5)))
struct KafkaMultiProcessTests {
    static var demo: URL { ChildProcess.builtProduct("coupon-demo") }
    static let topic = "coupon-requests"
    static let group = "coupon-issuers"

    static func scratch() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("eo-kafka-multi-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir
    }

    /// A standalone mock cluster in its own process, and its bootstrap servers.
    struct Mock {
        let process: ChildProcess
        let bootstrap: String

        /// Starts `coupon-demo kafka-mock --brokers 3 --bootstrap-file F` and waits for F.
        static func start(in dir: URL) async throws -> Mock {
            let file = dir.appendingPathComponent("bootstrap.txt")
            let process = try ChildProcess(KafkaMultiProcessTests.demo, ["kafka-mock", "--brokers", "3", "--bootstrap-file", file.path],
                                           outputIn: dir, name: "kafka-mock")
            let deadline = ContinuousClock.now + .seconds(60)
            var bootstrap = ""
            while bootstrap.isEmpty && ContinuousClock.now < deadline && process.isRunning {
                bootstrap = ((try? String(contentsOf: file, encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
                if bootstrap.isEmpty { try await Task.sleep(for: .milliseconds(20)) }
            }
            try #require(!bootstrap.isEmpty, "the mock cluster wrote no bootstrap servers: \(process.stderr)")
            // Three brokers, host:port each.
            #expect(bootstrap.split(separator: ",").count == 3, "\(bootstrap)")
            return Mock(process: process, bootstrap: bootstrap)
        }

        /// Records the sale's consumer group has committed, read from the cluster (asked once
        /// the sale's processes are done: a status handle in the sale's group is another client).
        func committed() async throws -> Int {
            try await KafkaTransport(configuration: .init(bootstrapServers: bootstrap)).partitionStatus(group: KafkaMultiProcessTests.group, topic: KafkaMultiProcessTests.topic)
                .reduce(0) { $0 + Int($1.committed?.rawValue ?? 0) }
        }

        /// Stops the cluster with SIGTERM and checks that it exits by itself, cleanly.
        func stop() async {
            process.kill(SIGTERM)
            let status = await process.wait(timeout: .seconds(30))
            #expect(status == 0, "the mock cluster's exit on SIGTERM: \(status) \(process.stderr)")
            #expect(!process.wasSignalled, "the mock cluster handles SIGTERM and exits by itself")
        }
    }

    /// How many requests the sale's consumers have claimed, read straight from the Redis store.
    static func claimed(_ server: RedisTestServer) throws -> Int {
        let c = try RedisConnection.connect(server.unixConfiguration)
        guard case .array(let keys) = try c.command(["KEYS", "coupon-demo:*:store:r:*"].map { Array($0.utf8) }) else { return 0 }
        return keys.count
    }

    /// Runs the audit role and checks its verdict and the ledger file independently.
    static func audit(_ sale: [String], requests: Int, coupons: Int64, stock: Int64, in dir: URL) async throws {
        let ledger = dir.appendingPathComponent("ledger.jsonl").path
        let requestsOut = dir.appendingPathComponent("requests.jsonl").path
        let auditor = try ChildProcess(Self.demo, sale + ["--role", "audit", "--json", "--ledger", ledger, "--requests-out", requestsOut], outputIn: dir, name: "audit")
        let status = await auditor.wait(timeout: .seconds(120))
        #expect(status == 0, "audit failed: \(auditor.stdout) \(auditor.stderr)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(auditor.stdout.utf8)) as? [String: Any], "\(auditor.stderr)")
        for field in ["overIssued", "doubleIssued", "lost", "fcfsViolations"] {
            #expect(json[field] as? Int == 0, "\(field) in \(auditor.stdout)")
        }
        #expect(json["requests"] as? Int == requests)
        #expect(json["transport"] as? String == "kafka")
        #expect(json["store"] as? String == "redis")

        // Independently of the demo's audit: the winners in serial order are the first `stock`
        // distinct members of each coupon in publish order, and nobody holds a coupon twice.
        let check = try DemoLedgerCheck(requestsPath: requestsOut, ledgerPath: ledger, stock: stock)
        let issued = check.issued
        #expect(check.requestCount == requests)
        #expect(check.actualWinners == check.expectedWinners)
        #expect(issued.count == Int(coupons * stock), "demand exceeds stock, so everything sells")
        // Serials of each coupon are 1...stock, each once.
        for (c, entries) in Dictionary(grouping: issued, by: \.couponId) {
            #expect(entries.map(\.serial).sorted() == Array(1...Int64(entries.count)), "serials of coupon \(c)")
        }
    }

    /// The sale's flags: the mock's default 3 partitions, a 3 s session (the mock's shortest
    /// that forms a group), a sale small enough for a debug build on a loaded machine.
    func saleArguments(_ server: RedisTestServer, _ mock: Mock, seed: Int, requests: Int, extra: [String] = []) -> [String] {
        ["--store", "redis", "--redis-url", "unix://\(server.socketPath)", "--transport", "kafka", "--kafka-brokers", mock.bootstrap,
         "--requests", "\(requests)", "--coupons", "4", "--stock", "100", "--members", "1500", "--partitions", "3",
         "--seed", "\(seed)", "--session-timeout", "3"] + extra
    }

    /// Three consumer processes and a publisher share one sale on the mock cluster; one consumer
    /// is SIGKILLed mid-sale and a replacement (a new member) joins. The dead member's
    /// partitions move on once its session lapses, its uncommitted records are read again by
    /// their new owner, and the dedupe store turns repeats into replays: the audit is clean.
    // Disabled: on a loaded machine the group often rebalances for tens of seconds on end. The
    // cause is in librdkafka 2.0.2's mock cluster, not in the consumer: the mock ends a
    // SyncGroup round as soon as the leader's SyncGroup arrives (it carries every member's
    // assignment) and answers a follower whose SyncGroup comes after that with INVALID_REQUEST
    // (seen with `debug=cgrp`: "SyncGroup error: Broker: Invalid request"); that follower
    // rejoins, which starts the round again for every member. With several members, a follower
    // that is late once per round keeps the group rebalancing. A real broker answers a late
    // follower with its assignment. See the issue 11 note.
    @Test(.disabled("librdkafka 2.0.2's mock cluster fails late followers' SyncGroup: long rebalance storms under load (issue 11 note)"))
    func threeConsumerProcessesOneKilledAndReplaced() async throws {
        try await RedisTestServer.with { server in
            let dir = try Self.scratch()
            defer { try? FileManager.default.removeItem(at: dir) }
            let mock = try await Mock.start(in: dir)
            let requests = 4_000
            let sale = saleArguments(server, mock, seed: 41, requests: requests, extra: ["--crash-rate", "0.001"])
            var consumers = try (0..<3).map { try ChildProcess(Self.demo, sale + ["--role", "consume", "--member-id", "proc-\($0)"], outputIn: dir, name: "consumer-\($0)") }
            let publisher = try ChildProcess(Self.demo, sale + ["--role", "publish", "--json"], outputIn: dir, name: "publisher")

            // Kill consumer 1 once the sale is under way, and start its replacement.
            let killed = await consumers[1].kill(when: { ((try? Self.claimed(server)) ?? 0) >= requests / 10 })
            _ = await consumers[1].wait()
            let before = try Self.claimed(server)
            #expect(killed, "consumer 1 still ran when it was killed (claimed \(before)): \(consumers[1].stderr)")
            #expect(before < requests * 8 / 10, "the kill must land mid-sale (claimed \(before) of about \(requests * 8 / 10) distinct requests)")
            #expect(consumers[1].wasSignalled)
            consumers.append(try ChildProcess(Self.demo, sale + ["--role", "consume", "--member-id", "proc-1-restarted"], outputIn: dir, name: "consumer-1b"))

            #expect(await publisher.wait(timeout: .seconds(180)) == 0, "\(publisher.stderr)")
            for (i, c) in consumers.enumerated() where i != 1 {
                #expect(await c.wait(timeout: .seconds(180)) == 0, "consumer \(i): \(c.stderr)")
            }
            #expect(try await mock.committed() == requests)
            try await Self.audit(sale, requests: requests, coupons: 4, stock: 100, in: dir)
            await mock.stop()
        }
    }

    /// A whole demo run (publisher and a consumer in one process) on the mock cluster and Redis
    /// is SIGKILLed mid-sale and run again with the same flags: the rerun resumes the publishing
    /// from the end offsets, reads the uncommitted records again, and finishes the sale cleanly.
    /// One group member per run (`--consumers 1`): with several, the mock cluster's SyncGroup
    /// race (see the disabled test above) can keep the group rebalancing past the test's limits.
    @Test func killedRunRerunWithTheSameFlagsFinishesCleanly() async throws {
        try await RedisTestServer.with { server in
            let dir = try Self.scratch()
            defer { try? FileManager.default.removeItem(at: dir) }
            let mock = try await Mock.start(in: dir)
            let requests = 4_000
            let sale = saleArguments(server, mock, seed: 42, requests: requests, extra: ["--crash-rate", "0.002", "--consumers", "1"])
            let first = try ChildProcess(Self.demo, sale + ["--json"], outputIn: dir, name: "first")
            let killed = await first.kill(when: { ((try? Self.claimed(server)) ?? 0) >= requests / 10 })
            _ = await first.wait()
            #expect(killed, "the kill must land mid-sale: \(first.stdout) \(first.stderr)")
            #expect(first.wasSignalled)
            let claimed = try Self.claimed(server)
            #expect(claimed >= requests / 10, "killed mid-sale (claimed \(claimed))")

            let second = try ChildProcess(Self.demo, sale + ["--json"], outputIn: dir, name: "second")
            #expect(await second.wait(timeout: .seconds(180)) == 0, "\(second.stdout) \(second.stderr)")
            let json = try #require(try JSONSerialization.jsonObject(with: Data(second.stdout.utf8)) as? [String: Any], "\(second.stderr)")
            for field in ["overIssued", "doubleIssued", "lost", "fcfsViolations"] {
                #expect(json[field] as? Int == 0, "\(field) in \(second.stdout)")
            }
            #expect(try await mock.committed() == requests)
            try await Self.audit(sale, requests: requests, coupons: 4, stock: 100, in: dir)
            await mock.stop()
        }
    }
}
