#if Postgres
import ExactlyOnce
import Logging
import PostgresNIO
import Synchronization

/// The error of one of the handler's own SQL statements (or the store's), as far as it is safe
/// to show: the SQLSTATE, its class name, and the names of the table, column and constraint
/// involved. Never the server's message or detail, which may quote row values.
public struct PostgresStatementError: Error, Sendable, CustomStringConvertible {
    /// The five-character SQLSTATE (`23505` for a unique violation).
    public let sqlState: String
    /// The constraint that was violated, when the server names one.
    public let constraint: String?
    /// The table involved, when the server names one.
    public let table: String?
    /// The column involved, when the server names one.
    public let column: String?

    /// Whether this is a unique-constraint violation (SQLSTATE 23505).
    public var isUniqueViolation: Bool { sqlState == "23505" }

    public var description: String {
        var s = "SQL statement failed: SQLSTATE \(sqlState)"
        if let name = Self.names[sqlState] { s += " (\(name))" }
        if let table { s += " on table \(table)" }
        if let column { s += " column \(column)" }
        if let constraint { s += " constraint \(constraint)" }
        return s
    }

    static let names = [
        "23505": "unique_violation", "23503": "foreign_key_violation", "23502": "not_null_violation",
        "23514": "check_violation", "40001": "serialization_failure", "40P01": "deadlock_detected",
        "42P01": "undefined_table", "42703": "undefined_column", "42601": "syntax_error", "22P02": "invalid_text_representation",
        "25P02": "in_failed_sql_transaction", "57014": "query_canceled", "42501": "insufficient_privilege",
    ]

    init?(_ e: PSQLError) {
        guard e.code == .server, let info = e.serverInfo, let state = info[.sqlState] else { return nil }
        sqlState = state
        constraint = info[.constraintName]
        table = info[.tableName]
        column = info[.columnName]
    }
}

/// A small pool of PostgreSQL connections with deadlines on connecting, on waiting for a free
/// connection and on every statement.
final class PostgresPool: Sendable {
    let configuration: PostgresStoreConfiguration
    let logger: Logger
    private let state: PoolState

    init(configuration: PostgresStoreConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
        self.state = PoolState(max: configuration.poolSize)
    }

    var target: String { configuration.endpoint.description }

    private func connectionConfiguration() -> PostgresConnection.Configuration {
        var c: PostgresConnection.Configuration
        switch configuration.endpoint.kind {
        case .tcp(let host, let port):
            c = .init(host: host, port: port, username: configuration.username, password: configuration.password,
                      database: configuration.database, tls: .disable)
        case .unix(let path):
            c = .init(unixSocketPath: path, username: configuration.username, password: configuration.password, database: configuration.database)
        }
        // postgres-nio's own limit is a backstop at twice ours, so ours (which counts startup and
        // authentication too, and says `timeout`) is the one that fires.
        c.options.connectTimeout = .nanoseconds(Int64(configuration.connectTimeout.wholeMilliseconds) * 2_000_000)
        return c
    }

    /// Opens a connection within ``PostgresStoreConfiguration/connectTimeout`` (socket, startup
    /// and authentication together).
    func connect() async throws -> PostgresConnection {
        let config = connectionConfiguration()
        let id = state.nextID()
        let logger = self.logger
        let timeout = configuration.connectTimeout
        let target = self.target
        do {
            return try await withThrowingTaskGroup(of: PostgresConnection?.self) { group in
                group.addTask { try await PostgresConnection.connect(configuration: config, id: id, logger: logger) }
                group.addTask {
                    try await Task.sleep(for: timeout)
                    return nil
                }
                defer { group.cancelAll() }
                guard let first = try await group.next(), let connection = first else {
                    throw ExactlyOnceError(.timeout, "PostgreSQL at \(target) did not complete the connection within \(timeout)")
                }
                return connection
            }
        } catch let e as ExactlyOnceError {
            throw e
        } catch {
            throw Self.map(error, target: target, username: configuration.username, during: "connecting")
        }
    }

    /// Takes a connection (an idle one, a new one, or the next one freed).
    func acquire() async throws -> PostgresConnection {
        switch try await state.acquire(timeout: configuration.acquireTimeout) {
        case .idle(let c): return c
        case .slot:
            do {
                return try await connect()
            } catch {
                state.returnSlot()
                throw error
            }
        }
    }

