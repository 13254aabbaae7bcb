#if Postgres
import ExactlyOnce
import ExactlyOncePostgres
import ExactlyOnceTestKit
import PostgresNIO
import Testing
import TestSupport

@Suite("PostgreSQL store conformance")
struct PostgresConformanceTests {
    /// The whole conformance suite, the batch checks included, with effects written as SQL in
    /// the handler's transaction (a table of the test's own next to the store's schema).
    @Test func conformsToTheStoreContract() async throws {
        let server = try await PostgresTestServer.shared()
        var stores: [PostgresDedupeStore] = []
        let effects = BatchEffects<PostgresDedupeStore>(
            set: { tx, k, v in
                try await tx.query("INSERT INTO \(unescaped: tx.storeSchema).test_fx (k, v) VALUES (\(k), \(v)) ON CONFLICT (k) DO UPDATE SET v = excluded.v")
            },
            get: { tx, k in
                try await tx.query("SELECT v FROM \(unescaped: tx.storeSchema).test_fx WHERE k = \(k)").first?.decode(Int64.self)
            },
            read: { store, k in
                try await store.query("SELECT v FROM \(unescaped: store.configuration.schema).test_fx WHERE k = \(k)").first?.decode(Int64.self)
            })
        try await StoreConformance.run(makeStore: { clock in
            let schema = uniqueSchema("conf")
            let store = try await PostgresDedupeStore.testing(server, clock: clock, schema: schema)
            try await store.query("CREATE TABLE \(unescaped: schema).test_fx (k text PRIMARY KEY, v bigint NOT NULL)")
            stores.append(store)
            return store
        }, batchEffects: effects)
        for s in stores { await s.shutdown() }
    }
}
#endif
