import Foundation
import TestSupport
import Testing

/// `exactly-once-admin` against a finished coupon-demo sale on the file store.
@Suite struct AdminToolTests {
    static var admin: URL { ChildProcess.builtProduct("exactly-once-admin") }
    static var demo: URL { ChildProcess.builtProduct("coupon-demo") }

    @Test func answersForAKeyOfAFinishedSaleOnTheFileStore() async throws {
        let dir = try ScratchDirectory("admin-file")
        defer { dir.cleanup() }
        let ledger = dir.path + "/ledger.jsonl"
        let sale = try await ChildProcess.run(Self.demo, ["--store", "file", "--data-dir", dir.path + "/data", "--requests", "3000", "--json", "--ledger", ledger])
        #expect(sale.status == 0, "\(sale.err)")
        let saleID = try #require((try JSONSerialization.jsonObject(with: Data(sale.out.utf8)) as? [String: Any])?["sale"] as? String)
        let winner = try DemoLedgerCheck.Issued.first(inLedger: ledger)
        let key = winner.key
        let backend = ["--store", "file", "--data-dir", dir.path + "/data", "--sale", saleID]

        let shown = try await ChildProcess.run(Self.admin, ["key", key, "--json"] + backend)
        #expect(shown.status == 0, "\(shown.err)")
        let record = try #require(try JSONSerialization.jsonObject(with: Data(shown.out.utf8)) as? [String: Any], "\(shown.out)")
        #expect(record["key"] as? String == key)
        #expect(record["phase"] as? String == "completed")
        #expect(record["outcome"] as? String == "applied")
        #expect(record["outcomeDetail"] as? String == "\(winner.serial)", "the stored outcome is the issued serial")
        #expect((record["fenceScope"] as? String)?.hasPrefix("memory:") == true)

        let text = try await ChildProcess.run(Self.admin, ["key", key] + backend)
        #expect(text.out.contains("phase        completed") && text.out.contains("outcome      applied"), "\(text.out)")

        let stuck = try await ChildProcess.run(Self.admin, ["keys", "--phase", "inProgress", "--json"] + backend)
        let page = try #require(try JSONSerialization.jsonObject(with: Data(stuck.out.utf8)) as? [String: Any])
        #expect((page["records"] as? [Any])?.isEmpty == true, "a finished sale has nothing in progress")

        let soldOut = try await ChildProcess.run(Self.admin, ["keys", "--outcome", "rejected", "--limit", "5", "--json"] + backend)
        let rejected = try #require((try JSONSerialization.jsonObject(with: Data(soldOut.out.utf8)) as? [String: Any])?["records"] as? [[String: Any]])
        #expect(rejected.count == 5 && rejected.allSatisfy { $0["outcomeDetail"] as? String == "sold out" })

        let missing = try await ChildProcess.run(Self.admin, ["key", "999:999"] + backend)
        #expect(missing.status == 1 && missing.err.contains("no record of key 999:999"))
        let bad = try await ChildProcess.run(Self.admin, ["lag", "--store", "memory"])
        #expect(bad.status == 2 && bad.err.contains("an in-memory store lives inside the process that runs it"), "\(bad.err)")
        let memoryTransport = try await ChildProcess.run(Self.admin, ["dlq", "list", "--transport", "memory"] + backend)
        #expect(memoryTransport.status == 2 && memoryTransport.err.contains("an in-memory transport lives inside the process that runs it"), "\(memoryTransport.err)")
        let noDir = try await ChildProcess.run(Self.admin, ["key", key, "--store", "file"])
        #expect(noDir.status == 2 && noDir.err.contains("--store file needs --data-dir"), "\(noDir.err)")
        let badLimit = try await ChildProcess.run(Self.admin, ["keys", "--limit", "0"] + backend)
        #expect(badLimit.status == 2 && badLimit.err.contains("--limit must be in 1...10000"), "\(badLimit.err)")
        let badSale = try await ChildProcess.run(Self.admin, ["key", key, "--store", "file", "--data-dir", dir.path, "--sale", "../x"])
        #expect(badSale.status == 2 && badSale.err.contains("--sale must be a sale id"), "\(badSale.err)")
        let stray = try await ChildProcess.run(Self.admin, ["key", key, "--kafka-brokers", "h:1"] + backend)
        #expect(stray.status == 2 && stray.err.contains("--kafka-brokers is used with --transport kafka"), "\(stray.err)")
    }
}
