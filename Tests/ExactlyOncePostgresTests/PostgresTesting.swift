#if Postgres
import ExactlyOnce
import ExactlyOncePostgres
import ExactlyOnceTestKit
import PostgresNIO
import TestSupport

/// A fresh schema name, so tests sharing one server never see each other's records.
func uniqueSchema(_ prefix: String = "t") -> String {
    "\(prefix)_\(UInt64.random(in: 0...UInt64.max) % 1_000_000_000_000)"
}

extension PostgresDedupeStore {
    /// A store on `server` (unix socket) in a schema of its own.
    static func testing(_ server: PostgresTestServer, clock: any WallClock = SystemWallClock(), schema: String = uniqueSchema(),
                        configure: (inout PostgresStoreConfiguration) -> Void = { _ in }) async throws -> PostgresDedupeStore {
        var c = try PostgresStoreConfiguration(url: server.socketURL)
        c.schema = schema
        c.poolSize = 4
        configure(&c)
        return try await PostgresDedupeStore.connect(c, clock: clock)
    }
}
#endif
