/// A fencing token: strictly increasing for every new claim a store hands out. A completion
/// carries the token of its claim; the store refuses a completion whose token is no longer the
/// key's current one (a zombie, F11).
public struct FencingToken: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// The token value.
    public let rawValue: UInt64
    /// Wraps a token value.
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (l: FencingToken, r: FencingToken) -> Bool { l.rawValue < r.rawValue }
    public var description: String { "\(rawValue)" }
}

/// Ownership of one partition by one consumer-group generation.
///
/// The transport hands out a strictly increasing epoch each time a partition is assigned. The
/// store remembers the highest epoch it has seen per ``scope`` and refuses claims, completions
/// and releases from a lower epoch, so once a new owner has touched the store a rebalanced-out
/// member can no longer apply anything, even for keys the new owner has not reached yet. This
/// is what keeps G2 (order) across rebalances.
public struct PartitionFence: Hashable, Sendable, CustomStringConvertible {
    /// What is owned, for example `group/topic/3`.
    public let scope: String
    /// The owner's epoch.
    public let epoch: UInt64
    /// Creates a fence.
    public init(scope: String, epoch: UInt64) {
        self.scope = scope
        self.epoch = epoch
    }
    public var description: String { "\(scope)@\(epoch)" }
}

/// The result of processing a record, stored with its dedupe record and replayed to duplicates (G4).
public struct Outcome: Hashable, Sendable, CustomStringConvertible {
    /// The kind of outcome.
    public struct Status: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The stored byte.
        public let rawValue: UInt8
        /// Wraps a stored byte.
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        /// The effect was applied.
        public static let applied = Status(rawValue: 0)
        /// The record was processed and refused by the business rules (for example "sold out").
        /// A negative outcome is still an outcome: it is stored and replayed.
        public static let rejected = Status(rawValue: 1)
        /// The record was given up on and sent to the dead-letter topic.
        public static let deadLettered = Status(rawValue: 2)
        public var description: String {
            switch rawValue {
            case 0: "applied"
            case 1: "rejected"
            case 2: "deadLettered"
            default: "status(\(rawValue))"
            }
        }
    }

    /// The kind of outcome.
    public var status: Status
    /// Application-defined detail (for example an issued serial or a reason), at most 64 KiB.
    public var detail: [UInt8]

    /// Creates an outcome.
    public init(status: Status, detail: [UInt8] = []) {
        self.status = status
        self.detail = detail
    }
    /// An applied outcome with a UTF-8 detail.
    public static func applied(_ detail: String = "") -> Outcome { Outcome(status: .applied, detail: Array(detail.utf8)) }
    /// A rejected outcome with a UTF-8 detail.
    public static func rejected(_ detail: String) -> Outcome { Outcome(status: .rejected, detail: Array(detail.utf8)) }
    /// The detail as UTF-8 text.
    public var detailText: String { String(decoding: detail, as: UTF8.self) }
    public var description: String { "\(status)(\(detail.count) bytes)" }
}

/// A request to claim a key before processing a record.
public struct ClaimRequest: Sendable, Hashable {
    /// The key to claim.
    public var key: IdempotencyKey
    /// The payload's fingerprint (G5).
    public var fingerprint: PayloadFingerprint
    /// How long the claim is exclusive. After that another claimant may take it over.
    public var lease: Duration
    /// The claimant's partition ownership, when it consumes from a partitioned transport.
    public var fence: PartitionFence?
    /// A prefetch claim is charged as an attempt only if no earlier request of the same batch
    /// was granted ``ClaimResult/new(_:)``. The consumer claims a whole batch ahead as prefetches,
    /// so a crash is charged to the record at the head of the lane (the one being processed),
    /// not to every record claimed behind it. Default: false (always charged).
    public var prefetch: Bool
    /// Creates a request.
    public init(key: IdempotencyKey, fingerprint: PayloadFingerprint, lease: Duration, fence: PartitionFence? = nil, prefetch: Bool = false) {
        self.key = key
        self.fingerprint = fingerprint
        self.lease = lease
        self.fence = fence
        self.prefetch = prefetch
    }
}

