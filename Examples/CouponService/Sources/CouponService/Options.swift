/// What a process of the service runs.
public enum Role: String, Sendable, CaseIterable {
    /// The HTTP API and its producers only.
    case api
    /// The consumers only (the HTTP server still answers health, metrics and the dashboard).
    case consumer
    /// Both, in one `ServiceGroup` (the default).
    case all
}

/// Options of a service process.
public struct ServiceOptions: Sendable {
    /// What this process runs. Default: all.
    public var role: Role = .all
    /// The log. Default: in memory.
    public var transport: TransportKind = .memory
    /// The source of truth. Default: in memory.
    public var store: StoreKind = .memory
    /// Partitions per topic. Default: 4.
    public var partitions = 4
    /// Data directory of the file store and catalog.
    public var dataDir = "coupon-service-data"
    /// Redis URL (read cache, legacy lock; needed by the Redis transport and store).
    public var redisURL: String?
    /// PostgreSQL URL with ``StoreKind/postgres``: `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`
    /// or `postgres:///DATABASE?host=/socket/directory`.
    public var postgresURL: String?
    /// Kafka bootstrap servers with ``TransportKind/kafka``; nil: an in-process mock cluster.
    public var kafkaBrokers: String?
    /// Connections to Redis for the cache and the legacy design. Default: 16.
    public var redisPoolSize = 16
    /// Prefix of every Redis key the service writes.
    public var keyPrefix = "coupon-service:"
    /// Dedupe records the in-memory store holds. Default: 1,000,000.
    public var memoryStoreCapacity = 1_000_000
    /// The consumer's member id.
    public var memberID = "consumer-1"
    /// Producer linger. Default: 1 ms.
    public var linger: Duration = .milliseconds(1)
    /// The legacy design's lock lease (Redisson's `leaseTime`). Default: 3 s.
    public var legacyLease: Duration = .seconds(3)
    /// The legacy design's wait budget (Redisson's `waitTime`). Default: 1 s.
    public var legacyWait: Duration = .seconds(1)
    /// Work inside the legacy lock that stands for its database round trip. Default: 0.
    public var legacyWorkDelay: Duration = .zero

    /// All defaults: the embedded default.
    public init() {}
}

/// A usage or setup error with a message for people.
public struct ServiceError: Error, CustomStringConvertible, Sendable {
    /// What went wrong.
    public var message: String
    /// Creates an error.
    public init(_ message: String) { self.message = message }
    /// The message.
    public var description: String { message }
}
