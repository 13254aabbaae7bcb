#if Postgres
import ExactlyOnce
import ExactlyOncePostgres
import PostgresNIO

/// The coupon sale in the user's own PostgreSQL tables: `coupon_stock` (one row per coupon:
/// its stock and how many were issued) and `issued_coupons` (one row per issued coupon:
/// coupon, serial, member, the request's idempotency key), in schema ``schema``. The handler
/// decrements the stock and inserts the coupon in the store's SQL transaction, so both commit
/// with the request's dedupe record or not at all.
///
/// ```sql
/// SELECT coupon_id, serial, member_id FROM coupons.issued_coupons ORDER BY coupon_id, serial;
/// ```
public struct PostgresCouponTables: Sendable {
    /// The schema of the two tables (a lowercase SQL identifier).
    public let schema: String

    /// Tables in `schema`.
    /// - Throws: `ExactlyOnceError/Code/invalidConfiguration` when `schema` is not a lowercase identifier.
    public init(schema: String) throws {
        let ok = !schema.isEmpty && schema.utf8.count <= 63 && schema.utf8.allSatisfy { $0 == UInt8(ascii: "_") || (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }
            && !(UInt8(ascii: "0")...UInt8(ascii: "9")).contains(schema.utf8.first!)
        guard ok else { throw ExactlyOnceError(.invalidConfiguration, "coupon schema must be a lowercase SQL identifier") }
        self.schema = schema
    }

    /// Creates the schema and tables when absent and sets each coupon's stock (a coupon
    /// already there keeps its row: a rerun continues the sale).
    public func create(on store: PostgresDedupeStore, stock: [Int64: Int64]) async throws {
        try await store.query(PostgresQuery(unsafeSQL: "CREATE SCHEMA IF NOT EXISTS \(schema)"))
        try await store.query(PostgresQuery(unsafeSQL: """
            CREATE TABLE IF NOT EXISTS \(schema).coupon_stock (
                coupon_id bigint PRIMARY KEY, stock bigint NOT NULL CHECK (stock >= 0),
                issued bigint NOT NULL DEFAULT 0 CHECK (issued >= 0 AND issued <= stock))
            """))
        try await store.query(PostgresQuery(unsafeSQL: """
            CREATE TABLE IF NOT EXISTS \(schema).issued_coupons (
                coupon_id bigint NOT NULL, serial bigint NOT NULL, member_id bigint NOT NULL, request_key text NOT NULL,
                issued_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (coupon_id, serial), UNIQUE (coupon_id, member_id))
            """))
        for (c, n) in stock.sorted(by: { $0.key < $1.key }) {
            try await store.query("INSERT INTO \(unescaped: schema).coupon_stock (coupon_id, stock) VALUES (\(c), \(n)) ON CONFLICT (coupon_id) DO NOTHING")
        }
    }

    /// Issues the next serial of the request's coupon to its member, or answers "sold out" /
    /// "unknown coupon". Two statements in the store's transaction.
    public func handle(_ ctx: inout HandlerContext<PostgresTransaction>) async throws -> Outcome {
        let (couponId, memberId) = try CouponRequest.decode(ctx.record.payload)
        let rows = try await ctx.transaction.query("""
            UPDATE \(unescaped: schema).coupon_stock SET issued = issued + 1
            WHERE coupon_id = \(couponId) AND issued < stock RETURNING issued
            """)
        guard let row = rows.first else {
            let known = try await ctx.transaction.query("SELECT 1 FROM \(unescaped: schema).coupon_stock WHERE coupon_id = \(couponId)")
            return known.isEmpty ? .rejected("unknown coupon") : .rejected("sold out")
        }
        let serial = try row.decode(Int64.self)
        try await ctx.transaction.query("""
            INSERT INTO \(unescaped: schema).issued_coupons (coupon_id, serial, member_id, request_key)
            VALUES (\(couponId), \(serial), \(memberId), \(ctx.key.rawValue))
            """)
        return .applied(String(serial))
    }

    /// The handler as a closure for ``ExactlyOnceConsumer``.
    public var handler: RecordHandler<PostgresTransaction> {
        let tables = self
        return { ctx in try await tables.handle(&ctx) }
    }

    /// The issued coupons, read back from `issued_coupons`, by coupon then serial: every
    /// coupon's, or `coupon`'s only.
    public func ledger(from store: PostgresDedupeStore, coupon: Int64? = nil) async throws -> [LedgerEntry] {
        let rows = try await store.query(coupon.map {
            "SELECT coupon_id, member_id, serial FROM \(unescaped: schema).issued_coupons WHERE coupon_id = \($0) ORDER BY serial"
        } ?? "SELECT coupon_id, member_id, serial FROM \(unescaped: schema).issued_coupons ORDER BY coupon_id, serial")
        return try rows.map { row in
            let (c, m, s) = try row.decode((Int64, Int64, Int64).self)
            return LedgerEntry(couponId: c, memberId: m, serial: s)
        }
    }
}
#endif
