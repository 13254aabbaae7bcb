import ExactlyOnce
import Logging

/// A dedupe store in Redis, through hiredis: the rules of `DedupeStateMachine`, each operation
/// one Lua script, so a claim batch, and a completion together with its effect writes (G3), are
/// each one atomic unit on the server.
///
/// ## Time
/// Leases and retention deadlines use the injected `WallClock` (the client's clock), passed to
/// the scripts as an argument: tests can use a manual clock, and lease arithmetic is the same as
/// in the other stores. Run clients with synchronised clocks (NTP); a client whose clock runs
/// ahead can take over a lease early. Completed records also get a Redis TTL (`PEXPIRE`) of
/// ``Configuration/retention``, measured by the server's clock, so Redis frees them by itself;
/// a record is forgotten when the first of the two deadlines passes.
///
/// ## Keys
/// Everything lives under ``Configuration/keyPrefix``: `<prefix>token` (fencing token counter),
/// `<prefix>fences` (hash: scope to highest epoch), `<prefix>r:<key>` (hash: one dedupe record),
/// `<prefix>s:<state key>` (hash: `v` value, `ver` version).
///
/// ## Failures (F8)
/// When Redis cannot be reached, or a command's reply is lost, operations throw the retriable
/// `ExactlyOnceError/Code/storeUnavailable`: the operation may or may not have happened, and
/// the caller claims again before acting. A claim never answers `ClaimResult/new(_:)` without
/// a claim recorded by the server.
public final class RedisDedupeStore: DedupeStore {
    /// Configuration of the Redis store.
    public struct Configuration: Sendable {
        /// How to reach Redis. Default: `127.0.0.1:6379`, database 0.
        public var redis: RedisConfiguration = .init()
        /// Prefix of every key the store touches, so tenants and tests never collide.
        /// Default: `"exactly-once:"`.
        public var keyPrefix: String = "exactly-once:"
        /// How long completed records are kept (enforced with `PEXPIRE`). Default: nil (forever).
        public var retention: Duration? = nil
        /// All defaults.
        public init() {}
        /// Defaults, reaching Redis as `redis`.
        public init(redis: RedisConfiguration) { self.redis = redis }
    }

    private let client: RedisClient
    private let clock: any WallClock
    private let configuration: Configuration
    private let tokenKey: [UInt8]
    private let fencesKey: [UInt8]

    /// Creates a store. No connection is made until the first operation.
    /// - Parameters:
    ///   - configuration: where Redis is and how keys are named.
    ///   - clock: the time used for leases and retention. Default: the system clock.
    ///   - logger: where connection events go (info and below). Default: discards everything.
    /// - Throws: `ExactlyOnceError/Code/invalidConfiguration` for out-of-range values.
    public init(configuration: Configuration = .init(), clock: any WallClock = SystemWallClock(),
                logger: Logger = Logger(label: "exactly-once.redis", factory: { _ in SwiftLogNoOpLogHandler() })) throws {
        if let retention = configuration.retention, retention <= .zero {
            throw ExactlyOnceError(.invalidConfiguration, "retention must be positive")
        }
        self.client = try RedisClient(configuration: configuration.redis, logger: logger)
        self.clock = clock
        self.configuration = configuration
        self.tokenKey = Array((configuration.keyPrefix + "token").utf8)
        self.fencesKey = Array((configuration.keyPrefix + "fences").utf8)
    }

    /// Creates a store for `url` (see ``RedisConfiguration/init(url:)``) with `keyPrefix`.
    /// - Throws: `ExactlyOnceError/Code/invalidConfiguration`.
    public convenience init(url: String, keyPrefix: String = "exactly-once:", retention: Duration? = nil,
                            clock: any WallClock = SystemWallClock(),
                            logger: Logger = Logger(label: "exactly-once.redis", factory: { _ in SwiftLogNoOpLogHandler() })) throws {
        var c = Configuration(redis: try RedisConfiguration(url: url))
        c.keyPrefix = keyPrefix
        c.retention = retention
        try self.init(configuration: c, clock: clock, logger: logger)
    }

