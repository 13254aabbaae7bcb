import ExactlyOnce
import Logging
import Synchronization

/// A durable `MessageTransport` on Redis Streams: one stream per partition, read through a
/// Redis consumer group per group, Kafka-style committed offsets, and partition ownership decided
/// in Redis, so members in different processes split a topic and each partition has one owner at
/// a time.
///
/// ## Design
/// - A record's offset is its position in the partition's stream: the entry ID is `0-(offset+1)`,
///   allocated with `INCR` in the same script as the `XADD`, so offsets are dense and ordered.
/// - Every group is a Redis consumer group (`XGROUP CREATE ... 0 MKSTREAM`) on each partition
///   stream; each member is the Redis consumer named by its member id.
/// - Members heartbeat on every `TransportSubscription/poll(maxRecords:)`; a member whose
///   session lapsed (``Configuration/sessionTimeout``) is dropped. Any membership change raises
///   the group's generation. Partitions go to the sorted live members round-robin; every change
///   of a partition's owner draws a new epoch from one `INCR` counter, so epochs only grow. Only
///   the owner reads a partition.
/// - The owner reads new entries with `XREADGROUP ... >` (non-blocking). A partition it acquires
///   is read from the committed offset: `XAUTOCLAIM` claims the previous (possibly dead) owner's
///   pending entries from there and returns them in order; entries no longer pending (after a
///   seek below the committed offset) are read with `XRANGE`. Ownership is decided by the lease
///   in Redis, not by idle time, so the claim uses min-idle 0.
/// - A commit is one script: refused with `ExactlyOnceError/Code/staleGeneration` unless the
///   generation is current and the member owns every partition committed; otherwise it stores
///   the next offset to read and `XACK`s every entry pending below it.
///
/// Durability of published records follows Redis persistence (see Docs/Redis.md).
public final class RedisStreamsTransport: MessageTransport {
    /// Configuration of the transport.
    public struct Configuration: Sendable {
        /// How to reach Redis. Default: `127.0.0.1:6379`, database 0.
        public var redis: RedisConfiguration = .init()
        /// Prefix of every key the transport touches. Default: `"exactly-once-streams:"`.
        public var keyPrefix: String = "exactly-once-streams:"
        /// A member that has not heartbeaten for this long loses its partitions. Default: 10 seconds.
        public var sessionTimeout: Duration = .seconds(10)
        /// How often a polling member runs the heartbeat script (renewing its session and
        /// learning rebalances); polls in between reuse the last assignment, and see a rebalance
        /// by the group's generation, read in the same round trip as the records. A refused
        /// commit makes the next poll heartbeat at once. At most a third of ``sessionTimeout`` is
        /// used. Default: 1 second.
        public var heartbeatInterval: Duration = .seconds(1)
        /// How long a topic's partition count is cached before it is read again (publish, read,
        /// subscribe). The count of a topic never changes while it exists (``RedisStreamsTransport/createTopic(_:partitions:)``
        /// refuses another count), so this only matters for a topic deleted and made again with
        /// another count. Default: 30 seconds.
        public var partitionCountRefresh: Duration = .seconds(30)
        /// Most records per publish script call; a batch publish sends all its calls in one
        /// pipelined round trip. Default: 256.
        public var publishChunk: Int = 256
        /// All defaults.
        public init() {}
        /// Defaults, reaching Redis as `redis`.
        public init(redis: RedisConfiguration) { self.redis = redis }
    }

    let client: RedisClient
    let configuration: Configuration
    let clock: any WallClock
    let logger: Logger
    /// Partition counts read, with when they were read.
    private let partitionCounts = Mutex<[String: (count: Int, at: ContinuousClock.Instant)]>([:])

    /// Creates a transport. No connection is made until the first operation.
    /// - Throws: `ExactlyOnceError/Code/invalidConfiguration`.
    public init(configuration: Configuration = .init(), clock: any WallClock = SystemWallClock(),
                logger: Logger = Logger(label: "exactly-once.redis-streams", factory: { _ in SwiftLogNoOpLogHandler() })) throws {
        guard configuration.sessionTimeout > .zero else {
            throw ExactlyOnceError(.invalidConfiguration, "sessionTimeout must be positive")
        }
        guard configuration.heartbeatInterval > .zero else {
            throw ExactlyOnceError(.invalidConfiguration, "heartbeatInterval must be positive")
        }
        guard configuration.partitionCountRefresh >= .zero else {
            throw ExactlyOnceError(.invalidConfiguration, "partitionCountRefresh must not be negative")
        }
        guard (1...4096).contains(configuration.publishChunk) else {
            throw ExactlyOnceError(.invalidConfiguration, "publishChunk must be within 1...4096")
        }
        self.client = try RedisClient(configuration: configuration.redis, logger: logger)
        self.configuration = configuration
        self.clock = clock
        self.logger = logger
    }

    func topicKey(_ topic: String, _ suffix: String) -> [UInt8] { Array("\(configuration.keyPrefix)t:\(topic):\(suffix)".utf8) }

    /// Creates `topic` with `partitions` partitions; creating it again with the same count is a no-op.
    /// - Throws: `ExactlyOnceError/Code/invalidConfiguration` when it exists with another count.
    public func createTopic(_ topic: String, partitions: Int) async throws {
        return try await transportCall {
            guard partitions >= 1 else { throw ExactlyOnceError(.invalidConfiguration, "a topic needs at least one partition") }
            let key = topicKey(topic, "n")
            _ = try await client.command([Array("SET".utf8), key, Array(String(partitions).utf8), Array("NX".utf8)])
            let existing = try await readPartitionCount(topic)
            guard existing == partitions else {
                throw ExactlyOnceError(.invalidConfiguration, "topic \(topic) exists with \(existing) partitions, not \(partitions)")
            }
            partitionCounts.withLock { $0[topic] = (existing, ContinuousClock.now) }
        }
    }

    /// The number of partitions of `topic`, cached for ``Configuration/partitionCountRefresh``.
    /// - Throws: `ExactlyOnceError/Code/unknownTopic` for an unknown topic.
    public func partitionCount(of topic: String) async throws -> Int {
        let clock = ContinuousClock()
        if let cached = partitionCounts.withLock({ $0[topic] }), clock.now - cached.at < configuration.partitionCountRefresh {
            return cached.count
        }
        return try await transportCall {
            let count = try await readPartitionCount(topic)
            partitionCounts.withLock { $0[topic] = (count, clock.now) }
            return count
        }
    }