/// An exclusive, leased claim on a key.
public struct Claim: Sendable, Hashable {
    /// The claimed key.
    public let key: IdempotencyKey
    /// The claim's fencing token; hand it to effects that live outside the store.
    public let token: FencingToken
    /// Which attempt this is (1 for the first): the record's charged attempts, plus one if this
    /// claim was an uncharged prefetch. Kept with the record, so it survives restarts.
    public let attempt: Int
    /// When the lease ends.
    public let leaseExpiresAt: Timestamp
    /// The fingerprint the key was claimed with.
    public let fingerprint: PayloadFingerprint
    /// The claimant's partition ownership, if any.
    public let fence: PartitionFence?
    /// Creates a claim (stores create these).
    public init(key: IdempotencyKey, token: FencingToken, attempt: Int, leaseExpiresAt: Timestamp,
                fingerprint: PayloadFingerprint, fence: PartitionFence?) {
        self.key = key
        self.token = token
        self.attempt = attempt
        self.leaseExpiresAt = leaseExpiresAt
        self.fingerprint = fingerprint
        self.fence = fence
    }
}

/// What a claim found.
///
/// The four answers are the complete set a dedupe store can give; this enum is not expected
/// to grow.
public enum ClaimResult: Sendable, Hashable {
    /// Nobody processed the key yet (or the last attempt failed or its lease lapsed): process it.
    case new(Claim)
    /// The key was processed; here is its stored outcome. Do not process again (G3), answer with it (G4).
    case completed(Outcome)
    /// Somebody else holds a live lease on the key. Try again later.
    case inProgress(leaseExpiresAt: Timestamp)
    /// The key is known with a different payload fingerprint (G5). The stored outcome is given
    /// when the first payload completed.
    case conflict(stored: PayloadFingerprint, outcome: Outcome?)
}

/// A value of the store's transactional state, with its version (0 when absent).
public struct VersionedValue: Sendable, Hashable {
    /// The value, or nil when absent.
    public var value: [UInt8]?
    /// Incremented on every write; 0 for a key never written.
    public var version: UInt64
    /// Creates a versioned value.
    public init(value: [UInt8]?, version: UInt64) {
        self.value = value
        self.version = version
    }
}

/// The state changes of a handler's effect, committed atomically with the completion (G3).
///
/// `reads` are optimistic: the completion fails with
/// ``ExactlyOnceError/Code/transactionConflict`` if any read key's version changed since.
public struct EffectWrites: Sendable, Hashable {
    /// Versions observed by the handler, by state key.
    public var reads: [String: UInt64]
    /// New values by state key (nil removes the key).
    public var writes: [String: [UInt8]?]
    /// No reads and no writes.
    public static let none = EffectWrites(reads: [:], writes: [:])
    /// Creates a set of effects.
    public init(reads: [String: UInt64], writes: [String: [UInt8]?]) {
        self.reads = reads
        self.writes = writes
    }
}

/// The finished processing of a claimed key.
public struct Completion: Sendable, Hashable {
    /// The claim being completed.
    public var claim: Claim
    /// The outcome to store and replay to duplicates.
    public var outcome: Outcome
    /// The effect, applied atomically with the completion.
    public var effects: EffectWrites
    /// Creates a completion.
    public init(claim: Claim, outcome: Outcome, effects: EffectWrites = .none) {
        self.claim = claim
        self.outcome = outcome
        self.effects = effects
    }
}

/// The state of a key in a store, for inspection and audits.
public struct DedupeRecord: Sendable, Hashable {
    /// Lifecycle of a record.
    public enum Phase: UInt8, Sendable, Hashable {
        /// Claimed, lease running or lapsed.
        case inProgress = 1
        /// Released after a failed attempt; claimable again.
        case released = 2
        /// Completed with an outcome.
        case completed = 3
    }
    /// The key.
    public var key: IdempotencyKey
    /// The fingerprint of the payload the key was first claimed with.
    public var fingerprint: PayloadFingerprint
    /// Lifecycle phase.
    public var phase: Phase
    /// Charged attempts so far (see ``ClaimRequest/prefetch``).
    public var attempts: Int
    /// Token of the latest claim.
    public var token: FencingToken
    /// Lease end of the latest claim.
    public var leaseExpiresAt: Timestamp
    /// The outcome, once completed.
    public var outcome: Outcome?
    /// When the record may be forgotten (completed records only).
    public var expiresAt: Timestamp?
    /// Reason given by the last release.
    public var lastFailure: String?
    /// The fence of the latest claim.
    public var fence: PartitionFence?

