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
///
/// Held as two small lists in the order the handler first touched each key, one entry per key
/// (a handler touches a few keys; lists cost no hashing). ``reads`` and ``writes`` give the
/// same effects as dictionaries.
public struct EffectWrites: Sendable, Hashable {
    /// A state key the handler read, with the version it saw.
    public struct Read: Sendable, Hashable {
        /// The state key.
        public var key: String
        /// The version observed (0: the key was absent).
        public var version: UInt64
        /// Creates a read.
        public init(key: String, version: UInt64) {
            self.key = key
            self.version = version
        }
    }

    /// A state key the handler wrote.
    public struct Write: Sendable, Hashable {
        /// The state key.
        public var key: String
        /// The new value; nil removes the key.
        public var value: [UInt8]?
        /// Creates a write.
        public init(key: String, value: [UInt8]?) {
            self.key = key
            self.value = value
        }
    }

    /// The reads, one per key, in the order they were made.
    public private(set) var readList: [Read]
    /// The writes, one per key (the last value written), in the order keys were first written.
    public private(set) var writeList: [Write]

    /// No reads and no writes.
    public static let none = EffectWrites(readList: [], writeList: [])

    /// Creates a set of effects from dictionaries (the lists are in key order).
    public init(reads: [String: UInt64], writes: [String: [UInt8]?]) {
        self.readList = reads.sorted { $0.key < $1.key }.map { Read(key: $0.key, version: $0.value) }
        self.writeList = writes.sorted { $0.key < $1.key }.map { Write(key: $0.key, value: $0.value) }
    }

    /// Creates a set of effects from lists; a key listed twice keeps its first read and its last write.
    public init(readList: [Read], writeList: [Write]) {
        self.readList = readList
        self.writeList = writeList
        if Set(readList.map(\.key)).count != readList.count || Set(writeList.map(\.key)).count != writeList.count {
            var reads: [String: UInt64] = [:]
            for r in readList where reads[r.key] == nil { reads[r.key] = r.version }
            var writes: [String: [UInt8]?] = [:]
            for w in writeList { writes[w.key] = .some(w.value) }
            self.readList = readList.filter { reads.removeValue(forKey: $0.key) != nil }
            self.writeList = writeList.reversed().filter { writes.removeValue(forKey: $0.key) != nil }.reversed()
        }
    }

    /// Versions observed by the handler, by state key.
    public var reads: [String: UInt64] {
        get { Dictionary(readList.map { ($0.key, $0.version) }, uniquingKeysWith: { first, _ in first }) }
        set { readList = newValue.sorted { $0.key < $1.key }.map { Read(key: $0.key, version: $0.value) } }
    }

    /// New values by state key (nil removes the key).
    public var writes: [String: [UInt8]?] {
        get { Dictionary(writeList.map { ($0.key, $0.value) }, uniquingKeysWith: { _, last in last }) }
        set { writeList = newValue.sorted { $0.key < $1.key }.map { Write(key: $0.key, value: $0.value) } }
    }

    /// Whether there is nothing to read-check or write.
    public var isEmpty: Bool { readList.isEmpty && writeList.isEmpty }

    /// The value this effect wrote for `key`: nil when it did not write it, `.some(nil)` when it removed it.
    func written(_ key: String) -> [UInt8]?? {
        guard let w = writeList.first(where: { $0.key == key }) else { return nil }
        return .some(w.value)
    }

    /// Records a read of `key` at `version` (the first read of a key is kept).
    mutating func noteRead(_ key: String, _ version: UInt64) {
        guard !readList.contains(where: { $0.key == key }) else { return }
        if readList.capacity == 0 { readList.reserveCapacity(2) }
        readList.append(Read(key: key, version: version))
    }

    /// Records a write of `value` to `key` (replacing an earlier write of the same key).
    mutating func noteWrite(_ key: String, _ value: [UInt8]?) {
        if let i = writeList.firstIndex(where: { $0.key == key }) {
            writeList[i].value = value
        } else {
            if writeList.capacity == 0 { writeList.reserveCapacity(4) }
            writeList.append(Write(key: key, value: value))
        }
    }

    /// Equal when they read the same versions and write the same values, whatever the order.
    public static func == (l: EffectWrites, r: EffectWrites) -> Bool { l.reads == r.reads && l.writes == r.writes }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(reads)
        hasher.combine(writes)
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

