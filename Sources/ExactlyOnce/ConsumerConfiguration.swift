/// Exponential backoff between retries.
public struct Backoff: Sendable, Hashable {
    /// First delay. Default: 10 ms.
    public var initial: Duration = .milliseconds(10)
    /// Largest delay. Default: 1 s.
    public var maximum: Duration = .seconds(1)
    /// Growth factor per retry. Default: 2.
    public var multiplier: Double = 2
    /// All defaults.
    public init() {}
    /// A backoff that never waits (the simulator's choice).
    public static let none: Backoff = {
        var b = Backoff()
        b.initial = .zero
        b.maximum = .zero
        return b
    }()
    /// The delay before retry number `retry` (1-based).
    public func delay(forRetry retry: Int) -> Duration {
        guard initial > .zero else { return .zero }
        var d = initial
        var i = 1
        while i < retry && d < maximum {
            d = d * multiplier
            i += 1
        }
        return min(d, maximum)
    }
}

/// Configuration of an ``ExactlyOnceConsumer``.
public struct ConsumerConfiguration: Sendable {
    /// The topic to consume.
    public var topic: String
    /// The consumer group.
    public var group: String
    /// This member's id (unique in the group).
    public var memberID: String
    /// Records per poll. Default: 512.
    public var maxPollRecords: Int = 512
    /// Lease of each claim; must exceed the handler's longest run. Default: 30 s.
    public var lease: Duration = .seconds(30)
    /// Attempts before a record is dead-lettered. Counted in the store, so it survives restarts. Default: 5.
    public var maxAttempts: Int = 5
    /// Backoff between handler retries of one record. Default: ``Backoff/init()``.
    public var retryBackoff: Backoff = .init()
    /// Backoff when the store or transport is unreachable, or a key is held by another member. Default: ``Backoff/init()``.
    public var unavailableBackoff: Backoff = .init()
    /// Times a completion is retried with the same claim when the store is unreachable, before the lane pauses. Default: 3.
    public var completionRetries: Int = 3
    /// Completions buffered per lane before they are sent to the store in one call. Larger
    /// batches cost fewer store round trips (and fsyncs); smaller ones lose less work to a crash.
    /// Default: 64.
    public var completionBatchSize: Int = 64
    /// Sleep when a poll returned nothing. Default: 5 ms.
    public var idleWait: Duration = .milliseconds(5)
    /// The dead-letter topic. Default: `"<topic>.dlq"`.
    public var deadLetterTopic: String
    /// Whether partitions of one batch are processed in parallel (one task per lane). The
    /// simulator turns this off for determinism. Default: true.
    public var concurrentLanes: Bool = true

    /// Creates a configuration.
    public init(topic: String, group: String, memberID: String) {
        self.topic = topic
        self.group = group
        self.memberID = memberID
        self.deadLetterTopic = topic + ".dlq"
    }

    func validate() throws {
        func bad(_ m: String) -> ExactlyOnceError { ExactlyOnceError(.invalidConfiguration, m) }
        if topic.isEmpty || group.isEmpty || memberID.isEmpty { throw bad("topic, group and memberID must not be empty") }
        if maxPollRecords < 1 { throw bad("maxPollRecords must be at least 1, got \(maxPollRecords)") }
        if lease <= .zero { throw bad("lease must be positive") }
        if maxAttempts < 1 { throw bad("maxAttempts must be at least 1, got \(maxAttempts)") }
        if completionRetries < 0 { throw bad("completionRetries must not be negative") }
        if completionBatchSize < 1 { throw bad("completionBatchSize must be at least 1, got \(completionBatchSize)") }
        if deadLetterTopic.isEmpty || deadLetterTopic == topic { throw bad("deadLetterTopic must be set and differ from topic") }
        if retryBackoff.multiplier < 1 || unavailableBackoff.multiplier < 1 { throw bad("backoff multiplier must be at least 1") }
    }
}

/// What the handler sees for one new record.
public struct HandlerContext: Sendable {
    /// The record.
    public let record: ConsumedRecord
    /// Its idempotency key.
    public let key: IdempotencyKey
    /// The claim: its fencing token and attempt number. When the effect lives outside the store,
    /// write it conditionally on this token (or with a unique constraint on the key).
    public let claim: Claim
    /// The store's transactional state: what the handler writes here commits atomically with
    /// the record's completion (G3), or not at all.
    public var transaction: EffectTransaction
}

/// Processes one new record and returns its outcome. Throwing counts as a failed attempt: the
/// claim is released, the transaction dropped, and the record retried with backoff up to
/// ``ConsumerConfiguration/maxAttempts``, then dead-lettered.
public typealias RecordHandler = @Sendable (inout HandlerContext) async throws -> Outcome

/// Derives the idempotency key of a record (for example `couponId:memberId` from its payload).
/// Throwing marks the record malformed: it is dead-lettered, never dropped.
public typealias KeyExtractor = @Sendable (ConsumedRecord) throws -> IdempotencyKey

/// Called with every finished record's outcome: `replayed` is true when the record was a
/// duplicate answered from the store (G4).
public typealias OutcomeObserver = @Sendable (ConsumedRecord, Outcome, _ replayed: Bool) async -> Void