    /// Reads the partition count from Redis (twice in one round trip: see ``verifiedPipeline(_:)``).
    private func readPartitionCount(_ topic: String) async throws -> Int {
        let reply = try await verifiedPipeline([[Array("GET".utf8), topicKey(topic, "n")]])[0]
        if reply == .null { throw ExactlyOnceError(.unknownTopic, "unknown topic \(topic)") }
        let n = try ReplyDecoding.int64(reply, "partition count")
        guard n >= 1, n <= 1_000_000, let count = Int(exactly: n) else { throw ReplyDecoding.unexpected("partition count", reply) }
        return count
    }

    /// Sends `commands` twice in one pipelined round trip and requires both answers to agree:
    /// for the small reads that decide where reading starts or ends (committed offsets, end
    /// offsets, the delivered point, partition counts). A reply damaged on the way (or a server
    /// that answers nonsense) then costs a retry (`storeUnavailable`, reported as
    /// `transportUnavailable`), never a position.
    func verifiedPipeline(_ commands: [[[UInt8]]], client: RedisClient? = nil) async throws -> [RedisReply] {
        let replies = try await (client ?? self.client).pipeline(commands + commands)
        let first = Array(replies[..<commands.count])
        guard first == Array(replies[commands.count...]) else {
            throw ExactlyOnceError(.storeUnavailable, "Redis answered the same read twice differently (a damaged reply); not trusted")
        }
        return first
    }

    /// Appends `record` to its partition's stream (one script call: offset allocation and `XADD`).
    public func publish(_ record: OutgoingRecord, to topic: String, partitioning: Partitioning) async throws -> RecordPosition {
        let report = try await publish([record], to: topic, partitioning: partitioning)
        if let position = report.positions[0] { return position }
        throw report.failure ?? ExactlyOnceError(.transportUnavailable, "Redis did not confirm the publish")
    }

    /// Publishes `records` in one pipelined round trip: one `EVALSHA` of the publish script per
    /// partition and chunk of ``Configuration/publishChunk`` records, each allocating its
    /// offsets and appending its entries atomically. Per partition, the records reported
    /// accepted are a prefix (a chunk after a failed one of the same partition is reported not
    /// accepted, whatever it answered). A reply that does not match what was sent (count and last
    /// entry ID) is not trusted: its records are reported not accepted (they may be in the log:
    /// publishing them again is safe, the consumer's dedupe makes the repeat harmless).
    public func publish(_ records: [OutgoingRecord], to topic: String, partitioning: Partitioning) async throws -> PublishReport {
        if records.isEmpty { return PublishReport(positions: [], failure: nil) }
        let count = try await partitionCount(of: topic)
        let partitions = try records.map { try partitioning.resolve(key: $0.key, partitionCount: count) }
        var byPartition: [PartitionID: [Int]] = [:]
        for (i, p) in partitions.enumerated() { byPartition[p, default: []].append(i) }
        var chunks: [(partition: PartitionID, indices: ArraySlice<Int>)] = []
        for p in byPartition.keys.sorted() {
            let indices = byPartition[p]!
            var start = 0
            while start < indices.count {
                let end = min(indices.count, start + configuration.publishChunk)
                chunks.append((p, indices[start..<end]))
                start = end
            }
        }
        let calls: [([[UInt8]], [[UInt8]])] = chunks.map { chunk in
            var args: [[UInt8]] = [Array(String(chunk.indices.count).utf8)]
            for i in chunk.indices {
                let fields = Self.entryFields(records[i])
                args.append(Array(String(fields.count).utf8))
                args += fields
            }
            return ([topicKey(topic, "\(chunk.partition.rawValue):seq"), topicKey(topic, "\(chunk.partition.rawValue)")], args)
        }
        var positions = [RecordPosition?](repeating: nil, count: records.count)
        let replies: [RedisReply]
        do {
            replies = try await transportCall { try await client.evaluate(StreamScripts.publish, calls) }
        } catch let e as ExactlyOnceError {
            return PublishReport(positions: positions, failure: e)
        }
        var failure: ExactlyOnceError?
        var failed = Set<PartitionID>()
        for (chunk, reply) in zip(chunks, replies) where !failed.contains(chunk.partition) {
            do {
                let first = try Self.asTransportError { try Self.decodePublish(reply, count: chunk.indices.count) }
                for (j, i) in chunk.indices.enumerated() {
                    positions[i] = RecordPosition(partition: chunk.partition, offset: Offset(first + Int64(j)))
                }
            } catch let e as ExactlyOnceError {
                failed.insert(chunk.partition)
                if failure == nil { failure = e }
            }
        }
        return PublishReport(positions: positions, failure: failure)
    }

    /// The first offset of a publish script's answer `{first offset, last entry ID}`, checked
    /// against the number of records sent.
    static func decodePublish(_ reply: RedisReply, count: Int) throws -> Int64 {
        let parts = try ReplyDecoding.array(reply, "publish", count: 2)
        let first = try ReplyDecoding.int64(parts[0], "publish")
        guard first >= 0, first < Int64.max - Int64(count),
              try ReplyDecoding.bytes(parts[1], "publish") == RedisStreamsSubscription.entryID(first + Int64(count) - 1) else {
            throw ReplyDecoding.unexpected("publish", reply)
        }
        return first
    }

    /// A record's stream fields after the offset field the script adds: `c` checksum, `p`
    /// payload, `k` key, `h:<name>` headers (sorted).
    static func entryFields(_ record: OutgoingRecord) -> [[UInt8]] {
        let headers = record.headers.sorted(by: { $0.key < $1.key })
        var fields: [[UInt8]] = [Array("c".utf8), Array(String(entryChecksum(key: record.key, payload: record.payload, headers: headers), radix: 16).utf8),
                                 Array("p".utf8), record.payload]
        if let key = record.key {
            fields.append(Array("k".utf8))
            fields.append(key)
        }
        for (name, value) in headers {
            fields.append(Array("h:\(name)".utf8))
            fields.append(Array(value.utf8))
        }
        return fields
    }

