import CHiredis
import ExactlyOnce

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One blocking hiredis connection: owns its `redisContext` and frees it in `deinit`.
///
/// Not thread-safe and not `Sendable`: ``RedisClient`` confines each connection to one serial
/// dispatch queue, so the blocking calls never run on Swift's cooperative thread pool.
final class RedisConnection {
    private let context: UnsafeMutablePointer<redisContext>
    /// Whether a command failed at the I/O level; the connection must not be used again.
    private(set) var isBroken = false

    /// The connection broke before any byte of the pipeline reached the server (the typical
    /// case of a connection left over from before a server restart): resending is safe.
    struct NotSent: Error {}

    private init(context: UnsafeMutablePointer<redisContext>) { self.context = context }

    deinit { redisFree(context) }

    /// Connects, authenticates and selects the database.
    /// - Throws: `ExactlyOnceError/Code/storeUnavailable` when any step fails; the context of
    ///   a failed attempt is freed before throwing.
    static func connect(_ configuration: RedisConfiguration) throws -> RedisConnection {
        let connectTimeout = makeTimeval(configuration.connectTimeout)
        let raw: UnsafeMutablePointer<redisContext>?
        switch configuration.endpoint.kind {
        case .tcp(let host, let port):
            raw = redisConnectWithTimeout(host, Int32(clamping: port), connectTimeout)
        case .unix(let path):
            raw = redisConnectUnixWithTimeout(path, connectTimeout)
        }
        guard let raw else {
            throw ExactlyOnceError(.storeUnavailable, "cannot allocate a Redis context for \(configuration.endpoint)")
        }
        // From here on the connection object owns (and frees) the context, whatever fails.
        let connection = RedisConnection(context: raw)
        if raw.pointee.err != 0 {
            throw ExactlyOnceError(.storeUnavailable, "cannot connect to Redis at \(configuration.endpoint): \(connection.errorString)")
        }
        guard redisSetTimeout(raw, makeTimeval(configuration.commandTimeout)) == REDIS_OK else {
            throw ExactlyOnceError(.storeUnavailable, "cannot set the Redis command timeout: \(connection.errorString)")
        }
        if case .tcp = configuration.endpoint.kind {
            // Only for TCP: on a unix socket hiredis marks the context as failed.
            _ = redisEnableKeepAlive(raw)
        }
        do {
            if let password = configuration.password {
                var argv: [[UInt8]] = [Array("AUTH".utf8)]
                if let user = configuration.username { argv.append(Array(user.utf8)) }
                argv.append(Array(password.utf8))
                // The reply to AUTH is checked by kind only: its text is not repeated, and the
                // arguments (the password) are never part of any message.
                let reply = try connection.command(argv)
                guard case .status = reply else {
                    throw ExactlyOnceError(.storeFailure, "Redis refused authentication at \(configuration.endpoint) (check the user name and password)", cause: ExactlyOnceError.Cause(type: "RedisServerError", code: reply.errorText.map { String($0.prefix { $0 != " " }.prefix(32)) }))
                }
            }
            if configuration.database != 0 {
                let reply = try connection.command([Array("SELECT".utf8), Array(String(configuration.database).utf8)])
                guard case .status = reply else {
                    throw ReplyDecoding.unexpected("SELECT \(configuration.database)", reply)
                }
            }
        } catch is NotSent {
            throw ExactlyOnceError(.storeUnavailable, "Redis at \(configuration.endpoint) closed the connection during the handshake")
        }
        return connection
    }

    private var errorString: String {
        withUnsafePointer(to: context.pointee.errstr) { tuple in
            tuple.withMemoryRebound(to: CChar.self, capacity: 128) { String(cString: $0) }
        }
    }

    /// Sends one command and reads its reply.
    func command(_ argv: [[UInt8]]) throws -> RedisReply {
        try pipeline([argv])[0]
    }