    func recordKey(_ key: IdempotencyKey) -> [UInt8] { Array((configuration.keyPrefix + "r:" + key.rawValue).utf8) }
    func stateKey(_ key: String) -> [UInt8] { Array((configuration.keyPrefix + "s:" + key).utf8) }

    // MARK: - Operations

    /// Claims keys in one script call, answering each request in order (see `DedupeStore`).
    public func claim(_ requests: [ClaimRequest]) async throws -> [ClaimResult] {
        if requests.isEmpty { return [] }
        let now = clock.now()
        // The whole batch is one script call: one atomic unit, so the fence check, the
        // prefetch charging and the answers follow the batch order exactly.
        var keys: [[UInt8]] = [tokenKey, fencesKey]
        var args: [[UInt8]] = [Self.decimal(now.milliseconds)]
        keys.reserveCapacity(requests.count + 2)
        args.reserveCapacity(requests.count * 6 + 1)
        for r in requests {
            keys.append(recordKey(r.key))
            args.append(r.fingerprint.bytes)
            args.append(Self.decimal(now.advanced(by: r.lease).milliseconds))
            Self.appendFence(r.fence, to: &args)
            args.append(r.prefetch ? Self.one : Self.zero)
        }
        let reply = try await evaluate(DedupeScripts.claim, [(keys, args)])[0]
        return try Self.decodeClaims(reply, requests: requests, now: now)
    }

    /// Completes a claim and applies its effect writes in one script call (G3).
    public func complete(_ completion: Completion) async throws {
        let result = try await completeInOrder([completion])
        if let failure = result.failure { throw failure }
    }

    /// Completes claims in order in one script call (one round trip, one atomic unit), stopping
    /// at the first that fails.
    public func complete(_ completions: [Completion]) async throws -> BatchCompletion {
        if completions.isEmpty { return BatchCompletion(applied: 0, failure: nil) }
        return try await completeInOrder(completions)
    }

    private func completeInOrder(_ completions: [Completion]) async throws -> BatchCompletion {
        let now = clock.now()
        var keys: [[UInt8]] = [fencesKey]
        var args: [[UInt8]] = [Self.decimal(now.milliseconds)]
        let retentionEnd: [UInt8]
        if let retention = configuration.retention {
            // PEXPIRE refuses TTLs that overflow the server's clock: cap at about 30,000 years.
            args.append(Self.decimal(min(max(1, Self.milliseconds(retention)), 1_000_000_000_000_000)))
            retentionEnd = Self.decimal(now.advanced(by: retention).milliseconds)
        } else {
            args.append([])
            retentionEnd = []
        }
        var readKeys: [[String]] = []
        for completion in completions {
            let claim = completion.claim
            keys.append(recordKey(claim.key))
            args.append(Self.decimal(claim.token.rawValue))
            Self.appendFence(claim.fence, to: &args)
            args.append(retentionEnd)
            args.append(Self.decimal(UInt64(completion.outcome.status.rawValue)))
            args.append(completion.outcome.detail)
            // One entry per key in each list: sorted by key, as the script expects.
            let reads = completion.effects.readList.sorted { $0.key < $1.key }
            let writes = completion.effects.writeList.sorted { $0.key < $1.key }
            args.append(Self.decimal(UInt64(reads.count)))
            args.append(Self.decimal(UInt64(writes.count)))
            for read in reads {
                keys.append(stateKey(read.key))
                args.append(Self.decimal(read.version))
            }
            for write in writes {
                keys.append(stateKey(write.key))
                if let value = write.value {
                    args.append(Self.one)
                    args.append(value)
                } else {
                    args.append(Self.zero)
                    args.append([])
                }
            }
            readKeys.append(reads.map(\.key))
        }
        let reply = try await evaluate(DedupeScripts.complete, [(keys, args)])[0]
        return try Self.decodeCompletions(reply, completions.map(\.claim), readKeys: readKeys)
    }