    /// FNV-1a (64 bit) over the key, payload and headers, each length-prefixed: written with the
    /// entry, checked on every read, so a damaged entry costs a retry, never a wrong record.
    static func entryChecksum(key: [UInt8]?, payload: [UInt8], headers: [(key: String, value: String)]) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        func mix(_ bytes: some Sequence<UInt8>) { for b in bytes { h = (h ^ UInt64(b)) &* 0x0100_0000_01b3 } }
        func field(_ bytes: [UInt8]) {
            mix(String(bytes.count).utf8)
            mix(CollectionOfOne(UInt8(ascii: ":")))
            mix(bytes)
        }
        if let key { field(key) } else { mix("-".utf8) }
        field(payload)
        for (name, value) in headers {
            field(Array(name.utf8))
            field(Array(value.utf8))
        }
        return h
    }

    /// A random id for a new topic: fencing scopes name it, so a topic deleted and created
    /// again (its epoch counters gone) never meets the epochs a durable store saw before.
    static func newIncarnation() -> String {
        var g = SystemRandomNumberGenerator()
        return String(g.next() as UInt64, radix: 16)
    }

    /// The topic's incarnation id (created for topics made before ids existed).
    func incarnation(of topic: String) async throws -> String {
        let replies = try await client.pipeline([
            [Array("SET".utf8), topicKey(topic, "id"), Array(Self.newIncarnation().utf8), Array("NX".utf8)],
            [Array("GET".utf8), topicKey(topic, "id")],
        ])
        return try ReplyDecoding.text(replies[1], "topic id")
    }

    /// Runs a transport operation; a Redis that cannot be reached (or answers nonsense) is
    /// `ExactlyOnceError/Code/transportUnavailable` here, a refusal `ExactlyOnceError/Code/transportFailure`.
    static func asTransportError<T>(_ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let e as ExactlyOnceError where e.code == .storeUnavailable {
            throw ExactlyOnceError(.transportUnavailable, e.message, cause: e.cause)
        } catch let e as ExactlyOnceError where e.code == .storeFailure {
            throw ExactlyOnceError(.transportFailure, e.message, cause: e.cause)
        }
    }

    func transportCall<T>(_ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch let e as ExactlyOnceError where e.code == .storeUnavailable {
            throw ExactlyOnceError(.transportUnavailable, e.message, cause: e.cause)
        } catch let e as ExactlyOnceError where e.code == .storeFailure {
            throw ExactlyOnceError(.transportFailure, e.message, cause: e.cause)
        }
    }

    /// Committed offset, end offset, lag, owner and epoch of every partition (reads Redis only).
    public func partitionStatus(group: String, topic: String) async throws -> [PartitionStatus] {
        return try await transportCall {
            let count = try await partitionCount(of: topic)
            let base = "\(configuration.keyPrefix)g:\(group):\(topic):"
            var commands: [[[UInt8]]] = []
            for p in 0..<count {
                let field = Array(String(p).utf8)
                commands.append([Array("GET".utf8), topicKey(topic, "\(p):seq")])
                commands.append([Array("HGET".utf8), Array((base + "committed").utf8), field])
                commands.append([Array("HGET".utf8), Array((base + "owners").utf8), field])
                commands.append([Array("HGET".utf8), Array((base + "epochs").utf8), field])
            }
            let replies = try await verifiedPipeline(commands)
            return try (0..<count).map { p in
                let end = replies[4 * p] == .null ? 0 : try ReplyDecoding.int64(replies[4 * p], "end offset")
                let committed: Offset? = replies[4 * p + 1] == .null ? nil : Offset(try ReplyDecoding.int64(replies[4 * p + 1], "committed offset"))
                let owner: String? = replies[4 * p + 2] == .null ? nil : try ReplyDecoding.text(replies[4 * p + 2], "owner")
                let epoch: UInt64? = owner == nil || replies[4 * p + 3] == .null ? nil : try ReplyDecoding.uint64(replies[4 * p + 3], "epoch")
                guard end >= 0, (committed?.rawValue ?? 0) >= 0 else { throw ReplyDecoding.unexpected("partition status", replies[4 * p]) }
                return PartitionStatus(partition: PartitionID(p), committed: committed, end: Offset(end),
                                       lag: max(0, end - (committed?.rawValue ?? 0)), owner: owner, epoch: epoch)
            }
        }
    }

    /// Records of one partition from `offset` on (`XRANGE`), outside any group.
    public func read(topic: String, partition: PartitionID, from offset: Offset, maxRecords: Int) async throws -> [ConsumedRecord] {
        return try await transportCall {
            let count = try await partitionCount(of: topic)
            guard partition.rawValue >= 0, partition.rawValue < count else {
                throw ExactlyOnceError(.invalidPartition, "partition \(partition) is outside 0..<\(count)")
            }
            guard maxRecords > 0 else { return [] }
            let reply = try await client.command([Array("XRANGE".utf8), topicKey(topic, "\(partition.rawValue)"),
                                                  RedisStreamsSubscription.entryID(max(0, offset.rawValue)), Array("+".utf8),
                                                  Array("COUNT".utf8), Array(String(maxRecords).utf8)])
            return try RedisStreamsSubscription.decodeEntries(reply, "XRANGE", topic: topic, partition: partition)
                .filter { $0.offset >= offset }
        }
    }

    /// Whether `group` has committed every partition of `topic` to its end (no lag), for
    /// operations and tests. Reads Redis only; does not join the group.
    public func isFullyCommitted(group: String, topic: String) async throws -> Bool {
        return try await transportCall {
            let count = try await partitionCount(of: topic)
            let committedKey = Array("\(configuration.keyPrefix)g:\(group):\(topic):committed".utf8)
            var commands: [[[UInt8]]] = []
            for p in 0..<count {
                commands.append([Array("GET".utf8), topicKey(topic, "\(p):seq")])
                commands.append([Array("HGET".utf8), committedKey, Array(String(p).utf8)])
            }
            let replies = try await verifiedPipeline(commands)
            for p in 0..<count {
                let end = replies[2 * p] == .null ? 0 : try ReplyDecoding.int64(replies[2 * p], "end offset")
                let committed = replies[2 * p + 1] == .null ? 0 : try ReplyDecoding.int64(replies[2 * p + 1], "committed offset")
                guard end >= 0, committed >= 0 else { throw ReplyDecoding.unexpected("committed offset", replies[2 * p + 1]) }
                if committed < end { return false }
            }
            return true
        }
    }

    /// The number of entries of `topic` delivered to `group` and not acknowledged yet (the sum of
    /// `XPENDING` over the partition streams), for operations and tests. Entries are acknowledged
    /// when a commit passes them. Reads Redis only; does not join the group.
    public func pendingCount(group: String, topic: String) async throws -> Int {
        return try await transportCall {
            let count = try await partitionCount(of: topic)
            let replies = try await client.pipeline((0..<count).map { p in
                [Array("XPENDING".utf8), topicKey(topic, "\(p)"), Array(group.utf8)]
            })
            var total = 0
            for reply in replies {
                if let e = reply.errorText, e.hasPrefix("NOGROUP") { continue }
                let summary = try ReplyDecoding.array(reply, "XPENDING", atLeast: 1)
                total += try ReplyDecoding.count(summary[0], "XPENDING count")
            }
            return total
        }
    }

    /// Joins `group` on `topic` as `memberID` (the group rebalances at once). Creates the Redis
    /// consumer group `group` on every partition stream (`XGROUP CREATE ... 0 MKSTREAM`) unless
    /// it exists.
    public func subscribe(topic: String, group: String, memberID: String) async throws -> RedisStreamsSubscription {
        return try await transportCall {
            let count = try await partitionCount(of: topic)
            let scope = "redis:\(configuration.keyPrefix)\(try await incarnation(of: topic))/\(group)/\(topic)"
            let subscription = RedisStreamsSubscription(transport: self, topic: topic, group: group, memberID: memberID, partitions: count, fencingScope: scope)
            try await subscription.createGroups((0..<count).map { PartitionID($0) })
            _ = try await subscription.heartbeat(leaving: false)
            return subscription
        }
    }
}

