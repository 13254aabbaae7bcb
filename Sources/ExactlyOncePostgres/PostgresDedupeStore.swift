#if Postgres
import ExactlyOnce
import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle

/// A dedupe store in the user's own PostgreSQL database: the handler of a record writes its
/// effect with SQL (``PostgresTransaction``), and that effect commits in the same SQL
/// transaction as the completion of the record's dedupe record, with its fencing-token, lease
/// and partition-fence checks, or nothing does (G3, the third way: see Docs/Guarantees.md).
///
/// ## Schema
/// Records, fences, the token sequence and the key-value state live in one PostgreSQL schema
/// (``PostgresStoreConfiguration/schema``, default `exactly_once`) that the store creates on
/// first use and stamps with its version in `<schema>.meta`. A schema of a version the store
/// does not know, or a schema that holds tables but no version, is refused with
/// `ExactlyOnceError/Code/storeFailure` and never altered. Claims, completions
/// and releases are PL/pgSQL functions of that schema: a batch of claims is one statement and
/// one round trip, atomic on the server.
///
/// ## Time
/// Leases and retention use the injected `WallClock` (the client's), passed to the server as
/// milliseconds, as the other stores do: tests use a manual clock. Run clients with
/// synchronised clocks.
///
/// ## Batches
/// ``makeCompletionBatch(_:)`` gives a lane a ``PostgresCompletionBatch``: one SQL transaction
/// on one pooled connection, each handler under a savepoint, all completions in one statement
/// before `COMMIT`.
///
/// ## Failures
/// A server that cannot be reached, a statement that passes its deadline or a connection that
/// breaks make the operation throw a retriable error (`ExactlyOnceError/Code/storeUnavailable`
/// or `ExactlyOnceError/Code/timeout`): the outcome is unknown, and the consumer
/// claims again before acting. A wrong password or a missing database is the non-retriable
/// `ExactlyOnceError/Code/storeFailure`, whose message never holds the password.
///
/// ## Use
/// ```swift
/// let store = try await PostgresDedupeStore.connect(try PostgresStoreConfiguration(url: "postgres://app@db:5432/shop"))
/// // Run it as a Service (retention cleanup; closes on shutdown), or call shutdown() yourself.
/// ```
public final class PostgresDedupeStore: DedupeStore, Service {
    /// The handler's SQL transaction.
    public typealias Transaction = PostgresTransaction
    /// A lane's SQL transaction of completions.
    public typealias Batch = PostgresCompletionBatch

    /// The configuration the store was opened with.
    public let configuration: PostgresStoreConfiguration
    let pool: PostgresPool
    let clock: any WallClock
    let logger: Logger
    /// `"schema".` ready to prefix table and function names.
    let s: String

    private init(configuration: PostgresStoreConfiguration, clock: any WallClock, logger: Logger) {
        self.configuration = configuration
        self.clock = clock
        self.logger = logger
        self.pool = PostgresPool(configuration: configuration, logger: logger)
        self.s = "\"\(configuration.schema)\""
    }

    /// Connects, and creates the schema when it is absent or checks its version when present.
    /// - Throws: `ExactlyOnceError/Code/invalidConfiguration` for bad settings,
    ///   `ExactlyOnceError/Code/storeFailure` for a refused login, a missing
    ///   database, missing privileges or a schema of another version, and the retriable
    ///   `ExactlyOnceError/Code/storeUnavailable` or
    ///   `ExactlyOnceError/Code/timeout` when the server cannot be reached in time.
    public static func connect(_ configuration: PostgresStoreConfiguration, clock: any WallClock = SystemWallClock(),
                               logger: Logger = Logger(label: "exactly-once.postgres", factory: { _ in SwiftLogNoOpLogHandler() })) async throws -> PostgresDedupeStore {
        try configuration.validate()
        let store = PostgresDedupeStore(configuration: configuration, clock: clock, logger: logger)
        do {
            try await store.migrate()
        } catch {
            await store.shutdown()
            throw error
        }
        return store
    }

