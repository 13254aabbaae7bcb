#if Postgres
import ExactlyOnce
import Foundation
import Testing
import TestSupport

@Suite("coupon-demo on PostgreSQL", .serialized)
struct PostgresDemoTests {
    static var binary: URL { ChildProcess.builtProduct("coupon-demo") }

    /// A run killed with SIGKILL mid-sale and started again with the same options finishes the
    /// sale with a clean audit; the coupons are in a plain table psql reads.
    @Test func aRunKilledMidSaleAndRerunFinishesCleanly() async throws {
        let server = try await PostgresTestServer.shared()
        let seed = UInt64.random(in: 1...1_000_000)
        let args = ["--store", "postgres", "--postgres-url", server.socketURL, "--requests", "6000", "--members", "3000",
                    "--stock", "100", "--crash-rate", "0", "--seed", "\(seed)", "--json"]
        let p = try ChildProcess(Self.binary, args)
        func issued() async -> Int {
            let out = try? await server.psql("""
                SELECT coalesce(sum(n), 0) FROM (SELECT (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.issued_coupons', nspname), false, true, '')))[1]::text::int AS n
                FROM pg_namespace WHERE nspname LIKE 'coupons_%') t
                """)
            return Int(out ?? "") ?? 0
        }
        let before = await issued()
        let deadline = ContinuousClock.now + .seconds(120)
        while await issued() < before + 40 && p.isRunning && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(p.isRunning, "the kill must land mid-sale: \(p.stdout) \(p.stderr)")
        p.kill()
        await p.wait()
        #expect(p.wasSignalled)
        #expect(await issued() - before < 500, "the first run must not have finished the sale")

        let r = try await ChildProcess.run(Self.binary, args, timeout: .seconds(300))
        #expect(r.status == 0, "\(r.out) \(r.err)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any], "\(r.out) \(r.err)")
        for field in ["overIssued", "doubleIssued", "lost", "fcfsViolations"] { #expect(json[field] as? Int == 0, "\(field): \(r.out)") }
        #expect(json["issued"] as? Int == 500, "\(r.out)")
        #expect((json["duplicatesSuppressed"] as? Int ?? 0) > 0, "the rerun found the first run's completions")
        let sale = try #require(json["sale"] as? String)
        let rows = try await server.psql("SELECT count(*), count(DISTINCT (coupon_id, member_id)) FROM coupons_\(sale).issued_coupons")
        #expect(rows == "500|500", "issued_coupons holds each coupon once: \(rows)")
    }

    /// A wrong password is a clear error that never repeats the password.
    @Test func aWrongPasswordIsAClearErrorWithoutThePassword() async throws {
        let server = try await PostgresTestServer.shared()
        let secret = "Sup3r-\(UInt32.random(in: 1000...9999))-Secret"
        let r = try await ChildProcess.run(Self.binary, ["--store", "postgres", "--postgres-url",
                                                         "postgres://postgres:\(secret)@127.0.0.1:\(server.port)/\(server.database)", "--requests", "10"])
        #expect(r.status != 0)
        #expect(!(r.out + r.err).contains(secret), "the password appears in the output: \(r.out) \(r.err)")
        #expect(r.err.contains("refused the login"), "\(r.err)")
    }
}
#endif
