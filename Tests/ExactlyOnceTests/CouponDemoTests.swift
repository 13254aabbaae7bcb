import Foundation
import TestSupport
#if canImport(Glibc)
import Glibc
#endif
import Testing

/// Runs the built `coupon-demo` binary end to end (it sits next to the test bundle).
@Suite struct CouponDemoTests {
    static var binary: URL { ChildProcess.builtProduct("coupon-demo") }

    static func run(_ args: [String], stdin: String? = nil) async throws -> (status: Int32, out: String, err: String) {
        try await ChildProcess.run(binary, args, stdin: stdin)
    }

    @Test func jsonRunWithCrashesAuditsCleanAndItsFilesAgree() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("demo-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let ledger = dir.appendingPathComponent("ledger.jsonl").path
        let requests = dir.appendingPathComponent("requests.jsonl").path
        let r = try await Self.run(["--json", "--requests", "3000", "--coupons", "4", "--stock", "25", "--members", "400",
                              "--crash-rate", "0.01", "--seed", "7", "--ledger", ledger, "--requests-out", requests])
        #expect(r.status == 0, "\(r.err)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any])
        for field in ["requests", "issued", "soldOut", "duplicatesSuppressed", "redelivered", "crashes", "overIssued",
                      "doubleIssued", "lost", "elapsedSeconds", "recordsPerSecond"] {
            #expect(json[field] != nil, "missing field \(field)")
        }
        #expect(json["overIssued"] as? Int == 0 && json["doubleIssued"] as? Int == 0 && json["lost"] as? Int == 0)
        #expect((json["crashes"] as? Int ?? 0) > 0, "crashes were injected")

        // Audit the files independently of the demo's own audit.
        struct Req: Decodable { var requestId: Int64; var couponId: Int64; var memberId: Int64 }
        struct Issued: Decodable { var couponId: Int64; var memberId: Int64; var serial: Int64 }
        let reqs = try String(contentsOfFile: requests, encoding: .utf8).split(separator: "\n").map { try JSONDecoder().decode(Req.self, from: Data($0.utf8)) }
        let issued = try String(contentsOfFile: ledger, encoding: .utf8).split(separator: "\n").map { try JSONDecoder().decode(Issued.self, from: Data($0.utf8)) }
        #expect(reqs.count == 3000)
        var expected: [Int64: [Int64]] = [:]
        for q in reqs where !(expected[q.couponId] ?? []).contains(q.memberId) && (expected[q.couponId]?.count ?? 0) < 25 {
            expected[q.couponId, default: []].append(q.memberId)
        }
        var actual: [Int64: [Int64]] = [:]
        for i in issued.sorted(by: { ($0.couponId, $0.serial) < ($1.couponId, $1.serial) }) { actual[i.couponId, default: []].append(i.memberId) }
        #expect(actual == expected, "the ledger's winners, in serial order, are the first 25 distinct members of each coupon in publish order")
        #expect(json["issued"] as? Int == issued.count)

        // The same seed publishes the same requests.
        let again = dir.appendingPathComponent("again.jsonl").path
        let r2 = try await Self.run(["--json", "--requests", "3000", "--coupons", "4", "--stock", "25", "--members", "400",
                               "--crash-rate", "0", "--seed", "7", "--requests-out", again])
        #expect(r2.status == 0)
        #expect(try String(contentsOfFile: again, encoding: .utf8) == String(contentsOfFile: requests, encoding: .utf8))
    }

    /// `--transport kafka` without `--kafka-brokers`: the sale on librdkafka's in-process mock
    /// cluster, with injected consumer crashes, audits clean and says it ran on Kafka.
    @Test(.timeLimit(.minutes(3))) func kafkaRunOnTheInProcessMockAuditsClean() async throws {
        let r = try await Self.run(["--json", "--transport", "kafka", "--requests", "2000", "--coupons", "4", "--stock", "25",
                                    "--members", "300", "--crash-rate", "0.01", "--seed", "11"])
        #expect(r.status == 0, "\(r.err)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any], "\(r.out) \(r.err)")
        #expect(json["transport"] as? String == "kafka")
        #expect(json["requests"] as? Int == 2000)
        #expect(json["issued"] as? Int == 100, "4 coupons of 25, and 300 members click more than 100 times")
        for field in ["overIssued", "doubleIssued", "lost", "fcfsViolations"] {
            #expect(json[field] as? Int == 0, "\(field) in \(r.out)")
        }
        #expect((json["crashes"] as? Int ?? 0) > 0, "crashes were injected")
    }

