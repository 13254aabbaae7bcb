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

/// What a batch publish did: which records the broker confirmed, at which positions.
///
/// A record is reported accepted only when the transport confirmed it durable by its own
/// rules; a record reported not accepted may still have reached the log (an unknown outcome):
/// publishing it again is safe, because the consumer's dedupe makes the repeat harmless (F9).
public struct PublishReport: Sendable, Equatable {
    /// One entry per record, in the order given: its position when accepted, nil when not.
    public var positions: [RecordPosition?]
    /// Why the first record that was not accepted failed (nil when all were accepted).
    public var failure: ExactlyOnceError?
    /// Creates a report.
    public init(positions: [RecordPosition?], failure: ExactlyOnceError?) {
        self.positions = positions
        self.failure = failure
    }
    /// How many records were accepted.
    public var acceptedCount: Int { positions.reduce(0) { $0 + ($1 == nil ? 0 : 1) } }
    /// Whether every record was accepted.
    public var allAccepted: Bool { failure == nil && positions.allSatisfy { $0 != nil } }
}

/// The state of one partition of a consumer group, for lag and operations.
public struct PartitionStatus: Sendable, Hashable {
    /// The partition.
    public var partition: PartitionID
    /// The group's committed offset (the next offset it will read), nil when it never committed.
    public var committed: Offset?
    /// The end offset: the offset the next published record gets.
    public var end: Offset
    /// Records published and not committed yet: `end - (committed ?? start)`, never negative.
    public var lag: Int64
    /// The member that owns the partition now, when the transport knows.
    public var owner: String?
    /// The owner's epoch for the partition, when the transport knows.
    public var epoch: UInt64?
    /// Creates a status.
    public init(partition: PartitionID, committed: Offset?, end: Offset, lag: Int64, owner: String?, epoch: UInt64?) {
        self.partition = partition
        self.committed = committed
        self.end = end
        self.lag = lag
        self.owner = owner
        self.epoch = epoch
    }
}

/// A broker-agnostic message transport: partitioned topics, consumer groups, manual commits.
///
/// ## Contract (checked by `TransportConformance` in the test kit)
/// - `publish(_:to:partitioning:)` of one record returns the record's position once the
///   transport confirmed it; offsets in a partition are strictly increasing in publish order.
///   `publish(_:to:partitioning:)` of an array publishes a batch and reports each
///   record: per partition, the accepted records are a prefix of that partition's records in
///   the batch, in batch order, so per-key order holds within and across batches. Input that can
///   never be published (an unknown topic, a record whose partition cannot be resolved) throws
///   before anything is sent.
/// - Members of one group split the topic's partitions; each partition has at most one owner per
///   generation, and every assignment of a partition gets an epoch greater than any earlier
///   assignment of it in the same ``TransportSubscription/fencingScope``.
/// - A newly assigned partition is read from its committed offset (or the start).
/// - ``TransportSubscription/poll(maxRecords:maxWait:)`` returns as soon as records are there,
///   or after at most `maxWait` with none. A poll also means the member finished (or gave up)
///   every record it was handed before: a transport that drains before a partition is revoked
///   lets it go then.
/// - ``TransportSubscription/commit(_:generation:)`` from a stale generation, or for a partition
///   the member no longer owns, throws ``ExactlyOnceError/Code/staleGeneration`` and commits
///   nothing.
/// - Records after the committed offset are redelivered to the next owner.
/// - An unreachable broker throws ``ExactlyOnceError/Code/transportUnavailable`` (retriable); an
///   unknown topic throws ``ExactlyOnceError/Code/unknownTopic`` (not retriable).
public protocol MessageTransport: Sendable {
    /// The subscription type.
    associatedtype Subscription: TransportSubscription
    /// The number of partitions of `topic`.
    /// - Throws: ``ExactlyOnceError/Code/unknownTopic`` when it does not exist.
    func partitionCount(of topic: String) async throws -> Int
    /// Publishes a record, returning its position once the transport confirmed it.
    func publish(_ record: OutgoingRecord, to topic: String, partitioning: Partitioning) async throws -> RecordPosition
    /// Publishes records, keeping many in flight, and reports each (see ``PublishReport``). Has a
    /// default implementation that publishes one at a time and stops at the first failure.
    func publish(_ records: [OutgoingRecord], to topic: String, partitioning: Partitioning) async throws -> PublishReport
    /// Joins `group` on `topic` as `memberID`.
    func subscribe(topic: String, group: String, memberID: String) async throws -> Subscription
    /// Committed offset, end offset, lag and (where known) owner and epoch of every partition of
    /// `topic` for `group`. Reads only; does not join the group.
    func partitionStatus(group: String, topic: String) async throws -> [PartitionStatus]
    /// Up to `maxRecords` records of one partition from `offset` on, in offset order, outside
    /// any group (dead-letter inspection, audits). Fewer (or none) at the end of the partition.
    func read(topic: String, partition: PartitionID, from offset: Offset, maxRecords: Int) async throws -> [ConsumedRecord]
}

/// One member's membership in a consumer group.
public protocol TransportSubscription: Sendable {
    /// The member id.
    var memberID: String { get }
    /// What this membership's partition epochs are counted in: the transport's identity (an
    /// instance, a Redis topic incarnation, a Kafka cluster), the group and the topic. A dedupe
    /// store keeps the highest epoch per scope and partition, so scopes must differ wherever
    /// epochs are counted independently; otherwise one transport's epochs could fence another's
    /// members forever.
    var fencingScope: String { get }
    /// Returns the current assignment and up to `maxRecords` records after this member's
    /// positions, waiting up to `maxWait` for records when there are none.
    func poll(maxRecords: Int, maxWait: Duration) async throws -> PollResult
    /// Commits offsets (each the next offset to read) for partitions this member owns.
    func commit(_ offsets: [PartitionID: Offset], generation: UInt64) async throws
    /// Moves this member's read position of `partition` (to re-read unfinished records).
    func seek(_ partition: PartitionID, to offset: Offset) async throws
    /// The group's committed offset of `partition`, if any.
    func committedOffset(_ partition: PartitionID) async throws -> Offset?
    /// Leaves the group gracefully (partitions move to the remaining members at once).
    func close() async throws
}

extension MessageTransport {
    /// Publishes one record at a time, stopping at the first failure: a valid (prefix)
    /// implementation for transports with nothing better.
    public func publish(_ records: [OutgoingRecord], to topic: String, partitioning: Partitioning) async throws -> PublishReport {
        let count = try await partitionCount(of: topic)
        for r in records { _ = try partitioning.resolve(key: r.key, partitionCount: count) }
        var positions: [RecordPosition?] = Array(repeating: nil, count: records.count)
        for (i, r) in records.enumerated() {
            do {
                positions[i] = try await publish(r, to: topic, partitioning: partitioning)
            } catch let e as ExactlyOnceError {
                return PublishReport(positions: positions, failure: e)
            }
        }
        return PublishReport(positions: positions, failure: nil)
    }
}

extension TransportSubscription {
    /// Polls without waiting.
    public func poll(maxRecords: Int) async throws -> PollResult {
        try await poll(maxRecords: maxRecords, maxWait: .zero)
    }
}
