import ExactlyOnce

/// How to reach one Redis server, and how to behave when it cannot be reached.
///
/// The ``password`` never appears in ``description``, in errors or in logs.
public struct RedisConfiguration: Sendable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// Where the server listens.
    public struct Endpoint: Sendable, Hashable, CustomStringConvertible {
        enum Kind: Sendable, Hashable {
            case tcp(host: String, port: Int)
            case unix(path: String)
        }
        let kind: Kind
        /// A TCP endpoint.
        public static func tcp(host: String, port: Int = 6379) -> Endpoint { Endpoint(kind: .tcp(host: host, port: port)) }
        /// A unix domain socket.
        public static func unix(path: String) -> Endpoint { Endpoint(kind: .unix(path: path)) }
        /// `host:port` or `unix:path`.
        public var description: String {
            switch kind {
            case .tcp(let host, let port): "\(host):\(port)"
            case .unix(let path): "unix:\(path)"
            }
        }
    }

    /// Where the server listens. Default: `127.0.0.1:6379`.
    public var endpoint: Endpoint = .tcp(host: "127.0.0.1")
    /// The ACL user for `AUTH user password`. Default: nil (`AUTH password` when a password is set).
    public var username: String? = nil
    /// The password for `AUTH`. Default: nil (no `AUTH`). Never logged or printed.
    public var password: String? = nil
    /// The logical database selected with `SELECT` on every new connection. Default: 0.
    public var database: Int = 0
    /// Limit on establishing a TCP or unix connection. Default: 2 seconds.
    public var connectTimeout: Duration = .seconds(2)
    /// Limit on one round trip: from the moment a command (or a pipeline of commands) is sent
    /// until its last reply has been read, however the bytes arrive. A server that never
    /// answers, or trickles its answer, is cut off when it passes. A command that times out has
    /// an unknown outcome: the operation throws `storeUnavailable` (`transportUnavailable` on
    /// the transport) and the connection is dropped. Blocking reads of the transport get their
    /// block time on top. Default: 5 seconds.
    public var commandTimeout: Duration = .seconds(5)
    /// The largest reply accepted: its bytes plus 32 per element (so that many tiny elements
    /// count for the memory they take). A bulk string or array header announcing more is
    /// refused as soon as it arrives, before its body is read; the connection is dropped and the
    /// operation throws `storeUnavailable`. Default: 256 MiB, far above any reply the store and
    /// the transport ask for (a poll of 512 records of 64 KiB each is 32 MiB).
    public var maxReplyBytes: Int = 256 << 20
    /// The deepest nesting of arrays accepted in a reply (the deepest the store and transport
    /// read is 4, `XAUTOCLAIM`). Default: 16.
    public var maxReplyDepth: Int = 16
    /// Connections in the pool; each has its own thread for the blocking hiredis calls.
    /// Default: 2.
    public var poolSize: Int = 2
    /// Connect attempts an operation makes on a broken connection before it throws
    /// `storeUnavailable`. Commands themselves are never retried (their outcome is unknown).
    /// Default: 3.
    public var connectAttempts: Int = 3
    /// Wait before the second connect attempt; doubles on each further attempt. Default: 50 ms.
    public var reconnectBackoff: Duration = .milliseconds(50)
    /// Longest wait between connect attempts. Default: 1 second.
    public var maximumReconnectBackoff: Duration = .seconds(1)

    /// All defaults: `127.0.0.1:6379`, database 0, no authentication.
    public init() {}

    /// Parses `redis://[user:password@]host[:port][/db]` or `unix:///path/to.sock[?db=N]`
    /// (user and password may be percent-encoded; `redis://:password@host` sets only a password).
    ///
    /// - Throws: `ExactlyOnceError/Code/invalidConfiguration` for any other form. The error
    ///   message never repeats the URL, which may hold a password.
    public init(url: String) throws {
        self.init()
        func invalid(_ why: String) -> ExactlyOnceError {
            ExactlyOnceError(.invalidConfiguration, "invalid Redis URL: \(why)")
        }
        if url.hasPrefix("unix://") {
            var rest = Substring(url.dropFirst("unix://".count))
            if let q = rest.firstIndex(of: "?") {
                let query = rest[rest.index(after: q)...]
                rest = rest[..<q]
                for pair in query.split(separator: "&") {
                    let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                    guard kv.count == 2 else { throw invalid("malformed query") }
                    switch kv[0] {
                    case "db":
                        guard let db = Int(kv[1]), db >= 0 else { throw invalid("db must be a non-negative integer") }
                        database = db
                    case "password":
                        password = try Self.percentDecode(kv[1]).orThrow(invalid("bad percent-encoding"))
                    case "user", "username":
                        username = try Self.percentDecode(kv[1]).orThrow(invalid("bad percent-encoding"))
                    default: throw invalid("unknown query parameter")
                    }
                }
            }
            guard rest.hasPrefix("/"), rest.count > 1 else { throw invalid("unix socket path must be absolute") }
            endpoint = .unix(path: String(rest))
            return
        }
        guard url.hasPrefix("redis://") else { throw invalid("scheme must be redis:// or unix://") }
        var rest = Substring(url.dropFirst("redis://".count))
        if let at = rest.lastIndex(of: "@") {
            let userinfo = rest[..<at]
            rest = rest[rest.index(after: at)...]
            if let colon = userinfo.firstIndex(of: ":") {
                let user = userinfo[..<colon]
                let pass = userinfo[userinfo.index(after: colon)...]
                if !user.isEmpty { username = try Self.percentDecode(user).orThrow(invalid("bad percent-encoding")) }
                password = try Self.percentDecode(pass).orThrow(invalid("bad percent-encoding"))
            } else {
                // `redis://password@host` (no colon) is the legacy password-only form.
                password = try Self.percentDecode(userinfo).orThrow(invalid("bad percent-encoding"))
            }
        }
        var hostPort = rest
        if let slash = rest.firstIndex(of: "/") {
            hostPort = rest[..<slash]
            let dbText = rest[rest.index(after: slash)...]
            if !dbText.isEmpty {
                guard let db = Int(dbText), db >= 0 else { throw invalid("database must be a non-negative integer") }
                database = db
            }
        }
        var host = hostPort
        var port = 6379
        if hostPort.hasPrefix("[") {
            guard let close = hostPort.firstIndex(of: "]") else { throw invalid("unterminated IPv6 address") }
            host = hostPort[hostPort.index(after: hostPort.startIndex)..<close]
            let after = hostPort[hostPort.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":"), let p = Int(after.dropFirst()) else { throw invalid("bad port") }
                port = p
            }
        } else if let colon = hostPort.lastIndex(of: ":") {
            host = hostPort[..<colon]
            guard let p = Int(hostPort[hostPort.index(after: colon)...]) else { throw invalid("bad port") }
            port = p
        }
        guard !host.isEmpty else { throw invalid("missing host") }
        guard (1...65535).contains(port) else { throw invalid("port out of range") }
        endpoint = .tcp(host: String(host), port: port)
    }

    static func percentDecode(_ s: Substring) -> String? {
        var out: [UInt8] = []
        var it = Array(s.utf8)[...]
        while let c = it.popFirst() {
            if c == UInt8(ascii: "%") {
                guard it.count >= 2, let v = UInt8(String(decoding: it.prefix(2), as: UTF8.self), radix: 16) else { return nil }
                out.append(v)
                it = it.dropFirst(2)
            } else {
                out.append(c)
            }
        }
        return String(validating: out, as: UTF8.self)
    }

    /// Checks ranges. - Throws: `ExactlyOnceError/Code/invalidConfiguration`.
    func validate() throws {
        func bad(_ m: String) -> ExactlyOnceError { ExactlyOnceError(.invalidConfiguration, m) }
        guard poolSize >= 1 else { throw bad("poolSize must be at least 1, got \(poolSize)") }
        guard connectAttempts >= 1 else { throw bad("connectAttempts must be at least 1, got \(connectAttempts)") }
        guard database >= 0 else { throw bad("database must be non-negative, got \(database)") }
        guard connectTimeout > .zero, commandTimeout > .zero else { throw bad("timeouts must be positive") }
        guard reconnectBackoff >= .zero, maximumReconnectBackoff >= .zero else { throw bad("backoffs must not be negative") }
        guard maxReplyBytes >= 1024 else { throw bad("maxReplyBytes must be at least 1024, got \(maxReplyBytes)") }
        guard (1...64).contains(maxReplyDepth) else { throw bad("maxReplyDepth must be within 1...64, got \(maxReplyDepth)") }
    }

    /// The endpoint, user and database; the password shows only as `***` when set.
    public var description: String {
        var s = "RedisConfiguration(\(endpoint), db \(database)"
        if let username { s += ", user \(username)" }
        if password != nil { s += ", password ***" }
        return s + ")"
    }

    /// Same as ``description``: the password shows only as `***`.
    public var debugDescription: String { description }

    /// A mirror without the password, so `dump` and reflection-based printing cannot leak it.
    public var customMirror: Mirror {
        Mirror(self, children: [
            "endpoint": endpoint, "username": username as Any, "password": password == nil ? "nil" : "***",
            "database": database, "connectTimeout": connectTimeout, "commandTimeout": commandTimeout,
            "poolSize": poolSize, "connectAttempts": connectAttempts,
            "maxReplyBytes": maxReplyBytes, "maxReplyDepth": maxReplyDepth,
        ], displayStyle: .struct)
    }
}

extension Optional {
    fileprivate func orThrow(_ error: @autoclosure () -> ExactlyOnceError) throws -> Wrapped {
        guard let self else { throw error() }
        return self
    }
}