    /// Creates the schema (version ``schemaVersion``) or checks the version of the one there.
    private func migrate() async throws {
        let schema = configuration.schema
        try await operation("opening the schema") { c in
            _ = try await pool.run("BEGIN", on: c)
            do {
                _ = try await pool.run("SELECT pg_advisory_xact_lock(hashtext(\("exactly-once-schema:" + schema))::bigint)", on: c)
                if !configuration.createsSchema {
                    let found = try await pool.run("SELECT to_regclass(\(schema + ".meta")::text)::text", on: c)
                    let table = try found.first?.decode(String?.self) ?? nil
                    guard table != nil else { throw Self.noStore(schema) }
                }
                _ = try await pool.run(PostgresQuery(unsafeSQL: "CREATE SCHEMA IF NOT EXISTS \(s)"), on: c)
                _ = try await pool.run(PostgresQuery(unsafeSQL: "CREATE TABLE IF NOT EXISTS \(s).meta (name text PRIMARY KEY, value text NOT NULL)"), on: c)
                let rows = try await pool.run(PostgresQuery(unsafeSQL: "SELECT value FROM \(s).meta WHERE name = 'schema_version'"), on: c)
                if let row = rows.first {
                    let found = try row.decode(String.self)
                    guard found == String(PostgresSchema.version) else {
                        throw ExactlyOnceError(.storeFailure, "PostgreSQL schema \(schema) has version \(found.prefix(20)); this store knows version \(PostgresSchema.version) only and leaves it as it is (upgrade the library, or use another schema)")
                    }
                } else {
                    guard configuration.createsSchema else { throw Self.noStore(schema) }
                    let others = try await pool.run("""
                        SELECT count(*)::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE n.nspname = \(schema) AND c.relname NOT IN ('meta', 'meta_pkey')
                        """, on: c)
                    let count = try others.first?.decode(Int64.self) ?? 0
                    guard count == 0 else {
                        throw ExactlyOnceError(.storeFailure, "PostgreSQL schema \(schema) holds \(count) relations but no exactly-once schema version; the store leaves it as it is (choose another schema)")
                    }
                    for statement in PostgresSchema.create {
                        _ = try await pool.run(PostgresQuery(unsafeSQL: statement.replacingOccurrences(of: "{s}", with: s)), on: c)
                    }
                    _ = try await pool.run(PostgresQuery(unsafeSQL: "INSERT INTO \(s).meta (name, value) VALUES ('schema_version', '\(PostgresSchema.version)')"), on: c)
                    logger.info("created the exactly-once schema", metadata: ["schema": "\(schema)", "version": "\(PostgresSchema.version)"])
                }
                _ = try await pool.run("COMMIT", on: c)
            } catch {
                _ = try? await pool.run("ROLLBACK", on: c)
                throw error
            }
        }
    }

    /// The error for a schema without a store, when the configuration does not create one.
    static func noStore(_ schema: String) -> ExactlyOnceError {
        ExactlyOnceError(.invalidConfiguration, "PostgreSQL schema \(schema) holds no exactly-once store (and this configuration does not create one)")
    }

    /// The schema version this store creates and reads.
    public static var schemaVersion: Int { PostgresSchema.version }

    /// Runs `body` on a pooled connection, mapping postgres-nio errors to the library's.
    func operation<T>(_ what: String, _ body: (PostgresConnection) async throws -> T) async throws -> T {
        do {
            return try await pool.withConnection(body)
        } catch {
            throw mapped(error, during: what)
        }
    }

    func mapped(_ error: any Error, during what: String) -> ExactlyOnceError {
        if let p = error as? PSQLError, p.code == .server, let state = p.serverInfo?[.sqlState], state == "EO001" {
            return ExactlyOnceError(.fenced, p.serverInfo?[.message] ?? "fenced")
        }
        return PostgresPool.map(error, target: pool.target, username: configuration.username, during: what)
    }

    // MARK: DedupeStore