    /// Releases a claim after a failed attempt; the attempt count is kept.
    public func release(_ claim: Claim, reason: String) async throws {
        let now = clock.now()
        var args: [[UInt8]] = [Self.decimal(now.milliseconds), Self.decimal(claim.token.rawValue)]
        Self.appendFence(claim.fence, to: &args)
        args.append(Array(String(reason.prefix(512)).utf8))
        args.append(Self.decimal(UInt64(max(0, claim.attempt))))
        let reply = try await evaluate(DedupeScripts.release, [([fencesKey, recordKey(claim.key)], args)])[0]
        if let failure = try Self.decodeStep(reply, claim: claim, readKeys: []) { throw failure }
    }

    /// Reads transactional state with versions, in one pipelined round trip.
    public func readState(_ keys: [String]) async throws -> [String: VersionedValue] {
        let unique = Array(Set(keys))
        let commands = unique.map { [Array("HMGET".utf8), stateKey($0), Array("v".utf8), Array("ver".utf8)] }
        let replies = try await client.pipeline(commands)
        var out: [String: VersionedValue] = [:]
        for (key, reply) in zip(unique, replies) {
            out[key] = try Self.decodeState(reply)
        }
        return out
    }

    /// The records of `keys` (absent keys are left out), in one pipelined round trip.
    public func records(for keys: [IdempotencyKey]) async throws -> [IdempotencyKey: DedupeRecord] {
        let unique = Array(Set(keys))
        let commands = unique.map { key in
            [Array("HMGET".utf8), recordKey(key)] + Self.recordFields.map { Array($0.utf8) }
        }
        let replies = try await client.pipeline(commands)
        var out: [IdempotencyKey: DedupeRecord] = [:]
        for (key, reply) in zip(unique, replies) {
            if let record = try Self.decodeRecord(reply, key: key) { out[key] = record }
        }
        return out
    }

    /// A page of records matching `query`, found with `SCAN` over the record keys: in key
    /// order within each `SCAN` step, not overall. The cursor is Redis's `SCAN` cursor and the
    /// last key returned from its step (`<cursor>|<key>`). As with `SCAN`, a record present for
    /// the whole listing is returned at least once; one moved by a rehash may come twice.
    public func listRecords(_ query: RecordQuery) async throws -> RecordPage {
        let limit = try query.validatedLimit()
        let prefix = configuration.keyPrefix + "r:"
        let pattern = Self.globEscape(prefix) + "*"
        var cursor = "0"
        var after: String?
        if let given = query.cursor {
            let parts = given.split(separator: "|", maxSplits: 1, omittingEmptySubsequences: false)
            guard let c = parts.first, !c.isEmpty, c.allSatisfy(\.isNumber) else {
                throw ExactlyOnceError(.invalidConfiguration, "not a cursor of this store: \(IdempotencyKeyText.bounded(given))")
            }
            cursor = String(c)
            if parts.count == 2 { after = String(parts[1]) }
        }
        var found: [DedupeRecord] = []
        let now = clock.now()
        while true {
            let reply = try await client.command("SCAN", cursor, "MATCH", pattern, "COUNT", String(max(100, limit)))
            let parts = try ReplyDecoding.array(reply, "SCAN", count: 2)
            let next = try ReplyDecoding.text(parts[0], "SCAN cursor")
            guard !next.isEmpty, next.allSatisfy(\.isNumber) else { throw ReplyDecoding.unexpected("SCAN cursor", parts[0]) }
            let names = try ReplyDecoding.array(parts[1], "SCAN keys").map { try ReplyDecoding.text($0, "SCAN key") }
            let keys = names.compactMap { name -> IdempotencyKey? in
                guard name.hasPrefix(prefix) else { return nil }
                return try? IdempotencyKey(rawValue: String(name.dropFirst(prefix.count)))
            }
            var lastInStep: String?
            for record in try await records(for: keys).values.sorted(by: { $0.key < $1.key }) {
                if let after, record.key.rawValue <= after { continue }
                if record.phase == .completed, let e = record.expiresAt, now >= e { continue }
                guard query.matches(record) else { continue }
                if found.count == limit {
                    return RecordPage(records: found, nextCursor: lastInStep.map { "\(cursor)|\($0)" } ?? cursor)
                }
                found.append(record)
                lastInStep = record.key.rawValue
            }
            after = nil
            cursor = next
            if cursor == "0" { return RecordPage(records: found, nextCursor: nil) }
        }
    }

