/// A dedupe store: remembers which idempotency keys were processed, with what outcome, and
/// holds (or joins) the transaction that handlers' effects commit in.
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
///   ``ExactlyOnceError/Code/fenced`` for the whole batch; a higher epoch raises the scope's
///   epoch. Scopes are independent: an epoch seen in one scope never fences another.
/// - `complete(_:)` succeeds only for the key's current token, while its lease runs and its
///   fence is current; otherwise ``ExactlyOnceError/Code/fenced`` and nothing is written. The
///   effect's reads are validated and its writes applied in the same atomic step. Completing
///   again with the same token after success succeeds without writing again (idempotent retry
///   after an unknown outcome).
/// - ``release(_:reason:)`` makes the key claimable again and keeps its attempt count.
/// - ``reopenDeadLettered(_:)`` makes a key whose stored outcome is dead-lettered claimable
///   again with no attempts charged, and changes nothing for any other key.
/// - Unreachable backends throw ``ExactlyOnceError/Code/storeUnavailable``: the caller does not
///   know whether the operation happened and must claim again before acting. A store that is
///   full throws the non-retriable ``ExactlyOnceError/Code/capacityExceeded``.
///
/// ## Effects: the store's transaction
/// The handler of a new record gets a ``Transaction``, and the consumer commits what the handler
/// did together with the record's completion through a ``CompletionBatch`` the store makes.
/// Key-value stores (in memory, the file store, Redis) use the defaults: the transaction is an
/// ``EffectTransaction`` whose buffered writes travel with the ``Completion``, and the batch is
/// a ``KeyValueBatch`` that sends completions with `complete(_:)` (the batch form). A store
/// that lives in the user's own database can instead hand the handler a live database
/// transaction and complete the records inside it (see ``CompletionBatch``).
public protocol DedupeStore<Transaction>: Sendable {
    /// What a handler gets to write its effect with. Default: ``EffectTransaction``.
    associatedtype Transaction = EffectTransaction
    /// A lane's unit of completion. Default: ``KeyValueBatch``.
    associatedtype Batch: CompletionBatch = KeyValueBatch<Self> where Batch.Transaction == Transaction

    /// Makes an empty completion batch for one lane (the consumer makes one per lane and poll).
    func makeCompletionBatch(_ options: CompletionBatchOptions) -> Batch
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
    /// Gives up a claim after a failed attempt. The attempt is charged: the record's attempt
    /// count becomes at least ``Claim/attempt`` (a prefetch claim that was not charged when it
    /// was granted counts once its handler ran), and it is kept for the next claim.
    func release(_ claim: Claim, reason: String) async throws
    /// How many completions are worth committing in one batch: 1 for stores where a call is as
    /// cheap as buffering (in memory); more where a call costs a round trip or an fsync. The
    /// consumer stages up to `min(this, completionBatchSize)`. Default: 64.
    var completionBatchLimit: Int { get }
    /// Reads transactional state with versions.
    func readState(_ keys: [String]) async throws -> [String: VersionedValue]
    /// Reads one state value with its version (version 0 when absent). Has a default implementation.
    func readState(_ key: String) async throws -> VersionedValue
    /// The records of keys, for audits and operations (absent keys are left out).
    func records(for keys: [IdempotencyKey]) async throws -> [IdempotencyKey: DedupeRecord]
    /// A page of records matching `query`, for operations (which keys are stuck in progress,
    /// which failed and why). Pages follow ``RecordPage/nextCursor``.
    func listRecords(_ query: RecordQuery) async throws -> RecordPage
    /// Makes `key` claimable again if its stored outcome is ``Outcome/Status/deadLettered``,
    /// with its attempts reset, so a replayed dead letter is processed instead of answered.
    /// Returns whether it did; any other record (or none) is left as it is.
    func reopenDeadLettered(_ key: IdempotencyKey) async throws -> Bool
}

/// What the consumer asks of a lane's ``CompletionBatch``.
public struct CompletionBatchOptions: Sendable, Hashable {
    /// The most completions the lane stages before it commits.
    public var limit: Int
    /// Times a commit whose outcome is unknown may be resent with the same claims before the
    /// batch gives up (stores whose completions are idempotent per token resend; others may not).
    public var unknownOutcomeRetries: Int
    /// Wait between those resends.
    public var backoff: Backoff
    /// Creates options.
    public init(limit: Int, unknownOutcomeRetries: Int = 3, backoff: Backoff = .init()) {
        self.limit = max(1, limit)
        self.unknownOutcomeRetries = max(0, unknownOutcomeRetries)
        self.backoff = backoff
    }
}