/// One member of a consumer group on a ``RedisStreamsTransport``.
///
/// The member is the Redis consumer `memberID` of the Redis consumer group `group` on each of
/// the topic's partition streams. Per owned partition it keeps a read position (the next offset
/// to deliver) and how far the Redis group has delivered (its last-delivered ID):
/// - below that point (after acquiring the partition, or after a seek backwards) it catches up:
///   `XAUTOCLAIM` from the position claims the pending entries (a dead or previous owner's) for
///   this member and returns them; where the entry at the position is no longer pending (already
///   acknowledged), `XRANGE` reads it;
/// - at or after that point it reads new entries with `XREADGROUP ... >` (never blocking).
public final class RedisStreamsSubscription: TransportSubscription {
    /// The member id (also the Redis consumer name).
    public let memberID: String
    /// `redis:<key prefix><topic incarnation>/<group>/<topic>`: epochs come from the group's
    /// counter in Redis, which lives as long as the topic's keys.
    public let fencingScope: String
    private let transport: RedisStreamsTransport
    private let topic: String
    private let group: String
    private let partitions: Int
    private let groupKeys: [[UInt8]]
    private let committedKey: [UInt8]

    /// One owned partition's read state.
    struct PartitionState: Equatable {
        /// The next offset to deliver.
        var position: Offset
        /// Offsets below this were delivered to the Redis group (its last-delivered ID is
        /// `0-delivered`), as far as this member knows.
        var delivered: Int64
    }

    private struct State {
        var assignment: [PartitionID: UInt64] = [:]
        var partitions: [PartitionID: PartitionState] = [:]
        var closed = false
        /// The last heartbeat's answer and when it was received.
        var lastHeartbeat: (generation: UInt64, assignment: [PartitionID: UInt64], at: Timestamp)?
    }
    private let state = Mutex(State())
    /// This member's own connection for blocking reads (`XREADGROUP ... BLOCK`), so a poll that
    /// waits never holds a connection of the transport's pool.
    private let readClient: RedisClient

    init(transport: RedisStreamsTransport, topic: String, group: String, memberID: String, partitions: Int, fencingScope: String) {
        self.transport = transport
        self.fencingScope = fencingScope
        self.topic = topic
        self.group = group
        self.memberID = memberID
        self.partitions = partitions
        let base = "\(transport.configuration.keyPrefix)g:\(group):\(topic):"
        // members, generation, owners, owner epochs, epoch counter
        self.groupKeys = ["members", "gen", "owners", "epochs", "epoch"].map { Array((base + $0).utf8) }
        self.committedKey = Array((base + "committed").utf8)
        var c = transport.configuration.redis
        c.poolSize = 1
        // Cannot fail: the same configuration already passed validation with a larger pool.
        self.readClient = (try? RedisClient(configuration: c, logger: transport.logger)) ?? transport.client
    }

    private func streamKey(_ p: PartitionID) -> [UInt8] { transport.topicKey(topic, "\(p.rawValue)") }

    /// Renews this member's session, rebalances if membership changed, and returns the
    /// generation and this member's partitions with their epochs. The script answers every
    /// value twice; a reply whose copies disagree (damaged on the way) is not trusted, since an
    /// epoch or partition taken from it would reach the dedupe store's fences.
    func heartbeat(leaving: Bool) async throws -> (UInt64, [PartitionID: UInt64]) {
        let now = transport.clock.now()
        let args: [[UInt8]] = [
            Array(String(now.milliseconds).utf8), Array(memberID.utf8),
            Array(String(now.advanced(by: transport.configuration.sessionTimeout).milliseconds).utf8),
            Array(String(partitions).utf8), Array((leaving ? "1" : "0").utf8),
        ]
        let reply = try await transport.client.evaluate(StreamScripts.heartbeat, [(groupKeys, args)])[0]
        let result = try Self.decodeHeartbeat(reply, partitions: partitions)
        if !leaving {
            state.withLock { $0.lastHeartbeat = (result.0, result.1, now) }
        }
        return result
    }

    /// `{generation, generation, {partition, epoch, partition, epoch, ...}}`, copies checked.
    static func decodeHeartbeat(_ reply: RedisReply, partitions: Int) throws -> (UInt64, [PartitionID: UInt64]) {
        let parts = try ReplyDecoding.array(reply, "heartbeat", count: 3)
        let generation = try ReplyDecoding.uint64(parts[0], "generation")
        guard try ReplyDecoding.uint64(parts[1], "generation") == generation else { throw ReplyDecoding.unexpected("heartbeat", reply) }
        let owned = try ReplyDecoding.array(parts[2], "assignment")
        guard owned.count % 4 == 0 else { throw ReplyDecoding.unexpected("assignment", reply) }
        var assignment: [PartitionID: UInt64] = [:]
        for i in stride(from: 0, to: owned.count, by: 4) {
            let p = try ReplyDecoding.int64(owned[i], "partition")
            let epoch = try ReplyDecoding.uint64(owned[i + 1], "epoch")
            guard p >= 0, p < Int64(partitions), try ReplyDecoding.int64(owned[i + 2], "partition") == p,
                  try ReplyDecoding.uint64(owned[i + 3], "epoch") == epoch, assignment[PartitionID(Int(p))] == nil else {
                throw ReplyDecoding.unexpected("assignment", reply)
            }
            assignment[PartitionID(Int(p))] = epoch
        }
        return (generation, assignment)
    }

    /// The last heartbeat's answer while it is younger than the heartbeat interval (on the
    /// transport's clock, like sessions), else a new one.
    private func currentAssignment() async throws -> (UInt64, [PartitionID: UInt64]) {
        if let last = state.withLock({ $0.lastHeartbeat }), transport.clock.now() < last.at.advanced(by: min(transport.configuration.heartbeatInterval, transport.configuration.sessionTimeout / 3)) {
            return (last.generation, last.assignment)
        }
        return try await heartbeat(leaving: false)
    }

