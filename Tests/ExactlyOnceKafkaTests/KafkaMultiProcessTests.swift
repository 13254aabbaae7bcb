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

        /// Starts `coupon-demo kafka-mock --brokers 3 --partitions P --bootstrap-file F` and waits for F.
        static func start(in dir: URL, partitions: Int = 3) async throws -> Mock {
            let file = dir.appendingPathComponent("bootstrap.txt")
            let process = try ChildProcess(KafkaMultiProcessTests.demo, ["kafka-mock", "--brokers", "3", "--partitions", "\(partitions)", "--bootstrap-file", file.path],
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

        /// Reads the sale's whole topic back and checks where each record is: on the partition
        /// Kafka's murmur2 partitioner (Java's, kcat's) gives its key, the coupon id.
        func expectMurmur2Placement(requests: Int) async throws {
            let reader = try KafkaTransport(configuration: .init(bootstrapServers: bootstrap))
            let ends = try await reader.endOffsets(topic: KafkaMultiProcessTests.topic)
            var total = 0
            var misplaced: [String] = []
            for (p, end) in ends {
                var next: Int64 = 0
                while next < end.rawValue {
                    let got = try await reader.read(topic: KafkaMultiProcessTests.topic, partition: p, from: Offset(next), maxRecords: 1_000)
                    try #require(!got.isEmpty, "partition \(p) ends at \(end) but reads stop at \(next)")
                    for r in got where try Murmur2Partitioner().partition(forKey: r.key ?? [], partitionCount: ends.count) != p {
                        misplaced.append("\(p)@\(r.offset) key \(String(decoding: r.key ?? [], as: UTF8.self))")
                    }
                    next = got.last!.offset.rawValue + 1
                    total += got.count
                }
            }
            #expect(total == requests)
            #expect(misplaced.isEmpty, "records not on their key's murmur2 partition: \(misplaced.prefix(5))")
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
    func saleArguments(_ server: RedisTestServer, _ mock: Mock, seed: Int, requests: Int, partitions: Int = 3, extra: [String] = []) -> [String] {
        ["--store", "redis", "--redis-url", "unix://\(server.socketPath)", "--transport", "kafka", "--kafka-brokers", mock.bootstrap,
         "--requests", "\(requests)", "--coupons", "4", "--stock", "100", "--members", "1500", "--partitions", "\(partitions)",
         "--seed", "\(seed)", "--session-timeout", "3"] + extra
    }

    /// The partitions a consumer process owns now, replayed from the "assignment changed" lines
    /// its `--log-level info` log writes (`assigned=[0, 2] member=... revoked=[]`).
    static func owned(by consumer: ChildProcess) -> Set<Int> {
        var owned = Set<Int>()
        for line in consumer.stderr.split(separator: "\n") where line.hasSuffix("assignment changed") {
            func partitions(_ field: String) -> [Int] {
                guard let open = line.range(of: " \(field)=[") else { return [] }
                let rest = line[open.upperBound...]
                guard let close = rest.firstIndex(of: "]") else { return [] }
                return rest[..<close].split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
            }
            owned.subtract(partitions("revoked"))
            owned.formUnion(partitions("assigned"))
        }
        return owned
    }

    /// Waits until `consumers` own the sale's 3 partitions between them, each at least one.
    static func awaitGroup(_ consumers: [ChildProcess], within timeout: Duration = .seconds(90)) async throws {
        let deadline = ContinuousClock.now + timeout
        while true {
            let owned = consumers.map(Self.owned(by:))
            let all = owned.reduce(into: Set<Int>()) { $0.formUnion($1) }
            if all == [0, 1, 2] && owned.allSatisfy({ !$0.isEmpty }) && owned.map(\.count).reduce(0, +) == 3 { return }
            for c in consumers where !c.isRunning { throw SaleFailure(description: "a consumer exited while the group formed: \(c.stderr.suffix(2000))") }
            guard ContinuousClock.now < deadline else {
                throw SaleFailure(description: "the group did not form within \(timeout): each consumer owns \(owned)")
            }
            try await Task.sleep(for: .milliseconds(50))
        }
    }

    /// Three consumer processes and a publisher share one sale on the mock cluster; one consumer
    /// is SIGKILLed mid-sale and a replacement (a new member) joins at once. The dead member's
    /// partition moves on (to the replacement, or to a survivor once its session lapses), its
    /// uncommitted records are read again by their new owner, and the dedupe store turns
    /// repeats into replays: the audit is clean.
    ///
    /// The group forms before the sale starts, one member at a time (proc-0 first, so it is the
    /// group's leader: the mock cluster elects the longest-standing member even when it is dead,
    /// and a dead leader costs a round that waits out its session). What made this test flaky
    /// before was the consumers' own commits: with librdkafka before 2.8.3 a commit in flight
    /// when a member rejoins resets its new generation and starts the next rebalance
    /// (confluentinc/librdkafka#4059), which the transport now avoids by holding commits while
    /// the group rebalances (`CommitHold`). The mock's own late-SyncGroup defect (a follower whose
    /// SyncGroup comes after the leader's gets INVALID_REQUEST and joins again) can still add a
    /// round now and then.
    @Test func threeConsumerProcessesOneKilledAndReplaced() async throws {
        try await RedisTestServer.with { server in
            let dir = try Self.scratch()
            defer { try? FileManager.default.removeItem(at: dir) }
            let mock = try await Mock.start(in: dir)
            let requests = 4_000
            let sale = saleArguments(server, mock, seed: 41, requests: requests, extra: ["--crash-rate", "0.001"])
            func consumer(_ name: String) throws -> ChildProcess {
                try ChildProcess(Self.demo, sale + ["--role", "consume", "--member-id", name, "--log-level", "info"], outputIn: dir, name: name)
            }
            var consumers = [try consumer("proc-0")]
            try await Self.awaitGroup(consumers)
            consumers += [try consumer("proc-1"), try consumer("proc-2")]
            try await Self.awaitGroup(consumers)
            let publisher = try ChildProcess(Self.demo, sale + ["--role", "publish", "--json"], outputIn: dir, name: "publisher")

            // Kill consumer 1 once the sale is under way, and start its replacement.
            let killed = await consumers[1].kill(when: { ((try? Self.claimed(server)) ?? 0) >= requests / 10 })
            _ = await consumers[1].wait()
            let before = try Self.claimed(server)
            #expect(killed, "consumer 1 still ran when it was killed (claimed \(before)): \(consumers[1].stderr.suffix(2000))")
            #expect(before < requests * 8 / 10, "the kill must land mid-sale (claimed \(before) of about \(requests * 8 / 10) distinct requests)")
            #expect(consumers[1].wasSignalled)
            consumers.append(try consumer("proc-1-restarted"))

            #expect(await publisher.wait(timeout: .seconds(180)) == 0, "\(publisher.stderr)")
            for (i, c) in consumers.enumerated() where i != 1 {
                #expect(await c.wait(timeout: .seconds(180)) == 0, "consumer \(i): \(c.stdout) \(c.stderr.suffix(3000))")
            }
            #expect(try await mock.committed() == requests)
            try await mock.expectMurmur2Placement(requests: requests)
            try await Self.audit(sale, requests: requests, coupons: 4, stock: 100, in: dir)
            await mock.stop()
        }
    }

    /// A whole demo run (publisher and a consumer in one process) on the mock cluster and Redis
    /// is SIGKILLed mid-sale and run again with the same flags: the rerun resumes the publishing
    /// from the end offsets, reads the uncommitted records again, and finishes the sale cleanly.
    /// Each run has the demo's three group members: the kill ends all three at once, and the
    /// rerun's members join a group whose dead members hold their partitions until their
    /// sessions lapse (and the mock elects a dead leader first).
    @Test func killedRunRerunWithTheSameFlagsFinishesCleanly() async throws {
        try await RedisTestServer.with { server in
            let dir = try Self.scratch()
            defer { try? FileManager.default.removeItem(at: dir) }
            let mock = try await Mock.start(in: dir)
            let requests = 4_000
            let sale = saleArguments(server, mock, seed: 42, requests: requests, extra: ["--crash-rate", "0.002"])
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

    /// A consumer process's stall timeout. Alone, with nothing published, it gives up after
    /// `--stall-timeout` with the stall error and exits (its consumer stops: the error does not
    /// wait for the sale that will never end). Beside a member that owns the only partition, it
    /// idles through a sale longer than its stall timeout (the owner is slowed down with
    /// SIGSTOP/SIGCONT) and exits 0 when the sale is over: the group's progress counts, not only
    /// its own.
    @Test func aStalledConsumerProcessGivesUpAndAnIdleOneWaitsOutTheSale() async throws {
        try await RedisTestServer.with { server in
            let dir = try Self.scratch()
            defer { try? FileManager.default.removeItem(at: dir) }
            let mock = try await Mock.start(in: dir, partitions: 1)
            let requests = 90_000  // the mock keeps at most 100,000 records per partition
            let sale = saleArguments(server, mock, seed: 44, requests: requests, partitions: 1, extra: ["--crash-rate", "0"])
            // The lone and the idle member stall after 5 s. The owner gets 60 s: its clock runs
            // from its own start, through the idle member's join and the publisher's start, and
            // under CI load that took over 5 s once (the owner gave up before the first record
            // and the idle member consumed the sale).
            func consumer(_ name: String, stallTimeout: Int = 5) throws -> ChildProcess {
                try ChildProcess(Self.demo, sale + ["--role", "consume", "--member-id", name, "--stall-timeout", "\(stallTimeout)", "--log-level", "info", "--json"],
                                 outputIn: dir, name: name)
            }

            let lone = try consumer("lone")
            let started = ContinuousClock.now
            #expect(await lone.wait(timeout: .seconds(90)) == 1, "a sale with nothing published stalls: \(lone.stdout) \(lone.stderr.suffix(2000))")
            #expect(ContinuousClock.now - started < .seconds(60), "the stalled consumer exits soon after its stall timeout")
            #expect(lone.stderr.contains("coupon-demo: the sale made no progress for 5 s"), "\(lone.stderr.suffix(2000))")

            let owner = try consumer("owner", stallTimeout: 60)
            let deadline = ContinuousClock.now + .seconds(60)
            while Self.owned(by: owner) != [0] {
                try #require(ContinuousClock.now < deadline && owner.isRunning, "owner never got the partition: \(owner.stderr.suffix(2000))")
                try await Task.sleep(for: .milliseconds(50))
            }
            let idle = try consumer("idle")
            // The group settles before the sale starts: idle's first session starts once its join
            // is complete (its SyncGroup answered, and so the owner's: the group is stable).
            while !idle.stderr.contains("member=idle [CouponDemo] session started") {
                try #require(ContinuousClock.now < deadline + .seconds(60) && idle.isRunning, "idle never joined: \(idle.stderr.suffix(2000))")
                try await Task.sleep(for: .milliseconds(50))
            }
            let publisher = try ChildProcess(Self.demo, sale + ["--role", "publish", "--json"], outputIn: dir, name: "publisher")
            // A slow owner: stopped (SIGSTOP) 1.2 s of every 1.5 s, well within its 3 s session,
            // so the sale lasts several times the idle member's stall timeout.
            let throttle = Task {
                while owner.isRunning && !Task.isCancelled {
                    owner.kill(SIGSTOP)
                    try? await Task.sleep(for: .milliseconds(1_200))
                    owner.kill(SIGCONT)
                    try? await Task.sleep(for: .milliseconds(300))
                }
                owner.kill(SIGCONT)
            }
            #expect(await publisher.wait(timeout: .seconds(180)) == 0, "\(publisher.stderr)")
            for c in [owner, idle] {
                #expect(await c.wait(timeout: .seconds(180)) == 0, "\(c.stdout) \(c.stderr.suffix(3000))")
            }
            throttle.cancel()
            await throttle.value
            let summary = try #require(try JSONSerialization.jsonObject(with: Data(idle.stdout.utf8)) as? [String: Any], "\(idle.stdout)")
            #expect(summary["polled"] as? Int == 0, "the idle member owned no partition: \(idle.stdout)")
            #expect((summary["elapsedSeconds"] as? Double ?? 0) > 6, "the sale outlasted the idle member's 5 s stall timeout: \(idle.stdout)")
            #expect(try await mock.committed() == requests)
            try await Self.audit(sale, requests: requests, coupons: 4, stock: 100, in: dir)
            await mock.stop()
        }
    }
}