    /// Creates a record.
    public init(key: IdempotencyKey, fingerprint: PayloadFingerprint, phase: Phase, attempts: Int, token: FencingToken,
                leaseExpiresAt: Timestamp, outcome: Outcome? = nil, expiresAt: Timestamp? = nil,
                lastFailure: String? = nil, fence: PartitionFence? = nil) {
        self.key = key
        self.fingerprint = fingerprint
        self.phase = phase
        self.attempts = attempts
        self.token = token
        self.leaseExpiresAt = leaseExpiresAt
        self.outcome = outcome
        self.expiresAt = expiresAt
        self.lastFailure = lastFailure
        self.fence = fence
    }
}

/// A dedupe store: remembers which idempotency keys were processed, with what outcome, and
/// holds the transactional state that handlers' effects write.
///
/// ## Contract (checked by `StoreConformance` in the test kit)
/// - ``claim(_:)`` answers, per request and in order: ``ClaimResult/new(_:)`` with a fresh
///   strictly-greater fencing token and `attempt` one more than the record's previous count
///   (the count itself grows only for charged claims: see ``ClaimRequest/prefetch``);
///   ``ClaimResult/completed(_:)`` with the stored outcome when the key completed with the same
///   fingerprint; ``ClaimResult/conflict(stored:outcome:)`` when the fingerprint differs;
///   ``ClaimResult/inProgress(leaseExpiresAt:)`` while another claim's lease runs, unless the
///   request's fence has the same or a higher epoch in the same scope: then it takes over at
///   once with a new token (a same-epoch re-claim is the owner itself after an unknown outcome
///   and keeps the attempt count; a higher epoch counts a new attempt).
/// - A request whose fence epoch is lower than the highest seen in its scope throws
///   ``ExactlyOnceError/Code/fenced`` for the whole batch; a higher epoch raises the scope's epoch.
/// - ``complete(_:)`` succeeds only for the key's current token, while its lease runs and its
///   fence is current; otherwise ``ExactlyOnceError/Code/fenced`` and nothing is written. The
///   effect's reads are validated and its writes applied in the same atomic step. Completing
///   again with the same token after success succeeds without writing again (idempotent retry
///   after an unknown outcome).
/// - ``release(_:reason:)`` makes the key claimable again and keeps its attempt count.
/// - Unreachable backends throw ``ExactlyOnceError/Code/storeUnavailable``: the caller does not
///   know whether the operation happened and must claim again before acting.
public protocol DedupeStore: Sendable {
    /// Claims keys, answering each request in order.
    func claim(_ requests: [ClaimRequest]) async throws -> [ClaimResult]
    /// Completes a claim, applying its effect atomically with the completion record.
    func complete(_ completion: Completion) async throws
    /// Completes claims in order, each atomically with its effect, stopping at the first that
    /// fails. Stores that can do better than one at a time (one lock, one fsync, one round trip)
    /// implement it; the default completes one at a time. Throws only when the outcome is unknown
    /// (``ExactlyOnceError/Code/storeUnavailable``): completions are idempotent per token, so the
    /// caller retries the whole batch.
    func complete(_ completions: [Completion]) async throws -> BatchCompletion
    /// Gives up a claim after a failed attempt; the attempt count is kept.
    func release(_ claim: Claim, reason: String) async throws
    /// How many completions are worth sending in one ``complete(_:)-([Completion])`` call: 1 for
    /// stores where a call is as cheap as buffering (in memory); more where a call costs a round
    /// trip or an fsync. The consumer buffers up to `min(this, completionBatchSize)`. Default: 64.
    var completionBatchLimit: Int { get }
    /// Reads transactional state with versions.
    func readState(_ keys: [String]) async throws -> [String: VersionedValue]
    /// Reads one state value with its version (version 0 when absent). Has a default implementation.
    func readState(_ key: String) async throws -> VersionedValue
    /// The records of keys, for audits and operations (absent keys are left out).
    func records(for keys: [IdempotencyKey]) async throws -> [IdempotencyKey: DedupeRecord]
}

