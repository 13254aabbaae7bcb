#if Postgres
import CouponKit
import ExactlyOnce
import ExactlyOncePostgres
import PostgresNIO
import Synchronization

/// PostgreSQL as the service's source of truth (``StoreKind/postgres``): plain SQL tables in
/// schema ``schema`` that a person can query with psql, written by the consumers' handlers in
/// the same SQL transaction as each request's dedupe record (`PostgresDedupeStore`, whose own
/// records live in its schema, default `exactly_once`).
///
/// | table | rows |
/// |---|---|
/// | `coupon_service.coupon_stock` | one per coupon: `coupon_id`, `stock`, `issued` (the catalog and the counts) |
/// | `coupon_service.issued_coupons` | one per issued coupon: `coupon_id`, `serial`, `member_id`, `request_key`, `issued_at` |
/// | `coupon_service.coupon_uses` | one per order that used a coupon: `order_id`, `coupon_id`, `member_id`, `event_key`, `restored` |
///
/// ```sql
/// SELECT coupon_id, stock, issued FROM coupon_service.coupon_stock ORDER BY coupon_id;
/// SELECT serial, member_id, issued_at FROM coupon_service.issued_coupons WHERE coupon_id = 1 ORDER BY serial;
/// ```
public enum PostgresCoupons {
    /// The schema of the service's tables.
    public static let schema = "coupon_service"

    /// The opened store and what the service reads and writes through it.
    public struct Opened: Sendable {
        /// The dedupe store (run it as a `Service`: it closes its pool on shutdown).
        public let store: PostgresDedupeStore
        /// The handlers and reads.
        public let effects: PostgresCouponEffects
        /// `coupon_stock` as the catalog.
        public let catalog: PostgresCatalog
    }

    /// Connects to `options.postgresURL`, creates the store's schema and the service's tables
    /// when absent.
    /// - Throws: ``ServiceError`` naming the URL without its password when the URL is malformed
    ///   or the server refuses or cannot be reached.
    public static func open(_ options: ServiceOptions) async throws -> Opened {
        guard let url = options.postgresURL else { throw ServiceError("--store postgres needs --postgres-url") }
        var config: PostgresStoreConfiguration
        do {
            config = try PostgresStoreConfiguration(url: url)
        } catch {
            throw ServiceError("--postgres-url is not usable: \(safeDescription(error))")
        }
        // Every lane of both consumers holds a connection while its batch is open; the API's
        // reads need a few more.
        config.poolSize = max(config.poolSize, 2 * options.partitions + 4)
        let store: PostgresDedupeStore
        do {
            store = try await PostgresDedupeStore.connect(config)
        } catch {
            throw ServiceError("PostgreSQL at \(config) is not usable: \(safeDescription(error))")
        }
        do {
            let tables = try PostgresCouponTables(schema: schema)
            try await tables.create(on: store, stock: [:])
            try await store.query(PostgresQuery(unsafeSQL: """
                CREATE TABLE IF NOT EXISTS \(schema).coupon_uses (
                    order_id text PRIMARY KEY, coupon_id bigint NOT NULL, member_id bigint NOT NULL, event_key text NOT NULL,
                    restored boolean NOT NULL DEFAULT false, used_at timestamptz NOT NULL DEFAULT now())
                """))
            // A coupon is in use by at most one order at a time (a restore frees it).
            try await store.query(PostgresQuery(unsafeSQL: """
                CREATE UNIQUE INDEX IF NOT EXISTS coupon_uses_active ON \(schema).coupon_uses (coupon_id, member_id) WHERE NOT restored
                """))
            return Opened(store: store, effects: PostgresCouponEffects(store: store, tables: tables), catalog: PostgresCatalog(store: store, tables: tables))
        } catch {
            await store.shutdown()
            throw ServiceError("PostgreSQL at \(config): creating the tables of schema \(schema) failed: \(safeDescription(error))")
        }
    }
}

/// The library's errors and PostgreSQL statement errors by their description (which never holds
/// a password or row values); anything else by its type only.
func safeDescription(_ error: any Error) -> String {
    if let e = error as? ExactlyOnceError { return "\(e)" }
    if let e = error as? PostgresStatementError { return "\(e)" }
    return "\(ExactlyOnceError.Cause(of: error))"
}

/// The coupon catalog as the `coupon_stock` table (shared by every process on the database).
public final class PostgresCatalog: CouponCatalog {
    private let store: PostgresDedupeStore
    private let cache = Mutex<[Int64: Int64]>([:])
    private let table: String

    /// The catalog in `store`'s database, in `tables`' schema.
    public init(store: PostgresDedupeStore, tables: PostgresCouponTables) {
        self.store = store
        table = tables.schema + ".coupon_stock"
    }