    /// Gives a connection back; a broken (or possibly mid-transaction) one is closed instead.
    func release(_ connection: PostgresConnection, healthy: Bool) {
        if healthy && !connection.isClosed {
            state.giveBack(connection)
        } else {
            connection.close().whenComplete { _ in _ = connection }
            state.returnSlot()
        }
    }

    /// Runs `body` with a connection, closing it instead of reusing it when `body` throws an
    /// error that leaves it in an unknown state.
    func withConnection<T>(_ body: (PostgresConnection) async throws -> T) async throws -> T {
        let c = try await acquire()
        do {
            let r = try await body(c)
            release(c, healthy: true)
            return r
        } catch let e as ExactlyOnceError where !e.isRetriable && e.code != .storeFailure {
            release(c, healthy: true)  // refused by the store's rules: the connection is fine
            throw e
        } catch let e as PSQLError where e.code == .server {
            release(c, healthy: true)  // the server refused an autocommit statement: the connection is fine
            throw e
        } catch {
            release(c, healthy: false)
            throw error
        }
    }

    /// Runs one statement on `connection` and collects its rows, within the statement deadline:
    /// when it passes, the connection is closed (failing the statement) and this throws
    /// ``ExactlyOnceError/Code/timeout``.
    func run(_ query: PostgresQuery, on connection: PostgresConnection) async throws -> [PostgresRow] {
        let timeout = configuration.statementTimeout
        let fired = TimerFlag()
        let timer = connection.eventLoop.scheduleTask(in: .nanoseconds(Int64(timeout.wholeMilliseconds) * 1_000_000)) {
            fired.set()
            connection.close().whenComplete { _ in _ = connection }
        }
        defer { timer.cancel() }
        do {
            let rows = try await connection.query(query, logger: logger)
            var out: [PostgresRow] = []
            for try await row in rows { out.append(row) }
            return out
        } catch {
            if fired.isSet {
                throw ExactlyOnceError(.timeout, "PostgreSQL at \(target) did not answer a statement within \(timeout); the connection was closed and the outcome is unknown")
            }
            throw error
        }
    }

    /// Closes every idle connection and refuses new ones.
    func shutdown() async {
        for c in state.shutdown() { try? await c.close() }
    }

    /// Maps a postgres-nio error to the library's error without quoting the server's message.
    static func map(_ error: any Error, target: String, username: String, during: String) -> ExactlyOnceError {
        if let e = error as? ExactlyOnceError { return e }
        if let p = error as? PSQLError {
            let cause = ExactlyOnceError.Cause(type: "PSQLError", code: p.serverInfo?[.sqlState] ?? "\(p.code)")
            if p.code == .server, let state = p.serverInfo?[.sqlState] {
                switch state {
                case "28P01", "28000":
                    return ExactlyOnceError(.storeFailure, "PostgreSQL at \(target) refused the login of role \(username) (SQLSTATE \(state): wrong password or no access)", cause: cause)
                case "3D000":
                    return ExactlyOnceError(.storeFailure, "PostgreSQL at \(target): the database does not exist (SQLSTATE 3D000)", cause: cause)
                case "57P01", "57P02", "57P03", "08000", "08003", "08006", "08001", "08004", "53300":
                    return ExactlyOnceError(.storeUnavailable, "PostgreSQL at \(target) is shutting down, starting up or refusing connections (SQLSTATE \(state)) while \(during)", cause: cause)
                case "40001", "40P01":
                    return ExactlyOnceError(.transactionConflict, "PostgreSQL at \(target) aborted a transaction (SQLSTATE \(state)) while \(during)", cause: cause)
                default:
                    let detail = PostgresStatementError(p).map { $0.description } ?? "SQLSTATE \(state)"
                    return ExactlyOnceError(.storeFailure, "PostgreSQL at \(target) refused a statement while \(during): \(detail)", cause: cause)
                }
            }
            switch p.code {
            case .unsupportedAuthMechanism, .authMechanismRequiresPassword, .saslError:
                return ExactlyOnceError(.storeFailure, "PostgreSQL at \(target) asked role \(username) for an authentication this client cannot give (\(p.code))", cause: cause)
            default:
                return ExactlyOnceError(.storeUnavailable, "PostgreSQL at \(target) could not be reached or the connection broke while \(during) (\(p.code)); the outcome is unknown", cause: cause)
            }
        }
        return ExactlyOnceError(.storeUnavailable, "PostgreSQL at \(target) could not be reached while \(during) (\(ExactlyOnceError.Cause(of: error)))", cause: ExactlyOnceError.Cause(of: error))
    }
}