    /// Makes a dead-lettered key claimable again with its attempts reset (one script call).
    public func reopenDeadLettered(_ key: IdempotencyKey) async throws -> Bool {
        let now = clock.now()
        let reply = try await evaluate(DedupeScripts.reopenDeadLettered, [([recordKey(key)], [Self.decimal(now.milliseconds), Array("reopened for dead-letter replay (was: ".utf8)])])[0]
        switch reply {
        case .integer(1): return true
        case .integer(0): return false
        default: throw ReplyDecoding.unexpected("reopen", reply)
        }
    }

    /// Deletes every key under ``Configuration/keyPrefix`` (with `SCAN` and `UNLINK`); returns
    /// how many. For tests and decommissioning; never run it against a live tenant.
    @discardableResult
    public func removeAll() async throws -> Int {
        var cursor = "0"
        var removed = 0
        let pattern = Self.globEscape(configuration.keyPrefix) + "*"
        repeat {
            let reply = try await client.command("SCAN", cursor, "MATCH", pattern, "COUNT", "1000")
            let parts = try ReplyDecoding.array(reply, "SCAN", count: 2)
            cursor = try ReplyDecoding.text(parts[0], "SCAN cursor")
            let keys = try ReplyDecoding.array(parts[1], "SCAN keys").map { try ReplyDecoding.bytes($0, "SCAN key") }
            if !keys.isEmpty {
                let n = try await client.command([Array("UNLINK".utf8)] + keys)
                removed += Int(try ReplyDecoding.int64(n, "UNLINK"))
            }
        } while cursor != "0"
        return removed
    }

    /// Sends `PING`; throws `ExactlyOnceError/Code/storeUnavailable` when Redis does not answer.
    public func ping() async throws {
        let reply = try await client.command("PING")
        guard case .status("PONG") = reply else { throw ReplyDecoding.unexpected("PING", reply) }
    }

    // MARK: - Script calls

    private func evaluate(_ script: RedisScript, _ calls: [([[UInt8]], [[UInt8]])]) async throws -> [RedisReply] {
        try await client.evaluate(script, calls)
    }

    // MARK: - Reply decoding (fuzzed: unexpected replies throw, never trap)

    static let recordFields = ["fp", "ph", "at", "tok", "le", "os", "od", "ex", "lf", "fs", "fe"]

    static func decodeClaims(_ reply: RedisReply, requests: [ClaimRequest], now: Timestamp) throws -> [ClaimResult] {
        guard case .array(let items) = reply else { throw ReplyDecoding.unexpected("claim", reply) }
        if let first = items.first, first.text == "FENCED" {
            guard items.count == 3 else { throw ReplyDecoding.unexpected("claim", reply) }
            let index = try ReplyDecoding.int64(items[1], "claim")
            let seen = try ReplyDecoding.uint64(items[2], "claim")
            guard index >= 1, index <= Int64(requests.count), let fence = requests[Int(index) - 1].fence else {
                throw ReplyDecoding.unexpected("claim", reply)
            }
            throw ExactlyOnceError(.fenced, "partition \(fence.scope) moved to epoch \(seen); this member holds epoch \(fence.epoch)")
        }
        guard items.count == requests.count else { throw ReplyDecoding.unexpected("claim", reply) }
        return try zip(requests, items).map { request, item in
            let parts = try ReplyDecoding.array(item, "claim", atLeast: 1)
            switch try ReplyDecoding.text(parts[0], "claim") {
            case "N" where parts.count == 3:
                let token = try ReplyDecoding.uint64(parts[1], "claim token")
                let attempt = try ReplyDecoding.count(parts[2], "claim attempt")
                guard attempt >= 1 else { throw ReplyDecoding.unexpected("claim attempt", parts[2]) }
                return .new(Claim(key: request.key, token: FencingToken(token), attempt: attempt,
                                  leaseExpiresAt: now.advanced(by: request.lease), fingerprint: request.fingerprint,
                                  fence: request.fence))
            case "D" where parts.count == 3:
                return .completed(try decodeOutcome(parts[1], parts[2]))
            case "P" where parts.count == 2:
                return .inProgress(leaseExpiresAt: Timestamp(milliseconds: try ReplyDecoding.int64(parts[1], "claim lease")))
            case "C" where parts.count == 5:
                let stored = try decodeFingerprint(parts[1])
                let hasOutcome = try ReplyDecoding.text(parts[2], "claim conflict")
                let outcome: Outcome? = hasOutcome == "1" ? try decodeOutcome(parts[3], parts[4]) : nil
                return .conflict(stored: stored, outcome: outcome)
            default:
                throw ReplyDecoding.unexpected("claim", item)
            }
        }
    }