    /// Appends every command to the output buffer, then reads one reply per command: one round
    /// trip for the whole list. An I/O failure breaks the connection and throws
    /// `ExactlyOnceError/Code/storeUnavailable` (some commands may have run).
    func pipeline(_ commands: [[[UInt8]]]) throws -> [RedisReply] {
        guard !isBroken else { throw ExactlyOnceError(.storeUnavailable, "Redis connection is broken") }
        for argv in commands {
            try append(argv)
        }
        // Flush the output buffer ourselves: a failure of the very first write means the server
        // received nothing, so the caller may safely resend on a fresh connection.
        var done: Int32 = 0
        var firstWrite = true
        while done == 0 {
            guard redisBufferWrite(context, &done) == REDIS_OK else {
                isBroken = true
                if firstWrite { throw NotSent() }
                throw ExactlyOnceError(.storeUnavailable, "Redis connection failed while sending: \(errorString)")
            }
            firstWrite = false
        }
        var replies: [RedisReply] = []
        replies.reserveCapacity(commands.count)
        for _ in commands {
            var raw: UnsafeMutableRawPointer?
            let status = redisGetReply(context, &raw)
            guard status == REDIS_OK, let raw else {
                if let raw { freeReplyObject(raw) }
                isBroken = true
                throw ExactlyOnceError(.storeUnavailable, "Redis connection failed while reading a reply: \(errorString)")
            }
            defer { freeReplyObject(raw) }
            replies.append(Self.copy(raw.assumingMemoryBound(to: redisReply.self)))
        }
        return replies
    }

    private func append(_ argv: [[UInt8]]) throws {
        precondition(!argv.isEmpty, "a Redis command needs a name")
        // All arguments in one buffer (plus a trailing byte, so even empty arguments point into
        // valid memory); the pointers into it live only inside this closure.
        var storage: [UInt8] = []
        storage.reserveCapacity(argv.reduce(1) { $0 + $1.count })
        var offsets: [Int] = []
        offsets.reserveCapacity(argv.count)
        for a in argv {
            offsets.append(storage.count)
            storage.append(contentsOf: a)
        }
        storage.append(0)
        let lengths = argv.map(\.count)
        let status: Int32 = storage.withUnsafeBytes { bytes in
            let base = bytes.baseAddress!.assumingMemoryBound(to: CChar.self)
            var pointers: [UnsafePointer<CChar>?] = offsets.map { base + $0 }
            return lengths.withUnsafeBufferPointer { lens in
                pointers.withUnsafeMutableBufferPointer { ptrs in
                    redisAppendCommandArgv(context, Int32(argv.count), ptrs.baseAddress, lens.baseAddress)
                }
            }
        }
        guard status == REDIS_OK else {
            isBroken = true
            throw ExactlyOnceError(.storeUnavailable, "cannot queue a Redis command: \(errorString)")
        }
    }

    /// Copies a hiredis reply tree into a Swift value (the C tree is freed by the caller).
    static func copy(_ reply: UnsafePointer<redisReply>) -> RedisReply {
        let r = reply.pointee
        func bytes() -> [UInt8] {
            guard let str = r.str, r.len > 0 else { return [] }
            return Array(UnsafeRawBufferPointer(start: str, count: Int(r.len)))
        }
        switch r.type {
        case REDIS_REPLY_STRING: return .string(bytes())
        case REDIS_REPLY_STATUS: return .status(String(decoding: bytes(), as: UTF8.self))
        case REDIS_REPLY_ERROR: return .error(String(decoding: bytes(), as: UTF8.self))
        case REDIS_REPLY_INTEGER: return .integer(Int64(r.integer))
        case REDIS_REPLY_NIL: return .null
        case REDIS_REPLY_ARRAY:
            var items: [RedisReply] = []
            items.reserveCapacity(Int(r.elements))
            for i in 0..<Int(r.elements) {
                if let element = r.element?[i] { items.append(copy(element)) } else { items.append(.null) }
            }
            return .array(items)
        default:
            return .error("ERR unsupported reply type \(r.type)")
        }
    }
}

private func makeTimeval(_ d: Duration) -> timeval {
    let (seconds, attoseconds) = d.components
    var tv = timeval()
    tv.tv_sec = .init(clamping: seconds)
    tv.tv_usec = .init(attoseconds / 1_000_000_000_000)
    return tv
}
