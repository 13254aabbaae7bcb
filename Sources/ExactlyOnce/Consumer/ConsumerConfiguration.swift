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

/// In which order a consumer handles the records of one partition.
///
/// - ``partition``: one record at a time per partition, in offset order (the log-based
///   design's lane, and Kafka's usual consumer). Lanes of different partitions run in parallel.
/// - ``key(maxConcurrency:)``: records with the same record key (the coupon id) stay in
///   publish order, and records of different keys in one partition run concurrently, up to
///   `maxConcurrency` keys at once (what Confluent's Parallel Consumer calls KEY ordering).
///   Records without a record key share one sequence. Records with one idempotency key always
///   share a sequence, whatever their record keys. The committed offset never passes the
///   lowest unfinished record, so G1 holds; fencing and outcome replay are unchanged.
public struct Ordering: Sendable, Hashable, CustomStringConvertible {
    enum Mode: Sendable, Hashable {
        case partition
        case key(Int)
    }
    let mode: Mode
    /// One sequence per partition.
    public static let partition = Ordering(mode: .partition)
    /// Whether records of one partition may run concurrently (key ordering).
    public var runsKeysConcurrently: Bool {
        if case .key(let n) = mode { return n > 1 }
        return false
    }
    /// One sequence per record key; up to `maxConcurrency` keys of a partition at once.
    public static func key(maxConcurrency: Int = 64) -> Ordering { Ordering(mode: .key(maxConcurrency)) }
    public var description: String {
        switch mode {
        case .partition: "partition"
        case .key(let n): "key(maxConcurrency: \(n))"
        }
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
    /// How long a poll may wait for records when there are none (Kafka's `fetch.max.wait.ms`):
    /// the transport answers as soon as records arrive, so this bounds idle latency, not
    /// throughput. Also bounds how long a graceful shutdown waits for an idle poll. Default: 100 ms.
    public var pollWait: Duration = .milliseconds(100)
    /// The dead-letter topic. It must exist when the consumer starts. Default: `"<topic>.dlq"`.
    public var deadLetterTopic: String
    /// In which order records of one partition are handled. Default: ``Ordering/partition``.
    public var ordering: Ordering = .partition
    /// How long a partition the transport still assigns to this member may stay refused by the
    /// store's fence before ``ExactlyOnceConsumer/run()`` stops with
    /// ``ExactlyOnceError/Code/fenced``. A rebalanced-out member learns of the move from its
    /// next poll within moments, so a fence that lasts means the store has seen a higher epoch
    /// for this scope than the transport hands out (a recreated group or topic), and waiting
    /// will not end it. Default: 60 s.
    public var maxFencedDuration: Duration = .seconds(60)
    /// Whether partitions of one batch are processed in parallel (one task per lane). The
    /// simulator turns this off for determinism. Default: true.
    package var concurrentLanes: Bool = true

    /// Creates a configuration.
    public init(topic: String, group: String, memberID: String) {
        self.topic = topic
        self.group = group
        self.memberID = memberID
        self.deadLetterTopic = topic + ".dlq"
    }

    package func validate() throws {
        func bad(_ m: String) -> ExactlyOnceError { ExactlyOnceError(.invalidConfiguration, m) }
        if topic.isEmpty || group.isEmpty || memberID.isEmpty { throw bad("topic, group and memberID must not be empty") }
        if maxPollRecords < 1 { throw bad("maxPollRecords must be at least 1, got \(maxPollRecords)") }
        if lease <= .zero { throw bad("lease must be positive") }
        if maxAttempts < 1 { throw bad("maxAttempts must be at least 1, got \(maxAttempts)") }
        if completionRetries < 0 { throw bad("completionRetries must not be negative") }
        if completionBatchSize < 1 { throw bad("completionBatchSize must be at least 1, got \(completionBatchSize)") }
        if deadLetterTopic.isEmpty || deadLetterTopic == topic { throw bad("deadLetterTopic must be set and differ from topic") }
        if retryBackoff.multiplier < 1 || unavailableBackoff.multiplier < 1 { throw bad("backoff multiplier must be at least 1") }
        if pollWait < .zero || pollWait > .seconds(60) { throw bad("pollWait must be in 0...60 s") }
        if maxFencedDuration <= .zero { throw bad("maxFencedDuration must be positive") }
        if case .key(let n) = ordering.mode, n < 1 || n > 10_000 { throw bad("key ordering needs a concurrency in 1...10000, got \(n)") }
    }
}

