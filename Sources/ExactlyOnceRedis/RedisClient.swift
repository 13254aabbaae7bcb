import Dispatch
import ExactlyOnce
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A small pool of blocking hiredis connections, each confined to its own serial dispatch
/// queue, bridged to `async` callers with continuations that are resumed exactly once and
/// never under a lock.
///
/// Commands are never retried: after an I/O failure their outcome is unknown, so the caller
/// gets `ExactlyOnceError/Code/storeUnavailable` and the connection is dropped. The next
/// operation on that slot reconnects, up to ``RedisConfiguration/connectAttempts`` times with
/// exponential backoff.
final class RedisClient: Sendable {
    private let slots: [Slot]
    private let next = Atomic<UInt>(0)
    /// SHA-1 of each script as Redis answered `SCRIPT LOAD`, by script name.
    private let scriptSHAs = Mutex<[String: [UInt8]]>([:])
    /// The configuration the client was made with.
    let configuration: RedisConfiguration

    /// Creates the pool; connections open lazily on first use.
    /// - Throws: `ExactlyOnceError/Code/invalidConfiguration`.
    init(configuration: RedisConfiguration, logger: Logger) throws {
        try configuration.validate()
        _ = Self.ignoreSIGPIPE
        self.configuration = configuration
        self.slots = (0..<configuration.poolSize).map { Slot(index: $0, configuration: configuration, logger: logger) }
    }

    /// hiredis writes with `write(2)`: a peer that went away would raise SIGPIPE and kill the
    /// process. Like SwiftNIO, ignore it once; the write then fails with EPIPE, which we report.
    private static let ignoreSIGPIPE: Void = {
        _ = signal(SIGPIPE, SIG_IGN)
    }()

    /// Sends `commands` on one connection in one round trip and returns one reply per command,
    /// within ``RedisConfiguration/commandTimeout`` plus `extraWait` (for commands that block on
    /// the server, such as `XREADGROUP ... BLOCK`).
    func pipeline(_ commands: [[[UInt8]]], extraWait: Duration = .zero) async throws -> [RedisReply] {
        if commands.isEmpty { return [] }
        let replies = try await pickSlot().run { connection in try connection.pipeline(commands, extraWait: extraWait) }
        guard replies.count == commands.count else {
            throw ExactlyOnceError(.storeUnavailable, "Redis answered \(replies.count) replies to \(commands.count) commands")
        }
        return replies
    }

    /// Sends one command.
    func command(_ argv: [[UInt8]]) async throws -> RedisReply {
        try await pipeline([argv])[0]
    }

    /// Sends one command given as text arguments.
    func command(_ argv: String...) async throws -> RedisReply {
        try await command(argv.map { Array($0.utf8) })
    }

    /// Runs `script` once per (keys, args) pair, all in one pipelined round trip, with
    /// `EVALSHA` under the SHA-1 Redis gave for it. The first call (and any call answered
    /// `NOSCRIPT`, after a restart or `SCRIPT FLUSH`) loads it with `SCRIPT LOAD` first.
    func evaluate(_ script: RedisScript, _ calls: [([[UInt8]], [[UInt8]])]) async throws -> [RedisReply] {
        if calls.isEmpty { return [] }
        func command(_ sha: [UInt8], _ call: ([[UInt8]], [[UInt8]])) -> [[UInt8]] {
            var argv: [[UInt8]] = [Array("EVALSHA".utf8), sha, Array(String(call.0.count).utf8)]
            argv.reserveCapacity(3 + call.0.count + call.1.count)
            argv += call.0
            argv += call.1
            return argv
        }
        var sha = scriptSHAs.withLock { $0[script.name] }
        if sha == nil { sha = try await load(script) }
        var replies = try await pipeline(calls.map { command(sha!, $0) })
        let missing = replies.indices.filter { replies[$0].errorText?.hasPrefix("NOSCRIPT") == true }
        if !missing.isEmpty {
            let fresh = try await load(script)
            let again = try await pipeline(missing.map { command(fresh, calls[$0]) })
            for (index, reply) in zip(missing, again) { replies[index] = reply }
        }
        return replies
    }

    /// `SCRIPT LOAD`, remembering the SHA-1 the server answers.
    private func load(_ script: RedisScript) async throws -> [UInt8] {
        let reply = try await command([Array("SCRIPT".utf8), Array("LOAD".utf8), script.body])
        guard let sha = reply.bytes, sha.count == 40, sha.allSatisfy({ (48...57).contains($0) || (97...102).contains($0) }) else {
            throw ReplyDecoding.unexpected("SCRIPT LOAD", reply)
        }
        scriptSHAs.withLock { $0[script.name] = sha }
        return sha
    }

    private func pickSlot() -> Slot {
        slots[Int(next.wrappingAdd(1, ordering: .relaxed).oldValue % UInt(slots.count))]
    }
}

/// One pooled connection and the queue that owns it.
///
/// `@unchecked Sendable` is safe because the mutable `connection` is read and written only by
/// blocks running on the serial `queue`.
private final class Slot: @unchecked Sendable {
    private let queue: DispatchQueue
    private let configuration: RedisConfiguration
    private let logger: Logger
    private var connection: RedisConnection?

    init(index: Int, configuration: RedisConfiguration, logger: Logger) {
        self.queue = DispatchQueue(label: "exactly-once.redis.connection.\(index)")
        self.configuration = configuration
        self.logger = logger
    }

    /// Runs `body` on this slot's queue with a live connection.
    func run<R: Sendable>(_ body: @escaping @Sendable (RedisConnection) throws -> R) async throws -> R {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<R, any Error>) in
            queue.async {
                let result = Result { try self.withConnection(body) }
                continuation.resume(with: result)
            }
        }
    }

    private func withConnection<R>(_ body: (RedisConnection) throws -> R) throws -> R {
        do {
            return try attempt(body)
        } catch is RedisConnection.NotSent {
            // Nothing reached the server: one resend on a fresh connection is safe.
            do {
                return try attempt(body)
            } catch is RedisConnection.NotSent {
                throw ExactlyOnceError(.storeUnavailable, "Redis connection failed while sending")
            }
        }
    }

    private func attempt<R>(_ body: (RedisConnection) throws -> R) throws -> R {
        let c = try connected()
        do {
            return try body(c)
        } catch {
            if c.isBroken {
                connection = nil
                logger.info("Redis connection lost", metadata: ["redis.endpoint": "\(configuration.endpoint)"])
            }
            throw error
        }
    }

    private func connected() throws -> RedisConnection {
        if let c = connection, !c.isBroken { return c }
        connection = nil
        var delay = configuration.reconnectBackoff
        var lastError: any Error = ExactlyOnceError(.storeUnavailable, "Redis is unreachable")
        for attempt in 1...configuration.connectAttempts {
            if attempt > 1 {
                // Blocking sleep on this slot's own thread, never on the cooperative pool.
                let (s, atto) = delay.components
                usleep(UInt32(clamping: s * 1_000_000 + atto / 1_000_000_000_000))
                delay = min(delay * 2, configuration.maximumReconnectBackoff)
            }
            do {
                let c = try RedisConnection.connect(configuration)
                connection = c
                logger.debug("Redis connected", metadata: ["redis.endpoint": "\(configuration.endpoint)"])
                return c
            } catch {
                lastError = error
            }
        }
        logger.info("Redis unreachable", metadata: ["redis.endpoint": "\(configuration.endpoint)", "redis.attempts": "\(configuration.connectAttempts)"])
        throw lastError
    }
}