/// The result of ``DedupeStore/complete(_:)-([Completion])``.
public struct BatchCompletion: Sendable {
    /// How many completions, from the first, were applied.
    public var applied: Int
    /// Why completion number `applied` failed, when not all were applied.
    public var failure: ExactlyOnceError?
    /// Creates a result.
    public init(applied: Int, failure: ExactlyOnceError?) {
        self.applied = applied
        self.failure = failure
    }
}

extension DedupeStore {
    /// 64: worth batching unless the store says otherwise.
    public var completionBatchLimit: Int { 64 }

    /// Completes one at a time, stopping at the first failure.
    public func complete(_ completions: [Completion]) async throws -> BatchCompletion {
        for (i, c) in completions.enumerated() {
            do {
                try await complete(c)
            } catch let e as ExactlyOnceError where e.code != .storeUnavailable {
                return BatchCompletion(applied: i, failure: e)
            }
        }
        return BatchCompletion(applied: completions.count, failure: nil)
    }

    /// Claims one key.
    public func claim(_ request: ClaimRequest) async throws -> ClaimResult {
        let results = try await claim([request])
        guard results.count == 1 else {
            throw ExactlyOnceError(.storeUnavailable, "store answered \(results.count) results for one claim")
        }
        return results[0]
    }

    /// Reads one state value.
    public func readState(_ key: String) async throws -> VersionedValue {
        try await readState([key])[key] ?? VersionedValue(value: nil, version: 0)
    }
}

/// The handler's view of the store's transactional state (G3): reads go to the store and are
/// remembered with their versions; writes are buffered and committed atomically with the
/// record's completion, or dropped if the handler throws.
public struct EffectTransaction: Sendable {
    private let store: any DedupeStore
    private let pending: PendingEffects?
    private var reads: [String: (version: UInt64, value: [UInt8]?)] = [:]
    private var writes: [String: [UInt8]?] = [:]

    /// Starts a transaction on `store`.
    public init(store: any DedupeStore) {
        self.store = store
        self.pending = nil
    }

    /// Starts a transaction that also sees the writes of completions not yet sent to the store.
    init(store: any DedupeStore, pending: PendingEffects) {
        self.store = store
        self.pending = pending
    }

    /// The value of `key`, seeing this transaction's own writes (and the lane's pending ones).
    public mutating func get(_ key: String) async throws -> [UInt8]? {
        if let written = writes[key] { return written }
        if let read = reads[key] { return read.value }
        let v = try await store.readState(key)
        if let p = pending?.writes[key] {
            // Not applied yet: by the time this completes, the pending writes will have been.
            reads[key] = (v.version + UInt64(p.count), p.value)
            return p.value
        }
        reads[key] = (v.version, v.value)
        return v.value
    }

    /// Buffers a write of `value` to `key`.
    public mutating func set(_ key: String, _ value: [UInt8]) { writes[key] = .some(value) }

    /// Buffers the removal of `key`.
    public mutating func remove(_ key: String) { writes[key] = .some(nil) }

    /// `key` as a decimal integer (nil when absent).
    /// - Throws: ``ExactlyOnceError/Code/invalidPayload`` when the stored value is not an integer.
    public mutating func getInt(_ key: String) async throws -> Int64? {
        guard let bytes = try await get(key) else { return nil }
        guard let v = Int64(String(decoding: bytes, as: UTF8.self)) else {
            throw ExactlyOnceError(.invalidPayload, "state key \(IdempotencyKey.abbreviate(key)) does not hold an integer")
        }
        return v
    }

    /// Buffers `value` as a decimal integer.
    public mutating func setInt(_ key: String, _ value: Int64) { set(key, Array(String(value).utf8)) }

    /// What the transaction read and wrote.
    public var effects: EffectWrites { EffectWrites(reads: reads.mapValues(\.version), writes: writes) }
}

/// The writes of a lane's completions that are buffered for one batched store call. Handlers of
/// later records read through it, so a lane sees its own effects in order.
///
/// `@unchecked Sendable`: a lane is one sequential task, and only that task creates, reads and
/// mutates its `PendingEffects` (handlers run inline in it), so there is no concurrent access.
final class PendingEffects: @unchecked Sendable {
    var writes: [String: (value: [UInt8]?, count: Int)] = [:]
    func add(_ effects: EffectWrites) {
        for (k, v) in effects.writes { writes[k] = (v, (writes[k]?.count ?? 0) + 1) }
    }
    func clear() { writes.removeAll(keepingCapacity: true) }
}