    /// Decodes the complete script's answer: how many completions applied, and why the next failed.
    static func decodeCompletions(_ reply: RedisReply, _ claims: [Claim], readKeys: [[String]]) throws -> BatchCompletion {
        let steps = try ReplyDecoding.array(reply, "completion", atLeast: 1)
        guard steps.count <= claims.count, claims.count == readKeys.count else { throw ReplyDecoding.unexpected("completion", reply) }
        for (index, step) in steps.enumerated() {
            if let failure = try decodeStep(step, claim: claims[index], readKeys: readKeys[index]) {
                guard index == steps.count - 1 else { throw ReplyDecoding.unexpected("completion", reply) }
                return BatchCompletion(applied: index, failure: failure)
            }
        }
        // Without a failure the script handles every completion.
        guard steps.count == claims.count else { throw ReplyDecoding.unexpected("completion", reply) }
        return BatchCompletion(applied: steps.count, failure: nil)
    }

    /// One completion's or release's answer: nil for success, the refusal otherwise.
    static func decodeStep(_ reply: RedisReply, claim: Claim, readKeys: [String]) throws -> ExactlyOnceError? {
        let parts = try ReplyDecoding.array(reply, "completion", atLeast: 1)
        switch try ReplyDecoding.text(parts[0], "completion") {
        case "OK" where parts.count == 1, "REPEAT" where parts.count == 1:
            return nil
        case "FENCED" where parts.count == 3:
            let detail = IdempotencyKeyText.bounded(try ReplyDecoding.text(parts[2], "completion"))
            switch try ReplyDecoding.text(parts[1], "completion") {
            case "epoch":
                return ExactlyOnceError(.fenced, "partition \(claim.fence?.scope ?? "?") moved to epoch \(detail); this member holds epoch \(claim.fence.map { "\($0.epoch)" } ?? "?")")
            case "missing":
                return ExactlyOnceError(.fenced, "key \(claim.key) is no longer held (expired or evicted)")
            case "superseded":
                return ExactlyOnceError(.fenced, "claim token \(claim.token) on \(claim.key) was superseded by token \(detail)")
            case "released":
                return ExactlyOnceError(.fenced, "claim token \(claim.token) on \(claim.key) was released")
            case "expired":
                return ExactlyOnceError(.fenced, "lease of token \(claim.token) on \(claim.key) expired before completion")
            case "completed":
                return ExactlyOnceError(.fenced, "key \(claim.key) already completed; it cannot be released")
            default:
                throw ReplyDecoding.unexpected("completion", reply)
            }
        case "CONFLICT" where parts.count == 2:
            let index = try ReplyDecoding.int64(parts[1], "completion")
            guard index >= 1, index <= Int64(readKeys.count) else { throw ReplyDecoding.unexpected("completion", reply) }
            return ExactlyOnceError(.transactionConflict, "state key \(IdempotencyKeyText.bounded(readKeys[Int(index) - 1])) changed during the effect")
        default:
            throw ReplyDecoding.unexpected("completion", reply)
        }
    }

    static func decodeState(_ reply: RedisReply) throws -> VersionedValue {
        let parts = try ReplyDecoding.array(reply, "state read", count: 2)
        let value = try ReplyDecoding.optionalBytes(parts[0], "state value")
        let version: UInt64 = parts[1] == .null ? 0 : try ReplyDecoding.uint64(parts[1], "state version")
        return VersionedValue(value: value, version: version)
    }

