#if Postgres
import ExactlyOnce
import PostgresNIO

/// The handler's effect transaction on ``PostgresDedupeStore``: statements on the store's
/// connection, inside the SQL transaction that also completes the record's dedupe record.
///
/// Everything the handler runs here commits together with the completion (and the other
/// completions of the lane's batch), or not at all. Each handler runs under a savepoint of its
/// own: when one of its statements fails, everything the handler ran in this attempt is rolled
/// back at once, the error is thrown as a ``PostgresStatementError`` (a unique-constraint
/// violation, say), and the other handlers of the batch keep their effects. A handler that
/// rethrows it fails the attempt (retried, then dead-lettered); a handler that expects a failure
/// and wants to keep its other statements runs the statement that may fail in
/// ``savepoint(_:)``.
///
/// Run under the server's default isolation (`READ COMMITTED`): write effects as single
/// conditional statements (`UPDATE coupon_stock SET remaining = remaining - 1 WHERE ... AND
/// remaining > 0 RETURNING remaining`), or lock what you read with `SELECT ... FOR UPDATE`.
/// Do not run `COMMIT`, `ROLLBACK` or `SAVEPOINT` yourself.
public struct PostgresTransaction {
    let session: BatchSession
    let scope: Scope

    /// One savepoint level: created before its first statement, rolled back on a failure.
    final class Scope {
        let name: String
        var created = false
        var failure: PostgresStatementError?
        init(name: String) { self.name = name }
    }

    /// The store's schema (``PostgresStoreConfiguration/schema``), for handlers that keep their
    /// tables next to it.
    public var storeSchema: String { session.store.configuration.schema }

    /// Runs one statement and returns its rows (use `RETURNING` to see what a write did).
    /// - Throws: ``PostgresStatementError`` when the server refused it (this attempt's effect is
    ///   then rolled back, and every further statement of the attempt throws the same error);
    ///   `ExactlyOnceError` (`storeUnavailable`, `timeout`) when the connection
    ///   broke or the statement passed its deadline.
    @discardableResult
    public func query(_ query: PostgresQuery) async throws -> [PostgresRow] {
        if let failure = scope.failure { throw failure }
        try await session.prepare(scope)
        do {
            return try await session.run(query)
        } catch let e as PSQLError where e.code == .server {
            let failure = PostgresStatementError(e) ?? PostgresStatementError(sqlState: "XX000")
            try await session.rollback(to: scope)
            scope.failure = failure
            throw failure
        }
    }

    /// Runs `body` under a nested savepoint: if it throws, what it ran is rolled back and the
    /// error rethrown, and the statements before it are kept (catch the error to go on).
    public func savepoint<T>(_ body: (PostgresTransaction) async throws -> T) async throws -> T {
        if let failure = scope.failure { throw failure }
        try await session.prepare(scope)
        let inner = PostgresTransaction(session: session, scope: Scope(name: session.nextSavepoint()))
        do {
            return try await body(inner)
        } catch {
            if inner.scope.created && inner.scope.failure == nil && session.isUsable { try await session.rollback(to: inner.scope) }
            throw error
        }
    }
}

extension PostgresStatementError {
    init(sqlState: String) {
        self.sqlState = sqlState
        self.constraint = nil
        self.table = nil
        self.column = nil
    }
}

/// The connection and SQL transaction of one completion batch.
final class BatchSession {
    let store: PostgresDedupeStore
    private(set) var connection: PostgresConnection?
    private(set) var broken = false
    private var counter = 0

    init(store: PostgresDedupeStore) { self.store = store }

    var isUsable: Bool { connection != nil && !broken }

    func markBroken() { broken = true }

    func nextSavepoint() -> String {
        counter += 1
        return "eo_\(counter)"
    }

    /// Takes a connection and begins the transaction, once.
    func begin() async throws -> PostgresConnection {
        if broken { throw ExactlyOnceError(.storeUnavailable, "the batch's PostgreSQL connection broke; its transaction is gone") }
        if let connection { return connection }
        let c: PostgresConnection
        do {
            c = try await store.pool.acquire()
        } catch {
            throw store.mapped(error, during: "taking a connection")
        }
        connection = c
        do {
            _ = try await store.pool.run("BEGIN", on: c)
        } catch {
            broken = true
            throw store.mapped(error, during: "beginning a transaction")
        }
        return c
    }

    /// Begins the transaction and creates `scope`'s savepoint, once.
    func prepare(_ scope: PostgresTransaction.Scope) async throws {
        _ = try await begin()
        guard !scope.created else { return }
        try await runChecked(PostgresQuery(unsafeSQL: "SAVEPOINT \(scope.name)"), during: "creating a savepoint")
        scope.created = true
    }

    /// Runs a statement of the handler's; server errors come back as they are, anything else
    /// breaks the session.
    func run(_ query: PostgresQuery) async throws -> [PostgresRow] {
        let c = try await begin()
        do {
            return try await store.pool.run(query, on: c)
        } catch let e as PSQLError where e.code == .server {
            throw e
        } catch {
            broken = true
            throw store.mapped(error, during: "running a handler's statement")
        }
    }

    /// Runs one of the batch's own statements; any failure breaks the session.
    func runChecked(_ query: PostgresQuery, during what: String) async throws {
        let c = try await begin()
        do {
            _ = try await store.pool.run(query, on: c)
        } catch {
            broken = true
            throw store.mapped(error, during: what)
        }
    }

