#if Postgres
import ExactlyOnce
import ExactlyOncePostgres
import ExactlyOnceTestKit
import Foundation
import PostgresNIO
import Testing
import TestSupport

#if canImport(Glibc)
import Glibc
#endif

@Suite("PostgreSQL store")
struct PostgresStoreTests {
    @Test func aSchemaOfAnUnknownVersionIsRefusedAndLeftAsItIs() async throws {
        let server = try await PostgresTestServer.shared()
        let schema = uniqueSchema("ver")
        let first = try await PostgresDedupeStore.testing(server, schema: schema)
        await first.shutdown()
        _ = try await server.psql("UPDATE \(schema).meta SET value = '99' WHERE name = 'schema_version'")
        do {
            let s = try await PostgresDedupeStore.testing(server, schema: schema)
            await s.shutdown()
            Issue.record("a schema of version 99 was accepted")
        } catch let e as ExactlyOnceError {
            #expect(e.code == .storeFailure)
            #expect(e.message.contains("version 99") && e.message.contains("knows version \(PostgresDedupeStore.schemaVersion)"), "\(e)")
        }
        #expect(try await server.psql("SELECT value FROM \(schema).meta WHERE name = 'schema_version'") == "99", "the schema was altered")

        // A schema that holds tables of someone else's, with no version, is not touched either.
        let foreign = uniqueSchema("foreign")
        _ = try await server.psql("CREATE SCHEMA \(foreign); CREATE TABLE \(foreign).orders (id int)")
        await #expect(throws: ExactlyOnceError.self) { _ = try await PostgresDedupeStore.testing(server, schema: foreign) }
        #expect(try await server.psql("SELECT count(*) FROM pg_tables WHERE schemaname = '\(foreign)'") == "1")
    }

    @Test func aWrongPasswordIsAClearErrorThatDoesNotEchoIt() async throws {
        let server = try await PostgresTestServer.shared()
        let wrong = "Wr0ng-\(UInt32.random(in: 1000...9999))-Passw0rd"
        var c = try PostgresStoreConfiguration(url: "postgres://postgres:\(wrong)@127.0.0.1:\(server.port)/\(server.database)")
        c.schema = uniqueSchema()
        #expect(!c.description.contains(wrong) && !String(reflecting: c).contains(wrong))
        do {
            let s = try await PostgresDedupeStore.connect(c)
            await s.shutdown()
            Issue.record("a wrong password was accepted")
        } catch {
            let text = "\(error) \(String(reflecting: error))"
            #expect(!text.contains(wrong), "the error echoes the password: \(text)")
            let e = try #require(error as? ExactlyOnceError)
            #expect(e.code == .storeFailure && !e.isRetriable, "\(e)")
            #expect(e.message.contains("refused the login of role postgres"), "\(e)")
        }
        // The right password (TCP, scram-sha-256) works.
        var good = try PostgresStoreConfiguration(url: server.tcpURL)
        good.schema = uniqueSchema()
        let s = try await PostgresDedupeStore.connect(good)
        _ = try await s.claim(ClaimRequest(key: try IdempotencyKey(rawValue: "k"), fingerprint: .of([1]), lease: .seconds(5)))
        await s.shutdown()
    }

    @Test func aSilentServerIsATimeoutInBoundedTime() async throws {
        // A listener that accepts connections and never answers.
        try await LocalSockets.withSilentListener { port in
            var c = try PostgresStoreConfiguration(url: "postgres://postgres@127.0.0.1:\(port)/x")
            c.connectTimeout = .milliseconds(500)
            let start = ContinuousClock.now
            do {
                let s = try await PostgresDedupeStore.connect(c)
                await s.shutdown()
                Issue.record("a silent server was accepted")
            } catch let e as ExactlyOnceError {
                #expect(e.code == .timeout && e.isRetriable, "\(e)")
            }
            #expect(ContinuousClock.now - start < .seconds(20), "the connect deadline did not hold")
        }
    }

    @Test func aStatementPastItsDeadlineIsATimeoutAndTheStoreGoesOn() async throws {
        let server = try await PostgresTestServer.shared()
        // 2 s: far below the statement's 10 s, and room for the fresh connection the next
        // operation opens while the other PostgreSQL tests load the same server (at 300 ms that
        // claim itself timed out once, in a loaded `make test`).
        let store = try await PostgresDedupeStore.testing(server) { $0.statementTimeout = .seconds(2) }
        do {
            try await store.query("SELECT pg_sleep(10)")
            Issue.record("pg_sleep(10) finished within a 2 s deadline")
        } catch let e as ExactlyOnceError {
            #expect(e.code == .timeout, "\(e)")
        }
        // The broken connection was dropped; the next operation gets a fresh one.
        let r = try await store.claim(ClaimRequest(key: try IdempotencyKey(rawValue: "after"), fingerprint: .of([1]), lease: .seconds(5)))
        guard case .new = r else { Issue.record("claim after a timeout gave \(r)"); return }
        await store.shutdown()
    }