/// A lane's unit of completion: the handlers' effects of a run of records are performed inside
/// it, and their dedupe records complete with it, in order, all or a prefix.
///
/// The consumer drives one batch from one task: ``perform(_:_:)`` for each new record, ``stage(_:outcome:)``
/// for records finished without an effect (dead-lettered), ``commit()`` when the batch is full,
/// before a claim that must see it, and at the end of the lane; ``discard()`` when the lane
/// stops early (a crash, a pause) so nothing staged survives.
///
/// Implementations: ``KeyValueBatch`` (buffered writes sent with `complete(_:)` (the batch form))
/// and, for a store in the user's database, a database transaction in which each handler runs
/// under a savepoint and each completion is a conditional update (token, lease and fence
/// checked) in the same transaction.
public protocol CompletionBatch<Transaction> {
    /// What the handler writes its effect with.
    associatedtype Transaction
    /// Completions staged and not yet committed.
    var count: Int { get }
    /// Runs `body` (the handler) with a transaction for `claim`, and stages the completion of
    /// `claim` with the outcome it returns and the effect it wrote. If `body` throws, nothing
    /// of its effect is kept and nothing is staged; the error is rethrown unchanged.
    /// Store trouble while staging throws ``ExactlyOnceError`` (``ExactlyOnceError/Code/fenced``
    /// when the claim is no longer current).
    mutating func perform(_ claim: Claim, _ body: (inout Transaction) async throws -> Outcome) async throws -> Outcome
    /// Stages the completion of `claim` with `outcome` and no effect.
    mutating func stage(_ claim: Claim, outcome: Outcome) async throws
    /// Makes the staged completions durable in staging order, all or a prefix, and empties the
    /// batch. Returns how many applied and why the next one did not. Throws only when the
    /// outcome is unknown (the caller re-reads and claims again).
    mutating func commit() async throws -> BatchCompletion
    /// Drops everything staged (nothing of it becomes durable).
    mutating func discard() async
}

/// The result of committing completions: a prefix applied, and why the rest was not.
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

/// Which records ``DedupeStore/listRecords(_:)`` returns.
public struct RecordQuery: Sendable, Hashable {
    /// Only records in this phase. Default: any.
    public var phase: DedupeRecord.Phase?
    /// Only completed records with this outcome status. Default: any.
    public var outcomeStatus: Outcome.Status?
    /// Only records whose last failure (the reason of their last release) contains this text;
    /// the empty string matches every record that has a last failure. Default: no filter.
    public var failureContains: String?
    /// Most records in one page (1...10,000). Default: 100.
    public var limit: Int = 100
    /// Where the page starts: the ``RecordPage/nextCursor`` of the previous page. Default: the beginning.
    public var cursor: String?
    /// All defaults: every record, first page.
    public init() {}
    /// A query by phase.
    public init(phase: DedupeRecord.Phase?, limit: Int = 100) {
        self.phase = phase
        self.limit = limit
    }

    /// Whether `record` matches the filters (not the paging).
    public func matches(_ record: DedupeRecord) -> Bool {
        if let phase, record.phase != phase { return false }
        if let outcomeStatus, record.outcome?.status != outcomeStatus || record.phase != .completed { return false }
        if let failureContains {
            guard let f = record.lastFailure else { return false }
            if !failureContains.isEmpty && !f.contains(failureContains) { return false }
        }
        return true
    }

    /// The limit, checked.
    /// - Throws: ``ExactlyOnceError/Code/invalidConfiguration`` outside 1...10,000.
    public func validatedLimit() throws -> Int {
        guard (1...10_000).contains(limit) else {
            throw ExactlyOnceError(.invalidConfiguration, "a record query's limit must be in 1...10000, got \(limit)")
        }
        return limit
    }
}

/// One page of ``DedupeStore/listRecords(_:)``.
public struct RecordPage: Sendable, Hashable {
    /// The records of this page (stores with an order give them in key order).
    public var records: [DedupeRecord]
    /// Pass as ``RecordQuery/cursor`` for the next page; nil on the last page.
    public var nextCursor: String?
    /// Creates a page.
    public init(records: [DedupeRecord], nextCursor: String?) {
        self.records = records
        self.nextCursor = nextCursor
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
            } catch let e as ExactlyOnceError where e.code != .storeUnavailable && e.code != .timeout {
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

    /// Every record matching `query`, following the pages (for tools and tests; mind the size).
    public func allRecords(_ query: RecordQuery = .init()) async throws -> [DedupeRecord] {
        var q = query
        var out: [DedupeRecord] = []
        while true {
            let page = try await listRecords(q)
            out += page.records
            guard let next = page.nextCursor else { return out }
            q.cursor = next
        }
    }
}

extension DedupeStore where Batch == KeyValueBatch<Self> {
    /// A ``KeyValueBatch`` over this store.
    public func makeCompletionBatch(_ options: CompletionBatchOptions) -> KeyValueBatch<Self> {
        KeyValueBatch(store: self, options: options)
    }
}
