import Synchronization

/// The embedded default dedupe store: everything in process memory, behind one lock.
///
/// Bounded by ``Configuration/capacity`` records. When a claim would exceed it, expired records
/// are purged first; if that is not enough, ``Configuration/EvictionPolicy`` decides:
/// `.rejectNewClaims` (default) fails the claim with the non-retriable
/// ``ExactlyOnceError/Code/capacityExceeded`` (the consumer stops with it) and keeps every guarantee; `.evictOldestCompleted`
/// forgets the oldest completed records, so a redelivery of one of those would be processed again
/// (G3 then holds only for records younger than the eviction horizon).
///
/// Nothing survives the process: G3 across a process crash needs the file or Redis store.
public final class InMemoryDedupeStore: DedupeStore {
    /// Configuration of the in-memory store.
    public struct Configuration: Sendable {
        /// What to do when the store is full.
        public struct EvictionPolicy: Sendable, Hashable {
            let evicts: Bool
            /// Refuse new claims with `capacityExceeded` (keeps all guarantees).
            public static let rejectNewClaims = EvictionPolicy(evicts: false)
            /// Forget the oldest completed records (weakens G3 beyond the horizon).
            public static let evictOldestCompleted = EvictionPolicy(evicts: true)
        }
        /// Maximum number of dedupe records. Default: 1,000,000.
        public var capacity: Int = 1_000_000
        /// How long completed records are kept. Default: nil (until evicted).
        public var retention: Duration? = nil
        /// Behaviour when full. Default: `.rejectNewClaims`.
        public var evictionPolicy: EvictionPolicy = .rejectNewClaims
        /// All defaults.
        public init() {}
    }

    private struct State {
        var machine: DedupeStateMachine
        var changes: [DedupeStateMachine.Change] = []
    }

    private let state: Mutex<State>
    private let clock: any WallClock
    private let configuration: Configuration

    /// Creates a store.
    /// - Throws: ``ExactlyOnceError/Code/invalidConfiguration`` for a capacity below 1.
    public init(configuration: Configuration = .init(), clock: any WallClock = SystemWallClock()) throws {
        guard configuration.capacity > 0 else {
            throw ExactlyOnceError(.invalidConfiguration, "capacity must be positive, got \(configuration.capacity)")
        }
        self.configuration = configuration
        self.clock = clock
        var machine = DedupeStateMachine(retention: configuration.retention, recordsChanges: false)
        machine.reserveCapacity(min(configuration.capacity, 1 << 16))
        self.state = Mutex(State(machine: machine))
    }

    public func claim(_ requests: [ClaimRequest]) async throws -> [ClaimResult] {
        let now = clock.now()
        return try state.withLock { s in
            s.changes.removeAll(keepingCapacity: true)
            // Count the keys not held yet only when the batch could overflow the capacity.
            let fresh = s.machine.records.count + requests.count > configuration.capacity
                ? requests.reduce(into: 0) { n, r in if s.machine.records[r.key] == nil { n += 1 } } : 0
            if s.machine.records.count + fresh > configuration.capacity {
                _ = s.machine.purgeExpired(now: now, changes: &s.changes)
                let over = s.machine.records.count + fresh - configuration.capacity
                if over > 0 {
                    if configuration.evictionPolicy.evicts {
                        _ = s.machine.evictOldestCompleted(over, changes: &s.changes)
                    }
                    if s.machine.records.count + fresh > configuration.capacity {
                        throw ExactlyOnceError(.capacityExceeded, "the in-memory store is full: \(configuration.capacity) records are live and its eviction policy keeps them; raise Configuration.capacity, set a retention, or choose .evictOldestCompleted")
                    }
                }
            }
            return try s.machine.claim(requests, now: now, changes: &s.changes)
        }
    }

    public func complete(_ completion: Completion) async throws {
        let now = clock.now()
        try state.withLock { s in
            s.changes.removeAll(keepingCapacity: true)
            try s.machine.complete(completion, now: now, changes: &s.changes)
        }
    }

    /// 1: a lock round trip is cheaper than buffering, so completions are not batched.
    public var completionBatchLimit: Int { 1 }

    public func complete(_ completions: [Completion]) async throws -> BatchCompletion {
        let now = clock.now()
        return state.withLock { s in
            s.changes.removeAll(keepingCapacity: true)
            for (i, c) in completions.enumerated() {
                do {
                    try s.machine.complete(c, now: now, changes: &s.changes)
                } catch let e as ExactlyOnceError {
                    return BatchCompletion(applied: i, failure: e)
                } catch {
                    return BatchCompletion(applied: i, failure: ExactlyOnceError(.storeUnavailable, "\(error)"))
                }
            }
            return BatchCompletion(applied: completions.count, failure: nil)
        }
    }

    public func release(_ claim: Claim, reason: String) async throws {
        let now = clock.now()
        try state.withLock { s in
            s.changes.removeAll(keepingCapacity: true)
            try s.machine.release(claim, reason: reason, now: now, changes: &s.changes)
        }
    }

    public func readState(_ keys: [String]) async throws -> [String: VersionedValue] {
        state.withLock { $0.machine.readState(keys) }
    }

    public func readState(_ key: String) async throws -> VersionedValue {
        state.withLock { $0.machine.readState(key) }
    }

    public func records(for keys: [IdempotencyKey]) async throws -> [IdempotencyKey: DedupeRecord] {
        state.withLock { s in
            var out: [IdempotencyKey: DedupeRecord] = [:]
            for k in keys { if let r = s.machine.records[k] { out[k] = r } }
            return out
        }
    }

    public func listRecords(_ query: RecordQuery) async throws -> RecordPage {
        let now = clock.now()
        return try state.withLock { try $0.machine.list(query, now: now) }
    }

    public func reopenDeadLettered(_ key: IdempotencyKey) async throws -> Bool {
        let now = clock.now()
        return state.withLock { s in
            s.changes.removeAll(keepingCapacity: true)
            return s.machine.reopenDeadLettered(key, now: now, changes: &s.changes)
        }
    }

    /// Removes completed records past their retention; returns how many were removed.
    @discardableResult
    public func purgeExpired() -> Int {
        let now = clock.now()
        return state.withLock { s in
            s.changes.removeAll(keepingCapacity: true)
            return s.machine.purgeExpired(now: now, changes: &s.changes)
        }
    }

    /// The number of dedupe records held.
    public var count: Int { state.withLock { $0.machine.records.count } }
}