    /// The configured ``PostgresStoreConfiguration/completionBatchLimit`` (default 64): a batch
    /// is one SQL transaction and one commit.
    public var completionBatchLimit: Int { configuration.completionBatchLimit }

    /// A lane's completion batch: one SQL transaction.
    public func makeCompletionBatch(_ options: CompletionBatchOptions) -> PostgresCompletionBatch {
        PostgresCompletionBatch(store: self, options: options)
    }

    static func epoch(_ fence: PartitionFence?) throws -> (String, Int64) {
        guard let fence else { return ("", 0) }
        guard fence.epoch <= UInt64(Int64.max) else {
            throw ExactlyOnceError(.invalidConfiguration, "partition epoch \(fence.epoch) of \(fence.scope.prefix(80)) is beyond what PostgreSQL's bigint holds")
        }
        guard !fence.scope.isEmpty else { throw ExactlyOnceError(.invalidConfiguration, "a partition fence needs a non-empty scope") }
        return (fence.scope, Int64(fence.epoch))
    }

    public func claim(_ requests: [ClaimRequest]) async throws -> [ClaimResult] {
        guard !requests.isEmpty else { return [] }
        var keys: [String] = [], fps: [ByteBuffer] = [], leases: [Int64] = [], scopes: [String] = [], epochs: [Int64] = [], prefetch: [Bool] = []
        for r in requests {
            keys.append(r.key.rawValue)
            fps.append(ByteBuffer(bytes: r.fingerprint.bytes))
            leases.append(max(0, r.lease.wholeMilliseconds))
            let (sc, ep) = try Self.epoch(r.fence)
            scopes.append(sc)
            epochs.append(ep)
            prefetch.append(r.prefetch)
        }
        let now = clock.now().milliseconds
        let q: PostgresQuery = "SELECT o_kind, o_token, o_attempt, o_lease, o_fp, o_status, o_detail FROM \(unescaped: s).claim(\(keys), \(fps), \(leases), \(scopes), \(epochs), \(prefetch), \(now))"
        let rows = try await operation("claiming") { c in try await pool.run(q, on: c) }
        guard rows.count == requests.count else {
            throw ExactlyOnceError(.storeUnavailable, "PostgreSQL answered \(rows.count) claim results for \(requests.count) requests")
        }
        var out: [ClaimResult] = []
        out.reserveCapacity(rows.count)
        do {
            for (row, request) in zip(rows, requests) {
                let (kind, token, attempt, lease, fp, status, detail) = try row.decode((Int16, Int64?, Int32?, Int64?, ByteBuffer?, Int16?, ByteBuffer?).self)
                let outcome = status.map { Outcome(status: Outcome.Status(rawValue: UInt8(truncatingIfNeeded: $0)), detail: detail.map { Array($0.readableBytesView) } ?? []) }
                switch kind {
                case 0:
                    guard let token, let attempt, let lease, token > 0 else { throw ExactlyOnceError(.invalidPayload, "a new claim came back without its token") }
                    out.append(.new(Claim(key: request.key, token: FencingToken(UInt64(token)), attempt: Int(attempt),
                                          leaseExpiresAt: Timestamp(milliseconds: lease), fingerprint: request.fingerprint, fence: request.fence)))
                case 1:
                    out.append(.completed(outcome ?? Outcome(status: .applied)))
                case 2:
                    out.append(.inProgress(leaseExpiresAt: Timestamp(milliseconds: lease ?? 0)))
                case 3:
                    guard let fp else { throw ExactlyOnceError(.invalidPayload, "a conflict came back without the stored fingerprint") }
                    out.append(.conflict(stored: try PayloadFingerprint(bytes: Array(fp.readableBytesView)), outcome: outcome))
                default:
                    throw ExactlyOnceError(.invalidPayload, "unknown claim answer kind \(kind)")
                }
            }
        } catch let e as ExactlyOnceError {
            throw ExactlyOnceError(.storeUnavailable, "PostgreSQL's claim answer could not be read: \(e.message)")
        } catch {
            throw ExactlyOnceError(.storeUnavailable, "PostgreSQL's claim answer could not be read (\(ExactlyOnceError.Cause(of: error)))")
        }
        return out
    }