    /// `XGROUP CREATE <stream> <group> 0 MKSTREAM` for `partitions` (an existing group is kept).
    func createGroups(_ partitions: [PartitionID]) async throws {
        let replies = try await transport.client.pipeline(partitions.map(createGroupCommand))
        for reply in replies { try Self.checkCreateGroup(reply) }
    }

    private func createGroupCommand(_ p: PartitionID) -> [[UInt8]] {
        [Array("XGROUP".utf8), Array("CREATE".utf8), streamKey(p), Array(group.utf8), Array("0".utf8), Array("MKSTREAM".utf8)]
    }

    static func checkCreateGroup(_ reply: RedisReply) throws {
        switch reply {
        case .status("OK"): return
        case .error(let e) where e.hasPrefix("BUSYGROUP"): return
        default: throw ReplyDecoding.unexpected("XGROUP CREATE", reply)
        }
    }

    private func ensureOpen() throws {
        if state.withLock({ $0.closed }) { throw ExactlyOnceError(.shutDown, "subscription of \(memberID) is closed") }
    }

    /// Takes the current assignment (heartbeating when ``RedisStreamsTransport/Configuration/heartbeatInterval``
    /// passed) and reads up to `maxRecords` records, waiting up to `maxWait` for them on the
    /// server (`XREADGROUP ... BLOCK`) when every owned partition is caught up.
    public func poll(maxRecords: Int, maxWait: Duration) async throws -> PollResult {
        let clock = ContinuousClock()
        let deadline = clock.now.advanced(by: maxWait)
        while true {
            let left = deadline - clock.now
            let result = try await pollOnce(maxRecords: maxRecords, block: left > .milliseconds(1) ? left : nil)
            if !result.records.isEmpty || clock.now >= deadline { return result }
            if result.assignment.isEmpty {
                // Nothing owned: wait for a rebalance without spinning.
                try await Task.sleep(for: min(.milliseconds(50), deadline - clock.now))
            }
        }
    }

    private func transportCall<T>(_ body: () async throws -> T) async throws -> T {
        try await transport.transportCall(body)
    }

    private func seqKey(_ p: PartitionID) -> [UInt8] { transport.topicKey(topic, "\(p.rawValue):seq") }