    @Test func retentionCleanupDeletesExpiredRecordsOnly() async throws {
        let server = try await PostgresTestServer.shared()
        let clock = ManualClock()
        let store = try await PostgresDedupeStore.testing(server, clock: clock) { $0.retention = .seconds(60) }
        let old = try IdempotencyKey(rawValue: "old"), young = try IdempotencyKey(rawValue: "young")
        guard case .new(let a) = try await store.claim(ClaimRequest(key: old, fingerprint: .of([1]), lease: .seconds(5))) else { Issue.record("no claim"); return }
        try await store.complete(Completion(claim: a, outcome: .applied()))
        clock.advance(by: .seconds(50))
        guard case .new(let b) = try await store.claim(ClaimRequest(key: young, fingerprint: .of([1]), lease: .seconds(5))) else { Issue.record("no claim"); return }
        try await store.complete(Completion(claim: b, outcome: .applied()))
        clock.advance(by: .seconds(20))
        #expect(try await store.purgeExpired() == 1)
        let left = try await store.records(for: [old, young])
        #expect(left[old] == nil && left[young]?.phase == .completed)
        await store.shutdown()
    }

    /// The store's `run()` runs the retention cleanup on its own every `cleanupInterval`, and
    /// closes the store when cancelled.
    @Test func runPurgesExpiredRecordsOnItsInterval() async throws {
        let server = try await PostgresTestServer.shared()
        let clock = ManualClock()
        let store = try await PostgresDedupeStore.testing(server, clock: clock) {
            $0.retention = .seconds(60)
            $0.cleanupInterval = .milliseconds(50)
        }
        let old = try IdempotencyKey(rawValue: "run-old")
        guard case .new(let a) = try await store.claim(ClaimRequest(key: old, fingerprint: .of([1]), lease: .seconds(5))) else { Issue.record("no claim"); return }
        try await store.complete(Completion(claim: a, outcome: .applied()))
        let service = Task { try await store.run() }
        try await Task.sleep(for: .milliseconds(200))
        #expect(try await store.records(for: [old])[old]?.phase == .completed, "kept while its retention runs")
        clock.advance(by: .seconds(61))
        var gone = false
        for _ in 0..<200 where !gone {
            try await Task.sleep(for: .milliseconds(25))
            gone = try await store.records(for: [old])[old] == nil
        }
        #expect(gone, "run() purged the expired record within its cleanup interval")
        service.cancel()
        try await service.value
        await #expect(throws: ExactlyOnceError.self) { _ = try await store.records(for: [old]) }
    }

    @Test func aFailedStatementRollsBackItsHandlerOnlyAndTheBatchCommitsTheRest() async throws {
        let server = try await PostgresTestServer.shared()
        let store = try await PostgresDedupeStore.testing(server)
        let t = store.configuration.schema + ".members"
        try await store.query(PostgresQuery(unsafeSQL: "CREATE TABLE \(t) (member bigint PRIMARY KEY, note text)"))
        try await store.query(PostgresQuery(unsafeSQL: "INSERT INTO \(t) VALUES (2, 'there before')"))
        var claims: [Claim] = []
        for i in 1...3 {
            guard case .new(let c) = try await store.claim(ClaimRequest(key: try IdempotencyKey(rawValue: "m\(i)"), fingerprint: .of([1]), lease: .seconds(30))) else {
                Issue.record("no claim"); return
            }
            claims.append(c)
        }
        var batch = store.makeCompletionBatch(CompletionBatchOptions(limit: 8))
        for (i, c) in claims.enumerated() {
            let member = Int64(i + 1)
            do {
                _ = try await batch.perform(c) { tx in
                    try await tx.query("INSERT INTO \(unescaped: t) VALUES (\(member * 10), 'side effect')")
                    try await tx.query("INSERT INTO \(unescaped: t) VALUES (\(member), 'issued')")
                    return .applied()
                }
                #expect(member != 2, "the duplicate member's insert succeeded")
            } catch let e as PostgresStatementError {
                #expect(member == 2)
                #expect(e.isUniqueViolation && e.constraint == "members_pkey", "\(e)")
                #expect(e.description.contains("23505") && e.description.contains("unique_violation"), "\(e)")
            }
        }
        #expect(batch.count == 2)
        let r = try await batch.commit()
        #expect(r.applied == 2 && r.failure == nil, "\(r)")
        let rows = try await store.query(PostgresQuery(unsafeSQL: "SELECT member FROM \(t) ORDER BY member")).map { try $0.decode(Int64.self) }
        #expect(rows == [1, 2, 3, 10, 30], "the failed handler's first statement must be rolled back with it, the others kept: \(rows)")
        await store.shutdown()
    }
}
#endif
