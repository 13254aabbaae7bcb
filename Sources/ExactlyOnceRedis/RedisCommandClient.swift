import ExactlyOnce
import Logging

/// A small Redis client on the library's own hiredis wrapper (its pool, timeouts, reconnects,
/// AUTH/ACL, SELECT and URL forms), for the parts of an application that talk to Redis beside
/// the dedupe store and the transport: a read cache, a lock, an inspection script.
///
/// Commands are never resent after an I/O failure (their outcome is unknown): they throw
/// `ExactlyOnceError` with code `storeUnavailable`; a server error reply is returned as a value
/// (``RedisValue/errorMessage``), not thrown, so callers can branch on `NOAUTH`, `WRONGTYPE`, ...
public final class RedisCommandClient: Sendable {
    let client: RedisClient

    /// Creates a client; connections open on first use.
    /// - Throws: `invalidConfiguration` for out-of-range values.
    public init(configuration: RedisConfiguration = .init(),
                logger: Logger = Logger(label: "exactly-once.redis-client", factory: { _ in SwiftLogNoOpLogHandler() })) throws {
        client = try RedisClient(configuration: configuration, logger: logger)
    }

    /// Creates a client for `url` (see ``RedisConfiguration/init(url:)``).
    public convenience init(url: String, logger: Logger = Logger(label: "exactly-once.redis-client", factory: { _ in SwiftLogNoOpLogHandler() })) throws {
        try self.init(configuration: try RedisConfiguration(url: url), logger: logger)
    }

    /// Sends one command given as text arguments, for example `["SET", "k", "v", "NX"]`.
    public func send(_ arguments: [String]) async throws -> RedisValue {
        RedisValue(try await client.command(arguments.map { Array($0.utf8) }))
    }

    /// Sends one command given as binary arguments.
    public func send(bytes arguments: [[UInt8]]) async throws -> RedisValue {
        RedisValue(try await client.command(arguments))
    }

    /// Sends `commands` in one round trip (pipelined) and returns one value per command.
    public func pipeline(_ commands: [[String]]) async throws -> [RedisValue] {
        try await client.pipeline(commands.map { $0.map { Array($0.utf8) } }).map(RedisValue.init)
    }

    /// Runs a Lua script with `EVALSHA` under the SHA-1 the server answered to `SCRIPT LOAD`
    /// (loading it on first use and again after `NOSCRIPT`).
    public func evaluate(script: String, keys: [String], arguments: [String]) async throws -> RedisValue {
        let replies = try await client.evaluate(RedisScript("user:" + script, script), [(keys.map { Array($0.utf8) }, arguments.map { Array($0.utf8) })])
        return RedisValue(replies[0])
    }
}

/// One Redis reply: a bulk or status string, an integer, an array, nil, or an error reply.
public struct RedisValue: Sendable, Hashable, CustomStringConvertible {
    let reply: RedisReply
    init(_ reply: RedisReply) { self.reply = reply }

    /// The bytes of a bulk or status string.
    public var bytes: [UInt8]? { reply.bytes }
    /// A bulk or status string as UTF-8 text.
    public var string: String? { reply.text }
    /// An integer reply (or a bulk string holding a decimal integer).
    public var int: Int64? { reply.int64 }
    /// The elements of an array reply.
    public var array: [RedisValue]? {
        if case .array(let items) = reply { return items.map(RedisValue.init) }
        return nil
    }
    /// Whether this is a nil reply.
    public var isNull: Bool { reply == .null }
    /// The server's error text, for an error reply.
    public var errorMessage: String? { reply.errorText }
    public var description: String { reply.shape }
}