/// Set once, from the event loop's timer, read by the task that ran the statement.
final class TimerFlag: Sendable {
    private let value = Mutex(false)
    func set() { value.withLock { $0 = true } }
    var isSet: Bool { value.withLock { $0 } }
}

/// The pool's bookkeeping, behind a lock.
final class PoolState: Sendable {
    enum Grant: Sendable {
        case idle(PostgresConnection)
        case slot
    }

    private struct Waiter {
        let id: UInt64
        let continuation: CheckedContinuation<Grant, any Error>
    }

    private struct Inner {
        var idle: [PostgresConnection] = []
        var open = 0
        var waiters: [Waiter] = []
        var nextWaiter: UInt64 = 0
        var nextID = 0
        var closed = false
    }

    private let max: Int
    private let inner = Mutex(Inner())

    init(max: Int) { self.max = max }

    func nextID() -> Int {
        inner.withLock { s in
            s.nextID += 1
            return s.nextID
        }
    }

    func acquire(timeout: Duration) async throws -> Grant {
        enum Immediate { case grant(Grant), wait(UInt64), closed }
        let now: Immediate = inner.withLock { s in
            if s.closed { return .closed }
            while let c = s.idle.popLast() {
                if !c.isClosed { return .grant(.idle(c)) }
                s.open -= 1
            }
            if s.open < max {
                s.open += 1
                return .grant(.slot)
            }
            s.nextWaiter += 1
            return .wait(s.nextWaiter)
        }
        switch now {
        case .closed: throw ExactlyOnceError(.shutDown, "the PostgreSQL store was shut down")
        case .grant(let g): return g
        case .wait(let id):
            return try await withCheckedThrowingContinuation { (c: CheckedContinuation<Grant, any Error>) in
                inner.withLock { $0.waiters.append(Waiter(id: id, continuation: c)) }
                // The waiter gives up after `timeout` unless a connection came first.
                Task { [self] in
                    try? await Task.sleep(for: timeout)
                    let expired: Waiter? = inner.withLock { s in
                        guard let i = s.waiters.firstIndex(where: { $0.id == id }) else { return nil }
                        return s.waiters.remove(at: i)
                    }
                    expired?.continuation.resume(throwing: ExactlyOnceError(.timeout, "no PostgreSQL connection of the store's \(max) became free within \(timeout) (raise poolSize?)"))
                }
            }
        }
    }

    func giveBack(_ c: PostgresConnection) {
        let waiter: Waiter? = inner.withLock { s in
            if s.closed {
                s.open -= 1
                return nil
            }
            if !s.waiters.isEmpty { return s.waiters.removeFirst() }
            s.idle.append(c)
            return nil
        }
        if let waiter { waiter.continuation.resume(returning: .idle(c)) } else if inner.withLock({ $0.closed }) { c.close().whenComplete { _ in _ = c } }
    }

    func returnSlot() {
        let waiter: Waiter? = inner.withLock { s in
            if !s.closed, !s.waiters.isEmpty { return s.waiters.removeFirst() }
            s.open -= 1
            return nil
        }
        waiter?.continuation.resume(returning: .slot)
    }

    func shutdown() -> [PostgresConnection] {
        let (idle, waiters): ([PostgresConnection], [Waiter]) = inner.withLock { s in
            s.closed = true
            let out = s.idle
            s.open -= out.count
            s.idle = []
            let w = s.waiters
            s.waiters = []
            return (out, w)
        }
        for w in waiters { w.continuation.resume(throwing: ExactlyOnceError(.shutDown, "the PostgreSQL store was shut down")) }
        return idle
    }
}

extension Duration {
    var wholeMilliseconds: Int64 {
        let (s, atto) = components
        return s * 1000 + atto / 1_000_000_000_000_000
    }
}
#endif