    func rollback(to scope: PostgresTransaction.Scope) async throws {
        guard scope.created else { return }
        try await runChecked(PostgresQuery(unsafeSQL: "ROLLBACK TO SAVEPOINT \(scope.name)"), during: "rolling back a savepoint")
    }

    /// Ends the session: the connection goes back to the pool (closed when broken or still in
    /// a transaction).
    func finish(committed: Bool) async {
        guard let c = connection else { return }
        connection = nil
        if !committed && !broken {
            do {
                _ = try await store.pool.run("ROLLBACK", on: c)
            } catch {
                broken = true
            }
        }
        store.pool.release(c, healthy: !broken)
        broken = false
        counter = 0
    }
}

/// A lane's completion batch on ``PostgresDedupeStore``: one SQL transaction on one pooled
/// connection, from the first handler's first statement to ``commit()``.
///
/// Each handler runs under its own savepoint (``PostgresTransaction``). ``commit()`` completes
/// every staged record in one statement (the schema's `complete` function: token, lease and
/// partition fence checked under row locks), then `COMMIT`s: the handlers' effects and their
/// completions become durable together. When a completion is refused (its claim is no longer
/// current), the effects from that record on are rolled back to its savepoint, the records
/// before it commit, and the refusal is reported: all or a prefix, as in the other stores.
/// A commit whose outcome is unknown (the connection broke) is never resent; it throws, and the
/// consumer claims again, which tells what happened.
public struct PostgresCompletionBatch: CompletionBatch {
    /// The handler's SQL transaction.
    public typealias Transaction = PostgresTransaction

    let store: PostgresDedupeStore
    let options: CompletionBatchOptions
    private let session: BatchSession
    private var staged: [(completion: Completion, scope: PostgresTransaction.Scope?)] = []

    init(store: PostgresDedupeStore, options: CompletionBatchOptions) {
        self.store = store
        self.options = options
        self.session = BatchSession(store: store)
    }

    /// Completions staged.
    public var count: Int { staged.count }

    /// Runs the handler under a savepoint of the batch's transaction and stages its completion.
    public mutating func perform(_ claim: Claim, _ body: (inout PostgresTransaction) async throws -> Outcome) async throws -> Outcome {
        var tx = PostgresTransaction(session: session, scope: .init(name: session.nextSavepoint()))
        let outcome: Outcome
        do {
            outcome = try await body(&tx)
        } catch {
            if tx.scope.created && tx.scope.failure == nil && session.isUsable { try? await session.rollback(to: tx.scope) }
            throw error
        }
        if outcome.detail.count > 65_536 {
            if tx.scope.created && session.isUsable { try? await session.rollback(to: tx.scope) }
            throw ExactlyOnceError(.limitExceeded, "an outcome's detail is \(outcome.detail.count) bytes; the limit is 64 KiB")
        }
        staged.append((Completion(claim: claim, outcome: outcome), tx.scope.created ? tx.scope : nil))
        return outcome
    }

    /// Stages a completion without effect.
    public mutating func stage(_ claim: Claim, outcome: Outcome) async throws {
        staged.append((Completion(claim: claim, outcome: outcome), nil))
    }

    /// Completes the staged records and commits, all or a prefix.
    public mutating func commit() async throws -> BatchCompletion {
        guard !staged.isEmpty else {
            await session.finish(committed: false)
            return BatchCompletion(applied: 0, failure: nil)
        }
        let entries = staged
        staged.removeAll(keepingCapacity: true)
        do {
            let c = try await session.begin()
            var upTo = entries.count
            var failure: ExactlyOnceError?
            while upTo > 0 {
                var a = PostgresDedupeStore.CompletionArrays()
                for (i, e) in entries[..<upTo].enumerated() { try a.append(e.completion, index: i) }
                let r: BatchCompletion
                do {
                    r = try await store.complete(a, all: true, on: c)
                } catch {
                    throw store.mapped(error, during: "completing a batch")
                }
                guard let refused = r.failure else { break }
                failure = refused
                upTo = min(max(0, r.applied), upTo - 1)
                if let scope = entries[upTo...].first(where: { $0.scope != nil })?.scope {
                    try await session.rollback(to: scope)
                }
            }
            if upTo == 0 {
                await session.finish(committed: false)
                return BatchCompletion(applied: 0, failure: failure)
            }
            do {
                _ = try await store.pool.run("COMMIT", on: c)
            } catch let e as PSQLError where e.code == .server {
                // The server refused the commit (a deferred constraint, a serialization failure):
                // the transaction is rolled back, nothing applied.
                await session.finish(committed: true)
                return BatchCompletion(applied: 0, failure: store.mapped(e, during: "committing a batch"))
            }
            await session.finish(committed: true)
            return BatchCompletion(applied: upTo, failure: failure)
        } catch {
            await session.finishBroken()
            throw (error as? ExactlyOnceError) ?? store.mapped(error, during: "committing a batch")
        }
    }

    /// Rolls the transaction back.
    public mutating func discard() async {
        staged.removeAll(keepingCapacity: true)
        await session.finish(committed: false)
    }
}

extension BatchSession {
    /// Ends a session whose commit outcome is unknown: the connection is closed.
    func finishBroken() async {
        guard connection != nil else { return }
        markBroken()
        await finish(committed: false)
    }
}
#endif
