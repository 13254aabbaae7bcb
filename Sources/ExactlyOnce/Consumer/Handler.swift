/// What the handler sees for one new record.
///
/// `Transaction` is the store's (``DedupeStore/Transaction``): an ``EffectTransaction`` for the
/// key-value stores, whose writes commit atomically with the record's completion (G3).
public struct HandlerContext<Transaction> {
    /// The record.
    public let record: ConsumedRecord
    /// Its idempotency key.
    public let key: IdempotencyKey
    /// The claim: its fencing token and attempt number. When the effect lives outside the store,
    /// write it conditionally on this token (or with a unique constraint on the key).
    public let claim: Claim
    /// The store's transaction: what the handler writes here commits atomically with the
    /// record's completion (G3), or not at all.
    public var transaction: Transaction

    /// Creates a context (the consumer does; tests of handlers may).
    public init(record: ConsumedRecord, key: IdempotencyKey, claim: Claim, transaction: Transaction) {
        self.record = record
        self.key = key
        self.claim = claim
        self.transaction = transaction
    }
}

extension HandlerContext: Sendable where Transaction: Sendable {}

/// Processes one new record and returns its outcome. Throwing counts as a failed attempt: the
/// claim is released, the transaction dropped, and the record retried with backoff up to
/// ``ConsumerConfiguration/maxAttempts``, then dead-lettered.
public typealias RecordHandler<Transaction> = @Sendable (inout HandlerContext<Transaction>) async throws -> Outcome

/// Derives the idempotency key of a record (for example `couponId:memberId` from its payload).
/// Throwing marks the record malformed: it is dead-lettered, never dropped.
public typealias KeyExtractor = @Sendable (ConsumedRecord) throws -> IdempotencyKey

/// Called with every finished record's outcome: `replayed` is true when the record was a
/// duplicate answered from the store (G4).
public typealias OutcomeObserver = @Sendable (ConsumedRecord, Outcome, _ replayed: Bool) async -> Void
