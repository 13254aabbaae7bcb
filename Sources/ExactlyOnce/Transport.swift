/// A position in a partition. Committed offsets follow Kafka's convention: the committed offset
/// is the offset of the next record to read.
public struct Offset: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// The offset value.
    public let rawValue: Int64
    /// Wraps an offset value.
    public init(_ rawValue: Int64) { self.rawValue = rawValue }
    public static func < (l: Offset, r: Offset) -> Bool { l.rawValue < r.rawValue }
    /// The next offset.
    public var next: Offset { Offset(rawValue + 1) }
    public var description: String { "\(rawValue)" }
}

/// A record to publish.
public struct OutgoingRecord: Sendable, Hashable {
    /// The record key (used by keyed partitioning and carried to the consumer).
    public var key: [UInt8]?
    /// The payload.
    public var payload: [UInt8]
    /// Small metadata (for example a dead-letter reason).
    public var headers: [String: String]
    /// Creates a record.
    public init(key: [UInt8]?, payload: [UInt8], headers: [String: String] = [:]) {
        self.key = key
        self.payload = payload
        self.headers = headers
    }
}

/// Where a published record landed.
public struct RecordPosition: Hashable, Sendable, CustomStringConvertible {
    /// The partition.
    public var partition: PartitionID
    /// The record's offset in it.
    public var offset: Offset
    /// Creates a position.
    public init(partition: PartitionID, offset: Offset) {
        self.partition = partition
        self.offset = offset
    }
    public var description: String { "\(partition)@\(offset)" }
}

/// A record delivered to a consumer.
public struct ConsumedRecord: Sendable, Hashable {
    /// The topic.
    public var topic: String
    /// The partition.
    public var partition: PartitionID
    /// The offset.
    public var offset: Offset
    /// The record key.
    public var key: [UInt8]?
    /// The payload.
    public var payload: [UInt8]
    /// Metadata.
    public var headers: [String: String]
    /// Creates a record.
    public init(topic: String, partition: PartitionID, offset: Offset, key: [UInt8]?, payload: [UInt8], headers: [String: String] = [:]) {
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.payload = payload
        self.headers = headers
    }
}

/// What one poll returned.
public struct PollResult: Sendable {
    /// The member's group generation this result belongs to. Commits must carry it.
    public var generation: UInt64
    /// The member's full assignment: partition to ownership epoch. Partitions missing since the
    /// previous poll were revoked; new ones were assigned (their position is the committed offset).
    public var assignment: [PartitionID: UInt64]
    /// Records, each partition's in offset order.
    public var records: [ConsumedRecord]
    /// End offset (offset after the last record) of each assigned partition, for lag metrics.
    public var endOffsets: [PartitionID: Offset]
    /// Creates a poll result.
    public init(generation: UInt64, assignment: [PartitionID: UInt64], records: [ConsumedRecord], endOffsets: [PartitionID: Offset]) {
        self.generation = generation
        self.assignment = assignment
        self.records = records
        self.endOffsets = endOffsets
    }
}

/// A broker-agnostic message transport: partitioned topics, consumer groups, manual commits.
///
/// ## Contract (checked by `TransportConformance` in the test kit)
/// - ``publish(_:to:partitioning:)`` returns the record's position; offsets in a partition are
///   strictly increasing in publish order.
/// - Members of one group split the topic's partitions; each partition has at most one owner per
///   generation, and every assignment of a partition gets an epoch greater than any before it.
/// - A newly assigned partition is read from its committed offset (or the start).
/// - ``TransportSubscription/commit(_:generation:)`` from a stale generation, or for a partition
///   the member no longer owns, throws ``ExactlyOnceError/Code/staleGeneration`` and commits
///   nothing.
/// - Records after the committed offset are redelivered to the next owner.
public protocol MessageTransport: Sendable {
    /// The subscription type.
    associatedtype Subscription: TransportSubscription
    /// The number of partitions of `topic`.
    func partitionCount(of topic: String) async throws -> Int
    /// Publishes a record, returning its position.
    func publish(_ record: OutgoingRecord, to topic: String, partitioning: Partitioning) async throws -> RecordPosition
    /// Joins `group` on `topic` as `memberID`.
    func subscribe(topic: String, group: String, memberID: String) async throws -> Subscription
}

/// One member's membership in a consumer group.
public protocol TransportSubscription: Sendable {
    /// The member id.
    var memberID: String { get }
    /// Returns the current assignment and up to `maxRecords` records after this member's positions.
    func poll(maxRecords: Int) async throws -> PollResult
    /// Commits offsets (each the next offset to read) for partitions this member owns.
    func commit(_ offsets: [PartitionID: Offset], generation: UInt64) async throws
    /// Moves this member's read position of `partition` (to re-read unfinished records).
    func seek(_ partition: PartitionID, to offset: Offset) async throws
    /// The group's committed offset of `partition`, if any.
    func committedOffset(_ partition: PartitionID) async throws -> Offset?
    /// Leaves the group gracefully (partitions move to the remaining members at once).
    func close() async throws
}