    private func pollOnce(maxRecords: Int, block: Duration?) async throws -> PollResult {
        return try await transportCall {
            try ensureOpen()
            let (generation, assignment) = try await currentAssignment()
            // Newly assigned partitions (or ones that came back with a new epoch) start from the
            // committed offset; the group's last-delivered ID tells how far they must catch up.
            // Both are read twice in one round trip and checked against the stream's end: a
            // damaged answer here would move the read position.
            let fresh = state.withLock { s in assignment.filter { s.assignment[$0.key] != $0.value }.map(\.key) }.sorted()
            var acquired: [PartitionID: PartitionState] = [:]
            if !fresh.isEmpty {
                try await createGroups(fresh)
                var commands: [[[UInt8]]] = []
                for p in fresh {
                    commands.append([Array("HGET".utf8), committedKey, Array(String(p.rawValue).utf8)])
                    commands.append([Array("XINFO".utf8), Array("GROUPS".utf8), streamKey(p)])
                    commands.append([Array("GET".utf8), seqKey(p)])
                }
                let replies = try await transport.verifiedPipeline(commands)
                for (i, p) in fresh.enumerated() {
                    let committed = replies[3 * i] == .null ? 0 : try ReplyDecoding.int64(replies[3 * i], "committed offset")
                    let delivered = try Self.lastDelivered(replies[3 * i + 1], group: group)
                    let end = replies[3 * i + 2] == .null ? 0 : try ReplyDecoding.int64(replies[3 * i + 2], "end offset")
                    guard end >= 0, committed >= 0, committed <= end, delivered <= end else {
                        throw ExactlyOnceError(.storeUnavailable, "Redis answered positions out of range for partition \(p) (committed \(committed), delivered \(delivered), end \(end)); not trusted")
                    }
                    acquired[p] = PartitionState(position: Offset(committed), delivered: delivered)
                }
            }
            let current: [PartitionID: PartitionState] = state.withLock { s in
                s.assignment = assignment
                s.partitions = s.partitions.filter { assignment[$0.key] != nil }
                for (p, ps) in acquired { s.partitions[p] = ps }
                return s.partitions
            }
            let owned = current.keys.sorted()
            guard !owned.isEmpty else {
                // Nothing to read: heartbeat now and then only (the interval), or when the
                // generation moved (one GET).
                let g = try await transport.client.command([Array("GET".utf8), groupKeys[1]])
                if (g == .null ? 0 : try ReplyDecoding.uint64(g, "generation")) != generation {
                    let (g2, a2) = try await heartbeat(leaving: false)
                    _ = a2  // acquired (from the committed offsets) by the next poll
                    return PollResult(generation: g2, assignment: [:], records: [], endOffsets: [:])
                }
                return PollResult(generation: generation, assignment: assignment, records: [], endOffsets: [:])
            }
            let perPartition = max(1, maxRecords / max(1, owned.count))
            let count = [Array("COUNT".utf8), Array(String(perPartition).utf8)]

            // Round 1, one round trip: XAUTOCLAIM for partitions below the group's delivered
            // point; one XREADGROUP over all the others (blocking on the server when nothing
            // needs catching up); the end offsets last, so they cover what was read.
            let catchingUp = owned.filter { current[$0]!.position.rawValue < current[$0]!.delivered }
            let reading = owned.filter { current[$0]!.position.rawValue >= current[$0]!.delivered }
            // The group's generation first: a rebalance since the last heartbeat is seen in this
            // round trip, and answered with a heartbeat at once.
            var commands: [[[UInt8]]] = [[Array("GET".utf8), groupKeys[1]]]
            for p in catchingUp {
                commands.append([Array("XAUTOCLAIM".utf8), streamKey(p), Array(group.utf8), Array(memberID.utf8),
                                 Array("0".utf8), Self.entryID(current[p]!.position.rawValue)] + count)
            }
            let blockFor = catchingUp.isEmpty ? block : nil
            if !reading.isEmpty {
                var read = [Array("XREADGROUP".utf8), Array("GROUP".utf8), Array(group.utf8), Array(memberID.utf8)] + count
                if let blockFor {
                    let (sec, atto) = blockFor.components
                    read += [Array("BLOCK".utf8), Array(String(max(1, sec * 1000 + atto / 1_000_000_000_000_000)).utf8)]
                }
                read.append(Array("STREAMS".utf8))
                read += reading.map(streamKey)
                read += reading.map { _ in Array(">".utf8) }
                commands.append(read)
            }
            commands.append([Array("MGET".utf8)] + owned.map(seqKey))
            let replies = try await (blockFor == nil ? transport.client : readClient).pipeline(commands, extraWait: blockFor ?? .zero)
            let ends = try ReplyDecoding.array(replies[replies.count - 1], "end offsets", count: owned.count)
            var endOffsets: [PartitionID: Offset] = [:]
            for (p, reply) in zip(owned, ends) {
                let end = reply == .null ? 0 : try ReplyDecoding.int64(reply, "end offset")
                guard end >= 0 else { throw ReplyDecoding.unexpected("end offset", reply) }
                endOffsets[p] = Offset(end)
            }
            /// Entries must lie below the partition's end: anything else is a damaged answer.
            func checkBelowEnd(_ entries: [ConsumedRecord], _ p: PartitionID) throws {
                if let last = entries.last, last.offset >= endOffsets[p]! {
                    throw ExactlyOnceError(.storeUnavailable, "Redis answered an entry of partition \(p) at \(last.offset), at or past the end \(endOffsets[p]!); not trusted")
                }
            }
            var read: [PartitionID: [ConsumedRecord]] = [:]
            var next = current
            var needsRange: [PartitionID] = []
            for (i, p) in catchingUp.enumerated() {
                var ps = current[p]!
                let entries = try Self.decodeAutoClaim(replies[1 + i], topic: topic, partition: p)
                try checkBelowEnd(entries, p)
                if let last = entries.last { ps.delivered = max(ps.delivered, last.offset.rawValue + 1) }
                let run = Self.run(entries, from: &ps.position)
                if run.isEmpty { needsRange.append(p) }
                read[p] = run
                next[p] = ps
            }
            if !reading.isEmpty {
                let byStream = try Self.decodeReadGroup(replies[1 + catchingUp.count], streams: reading.map(streamKey), topic: topic, partitions: reading)
                for p in reading {
                    guard let entries = byStream[p], !entries.isEmpty else { continue }
                    try checkBelowEnd(entries, p)
                    var ps = current[p]!
                    ps.delivered = max(ps.delivered, entries.last!.offset.rawValue + 1)
                    // Only the entries that follow the position without a gap are delivered.
                    // Entries below it (after a seek forward) are skipped and stay pending until a
                    // commit acknowledges them; after a gap (another consumer, a former owner
                    // still reading, took the ones between) the next poll catches up from the
                    // position with XAUTOCLAIM, these included.
                    read[p] = Self.run(entries, from: &ps.position)
                    next[p] = ps
                }
            }

            // Round 2: entries that are no longer pending (acknowledged: a seek below the committed
            // offset, or a commit moved backwards) are read with XRANGE up to the delivered point.
            if !needsRange.isEmpty {
                let rangeReplies = try await transport.client.pipeline(needsRange.map { p in
                    [Array("XRANGE".utf8), streamKey(p), Self.entryID(next[p]!.position.rawValue),
                     Array("0-\(next[p]!.delivered)".utf8)] + count
                })
                for (p, reply) in zip(needsRange, rangeReplies) {
                    var ps = next[p]!
                    let entries = try Self.decodeEntries(reply, "XRANGE", topic: topic, partition: p)
                        .filter { $0.offset.rawValue < ps.delivered }
                    try checkBelowEnd(entries, p)
                    let run = Self.run(entries, from: &ps.position)
                    // Fewer than asked and none at the position: nothing exists between the
                    // position and the first entry returned (trimmed), or up to the delivered point.
                    if run.isEmpty, entries.count < perPartition {
                        let to = entries.first(where: { $0.offset > ps.position })?.offset.rawValue ?? ps.delivered
                        ps.position = Offset(max(ps.position.rawValue, to))
                        read[p] = Self.run(entries, from: &ps.position)
                    } else {
                        read[p] = run
                    }
                    next[p] = ps
                }
            }

            let seenGeneration = replies[0] == .null ? 0 : try ReplyDecoding.uint64(replies[0], "generation")
            var resultGeneration = generation
            var resultAssignment = assignment
            if seenGeneration != generation {
                // Rebalanced meanwhile: keep what was read of the partitions this member still
                // holds with the same epoch; the others are dropped (their entries stay pending
                // and the new owner claims them from the committed offset). Partitions gained
                // are acquired by the next poll.
                let (g2, a2) = try await heartbeat(leaving: false)
                resultGeneration = g2
                resultAssignment = assignment.filter { a2[$0.key] == $0.value }
                state.withLock { s in
                    s.assignment = resultAssignment
                    s.partitions = s.partitions.filter { resultAssignment[$0.key] != nil }
                }
                endOffsets = endOffsets.filter { resultAssignment[$0.key] != nil }
            }
            let records = owned.filter { resultAssignment[$0] != nil }.flatMap { read[$0] ?? [] }
            state.withLock { s in
                for (p, ps) in next where s.assignment[p] == resultAssignment[p] && s.partitions[p] == current[p] { s.partitions[p] = ps }
            }
            return PollResult(generation: resultGeneration, assignment: resultAssignment, records: records, endOffsets: endOffsets)
        }
    }

    /// The entries that follow `position` without a gap (entries below it are skipped), moving
    /// `position` past them.
    static func run(_ entries: [ConsumedRecord], from position: inout Offset) -> [ConsumedRecord] {
        var out: [ConsumedRecord] = []
        for r in entries where r.offset >= position {
            guard r.offset == position else { break }
            out.append(r)
            position = r.offset.next
        }
        return out
    }

    /// The stream entry ID of `offset`.
    static func entryID(_ offset: Int64) -> [UInt8] { Array("0-\(offset + 1)".utf8) }

    /// The offset after the group's last-delivered ID, from an `XINFO GROUPS` reply (0 when the
    /// group is not listed).
    static func lastDelivered(_ reply: RedisReply, group: String) throws -> Int64 {
        for g in try ReplyDecoding.array(reply, "XINFO GROUPS") {
            let fields = try ReplyDecoding.array(g, "XINFO GROUPS entry")
            guard fields.count % 2 == 0 else { throw ReplyDecoding.unexpected("XINFO GROUPS entry", g) }
            var name: String?
            var last: RedisReply?
            for i in stride(from: 0, to: fields.count, by: 2) {
                switch fields[i].text {
                case "name": name = fields[i + 1].text
                case "last-delivered-id": last = fields[i + 1]
                default: break
                }
            }
            guard name == group else { continue }
            guard let last else { throw ReplyDecoding.unexpected("XINFO GROUPS entry", g) }
            let id = try ReplyDecoding.text(last, "last-delivered-id")
            guard id.hasPrefix("0-"), let seq = Int64(id.dropFirst(2)), seq >= 0 else { throw ReplyDecoding.unexpected("last-delivered-id", last) }
            return seq
        }
        return 0
    }

