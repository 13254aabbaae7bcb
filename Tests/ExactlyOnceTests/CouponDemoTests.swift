import Foundation
import TestSupport
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

    @Test func badFlagsGetAClearErrorAndExitCode2() async throws {
        for args in [["--requests", "many"], ["--crash-rate", "2"], ["--partitions", "0"], ["--bogus"], ["--store", "file"], ["--data-dir", "/tmp/x"], ["--store", "file", "--data-dir", "/tmp/x", "--role", "consume", "--transport", "redis-streams"], ["--transport", "kafka"],
                     ["--transport", "redis-streams"], ["--role", "consume"], ["--role", "boss"], ["--member-id", "a"],
                     ["--redis-url", "redis://127.0.0.1:1"], ["--store", "redis", "--redis-url", "http://example.com"],
                     ["--store", "redis", "--redis-url", "redis://u:hunter2@127.0.0.1:99999"]] {
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

    @Test func partitionSubcommandMapsKeysAndReportsBadLines() async throws {
        let m = try await Self.run(["partition", "--partitioner", "murmur2", "--partitions", "12"], stdin: "kafka\n21\n")
        // kafka: 0xd067cf64 & 0x7fffffff = 1348980580, % 12 = 4. "21": -973932308 & 0x7fffffff = 1173551340, % 12 = 0.
        #expect(m.out == "kafka\t4\n21\t0\n")
        let mod = try await Self.run(["partition", "--partitioner", "modulo", "--partitions", "3"], stdin: "10\n-1\n11\n")
        #expect(mod.out == "10\t1\n11\t2\n")
        #expect(mod.err.contains("non-negative"))
        #expect(mod.status == 1)
    }
}
