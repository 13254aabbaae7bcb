#if Postgres
import Foundation
import Testing
import TestSupport

/// `exactly-once-admin --store postgres` against a finished coupon-demo sale (both built with
/// the Postgres trait, as `make test` builds them).
@Suite("exactly-once-admin on PostgreSQL", .serialized)
struct AdminPostgresTests {
    static var admin: URL { ChildProcess.builtProduct("exactly-once-admin") }
    static var demo: URL { ChildProcess.builtProduct("coupon-demo") }

    @Test func answersForAKeyOfAFinishedDemoSale() async throws {
        let server = try await PostgresTestServer.shared()
        let dir = try ScratchDirectory("admin-pg")
        defer { dir.cleanup() }
        let ledger = dir.path + "/ledger.jsonl"
        let seed = UInt64.random(in: 1...1_000_000_000)  // a sale of its own on the shared server
        let sale = try await ChildProcess.run(Self.demo, ["--store", "postgres", "--postgres-url", server.socketURL, "--requests", "3000",
                                                          "--seed", "\(seed)", "--json", "--ledger", ledger])
        #expect(sale.status == 0, "\(sale.err)")
        let summary = try #require(try JSONSerialization.jsonObject(with: Data(sale.out.utf8)) as? [String: Any], "\(sale.out) \(sale.err)")
        #expect(summary["overIssued"] as? Int == 0 && summary["doubleIssued"] as? Int == 0 && summary["lost"] as? Int == 0)
        let saleID = try #require(summary["sale"] as? String)
        let winner = try DemoLedgerCheck.Issued.first(inLedger: ledger)
        let key = winner.key
        let backend = ["--store", "postgres", "--postgres-url", server.socketURL, "--sale", saleID]

        let shown = try await ChildProcess.run(Self.admin, ["key", key, "--json"] + backend)
        #expect(shown.status == 0, "\(shown.err)")
        let record = try #require(try JSONSerialization.jsonObject(with: Data(shown.out.utf8)) as? [String: Any], "\(shown.out)")
        #expect(record["key"] as? String == key)
        #expect(record["phase"] as? String == "completed")
        #expect(record["outcome"] as? String == "applied")
        #expect(record["outcomeDetail"] as? String == "\(winner.serial)", "the stored outcome is the serial in issued_coupons")
        let text = try await ChildProcess.run(Self.admin, ["key", key] + backend)
        #expect(text.out.contains("phase        completed") && text.out.contains("outcome      applied (\(winner.serial))"), "\(text.out)")
        // The same through --schema, as an operator without a sale id names it.
        let bySchema = try await ChildProcess.run(Self.admin, ["key", key, "--store", "postgres", "--postgres-url", server.socketURL, "--schema", "eo_sale_\(saleID)"])
        #expect(bySchema.status == 0 && bySchema.out.contains("outcome      applied"), "\(bySchema.out) \(bySchema.err)")

        let stuck = try await ChildProcess.run(Self.admin, ["keys", "--phase", "inProgress", "--json"] + backend)
        #expect(stuck.status == 0, "\(stuck.err)")
        let page = try #require(try JSONSerialization.jsonObject(with: Data(stuck.out.utf8)) as? [String: Any])
        #expect((page["records"] as? [Any])?.isEmpty == true, "a finished sale has nothing in progress")
        let soldOut = try await ChildProcess.run(Self.admin, ["keys", "--outcome", "rejected", "--limit", "5", "--json"] + backend)
        let rejected = try #require((try JSONSerialization.jsonObject(with: Data(soldOut.out.utf8)) as? [String: Any])?["records"] as? [[String: Any]])
        #expect(rejected.count == 5 && rejected.allSatisfy { $0["outcomeDetail"] as? String == "sold out" })
        #expect((try JSONSerialization.jsonObject(with: Data(soldOut.out.utf8)) as? [String: Any])?["nextCursor"] is String, "more than 5 sold out")

        let missing = try await ChildProcess.run(Self.admin, ["key", "999:999"] + backend)
        #expect(missing.status == 1 && missing.err.contains("no record of key 999:999"))

        // A schema without a store is "not found", and the tool leaves no empty store behind.
        let wrong = "eo_sale_nosuch\(UInt32.random(in: 0...UInt32.max))"
        let absent = try await ChildProcess.run(Self.admin, ["key", key, "--store", "postgres", "--postgres-url", server.socketURL, "--schema", wrong])
        #expect(absent.status == 1 && absent.err.contains("PostgreSQL schema \(wrong) holds no exactly-once store"), "\(absent.err)")
        #expect(try await server.psql("SELECT count(*) FROM pg_namespace WHERE nspname = '\(wrong)'") == "0", "the inspection created the schema")

        let badURL = try await ChildProcess.run(Self.admin, ["key", key, "--store", "postgres", "--postgres-url", "mysql://x"])
        #expect(badURL.status == 2 && badURL.err.contains("--postgres-url"), "\(badURL.err)")
        let noURL = try await ChildProcess.run(Self.admin, ["key", key, "--store", "postgres"])
        #expect(noURL.status == 2 && noURL.err.contains("--store postgres needs --postgres-url"), "\(noURL.err)")
    }
}
#endif