    /// The arrays of the schema's `complete` function.
    struct CompletionArrays {
        var keys: [String] = [], tokens: [Int64] = [], scopes: [String] = [], epochs: [Int64] = []
        var statuses: [Int16] = [], details: [ByteBuffer] = []
        var fxOwner: [Int32] = [], fxKind: [Int16] = [], fxKey: [String] = [], fxValue: [ByteBuffer] = [], fxVersion: [Int64] = []

        mutating func append(_ c: Completion, index: Int) throws {
            guard c.outcome.detail.count <= 65_536 else {
                throw ExactlyOnceError(.limitExceeded, "an outcome's detail is \(c.outcome.detail.count) bytes; the limit is 64 KiB")
            }
            keys.append(c.claim.key.rawValue)
            tokens.append(Int64(truncatingIfNeeded: c.claim.token.rawValue))
            let (sc, ep) = try PostgresDedupeStore.epoch(c.claim.fence)
            scopes.append(sc)
            epochs.append(ep)
            statuses.append(Int16(c.outcome.status.rawValue))
            details.append(ByteBuffer(bytes: c.outcome.detail))
            for r in c.effects.readList.sorted(by: { $0.key < $1.key }) {
                fxOwner.append(Int32(index + 1)); fxKind.append(0); fxKey.append(r.key); fxValue.append(ByteBuffer()); fxVersion.append(Int64(truncatingIfNeeded: r.version))
            }
            for w in c.effects.writeList.sorted(by: { $0.key < $1.key }) {
                fxOwner.append(Int32(index + 1)); fxKind.append(w.value == nil ? 2 : 1); fxKey.append(w.key)
                fxValue.append(ByteBuffer(bytes: w.value ?? [])); fxVersion.append(0)
            }
        }
    }

    /// Runs the schema's `complete` over `arrays` on `connection`; returns how many applied and
    /// the refusal of the next.
    func complete(_ a: CompletionArrays, all: Bool, on connection: PostgresConnection) async throws -> BatchCompletion {
        let now = clock.now().milliseconds
        let retention: Int64? = configuration.retention.map { $0.wholeMilliseconds }
        let q: PostgresQuery = """
            SELECT o_applied, o_code, o_message FROM \(unescaped: s).complete(\(a.keys), \(a.tokens), \(a.scopes), \(a.epochs), \(a.statuses), \
            \(a.details), \(retention), \(now), \(all), \(a.fxOwner), \(a.fxKind), \(a.fxKey), \(a.fxValue), \(a.fxVersion))
            """
        let rows = try await pool.run(q, on: connection)
        guard let row = rows.first else { throw ExactlyOnceError(.storeUnavailable, "PostgreSQL answered no completion result") }
        let (applied, code, message) = try row.decode((Int32, String?, String?).self)
        guard let code else { return BatchCompletion(applied: Int(applied), failure: nil) }
        let failure = ExactlyOnceError(code == "transactionConflict" ? .transactionConflict : .fenced, message ?? code)
        return BatchCompletion(applied: Int(applied), failure: failure)
    }

    public func complete(_ completion: Completion) async throws {
        let r = try await complete([completion])
        if let failure = r.failure, r.applied < 1 { throw failure }
    }

    public func complete(_ completions: [Completion]) async throws -> BatchCompletion {
        guard !completions.isEmpty else { return BatchCompletion(applied: 0, failure: nil) }
        var a = CompletionArrays()
        for (i, c) in completions.enumerated() { try a.append(c, index: i) }
        return try await operation("completing") { c in try await complete(a, all: false, on: c) }
    }

