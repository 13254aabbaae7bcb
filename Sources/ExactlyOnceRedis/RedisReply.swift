import ExactlyOnce

/// A Redis reply, copied out of hiredis's `redisReply` tree so no C memory outlives the call
/// that read it (RESP2: hiredis 0.14 speaks no RESP3).
enum RedisReply: Sendable, Hashable {
    /// A bulk string (binary-safe).
    case string([UInt8])
    /// A status reply such as `OK` or `QUEUED`.
    case status(String)
    /// An error reply such as `NOSCRIPT ...`.
    case error(String)
    /// An integer reply.
    case integer(Int64)
    /// A nil bulk or nil multi-bulk.
    case null
    /// A multi-bulk reply.
    case array([RedisReply])

    /// The bytes of a bulk string or status, nil otherwise.
    var bytes: [UInt8]? {
        switch self {
        case .string(let b): b
        case .status(let s): Array(s.utf8)
        default: nil
        }
    }

    /// The reply as text (bulk strings and statuses), nil otherwise.
    var text: String? { bytes.map { String(decoding: $0, as: UTF8.self) } }

    /// The reply as an integer: integer replies, and bulk strings holding a decimal integer.
    var int64: Int64? {
        switch self {
        case .integer(let i): i
        case .string(let b): Int64(String(decoding: b, as: UTF8.self))
        default: nil
        }
    }

    /// The error text, if this is an error reply.
    var errorText: String? {
        if case .error(let e) = self { return e }
        return nil
    }

    /// A short, payload-free summary of the reply's shape, for error messages.
    var shape: String {
        switch self {
        case .string(let b): "bulk(\(b.count) bytes)"
        case .status: "status"
        case .error: "error"
        case .integer: "integer"
        case .null: "nil"
        case .array(let a): "array(\(a.count))"
        }
    }
}

/// Turning replies into the values the store expects. Every function here throws
/// `ExactlyOnceError` for a reply it does not expect; none of them traps.
enum ReplyDecoding {
    /// Server error classes that a retry can get past (a server starting, busy, failing over,
    /// or out of memory until TTLs free some); every other error reply is a refusal.
    static let transientErrorClasses: Set<String> = ["LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN", "READONLY", "OOM"]

    /// The error for a reply `what` did not expect: a server error reply is
    /// `ExactlyOnceError/Code/storeFailure` (or `storeUnavailable` for the transient classes),
    /// with the error class as the cause's code; any other unexpected reply (a damaged or
    /// hostile answer) is `storeUnavailable`: it costs a retry, it is never trusted.
    static func unexpected(_ what: String, _ reply: RedisReply) -> ExactlyOnceError {
        if let e = reply.errorText {
            let errorClass = String(e.prefix { $0 != " " }.prefix(32))
            let code: ExactlyOnceError.Code = transientErrorClasses.contains(errorClass) ? .storeUnavailable : .storeFailure
            return ExactlyOnceError(code, "Redis refused \(what): \(RedisErrorText.sanitize(e))",
                                    cause: ExactlyOnceError.Cause(type: "RedisServerError", code: errorClass))
        }
        return ExactlyOnceError(.storeUnavailable, "unexpected Redis reply to \(what): \(reply.shape)")
    }

    static func array(_ reply: RedisReply, _ what: String, count: Int? = nil, atLeast: Int? = nil) throws -> [RedisReply] {
        guard case .array(let items) = reply else { throw unexpected(what, reply) }
        if let count, items.count != count { throw unexpected(what, reply) }
        if let atLeast, items.count < atLeast { throw unexpected(what, reply) }
        return items
    }

    static func text(_ reply: RedisReply, _ what: String) throws -> String {
        guard let t = reply.text else { throw unexpected(what, reply) }
        return t
    }

    static func bytes(_ reply: RedisReply, _ what: String) throws -> [UInt8] {
        guard let b = reply.bytes else { throw unexpected(what, reply) }
        return b
    }

    static func int64(_ reply: RedisReply, _ what: String) throws -> Int64 {
        guard let i = reply.int64 else { throw unexpected(what, reply) }
        return i
    }

    static func uint64(_ reply: RedisReply, _ what: String) throws -> UInt64 {
        switch reply {
        case .integer(let i) where i >= 0: return UInt64(i)
        case .string(let b):
            guard let v = UInt64(String(decoding: b, as: UTF8.self)) else { throw unexpected(what, reply) }
            return v
        default: throw unexpected(what, reply)
        }
    }

    /// A non-negative attempt count that fits in `Int`.
    static func count(_ reply: RedisReply, _ what: String) throws -> Int {
        let v = try int64(reply, what)
        guard v >= 0, let i = Int(exactly: v) else { throw unexpected(what, reply) }
        return i
    }

    /// An optional bulk string: nil reply or empty string mean absent.
    static func optionalBytes(_ reply: RedisReply, _ what: String) throws -> [UInt8]? {
        switch reply {
        case .null: return nil
        case .string(let b): return b
        default: throw unexpected(what, reply)
        }
    }
}

/// Error texts from Redis are short and carry no secrets of ours, but they may echo arguments
/// (for example a script body): keep only the first line and bound its length.
enum RedisErrorText {
    static func sanitize(_ s: String) -> String {
        let line = s.split(separator: "\n", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        return line.utf8.count > 120 ? String(decoding: line.utf8.prefix(120), as: UTF8.self) + "…" : line
    }
}
