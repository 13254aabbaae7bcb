/// The claim/complete/release rules of the dedupe contract as a pure state machine over an
/// in-memory index. The in-memory store runs it behind a lock; the file store runs it and
/// journals the resulting records. Keeping the rules in one place means every store that uses
/// it answers the conformance suite the same way.
package struct DedupeStateMachine: Sendable {
    /// Records by key.
    package private(set) var records: [IdempotencyKey: DedupeRecord] = [:]
    /// Transactional state by key.
    package private(set) var state: [String: VersionedValue] = [:]
    /// Highest epoch seen per fence scope.
    package private(set) var fences: [String: UInt64] = [:]
    /// The last token handed out.
    package private(set) var lastToken: UInt64 = 0
    /// How long completed records are kept (nil: forever).
    package var retention: Duration?
    /// Whether operations report their ``Change``s (journaling stores need them; the in-memory
    /// store does not, and skipping them keeps its hot path free of copies).
    package var recordsChanges: Bool

    /// Creates an empty state machine.
    package init(retention: Duration?, recordsChanges: Bool = true) {
        self.retention = retention
        self.recordsChanges = recordsChanges
    }

    /// Reserves room for `records` dedupe records and as many state keys.
    package mutating func reserveCapacity(_ records: Int) {
        self.records.reserveCapacity(records)
        self.state.reserveCapacity(records)
    }

    /// Reserves room for `records` dedupe records and `state` state keys (never shrinks).
    package mutating func reserveCapacity(records: Int, state: Int) {
        if records > self.records.capacity { self.records.reserveCapacity(records) }
        if state > self.state.capacity { self.state.reserveCapacity(state) }
    }

    /// A change the machine made, for journaling stores.
    package enum Change: Sendable, Hashable {
        /// A record was created or replaced.
        case record(DedupeRecord)
        /// A record was removed (expired or evicted).
        case removed(IdempotencyKey)
        /// A state key was written (nil value: removed).
        case state(key: String, value: VersionedValue)
        /// A fence scope's epoch was raised.
        case fence(scope: String, epoch: UInt64)
    }

    private func checkFence(_ fence: PartitionFence?) throws {
        guard let fence, let seen = fences[fence.scope] else { return }
        if fence.epoch < seen {
            throw ExactlyOnceError(.fenced, "partition \(fence.scope) moved to epoch \(seen); this member holds epoch \(fence.epoch)")
        }
    }

    private static func isLive(_ r: DedupeRecord, now: Timestamp) -> Bool {
        guard r.phase == .completed, let e = r.expiresAt else { return true }
        return now < e
    }

    /// Applies a batch of claims; `changes` receives what changed.
    package mutating func claim(_ requests: [ClaimRequest], now: Timestamp, changes: inout [Change]) throws -> [ClaimResult] {
        // A batch's requests nearly always share one fence (one lane of one partition): each
        // run of equal fences is checked and raised once.
        var checked: PartitionFence?
        for r in requests {
            guard let f = r.fence, f != checked else { continue }
            try checkFence(f)
            checked = f
        }
        checked = nil
        for r in requests {
            guard let f = r.fence, f != checked else { continue }
            checked = f
            if (fences[f.scope] ?? 0) < f.epoch {
                fences[f.scope] = f.epoch
                if recordsChanges { changes.append(.fence(scope: f.scope, epoch: f.epoch)) }
            }
        }
        var results: [ClaimResult] = []
        results.reserveCapacity(requests.count)
        var granted = false
        for request in requests {
            // One hash lookup per key: the record's slot is read and written in place.
            results.append(Self.claim(&records[request.key], request, now: now, lastToken: &lastToken, granted: &granted,
                                      recordsChanges: recordsChanges, changes: &changes))
        }
        return results
    }

    /// Claims one key, given its record's slot in the index (nil: no record).
    private static func claim(_ slot: inout DedupeRecord?, _ request: ClaimRequest, now: Timestamp, lastToken: inout UInt64,
                              granted: inout Bool, recordsChanges: Bool, changes: inout [Change]) -> ClaimResult {
        var attempts = 0
        var sameOwner = false
        if let existing = slot {
            if isLive(existing, now: now) {
                if existing.fingerprint != request.fingerprint {
                    return .conflict(stored: existing.fingerprint, outcome: existing.phase == .completed ? existing.outcome : nil)
                }
                switch existing.phase {
                case .completed:
                    return .completed(existing.outcome ?? Outcome(status: .applied))
                case .inProgress:
                    // The partition's owner of the same or a newer epoch may take over at once:
                    // an older epoch is fenced anyway, and the same epoch is this owner itself
                    // re-claiming after an unknown outcome. That re-claim is not a new attempt.
                    var newerOrSameOwner = false
                    if let mine = request.fence, let theirs = existing.fence, mine.scope == theirs.scope {
                        newerOrSameOwner = mine.epoch >= theirs.epoch
                        sameOwner = mine.epoch == theirs.epoch
                    }
                    if now < existing.leaseExpiresAt && !newerOrSameOwner {
                        return .inProgress(leaseExpiresAt: existing.leaseExpiresAt)
                    }
                    attempts = existing.attempts
                case .released:
                    attempts = existing.attempts
                }
            } else {
                // Expired: forget it and start afresh.
                if recordsChanges { changes.append(.removed(request.key)) }
            }
        }
        lastToken += 1
        let charged = !(request.prefetch && granted) && !sameOwner
        granted = true
        let expires = now.advanced(by: request.lease)
        let record = DedupeRecord(
            key: request.key, fingerprint: request.fingerprint, phase: .inProgress, attempts: charged ? attempts + 1 : attempts,
            token: FencingToken(lastToken), leaseExpiresAt: expires, fence: request.fence
        )
        if recordsChanges { changes.append(.record(record)) }
        slot = record
        return .new(Claim(key: request.key, token: record.token, attempt: sameOwner ? max(1, attempts) : attempts + 1,
                          leaseExpiresAt: expires, fingerprint: request.fingerprint, fence: request.fence))
    }

    private func checkOwner(_ claim: Claim, now: Timestamp) throws -> DedupeRecord {
        try checkFence(claim.fence)
        guard let record = records[claim.key] else {
            throw ExactlyOnceError(.fenced, "key \(claim.key) is no longer held (expired or evicted)")
        }
        guard record.token == claim.token else {
            throw ExactlyOnceError(.fenced, "claim token \(claim.token) on \(claim.key) was superseded by token \(record.token)")
        }
        return record
    }

    /// Applies a completion. Returns false when it was an idempotent repeat.
    @discardableResult
    package mutating func complete(_ completion: Completion, now: Timestamp, changes: inout [Change]) throws -> Bool {
        try checkFence(completion.claim.fence)
        let claim = completion.claim
        guard let index = records.index(forKey: claim.key) else {
            throw ExactlyOnceError(.fenced, "key \(claim.key) is no longer held (expired or evicted)")
        }
        // Read in place (a getter on `values` would copy the whole record, three times).
        let (phase, token, leaseEnd) = Self.ownership(&records.values[index])
        guard token == claim.token else {
            throw ExactlyOnceError(.fenced, "claim token \(claim.token) on \(claim.key) was superseded by token \(token)")
        }
        if phase == .completed { return false }
        guard phase == .inProgress else {
            throw ExactlyOnceError(.fenced, "claim token \(token) on \(claim.key) was released")
        }
        guard now < leaseEnd else {
            throw ExactlyOnceError(.fenced, "lease of token \(token) on \(claim.key) expired before completion")
        }
        for read in completion.effects.readList where (state[read.key]?.version ?? 0) != read.version {
            throw ExactlyOnceError(.transactionConflict, "state key \(IdempotencyKey.abbreviate(read.key)) changed during the effect")
        }
        for write in completion.effects.writeList {
            let v = Self.write(&state[write.key], write.value)  // one hash lookup per key
            if recordsChanges { changes.append(.state(key: write.key, value: v)) }
        }
        // Mutate in place: no second lookup, no copy of the record.
        Self.markCompleted(&records.values[index], completion.outcome, expiresAt: retention.map { now.advanced(by: $0) })
        if recordsChanges { changes.append(.record(records.values[index])) }
        return true
    }

    private static func markCompleted(_ r: inout DedupeRecord, _ outcome: Outcome, expiresAt: Timestamp?) {
        r.phase = .completed
        r.outcome = outcome
        r.expiresAt = expiresAt
    }

    /// The fields a completion checks, read without copying the record.
    private static func ownership(_ r: inout DedupeRecord) -> (DedupeRecord.Phase, FencingToken, Timestamp) {
        (r.phase, r.token, r.leaseExpiresAt)
    }

    /// Writes `value` into a state slot, one version up; returns the new versioned value.
    private static func write(_ slot: inout VersionedValue?, _ value: [UInt8]?) -> VersionedValue {
        let v = VersionedValue(value: value, version: (slot?.version ?? 0) + 1)
        slot = v
        return v
    }

    /// Applies a release.
    package mutating func release(_ claim: Claim, reason: String, now: Timestamp, changes: inout [Change]) throws {
        var record = try checkOwner(claim, now: now)
        guard record.phase == .inProgress else {
            if record.phase == .released { return }
            throw ExactlyOnceError(.fenced, "key \(record.key) already completed; it cannot be released")
        }
        record.phase = .released
        // The attempt the claim stood for is charged, even when its claim was an uncharged
        // prefetch: a handler that ran and failed always counts.
        record.attempts = max(record.attempts, claim.attempt)
        record.lastFailure = String(reason.prefix(512))
        records[record.key] = record
        if recordsChanges { changes.append(.record(record)) }
    }

    /// Removes completed records whose retention ended; returns how many.
    package mutating func purgeExpired(now: Timestamp, changes: inout [Change]) -> Int {
        let expired = records.values.filter { !Self.isLive($0, now: now) }.map(\.key)
        for key in expired {
            records[key] = nil
            if recordsChanges { changes.append(.removed(key)) }
        }
        return expired.count
    }

    /// Removes up to `count` completed records, oldest completion first (by token order).
    package mutating func evictOldestCompleted(_ count: Int, changes: inout [Change]) -> Int {
        let victims = records.values.filter { $0.phase == .completed }.sorted { $0.token < $1.token }.prefix(count).map(\.key)
        for key in victims {
            records[key] = nil
            if recordsChanges { changes.append(.removed(key)) }
        }
        return victims.count
    }

    /// Re-applies a journaled change (recovery). Consumes it, so a record moves into the index
    /// without being copied.
    package mutating func replay(_ change: consuming Change) {
        switch change {
        case .record(let r):
            records[r.key] = r
            lastToken = max(lastToken, r.token.rawValue)
        case .removed(let k): records[k] = nil
        case .state(let key, let value):
            if value.value == nil { state[key] = VersionedValue(value: nil, version: value.version) } else { state[key] = value }
        case .fence(let scope, let epoch): fences[scope] = max(fences[scope] ?? 0, epoch)
        }
    }

    /// Raises the last token handed out to at least `token` (recovery of a compacted journal,
    /// where the record that held the highest token may be gone), so tokens never repeat.
    package mutating func raiseLastToken(to token: UInt64) {
        lastToken = max(lastToken, token)
    }

    /// Makes a dead-lettered key claimable again with no attempts charged (dead-letter replay).
    /// Returns false, changing nothing, for any other record.
    package mutating func reopenDeadLettered(_ key: IdempotencyKey, now: Timestamp, changes: inout [Change]) -> Bool {
        guard var record = records[key], record.phase == .completed, record.outcome?.status == .deadLettered else { return false }
        record.phase = .released
        record.attempts = 0
        record.lastFailure = "reopened for dead-letter replay (was: \(String((record.outcome?.detailText ?? "").prefix(200))))"
        record.outcome = nil
        record.expiresAt = nil
        record.leaseExpiresAt = now
        records[key] = record
        if recordsChanges { changes.append(.record(record)) }
        return true
    }

    /// A page of live records matching `query`, in key order; the cursor is the last key's raw value.
    package func list(_ query: RecordQuery, now: Timestamp) throws -> RecordPage {
        let limit = try query.validatedLimit()
        var matching: [DedupeRecord] = []
        for r in records.values where Self.isLive(r, now: now) && query.matches(r) {
            if let cursor = query.cursor, r.key.rawValue <= cursor { continue }
            matching.append(r)
        }
        matching.sort { $0.key < $1.key }
        let page = Array(matching.prefix(limit))
        return RecordPage(records: page, nextCursor: matching.count > limit ? page.last?.key.rawValue : nil)
    }

    /// Reads one state value.
    package func readState(_ key: String) -> VersionedValue { state[key] ?? VersionedValue(value: nil, version: 0) }

    /// Reads state.
    package func readState(_ keys: [String]) -> [String: VersionedValue] {
        var out: [String: VersionedValue] = [:]
        for k in keys { out[k] = state[k] ?? VersionedValue(value: nil, version: 0) }
        return out
    }
}