    public func release(_ claim: Claim, reason: String) async throws {
        let (sc, ep) = try Self.epoch(claim.fence)
        let token = Int64(truncatingIfNeeded: claim.token.rawValue)
        let q: PostgresQuery = "SELECT \(unescaped: s).release(\(claim.key.rawValue), \(token), \(sc), \(ep), \(String(reason.prefix(512))))"
        // The release charges the attempt the claim stood for (an uncharged prefetch that ran
        // its handler counts as an attempt), in the same transaction.
        let charge: PostgresQuery = """
            UPDATE \(unescaped: s).records SET attempts = GREATEST(attempts, \(Int32(clamping: claim.attempt)))
            WHERE key = \(claim.key.rawValue) AND token = \(token)
            """
        _ = try await operation("releasing") { c in
            _ = try await pool.run("BEGIN", on: c)
            do {
                _ = try await pool.run(q, on: c)
                _ = try await pool.run(charge, on: c)
                _ = try await pool.run("COMMIT", on: c)
            } catch {
                _ = try? await pool.run("ROLLBACK", on: c)
                throw error
            }
        }
    }

    public func readState(_ keys: [String]) async throws -> [String: VersionedValue] {
        var out: [String: VersionedValue] = [:]
        for k in keys { out[k] = VersionedValue(value: nil, version: 0) }
        guard !keys.isEmpty else { return out }
        let q: PostgresQuery = "SELECT key, value, version FROM \(unescaped: s).state WHERE key = ANY(\(keys))"
        let rows = try await operation("reading state") { c in try await pool.run(q, on: c) }
        for row in rows {
            let (k, v, version) = try row.decode((String, ByteBuffer?, Int64).self)
            out[k] = VersionedValue(value: v.map { Array($0.readableBytesView) }, version: UInt64(max(0, version)))
        }
        return out
    }

    static let recordColumns = "key, fingerprint, phase, attempts, token, lease_expires_at, outcome_status, outcome_detail, expires_at, last_failure, fence_scope, fence_epoch"

    static func record(_ row: PostgresRow) throws -> DedupeRecord {
        let (key, fp, phase, attempts, token, lease, status, detail, expires, failure, scope, epoch) =
            try row.decode((String, ByteBuffer, Int16, Int32, Int64, Int64, Int16?, ByteBuffer?, Int64?, String?, String?, Int64?).self)
        guard let p = DedupeRecord.Phase(rawValue: UInt8(truncatingIfNeeded: phase)) else {
            throw ExactlyOnceError(.corruptData, "a dedupe record has phase \(phase)")
        }
        let outcome = status.map { Outcome(status: Outcome.Status(rawValue: UInt8(truncatingIfNeeded: $0)), detail: detail.map { Array($0.readableBytesView) } ?? []) }
        return DedupeRecord(
            key: try IdempotencyKey(rawValue: key), fingerprint: try PayloadFingerprint(bytes: Array(fp.readableBytesView)), phase: p,
            attempts: Int(attempts), token: FencingToken(UInt64(max(0, token))), leaseExpiresAt: Timestamp(milliseconds: lease),
            outcome: p == .completed ? outcome : nil, expiresAt: expires.map { Timestamp(milliseconds: $0) }, lastFailure: failure,
            fence: scope.map { PartitionFence(scope: $0, epoch: UInt64(max(0, epoch ?? 0))) })
    }

    public func records(for keys: [IdempotencyKey]) async throws -> [IdempotencyKey: DedupeRecord] {
        guard !keys.isEmpty else { return [:] }
        let raw = keys.map(\.rawValue)
        let q: PostgresQuery = "SELECT \(unescaped: Self.recordColumns) FROM \(unescaped: s).records WHERE key = ANY(\(raw))"
        let rows = try await operation("reading records") { c in try await pool.run(q, on: c) }
        var out: [IdempotencyKey: DedupeRecord] = [:]
        for row in rows {
            let r = try Self.record(row)
            out[r.key] = r
        }
        return out
    }