    /// Entries of an `XREADGROUP` reply on `streams`, by partition (nil reply: nothing new). A
    /// stream that was not asked for, or named twice, makes the whole reply untrusted.
    static func decodeReadGroup(_ reply: RedisReply, streams: [[UInt8]], topic: String, partitions: [PartitionID]) throws -> [PartitionID: [ConsumedRecord]] {
        if reply == .null { return [:] }
        var out: [PartitionID: [ConsumedRecord]] = [:]
        for item in try ReplyDecoding.array(reply, "XREADGROUP") {
            let stream = try ReplyDecoding.array(item, "XREADGROUP stream", count: 2)
            let name = try ReplyDecoding.bytes(stream[0], "XREADGROUP stream name")
            guard let i = streams.firstIndex(of: name), out[partitions[i]] == nil else { throw ReplyDecoding.unexpected("XREADGROUP", reply) }
            out[partitions[i]] = try decodeEntries(stream[1], "XREADGROUP entries", topic: topic, partition: partitions[i])
        }
        return out
    }

    /// Entries of an `XREADGROUP` reply on one stream, whatever its name (nil reply: nothing new).
    static func decodeReadGroup(_ reply: RedisReply, topic: String, partition: PartitionID) throws -> [ConsumedRecord] {
        if reply == .null { return [] }
        let streams = try ReplyDecoding.array(reply, "XREADGROUP", count: 1)
        let stream = try ReplyDecoding.array(streams[0], "XREADGROUP stream", count: 2)
        return try decodeEntries(stream[1], "XREADGROUP entries", topic: topic, partition: partition)
    }

    /// Entries of an `XAUTOCLAIM` reply: `[cursor, entries]` (Redis 6.2) or
    /// `[cursor, entries, deleted IDs]` (Redis 7).
    static func decodeAutoClaim(_ reply: RedisReply, topic: String, partition: PartitionID) throws -> [ConsumedRecord] {
        let parts = try ReplyDecoding.array(reply, "XAUTOCLAIM", atLeast: 2)
        guard parts.count <= 3 else { throw ReplyDecoding.unexpected("XAUTOCLAIM", reply) }
        _ = try ReplyDecoding.text(parts[0], "XAUTOCLAIM cursor")
        return try decodeEntries(parts[1], "XAUTOCLAIM entries", topic: topic, partition: partition)
    }

    /// A list of stream entries in ID order; deleted entries (nil, or an ID with nil fields) are
    /// left out.
    static func decodeEntries(_ reply: RedisReply, _ what: String, topic: String, partition: PartitionID) throws -> [ConsumedRecord] {
        var out: [ConsumedRecord] = []
        for entry in try ReplyDecoding.array(reply, what) {
            if entry == .null { continue }
            if case .array(let parts) = entry, parts.count == 2, parts[1] == .null { continue }
            let record = try decodeEntry(entry, topic: topic, partition: partition)
            if let last = out.last, record.offset <= last.offset { throw ReplyDecoding.unexpected(what, reply) }
            out.append(record)
        }
        return out
    }

    static func decodeEntry(_ entry: RedisReply, topic: String, partition: PartitionID) throws -> ConsumedRecord {
        let parts = try ReplyDecoding.array(entry, "stream entry", count: 2)
        let id = try ReplyDecoding.text(parts[0], "stream entry id")
        guard id.hasPrefix("0-"), let seq = Int64(id.dropFirst(2)), seq >= 1 else { throw ReplyDecoding.unexpected("stream entry id", parts[0]) }
        let fields = try ReplyDecoding.array(parts[1], "stream entry fields")
        guard fields.count % 2 == 0 else { throw ReplyDecoding.unexpected("stream entry fields", parts[1]) }
        var payload: [UInt8]?
        var key: [UInt8]?
        var headers: [String: String] = [:]
        var offsetField: [UInt8]?
        var checksum: [UInt8]?
        for i in stride(from: 0, to: fields.count, by: 2) {
            let name = try ReplyDecoding.text(fields[i], "stream field")
            let value = try ReplyDecoding.bytes(fields[i + 1], "stream value")
            switch name {
            case "p": payload = value
            case "k": key = value
            case "o": offsetField = value
            case "c": checksum = value
            default:
                if name.hasPrefix("h:") { headers[String(name.dropFirst(2))] = String(decoding: value, as: UTF8.self) }
            }
        }
        guard let payload else { throw ReplyDecoding.unexpected("stream entry without payload", entry) }
        // Entries written by this version carry their offset and a checksum (older ones do not):
        // an entry whose ID, offset field or content disagree was damaged on the way.
        if let offsetField, offsetField != Array(String(seq - 1).utf8) {
            throw ExactlyOnceError(.storeUnavailable, "a stream entry's ID and offset disagree (a damaged reply); not trusted")
        }
        if let checksum {
            let sorted = headers.sorted(by: { $0.key < $1.key }).map { (key: $0.key, value: $0.value) }
            guard checksum == Array(String(RedisStreamsTransport.entryChecksum(key: key, payload: payload, headers: sorted), radix: 16).utf8) else {
                throw ExactlyOnceError(.storeUnavailable, "a stream entry's checksum does not match its content (a damaged reply); not trusted")
            }
        }
        return ConsumedRecord(topic: topic, partition: partition, offset: Offset(seq - 1), key: key, payload: payload, headers: headers)
    }

    /// Stores committed offsets and acknowledges (`XACK`) every pending entry below them, in one
    /// script, or throws `ExactlyOnceError/Code/staleGeneration` and stores and acknowledges
    /// nothing.
    public func commit(_ offsets: [PartitionID: Offset], generation: UInt64) async throws {
        return try await transportCall {
            if offsets.isEmpty { return }
            var keys = [groupKeys[1], groupKeys[2], committedKey]
            var args: [[UInt8]] = [Array(memberID.utf8), Array(String(generation).utf8), Array(group.utf8)]
            for (p, o) in offsets.sorted(by: { $0.key < $1.key }) {
                keys.append(streamKey(p))
                args.append(Array(String(p.rawValue).utf8))
                args.append(Array(String(o.rawValue).utf8))
                // Exclusive upper bound of the IDs to acknowledge: the entry of offset `o` and later stay.
                args.append(Array("(0-\(max(0, o.rawValue) + 1)".utf8))
            }
            let reply = try await transport.client.evaluate(StreamScripts.commit, [(keys, args)])[0]
            switch reply {
            case .status("OK"): return
            case .string(let b) where b == Array("STALE".utf8):
                // Learn the rebalance at the next poll, not a heartbeat interval later.
                state.withLock { $0.lastHeartbeat = nil }
                throw ExactlyOnceError(.staleGeneration, "member \(memberID) with generation \(generation) no longer owns the partitions it commits")
            default:
                throw ReplyDecoding.unexpected("commit", reply)
            }
        }
    }