    static func decodeRecord(_ reply: RedisReply, key: IdempotencyKey) throws -> DedupeRecord? {
        let f = try ReplyDecoding.array(reply, "record read", count: recordFields.count)
        guard f[0] != .null else { return nil }
        let fingerprint = try decodeFingerprint(f[0])
        let phaseByte = try ReplyDecoding.int64(f[1], "record phase")
        guard let raw = UInt8(exactly: phaseByte), let phase = DedupeRecord.Phase(rawValue: raw) else {
            throw ExactlyOnceError(.corruptData, "record of \(key) has an unknown phase")
        }
        let attempts = try ReplyDecoding.count(f[2], "record attempts")
        let token = try ReplyDecoding.uint64(f[3], "record token")
        let lease = Timestamp(milliseconds: try ReplyDecoding.int64(f[4], "record lease"))
        let outcome: Outcome? = f[5] == .null ? nil : try decodeOutcome(f[5], f[6] == .null ? .string([]) : f[6])
        let expires: Timestamp? = try ReplyDecoding.optionalBytes(f[7], "record expiry").map { _ in
            Timestamp(milliseconds: try ReplyDecoding.int64(f[7], "record expiry"))
        }
        let failure = try ReplyDecoding.optionalBytes(f[8], "record failure").map { String(decoding: $0, as: UTF8.self) }
        var fence: PartitionFence?
        if let scope = try ReplyDecoding.optionalBytes(f[9], "record fence scope") {
            fence = PartitionFence(scope: String(decoding: scope, as: UTF8.self), epoch: try ReplyDecoding.uint64(f[10], "record fence epoch"))
        }
        return DedupeRecord(key: key, fingerprint: fingerprint, phase: phase, attempts: attempts, token: FencingToken(token),
                            leaseExpiresAt: lease, outcome: phase == .completed ? outcome : nil, expiresAt: expires,
                            lastFailure: failure, fence: fence)
    }

    static func decodeOutcome(_ status: RedisReply, _ detail: RedisReply) throws -> Outcome {
        let s = try ReplyDecoding.int64(status, "outcome status")
        guard let raw = UInt8(exactly: s) else { throw ExactlyOnceError(.corruptData, "stored outcome status \(s) is out of range") }
        return Outcome(status: Outcome.Status(rawValue: raw), detail: try ReplyDecoding.bytes(detail, "outcome detail"))
    }

    static func decodeFingerprint(_ reply: RedisReply) throws -> PayloadFingerprint {
        let bytes = try ReplyDecoding.bytes(reply, "fingerprint")
        guard (1...64).contains(bytes.count), let fp = try? PayloadFingerprint(bytes: bytes) else {
            throw ExactlyOnceError(.corruptData, "stored fingerprint has \(bytes.count) bytes")
        }
        return fp
    }

    // MARK: - Encoding helpers

    private static let one: [UInt8] = [UInt8(ascii: "1")]
    private static let zero: [UInt8] = [UInt8(ascii: "0")]

    static func decimal(_ v: Int64) -> [UInt8] { Array(String(v).utf8) }
    static func decimal(_ v: UInt64) -> [UInt8] { Array(String(v).utf8) }

    private static func appendFence(_ fence: PartitionFence?, to args: inout [[UInt8]]) {
        if let f = fence {
            args.append(one)
            args.append(Array(f.scope.utf8))
            args.append(decimal(f.epoch))
        } else {
            args.append(zero)
            args.append([])
            args.append([])
        }
    }

    /// `d` in whole milliseconds, saturating (the core's `Timestamp` arithmetic).
    static func milliseconds(_ d: Duration) -> Int64 {
        Timestamp(milliseconds: 0).advanced(by: d).milliseconds
    }

    private static func globEscape(_ s: String) -> String {
        var out = ""
        for c in s {
            if "*?[]\\".contains(c) { out.append("\\") }
            out.append(c)
        }
        return out
    }
}

/// Shortens text from the server before it goes into an error message.
enum IdempotencyKeyText {
    static func bounded(_ s: String) -> String {
        s.utf8.count > 64 ? String(decoding: s.utf8.prefix(40), as: UTF8.self) + "…(\(s.utf8.count) bytes)" : s
    }
}