    /// Inserts the coupon's row (`ON CONFLICT DO NOTHING`): false when it exists.
    public func create(couponId: Int64, stock: Int64) async throws -> Bool {
        let rows = try await store.query(
            "INSERT INTO \(unescaped: table) (coupon_id, stock) VALUES (\(couponId), \(stock)) ON CONFLICT (coupon_id) DO NOTHING RETURNING coupon_id")
        if !rows.isEmpty { cache.withLock { $0[couponId] = stock } }
        return !rows.isEmpty
    }

    /// The coupon's stock (cached once read: stock never changes).
    public func stock(of couponId: Int64) async throws -> Int64? {
        if let s = cache.withLock({ $0[couponId] }) { return s }
        guard let row = try await store.query("SELECT stock FROM \(unescaped: table) WHERE coupon_id = \(couponId)").first else { return nil }
        let s = try row.decode(Int64.self)
        cache.withLock { $0[couponId] = s }
        return s
    }

    /// Every coupon and its stock.
    public func all() async throws -> [Int64: Int64] {
        var out: [Int64: Int64] = [:]
        for row in try await store.query("SELECT coupon_id, stock FROM \(unescaped: table)") {
            let (c, s) = try row.decode((Int64, Int64).self)
            out[c] = s
        }
        return out
    }
}

/// ``CouponEffects`` in PostgreSQL: CouponKit's `PostgresCouponTables` handler for clicks
/// (`UPDATE coupon_stock ... WHERE issued < stock RETURNING issued`, `INSERT INTO issued_coupons`)
/// and a SQL payment-event handler on `coupon_uses`, each in the store's SQL transaction.
public struct PostgresCouponEffects: CouponEffects {
    /// The store.
    public let store: PostgresDedupeStore
    /// The click tables.
    public let tables: PostgresCouponTables

    /// Effects in `store`'s database.
    public init(store: PostgresDedupeStore, tables: PostgresCouponTables) {
        self.store = store
        self.tables = tables
    }

    /// Issues the next serial: two statements in the store's transaction.
    public var clickHandler: RecordHandler<PostgresTransaction> { tables.handler }

    /// A coupon's use or restore, with the same outcomes as ``PaymentHandler``.
    public var eventHandler: RecordHandler<PostgresTransaction> {
        let effects = self
        return { ctx in try await effects.handleEvent(&ctx) }
    }

    func handleEvent(_ ctx: inout HandlerContext<PostgresTransaction>) async throws -> Outcome {
        let e = try OrderEvent.decode(ctx.record.payload)
        let s = tables.schema
        switch e.type {
        case .use:
            let held = try await ctx.transaction.query(
                "SELECT 1 FROM \(unescaped: s).issued_coupons WHERE coupon_id = \(e.couponId) AND member_id = \(e.memberId)")
            guard !held.isEmpty else { return .rejected("coupon not held") }
            // One order's events are handled in order, one at a time: no other transaction
            // writes this order's row meanwhile.
            let used = try await ctx.transaction.query("SELECT 1 FROM \(unescaped: s).coupon_uses WHERE order_id = \(e.orderId)")
            guard used.isEmpty else { return .rejected("order already used a coupon") }
            // Two orders using the same coupon at once: the unique index makes the second wait
            // for the first's commit, then do nothing.
            let inserted = try await ctx.transaction.query("""
                INSERT INTO \(unescaped: s).coupon_uses (order_id, coupon_id, member_id, event_key)
                VALUES (\(e.orderId), \(e.couponId), \(e.memberId), \(ctx.key.rawValue)) ON CONFLICT DO NOTHING RETURNING 1
                """)
            return inserted.isEmpty ? .rejected("coupon already used") : .applied("used")
        case .restore:
            let rows = try await ctx.transaction.query(
                "SELECT coupon_id, member_id, restored FROM \(unescaped: s).coupon_uses WHERE order_id = \(e.orderId)")
            guard let row = rows.first else { return .rejected("restore before use") }
            let (c, m, restored) = try row.decode((Int64, Int64, Bool).self)
            guard c == e.couponId, m == e.memberId else { return .rejected("restore of another coupon than the one used") }
            guard !restored else { return .rejected("already restored") }
            try await ctx.transaction.query("UPDATE \(unescaped: s).coupon_uses SET restored = true WHERE order_id = \(e.orderId)")
            return .applied("restored")
        }
    }

    /// `issued` of the coupon's `coupon_stock` row (0 when there is none).
    public func issued(_ couponId: Int64) async throws -> Int64 {
        let rows = try await store.query("SELECT issued FROM \(unescaped: tables.schema).coupon_stock WHERE coupon_id = \(couponId)")
        return try rows.first?.decode(Int64.self) ?? 0
    }

    /// The coupon's `issued_coupons` rows by serial.
    public func ledger(_ couponId: Int64) async throws -> [LedgerEntry] {
        try await tables.ledger(from: store, coupon: couponId)
    }
}
#endif