    /// Moves this member's read position of an owned partition. Positions below the group's
    /// delivered point are read again (claimed pending entries, or acknowledged ones with
    /// `XRANGE`); entries below a position moved forward are skipped.
    public func seek(_ partition: PartitionID, to offset: Offset) async throws {
        try ensureOpen()
        try state.withLock { s in
            guard s.assignment[partition] != nil, s.partitions[partition] != nil else {
                throw ExactlyOnceError(.staleGeneration, "member \(memberID) does not own partition \(partition)")
            }
            s.partitions[partition]!.position = offset
        }
    }

    /// The group's committed offset of `partition`, if any.
    public func committedOffset(_ partition: PartitionID) async throws -> Offset? {
        return try await transportCall {
            let reply = try await transport.verifiedPipeline([[Array("HGET".utf8), committedKey, Array(String(partition.rawValue).utf8)]])[0]
            if reply == .null { return nil }
            let o = try ReplyDecoding.int64(reply, "committed offset")
            guard o >= 0 else { throw ReplyDecoding.unexpected("committed offset", reply) }
            return Offset(o)
        }
    }

    /// Leaves the group; its partitions move to the remaining members at once. The Redis
    /// consumer `memberID` stays in the Redis groups (its pending entries, if any, are claimed by
    /// the next owners).
    public func close() async throws {
        return try await transportCall {
            let wasOpen = state.withLock { s in
                defer { s.closed = true; s.assignment = [:]; s.partitions = [:]; s.lastHeartbeat = nil }
                return !s.closed
            }
            if wasOpen { _ = try await heartbeat(leaving: true) }
        }
    }
}

/// The transport's scripts, run with `EVALSHA` (loaded on first use and after `NOSCRIPT`).
enum StreamScripts {
    /// KEYS: sequence counter, stream. ARGV: record count, then per record the number of its
    /// fields and values and the field/value pairs. Allocates the records' offsets in one
    /// `INCRBY` and appends them in order, each with its offset in field `o`. Returns
    /// `{first offset, ID of the last entry}`.
    static let publish = RedisScript("streams.publish.v2", """
    local n = tonumber(ARGV[1])
    local first = redis.call('INCRBY', KEYS[1], n) - n
    local i = 2
    for r = 0, n - 1 do
      local m = tonumber(ARGV[i])
      redis.call('XADD', KEYS[2], '0-' .. (first + r + 1), 'o', tostring(first + r), unpack(ARGV, i + 1, i + m))
      i = i + m + 1
    end
    return {first, '0-' .. (first + n)}
    """)

    /// KEYS: members, generation, owners, owner epochs, epoch counter.
    /// ARGV: now, member, session end, partition count, leaving (1/0).
    /// Returns `{generation, generation, {partition, epoch, partition, epoch, ...}}` for this
    /// member: every value twice, so a damaged reply shows.
    static let heartbeat = RedisScript("streams.heartbeat.v2", """
    local now = tonumber(ARGV[1])
    local me = ARGV[2]
    local changed = false
    if ARGV[5] == '1' then
      if redis.call('HDEL', KEYS[1], me) == 1 then changed = true end
    else
      if redis.call('HSET', KEYS[1], me, ARGV[3]) == 1 then changed = true end
    end
    local all = redis.call('HGETALL', KEYS[1])
    local live = {}
    for i = 1, #all, 2 do
      if tonumber(all[i + 1]) <= now then
        redis.call('HDEL', KEYS[1], all[i])
        changed = true
      else
        live[#live + 1] = all[i]
      end
    end
    table.sort(live)
    if changed then redis.call('INCR', KEYS[2]) end
    local gen = redis.call('GET', KEYS[2]) or '0'
    local mine = {}
    for p = 0, tonumber(ARGV[4]) - 1 do
      local want = false
      if #live > 0 then want = live[(p % #live) + 1] end
      local owner = redis.call('HGET', KEYS[3], p)
      local epoch = redis.call('HGET', KEYS[4], p)
      if not want then
        if owner then redis.call('HDEL', KEYS[3], p) end
      elseif owner ~= want then
        epoch = redis.call('INCR', KEYS[5])
        redis.call('HSET', KEYS[3], p, want)
        redis.call('HSET', KEYS[4], p, epoch)
      end
      if want == me then
        mine[#mine + 1] = p
        mine[#mine + 1] = tonumber(epoch)
        mine[#mine + 1] = p
        mine[#mine + 1] = tonumber(epoch)
      end
    end
    return {tonumber(gen), tonumber(gen), mine}
    """)

    /// KEYS: generation, owners, committed, then the stream of each partition committed.
    /// ARGV: member, generation, Redis group, then per partition (in the order of the streams):
    /// partition, offset, exclusive upper bound of the IDs to acknowledge (`(0-(offset+1)`).
    /// Returns `OK`, or `STALE` and stores and acknowledges nothing.
    ///
    /// Acknowledges every entry still pending below each committed offset (`XPENDING` over the
    /// ID range, then `XACK`, in chunks), so a commit also settles entries delivered below the
    /// position after a seek forward. A group missing on a stream (deleted stream) has nothing
    /// pending: its error is ignored before anything is written.
    static let commit = RedisScript("streams.commit", """
    if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[2] then return 'STALE' end
    for i = 4, #ARGV, 3 do
      if redis.call('HGET', KEYS[2], ARGV[i]) ~= ARGV[1] then return 'STALE' end
    end
    local k = 4
    for i = 4, #ARGV, 3 do
      while true do
        local pending = redis.pcall('XPENDING', KEYS[k], ARGV[3], '-', ARGV[i + 2], 500)
        if type(pending) ~= 'table' or pending.err or #pending == 0 then break end
        local ids = {}
        for j = 1, #pending do ids[j] = pending[j][1] end
        redis.call('XACK', KEYS[k], ARGV[3], unpack(ids))
        if #pending < 500 then break end
      end
      k = k + 1
    end
    for i = 4, #ARGV, 3 do
      redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
    end
    return redis.status_reply('OK')
    """)
}