    /// `--kafka-property NAME=VALUE` reaches librdkafka: with `debug=metadata` its debug log
    /// (which names the librdkafka version) goes to standard error; standard output stays one
    /// JSON object.
    @Test(.timeLimit(.minutes(2))) func kafkaPropertyReachesLibrdkafka() async throws {
        let r = try await Self.run(["--json", "--transport", "kafka", "--requests", "0", "--kafka-property", "debug=metadata"])
        #expect(r.status == 0, "\(r.err.suffix(2000))")
        #expect(r.err.contains("librdkafka v") && r.err.contains("METADATA"), "librdkafka's debug log: \(r.err.prefix(500))")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any], "\(r.out)")
        #expect(json["requests"] as? Int == 0 && json["lost"] as? Int == 0)
    }

    /// Two runs of `--transport kafka` on the in-process mock cluster with one `--store file`
    /// directory: the first SIGKILLed mid-sale, the second finishes the sale with a clean audit,
    /// and its records carry a fencing scope of their own. Each run's mock cluster is a new
    /// cluster whose group generations start again from 1; librdkafka names a mock after its
    /// memory address, so two runs (without address randomization, as here under `setarch -R`)
    /// can get the same cluster id, and a shared scope would let the first run's higher epochs
    /// fence the second. The scope names the mock's broker ports too.
    @Test(.timeLimit(.minutes(3))) func kafkaRunsOnTheInProcessMockHaveAFencingScopeEach() async throws {
        let dir = try ScratchDirectory("demo-kafka-scope")
        defer { dir.cleanup() }
        let flags = ["--transport", "kafka", "--store", "file", "--data-dir", dir.path, "--requests", "90000", "--coupons", "5",
                     "--members", "20000", "--seed", "21", "--crash-rate", "0", "--json"]
        // Address randomization off for both runs when setarch is there: the case where the two
        // mocks' ids are the same.
        let setarch = ChildProcess.which("setarch")
        func start(_ extra: [String]) throws -> ChildProcess {
            if let setarch { return try ChildProcess(setarch, ["-R", Self.binary.path] + flags + extra) }
            return try ChildProcess(Self.binary, flags + extra)
        }
        func journalBytes() -> Int {
            guard let sale = try? FileManager.default.contentsOfDirectory(atPath: dir.path).first(where: { $0.hasPrefix("sale-") }),
                  let names = try? FileManager.default.contentsOfDirectory(atPath: dir.path + "/" + sale) else { return 0 }
            return names.filter { $0.hasSuffix(".eoj") }.reduce(0) { total, name in
                total + ((try? FileManager.default.attributesOfItem(atPath: dir.path + "/" + sale + "/" + name)[.size] as? Int) ?? 0)
            }
        }
        let first = try start([])
        let deadline = ContinuousClock.now + .seconds(90)
        while journalBytes() < 1_000_000 && first.isRunning && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(5))
        }
        #expect(first.isRunning, "the kill must land mid-sale: \(first.stdout) \(first.stderr)")
        first.kill()
        await first.wait()

        let second = try start([])
        #expect(await second.wait(timeout: .seconds(120)) == 0, "\(second.stdout) \(second.stderr)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(second.stdout.utf8)) as? [String: Any], "\(second.stdout) \(second.stderr)")
        for field in ["overIssued", "doubleIssued", "lost", "fcfsViolations"] { #expect(json[field] as? Int == 0, "\(field): \(second.stdout)") }
        #expect(json["transport"] as? String == "kafka")
        if (json["lost"] as? Int ?? 0) > 0, let sale = json["sale"] as? String {
            // Seen once under load, not reproduced since: which records the lost keys were left in
            // (claimed and never completed, or released), for whoever meets it next.
            for phase in ["inProgress", "released"] {
                let r = try await ChildProcess.run(ChildProcess.builtProduct("exactly-once-admin"),
                                                   ["keys", "--phase", phase, "--data-dir", dir.path, "--sale", sale, "--limit", "20"])
                Issue.record("records left \(phase) after a run that lost \(json["lost"]!):\n\(r.out)\(r.err)")
            }
        }

        // The fencing scopes the sale's records carry, without the partition: one per run.
        let sale = try #require(json["sale"] as? String)
        var clusters = Set<String>()
        var cursor: String?
        var pages = 0
        repeat {
            let r = try await ChildProcess.run(ChildProcess.builtProduct("exactly-once-admin"),
                                               ["keys", "--data-dir", dir.path, "--sale", sale, "--json", "--limit", "10000"] + (cursor.map { ["--cursor", $0] } ?? []))
            try #require(r.status == 0, "\(r.err)")
            let page = try #require(try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any])
            for record in page["records"] as? [[String: Any]] ?? [] {
                if let scope = record["fenceScope"] as? String { clusters.insert(String(scope.split(separator: "/").first ?? "")) }
            }
            cursor = page["nextCursor"] as? String
            pages += 1
        } while cursor != nil && pages < 100
        #expect(clusters.count == 2, "two mock clusters, two fencing scopes: \(clusters)")
        #expect(clusters.allSatisfy { $0.hasPrefix("kafka:mockCluster") && $0.contains("@") }, "\(clusters)")
    }

    /// `--log-level`: off by default (standard error stays quiet); from `info` up the library's
    /// messages go to standard error, and standard output stays one JSON object.
    @Test func logLevelSendsTheLibrarysMessagesToStandardError() async throws {
        let sale = ["--json", "--requests", "1000", "--coupons", "2", "--stock", "20", "--members", "200", "--seed", "5", "--crash-rate", "0.01"]
        let quiet = try await Self.run(sale)
        #expect(quiet.status == 0, "\(quiet.err)")
        #expect(!quiet.err.contains("[ExactlyOnce]"), "no log messages without --log-level: \(quiet.err)")
        let loud = try await Self.run(sale + ["--log-level", "info"])
        #expect(loud.status == 0, "\(loud.err)")
        #expect(loud.err.contains(" info coupon-demo:") && loud.err.contains("[ExactlyOnce]"), "\(loud.err)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(loud.out.utf8)) as? [String: Any], "\(loud.out)")
        #expect(json["lost"] as? Int == 0)
        let bad = try await Self.run(sale + ["--log-level", "loud"])
        #expect(bad.status == 2)
        #expect(bad.err.contains("--log-level"), "\(bad.err)")
    }

    @Test func badFlagsGetAClearErrorAndExitCode2() async throws {
        for args in [["--requests", "many"], ["--crash-rate", "2"], ["--partitions", "0"], ["--bogus"], ["--store", "file"], ["--data-dir", "/tmp/x"], ["--store", "file", "--data-dir", "/tmp/x", "--role", "consume", "--transport", "redis-streams"], ["--transport", "kafka", "--kafka-brokers", "no-port"],
                     ["--transport", "kafka", "--kafka-brokers", "127.0.0.1:9092"], ["--role", "publish", "--transport", "kafka", "--store", "redis"],
                     ["--transport", "redis-streams"], ["--role", "consume"], ["--role", "boss"], ["--member-id", "a"],
                     ["--redis-url", "redis://127.0.0.1:1"], ["--store", "redis", "--redis-url", "http://example.com"],
                     ["--store", "redis", "--redis-url", "redis://u:hunter2@127.0.0.1:99999"],
                     ["--kafka-property", "debug=cgrp"], ["--transport", "kafka", "--kafka-property", "debug"],
                     ["--transport", "kafka", "--kafka-property", "=cgrp"], ["--transport", "kafka", "--kafka-property", "group.id=other"],
                     ["--transport", "kafka", "--kafka-property", "no.such.property=1"],
                     ["kafka-mock", "--bootstrap-file", "/tmp/never-written", "--kafka-property", "debug"]] {
            let r = try await Self.run(args)
            #expect(r.status == 2, "\(args)")
            #expect(r.err.contains("coupon-demo:"), "\(args): \(r.err)")
            #expect(!r.err.contains("hunter2"), "passwords never appear in errors")
        }
    }

    /// `--store file`: a run killed with SIGKILL mid-sale and started again with the same seed
    /// and directory finishes the sale with a clean audit (ledger read back from the journal).
    @Test func fileStoreRunKilledAndRerunFinishesCleanly() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("demo-file-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let args = ["--store", "file", "--data-dir", dir.path, "--requests", "300000", "--members", "200000", "--seed", "11", "--json"]
        let p = try ChildProcess(Self.binary, args)
        // Kill it once the journal has grown (the sale is under way) and before it finishes.
        func journalBytes() -> Int {
            guard let sales = try? FileManager.default.contentsOfDirectory(atPath: dir.path), let sale = sales.first,
                  let names = try? FileManager.default.contentsOfDirectory(atPath: dir.path + "/" + sale) else { return 0 }
            return names.filter { $0.hasSuffix(".eoj") }.reduce(0) { total, name in
                total + ((try? FileManager.default.attributesOfItem(atPath: dir.path + "/" + sale + "/" + name)[.size] as? Int) ?? 0)
            }
        }
        let deadline = ContinuousClock.now + .seconds(60)
        while journalBytes() < 2_000_000 && p.isRunning && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(5))
        }
        #expect(p.isRunning, "the kill must land mid-sale")
        p.kill()
        await p.wait()
        #expect(p.wasSignalled)

        let ledger = dir.appendingPathComponent("ledger.jsonl").path
        let r = try await Self.run(args + ["--ledger", ledger])
        #expect(r.status == 0, "\(r.out) \(r.err)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any])
        for field in ["overIssued", "doubleIssued", "lost", "fcfsViolations"] { #expect(json[field] as? Int == 0, "\(field): \(r.out)") }
        #expect((json["duplicatesSuppressed"] as? Int ?? 0) > 0, "the rerun found the first run's completions in the journal")
        let issued = try String(contentsOfFile: ledger, encoding: .utf8).split(separator: "\n")
        #expect(issued.count == 500)
        #expect(Set(issued.map { line -> String in
            let o = (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
            return "\(o?["couponId"] ?? ""):\(o?["memberId"] ?? "")"
        }).count == 500, "nobody holds the same coupon twice")
    }

    /// A Redis that is not there is a clear error after a few tries, not a hang or a crash.
    @Test func unreachableRedisIsAClearError() async throws {
        let r = try await Self.run(["--store", "redis", "--redis-url", "unix:///nonexistent/redis.sock", "--requests", "10"])
        #expect(r.status == 1)
        #expect(r.err.contains("cannot reach the backend"), "\(r.err)")
    }

    /// `--kafka-brokers` that nobody answers is a clear error within seconds (exit status 1, as
    /// other backend failures), whether the port is closed (connection refused) or a server
    /// accepts the connection and never answers; never a minute of retries, never a hang.
    @Test(.timeLimit(.minutes(2))) func unreachableKafkaBrokersAreAClearErrorWithinSeconds() async throws {
        let dir = try ScratchDirectory("demo-kafka-unreachable")
        defer { dir.cleanup() }
        // A closed port: one that was just listened on and closed again.
        let closedPort = try await LocalSockets.withSilentListener { $0 }
        try await LocalSockets.withSilentListener { silentPort in
            for (what, port) in [("a closed port", closedPort), ("a server that never answers", silentPort)] {
                let started = ContinuousClock.now
                let r = try await ChildProcess.run(Self.binary, ["--transport", "kafka", "--kafka-brokers", "127.0.0.1:\(port)",
                                                                 "--store", "file", "--data-dir", dir.path + "/\(port)", "--requests", "100"],
                                                   timeout: .seconds(60))
                let took = ContinuousClock.now - started
                #expect(r.status == 1, "\(what): \(r.err)")
                #expect(r.err.contains("coupon-demo: no Kafka broker of 127.0.0.1:\(port) answered within"), "\(what): \(r.err)")
                #expect(r.err.split(separator: "\n").count == 1, "one line, not librdkafka's log: \(r.err)")
                #expect(took < .seconds(30), "\(what): the error took \(took)")
            }
        }
    }

    @Test func partitionSubcommandMapsKeysAndReportsBadLines() async throws {
        let m = try await Self.run(["partition", "--partitioner", "murmur2", "--partitions", "12"], stdin: "kafka\n21\n")
        // kafka: 0xd067cf64 & 0x7fffffff = 1348980580, % 12 = 4. "21": -973932308 & 0x7fffffff = 1173551340, % 12 = 0.
        #expect(m.out == "kafka\t4\n21\t0\n")
        let mod = try await Self.run(["partition", "--partitioner", "modulo", "--partitions", "3"], stdin: "10\n-1\n11\n")
        #expect(mod.out == "10\t1\n11\t2\n")
        #expect(mod.err.contains("non-negative"))
        #expect(mod.status == 1)
    }

    /// Output paths are written without replacing the node the user named: a regular file
    /// atomically, a symlink's target (the link stays), a FIFO written through, a device written
    /// through (its error reported), a directory refused.
    @Test func outputPathsAreNeverReplaced() async throws {
        let dir = try ScratchDirectory("demo-out")
        defer { dir.cleanup() }
        let small = ["--requests", "300", "--coupons", "2", "--stock", "10", "--members", "100", "--json"]
        // A symlink to a regular file: the file gets the ledger, the link stays a link.
        let target = dir.path + "/target.jsonl"
        let link = dir.path + "/link.jsonl"
        try "old".write(toFile: target, atomically: true, encoding: .utf8)
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: target)
        let r1 = try await Self.run(small + ["--ledger", link])
        #expect(r1.status == 0, "\(r1.err)")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: link) == target, "the link is kept")
        #expect(try String(contentsOfFile: target, encoding: .utf8).split(separator: "\n").count == 20, "the target holds the ledger")
        // A FIFO: written through to its reader.
        let fifo = dir.path + "/ledger.fifo"
        #expect(mkfifo(fifo, 0o600) == 0)
        let reader = try ChildProcess(URL(fileURLWithPath: "/bin/cat"), [fifo])
        let r2 = try await Self.run(small + ["--ledger", fifo])
        #expect(r2.status == 0, "\(r2.err)")
        await reader.wait(timeout: .seconds(30))
        #expect(reader.stdout.split(separator: "\n").count == 20, "the FIFO's reader got the ledger")
        var st = stat()
        #expect(lstat(fifo, &st) == 0 && (st.st_mode & S_IFMT) == S_IFIFO, "the FIFO is still a FIFO")
        // A device that refuses the write: a clear error, and the device is untouched.
        let r3 = try await Self.run(small + ["--ledger", "/dev/full"])
        #expect(r3.status == 1)
        #expect(r3.err.contains("--ledger /dev/full") && r3.err.contains("write failed"), "\(r3.err)")
        #expect(lstat("/dev/full", &st) == 0 && (st.st_mode & S_IFMT) == S_IFCHR, "/dev/full is still a character device")
        // A directory: refused.
        let r4 = try await Self.run(small + ["--requests-out", dir.path])
        #expect(r4.status == 2)
        #expect(r4.err.contains("is a directory"), "\(r4.err)")
        // A regular file: replaced whole (no temporary files left behind).
        let plain = dir.path + "/requests.jsonl"
        try String(repeating: "stale\n", count: 5000).write(toFile: plain, atomically: true, encoding: .utf8)
        let r5 = try await Self.run(small + ["--requests-out", plain])
        #expect(r5.status == 0)
        #expect(try String(contentsOfFile: plain, encoding: .utf8).split(separator: "\n").count == 300)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasSuffix(".tmp") }.isEmpty)
    }

    /// An output path that cannot be written is a bad flag, refused before the sale runs (a
    /// sale of 5 M requests would take minutes; the refusal comes at once, with no summary).
    @Test func badOutputPathsAreRefusedBeforeTheSale() async throws {
        let dir = try ScratchDirectory("demo-out-early")
        defer { dir.cleanup() }
        let dangling = dir.path + "/dangling.jsonl"
        try FileManager.default.createSymbolicLink(atPath: dangling, withDestinationPath: dir.path + "/nowhere/file")
        for (args, says) in [
            (["--ledger", dir.path], "is a directory"),
            (["--requests-out", dangling], "symbolic link to nothing"),
            (["--ledger", dir.path + "/missing/ledger.jsonl"], "does not exist"),
        ] {
            let start = ContinuousClock.now
            let r = try await Self.run(["--requests", "5000000", "--json"] + args)
            #expect(r.status == 2, "\(args): \(r.err)")
            #expect(r.err.contains(says), "\(args): \(r.err)")
            #expect(r.out.isEmpty, "refused before the sale: \(r.out)")
            #expect(ContinuousClock.now - start < .seconds(20), "\(args)")
        }
    }

    /// The same sale flags on the same durable store, first on one transport and then on
    /// another, are two sales (the sale's identity includes the transport): the second is not
    /// fenced by the epochs the first left in the store, and both audit clean.
    @Test func oneStoreTwoTransportsAreTwoSalesBothClean() async throws {
        let dir = try ScratchDirectory("demo-two-transports")
        defer { dir.cleanup() }
        let common = ["--json", "--requests", "800", "--coupons", "2", "--stock", "30", "--members", "200",
                      "--crash-rate", "0.005", "--seed", "11", "--store", "file", "--data-dir", dir.path]
        var sales: [String] = []
        for transport in ["memory", "kafka"] {
            let r = try await Self.run(common + ["--transport", transport])
            #expect(r.status == 0, "\(transport): \(r.err)")
            let json = try #require(try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any], "\(transport): \(r.out) \(r.err)")
            for field in ["overIssued", "doubleIssued", "lost", "fcfsViolations"] {
                #expect(json[field] as? Int == 0, "\(transport): \(field) in \(r.out)")
            }
            #expect(json["issued"] as? Int == 60, "\(transport): \(r.out)")
            sales.append(json["sale"] as? String ?? "")
        }
        #expect(sales[0] != sales[1] && !sales[0].isEmpty, "two transports, two sales: \(sales)")
    }

    /// Flags a sale cannot serve get the same clear message and exit status as other bad flags.
    @Test func flagsASaleCannotServeAreRefused() async throws {
        let file = try ScratchDirectory("demo-flags")
        defer { file.cleanup() }
        let notADir = file.path + "/plain"
        try "x".write(toFile: notADir, atomically: true, encoding: .utf8)
        for (args, says) in [
            (["--crash-rate", "1"], "too high for a sale to finish"),
            (["--crash-rate", "0.5"], "too high for a sale to finish"),
            (["--store", "file", "--data-dir", ""], "--data-dir needs a directory path"),
            (["--store", "file", "--data-dir", notADir], "is not a directory"),
            (["--store", "file", "--data-dir", notADir + "/sub"], "cannot be created"),
            (["--requests=-1"], "--requests must be in"),
        ] {
            let r = try await Self.run(args)
            #expect(r.status == 2, "\(args): \(r.err)")
            #expect(r.err.hasPrefix("coupon-demo:") && r.err.contains(says), "\(args): \(r.err)")
            #expect(!r.err.contains("NSCocoaErrorDomain") && !r.err.contains("Error Domain"), "no raw Foundation error dump: \(r.err)")
        }
    }

    /// A long run on a terminal shows one progress line that updates in place; `--json` and
    /// output that is not a terminal stay clean.
    @Test func progressOnATerminalOnly() async throws {
        guard let script = ChildProcess.which("script") else {
            Issue.record("util-linux `script` is needed to give the demo a terminal")
            return
        }
        let sale = "\(Self.binary.path) --requests 120000 --members 100000 --crash-rate 0"
        let tty = try await ChildProcess.run(script, ["-qfec", sale, "/dev/null"])
        #expect(tty.status == 0, "\(tty.err)")
        #expect(tty.out.contains("\r  published") && tty.out.contains("records/s"), "a progress line on the terminal: \(tty.out.prefix(300))")
        #expect(tty.out.contains("OK: every coupon went to exactly"))
        let piped = try await Self.run(["--requests", "120000", "--members", "100000", "--crash-rate", "0"])
        #expect(!piped.out.contains("\r") && !piped.out.contains("\u{1B}["), "no progress when standard output is not a terminal")
        let json = try await ChildProcess.run(script, ["-qfec", sale + " --json", "/dev/null"])
        #expect(!json.out.contains("published"), "no progress with --json")
        #expect((try? JSONSerialization.jsonObject(with: Data(json.out.trimmingCharacters(in: .whitespacesAndNewlines).utf8))) != nil, "--json prints one JSON object: \(json.out.prefix(200))")
    }
}
