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

    private let fd: Int32
    private let commandTimeout: Duration
    private let endpoint: RedisConfiguration.Endpoint
    private var reader: RESPReader

    private init(context: UnsafeMutablePointer<redisContext>, configuration: RedisConfiguration) {
        self.context = context
        self.fd = context.pointee.fd
        self.commandTimeout = configuration.commandTimeout
        self.endpoint = configuration.endpoint
        self.reader = RESPReader(limits: RESPLimits(maxReplyBytes: configuration.maxReplyBytes, maxDepth: configuration.maxReplyDepth))
    }

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
        let connection = RedisConnection(context: raw, configuration: configuration)
        if raw.pointee.err != 0 {
            throw ExactlyOnceError(.storeUnavailable, "cannot connect to Redis at \(configuration.endpoint): \(connection.errorString)")
        }
        // From here on the bytes are written and read by `pipeline`, never by hiredis.
        let flags = fcntl(raw.pointee.fd, F_GETFL)
        guard flags >= 0, fcntl(raw.pointee.fd, F_SETFL, flags | O_NONBLOCK) == 0 else {
            throw ExactlyOnceError(.storeUnavailable, "cannot make the Redis socket non-blocking: \(describe(errno: errno))")
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

    /// Writes every command, then reads one reply per command: one round trip for the whole
    /// list, bounded by ``RedisConfiguration/commandTimeout`` (plus `extraWait`, for commands
    /// that block on the server) counted from the request, and by the reply limits. hiredis
    /// only connects; the bytes are written and read here, on a non-blocking socket with
    /// `poll(2)`, so that no server can hold the call longer than the deadline or make it buffer
    /// more than the limits. An I/O failure, a timeout or a refused reply breaks the connection
    /// and throws `ExactlyOnceError/Code/storeUnavailable` (some commands may have run).
    func pipeline(_ commands: [[[UInt8]]], extraWait: Duration = .zero) throws -> [RedisReply] {
        guard !isBroken else { throw ExactlyOnceError(.storeUnavailable, "Redis connection is broken") }
        let clock = ContinuousClock()
        let deadline = clock.now.advanced(by: commandTimeout + extraWait)
        try checkIdle()
        var out: [UInt8] = []
        out.reserveCapacity(commands.reduce(0) { $0 + $1.reduce(16) { $0 + $1.count + 16 } })
        for argv in commands {
            precondition(!argv.isEmpty, "a Redis command needs a name")
            RESPEncoder.append(argv, to: &out)
        }
        // Write everything. A failure of the very first write means the server received
        // nothing, so the caller may safely resend on a fresh connection.
        var written = 0
        while written < out.count {
            let n = out.withUnsafeBytes { write(fd, $0.baseAddress! + written, $0.count - written) }
            if n > 0 {
                written += n
                continue
            }
            let e = errno
            if n < 0 && e == EINTR { continue }
            if n < 0 && (e == EAGAIN || e == EWOULDBLOCK) {
                try wait(for: Int16(POLLOUT), until: deadline, clock, what: "sending")
                continue
            }
            isBroken = true
            if written == 0 { throw NotSent() }
            throw ExactlyOnceError(.storeUnavailable, "Redis connection failed while sending: \(Self.describe(errno: e))")
        }
        var replies: [RedisReply] = []
        replies.reserveCapacity(commands.count)
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        while replies.count < commands.count {
            do {
                if let reply = try reader.next() {
                    replies.append(reply)
                    continue
                }
            } catch {
                isBroken = true
                throw ExactlyOnceError(.storeUnavailable, "refused a reply from Redis at \(endpoint): \(error)",
                                       cause: ExactlyOnceError.Cause(type: "RedisReplyLimit", code: nil))
            }
            try wait(for: Int16(POLLIN), until: deadline, clock, what: "waiting for a reply")
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n > 0 {
                chunk.withUnsafeBytes { reader.feed(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                bytesRead += n
                continue
            }
            let e = errno
            if n < 0 && (e == EINTR || e == EAGAIN || e == EWOULDBLOCK) { continue }
            isBroken = true
            if n == 0 { throw ExactlyOnceError(.storeUnavailable, "Redis closed the connection before answering") }
            throw ExactlyOnceError(.storeUnavailable, "Redis connection failed while reading a reply: \(Self.describe(errno: e))")
        }
        return replies
    }

    /// Bytes received on this connection, for tests.
    private(set) var bytesRead = 0

    /// Refuses a connection that the server closed, or that holds bytes nobody asked for,
    /// before anything is sent on it (resending on a fresh connection is then safe).
    private func checkIdle() throws {
        if reader.hasPendingInput {
            isBroken = true
            throw NotSent()
        }
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 0) > 0 else { return }
        // Readable while idle: closed by the peer (or unsolicited bytes): drop it.
        isBroken = true
        throw NotSent()
    }

    /// Waits until the socket is ready for `events`, or throws when `deadline` passed.
    private func wait(for events: Int16, until deadline: ContinuousClock.Instant, _ clock: ContinuousClock, what: String) throws {
        while true {
            let left = deadline - clock.now
            guard left > .zero else {
                isBroken = true
                throw ExactlyOnceError(.storeUnavailable, "Redis at \(endpoint) did not answer within \(commandTimeout) (commandTimeout, counted from the request) while \(what)",
                                       cause: ExactlyOnceError.Cause(type: "RedisTimeout", code: nil))
            }
            let (s, atto) = left.components
            let ms = Int32(clamping: s * 1000 + atto / 1_000_000_000_000_000 + 1)
            var pfd = pollfd(fd: fd, events: events, revents: 0)
            let r = poll(&pfd, 1, ms)
            if r > 0 { return }
            if r < 0 && errno != EINTR {
                isBroken = true
                throw ExactlyOnceError(.storeUnavailable, "Redis connection failed: \(Self.describe(errno: errno))")
            }
        }
    }

    private static func describe(errno e: Int32) -> String {
        String(cString: strerror(e))
    }
}

private func makeTimeval(_ d: Duration) -> timeval {
    let (seconds, attoseconds) = d.components
    var tv = timeval()
    tv.tv_sec = .init(clamping: seconds)
    tv.tv_usec = .init(attoseconds / 1_000_000_000_000)
    return tv
}