    public func listRecords(_ query: RecordQuery) async throws -> RecordPage {
        let limit = try query.validatedLimit()
        let now = clock.now().milliseconds
        let phase: Int16? = query.phase.map { Int16($0.rawValue) }
        let status: Int16? = query.outcomeStatus.map { Int16($0.rawValue) }
        let q: PostgresQuery = """
            SELECT \(unescaped: Self.recordColumns) FROM \(unescaped: s).records
            WHERE (phase <> 3 OR expires_at IS NULL OR expires_at > \(now))
              AND (\(phase)::smallint IS NULL OR phase = \(phase))
              AND (\(status)::smallint IS NULL OR (phase = 3 AND outcome_status = \(status)))
              AND (\(query.failureContains)::text IS NULL OR (last_failure IS NOT NULL AND strpos(last_failure, \(query.failureContains)) > 0))
              AND (\(query.cursor)::text IS NULL OR key > \(query.cursor))
            ORDER BY key LIMIT \(Int64(limit + 1))
            """
        let rows = try await operation("listing records") { c in try await pool.run(q, on: c) }
        var records = try rows.map(Self.record)
        var next: String?
        if records.count > limit {
            records.removeLast(records.count - limit)
            next = records.last?.key.rawValue
        }
        return RecordPage(records: records, nextCursor: next)
    }

    public func reopenDeadLettered(_ key: IdempotencyKey) async throws -> Bool {
        let now = clock.now().milliseconds
        let q: PostgresQuery = """
            UPDATE \(unescaped: s).records SET phase = 2, attempts = 0, outcome_status = NULL, outcome_detail = NULL, expires_at = NULL,
                lease_expires_at = \(now), last_failure = 'reopened for dead-letter replay'
            WHERE key = \(key.rawValue) AND phase = 3 AND outcome_status = 2 RETURNING 1
            """
        let rows = try await operation("reopening a dead letter") { c in try await pool.run(q, on: c) }
        return !rows.isEmpty
    }

    /// Runs one statement on a pooled connection, outside any batch (autocommit), within the
    /// statement deadline: for setting up the application's tables, reading them back, audits.
    /// - Throws: ``PostgresStatementError`` when the server refused it, and the library's
    ///   retriable errors when the server could not be reached in time.
    @discardableResult
    public func query(_ query: PostgresQuery) async throws -> [PostgresRow] {
        do {
            return try await pool.withConnection { c in try await pool.run(query, on: c) }
        } catch let e as PSQLError where e.code == .server {
            throw PostgresStatementError(e) ?? PostgresStatementError(sqlState: "XX000")
        } catch {
            throw mapped(error, during: "running a statement")
        }
    }

    // MARK: Retention and lifecycle

    /// Deletes completed records whose retention ended, in statements of at most
    /// ``PostgresStoreConfiguration/cleanupBatch`` records; returns how many.
    @discardableResult
    public func purgeExpired() async throws -> Int {
        var total = 0
        while true {
            let now = clock.now().milliseconds
            let q: PostgresQuery = "SELECT \(unescaped: s).purge(\(now), \(Int32(configuration.cleanupBatch)))"
            let rows = try await operation("deleting expired records") { c in try await pool.run(q, on: c) }
            let n = Int(try rows.first?.decode(Int32.self) ?? 0)
            total += n
            if n < configuration.cleanupBatch { return total }
        }
    }

    /// Runs the retention cleanup every ``PostgresStoreConfiguration/cleanupInterval`` (when a
    /// retention is set) until cancelled or gracefully shut down, then closes the pool. In a
    /// `ServiceGroup`, list the store before the consumers that use it.
    public func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                if self.configuration.retention != nil {
                    do {
                        let n = try await self.purgeExpired()
                        if n > 0 { self.logger.debug("deleted expired dedupe records", metadata: ["count": "\(n)"]) }
                    } catch {
                        self.logger.info("retention cleanup failed; trying again later", metadata: ["error": "\(error)"])
                    }
                }
                try? await Task.sleep(for: self.configuration.cleanupInterval)
            }
        }
        await shutdown()
    }

    /// Closes the idle connections and refuses further operations.
    public func shutdown() async {
        await pool.shutdown()
    }
}
#endif
