#if Postgres
import ExactlyOnce
import Foundation

/// How ``PostgresDedupeStore`` reaches PostgreSQL, where its tables live, and its limits.
///
/// The ``password`` never appears in ``description``, in errors or in logs.
public struct PostgresStoreConfiguration: Sendable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// Where the server listens.
    public struct Endpoint: Sendable, Hashable, CustomStringConvertible {
        enum Kind: Sendable, Hashable {
            case tcp(host: String, port: Int)
            case unix(path: String)
        }
        let kind: Kind
        /// A TCP endpoint.
        public static func tcp(host: String, port: Int = 5432) -> Endpoint { Endpoint(kind: .tcp(host: host, port: port)) }
        /// A unix domain socket: the socket file itself (for example `/run/postgresql/.s.PGSQL.5432`).
        public static func unix(path: String) -> Endpoint { Endpoint(kind: .unix(path: path)) }
        /// `host:port` or `unix:path`.
        public var description: String {
            switch kind {
            case .tcp(let host, let port): "\(host):\(port)"
            case .unix(let path): "unix:\(path)"
            }
        }
    }

    /// Where the server listens. Default: `127.0.0.1:5432`.
    public var endpoint: Endpoint = .tcp(host: "127.0.0.1")
    /// The role to log in as. Default: `postgres`.
    public var username: String = "postgres"
    /// The role's password, when the server asks for one. Never logged or printed. Default: nil.
    public var password: String? = nil
    /// The database. Default: nil (the server's default: the role's name).
    public var database: String? = nil
    /// The PostgreSQL schema (namespace) that holds the store's tables and functions; the store
    /// creates it when absent. A lowercase SQL identifier (`[a-z_][a-z0-9_]*`, at most 63 bytes).
    /// Default: `exactly_once`.
    public var schema: String = "exactly_once"
    /// Whether ``PostgresDedupeStore/connect(_:clock:logger:)`` creates ``schema`` and the
    /// store's tables when they are absent. Set it to false to open an existing store only (an
    /// inspection tool must not leave an empty store behind a mistyped name): a schema without
    /// the store's tables then throws `ExactlyOnceError/Code/invalidConfiguration`. Default: true.
    public var createsSchema: Bool = true
    /// Connections the store opens at most: claims, releases and reads take one for a call; a
    /// lane's completion batch holds one from its first handler to its commit. Give it at least
    /// one more than the lanes that run at once. Default: 8.
    public var poolSize: Int = 8
    /// Limit on establishing a connection, including the startup and authentication exchange.
    /// Default: 5 seconds.
    public var connectTimeout: Duration = .seconds(5)
    /// Limit on one statement, from sending it to its last row. A statement that times out has
    /// an unknown outcome: its connection is closed (which also ends the transaction it was in)
    /// and the operation throws `ExactlyOnceError/Code/timeout`. Default: 10 seconds.
    public var statementTimeout: Duration = .seconds(10)
    /// Longest wait for a free connection when all ``poolSize`` are in use. Default: 10 seconds.
    public var acquireTimeout: Duration = .seconds(10)
    /// How long completed records are kept. Default: nil (forever).
    public var retention: Duration? = nil
    /// How often ``PostgresDedupeStore/run()`` deletes records whose retention ended. Default: 60 s.
    public var cleanupInterval: Duration = .seconds(60)
    /// Most records one cleanup statement deletes (it repeats until none are left). Default: 10,000.
    public var cleanupBatch: Int = 10_000
    /// The most completions one batch commits in one SQL transaction. Default: 64.
    public var completionBatchLimit: Int = 64

    /// All defaults.
    public init() {}

    /// Parses a libpq-style URL: `postgres://user[:password]@host[:port]/database`, or the unix
    /// socket form `postgres:///database?host=/socket/directory` (also `postgresql://`; user and
    /// password may be percent-encoded; `?user=` and `?port=` are read too). The socket
    /// directory holds `.s.PGSQL.<port>` (5432 when no port is given); a path that names the
    /// socket file itself is taken as it is. `sslmode=disable` (or none) only: this store speaks
    /// plain TCP or unix sockets.
    ///
    /// - Throws: `ExactlyOnceError/Code/invalidConfiguration` for any other form.
    ///   The message never repeats the URL, which may hold a password.
    public init(url: String) throws {
        func bad(_ m: String) -> ExactlyOnceError { ExactlyOnceError(.invalidConfiguration, "PostgreSQL URL: \(m)") }
        guard let c = URLComponents(string: url) else { throw bad("not a URL of the form postgres://user@host:port/database") }
        guard let scheme = c.scheme?.lowercased(), scheme == "postgres" || scheme == "postgresql" else {
            throw bad("the scheme must be postgres:// or postgresql://")
        }
        var query: [String: String] = [:]
        for item in c.queryItems ?? [] {
            guard let v = item.value else { throw bad("query parameter \(item.name.prefix(40)) has no value") }
            query[item.name] = v
        }
        for name in query.keys where !["host", "port", "user", "sslmode", "dbname"].contains(name) {
            throw bad("unsupported query parameter \(name.prefix(40)) (known: host, port, user, dbname, sslmode)")
        }
        if let mode = query["sslmode"], mode != "disable" && mode != "prefer" && mode != "allow" {
            throw bad("sslmode=\(mode.prefix(20)) is not supported: this store connects without TLS (use a unix socket or a trusted network)")
        }
        var port = 5432
        if let p = c.port { port = p }
        if let p = query["port"] {
            guard let n = Int(p) else { throw bad("port must be a number") }
            port = n
        }
        guard (1...65535).contains(port) else { throw bad("port must be in 1...65535") }
        let host = query["host"] ?? c.percentEncodedHost.flatMap { $0.removingPercentEncoding }
        if let host, host.hasPrefix("/") {
            let last = host.split(separator: "/").last.map(String.init) ?? ""
            endpoint = .unix(path: last.hasPrefix(".s.PGSQL.") ? host : (host.hasSuffix("/") ? host : host + "/") + ".s.PGSQL.\(port)")
        } else if let host, !host.isEmpty {
            endpoint = .tcp(host: host, port: port)
        } else {
            endpoint = .tcp(host: "127.0.0.1", port: port)
        }
        if let u = c.percentEncodedUser {
            guard let user = u.removingPercentEncoding, !user.isEmpty else { throw bad("the user name is not valid percent-encoding") }
            username = user
        } else if let user = query["user"] {
            username = user
        }
        if let p = c.percentEncodedPassword {
            guard let pw = p.removingPercentEncoding else { throw bad("the password is not valid percent-encoding") }
            password = pw
        }
        let path = c.path.hasPrefix("/") ? String(c.path.dropFirst()) : c.path
        if !path.isEmpty {
            guard !path.contains("/") else { throw bad("the path must be one database name") }
            database = path
        } else if let db = query["dbname"] {
            database = db
        }
    }

    /// Endpoint, user, database and schema; never the password.
    public var description: String {
        "postgres \(username)@\(endpoint)/\(database ?? username) schema \(schema)\(password == nil ? "" : " (password set)")"
    }
    /// Same as ``description``.
    public var debugDescription: String { description }
    /// Mirrors ``description`` so `dump` and debuggers never show the password.
    public var customMirror: Mirror { Mirror(self, children: ["description": description]) }

    /// Checks every value.
    /// - Throws: `ExactlyOnceError/Code/invalidConfiguration`.
    public func validate() throws {
        func bad(_ m: String) -> ExactlyOnceError { ExactlyOnceError(.invalidConfiguration, m) }
        guard Self.isIdentifier(schema) else {
            throw bad("schema must be a lowercase SQL identifier ([a-z_][a-z0-9_]*, at most 63 bytes)")
        }
        guard (1...1_000).contains(poolSize) else { throw bad("poolSize must be in 1...1000, got \(poolSize)") }
        for (name, d) in [("connectTimeout", connectTimeout), ("statementTimeout", statementTimeout), ("acquireTimeout", acquireTimeout),
                          ("cleanupInterval", cleanupInterval)] where d <= .zero {
            throw bad("\(name) must be positive")
        }
        if let retention, retention <= .zero { throw bad("retention must be positive") }
        guard (1...1_000_000).contains(cleanupBatch) else { throw bad("cleanupBatch must be in 1...1000000") }
        guard (1...10_000).contains(completionBatchLimit) else { throw bad("completionBatchLimit must be in 1...10000") }
        if username.isEmpty { throw bad("username must not be empty") }
    }

    static func isIdentifier(_ s: String) -> Bool {
        let b = Array(s.utf8)
        guard (1...63).contains(b.count), let first = b.first, first == UInt8(ascii: "_") || (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(first) else {
            return false
        }
        return b.allSatisfy { $0 == UInt8(ascii: "_") || (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }
    }
}
#endif
