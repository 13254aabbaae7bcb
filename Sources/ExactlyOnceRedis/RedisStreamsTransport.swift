import ExactlyOnce
import Logging
import Synchronization

/// A durable ``MessageTransport`` on Redis Streams: one stream per partition, Kafka-style
/// committed offsets per consumer group, and partition ownership decided in Redis, so members in
/// different processes split a topic and each partition has one owner at a time.
///
/// ## Design
/// - A record's offset is its position in the partition's stream: the entry ID is `0-(offset+1)`,
///   allocated with `INCR` in the same script as the `XADD`, so offsets are dense and ordered.
/// - Members heartbeat on every ``TransportSubscription/poll(maxRecords:)``; a member whose
///   session lapsed (``Configuration/sessionTimeout``) is dropped. Any membership change raises
///   the group's generation. Partitions go to the sorted live members round-robin; every change
///   of a partition's owner draws a new epoch from one `INCR` counter, so epochs only grow.
/// - Reads are `XRANGE` from the member's position; commits store the next offset to read,
///   refused with ``ExactlyOnceError/Code/staleGeneration`` unless the generation is current and
///   the member owns every partition committed.
///
/// Redis consumer groups (`XREADGROUP`/`XACK`/`XAUTOCLAIM`) are deliberately not used: the
/// contract needs re-reads from a committed offset and ``TransportSubscription/seek(_:to:)``,
/// which a pending-entries list does not give; committed offsets plus fencing epochs (which the
/// dedupe store checks) give the same recovery of a dead member's records.
///
/// Durability of published records follows Redis persistence (see Docs/Redis.md).
public final class RedisStreamsTransport: MessageTransport {
    /// Configuration of the transport.
    public struct Configuration: Sendable {
        /// How to reach Redis. Default: `127.0.0.1:6379`, database 0.
        public var redis: RedisConfiguration = .init()
        /// Prefix of every key the transport touches. Default: `"exactly-once-streams:"`.
        public var keyPrefix: String = "exactly-once-streams:"
        /// A member that has not polled for this long loses its partitions. Default: 10 seconds.
        public var sessionTimeout: Duration = .seconds(10)
        /// All defaults.
        public init() {}
        /// Defaults, reaching Redis as `redis`.
        public init(redis: RedisConfiguration) { self.redis = redis }
    }

    let client: RedisClient
    let configuration: Configuration
    let clock: any WallClock

    /// Creates a transport. No connection is made until the first operation.
    /// - Throws: ``ExactlyOnceError/Code/invalidConfiguration``.
    public init(configuration: Configuration = .init(), clock: any WallClock = SystemWallClock(),
                logger: Logger = Logger(label: "exactly-once.redis-streams", factory: { _ in SwiftLogNoOpLogHandler() })) throws {
        guard configuration.sessionTimeout > .zero else {
            throw ExactlyOnceError(.invalidConfiguration, "sessionTimeout must be positive")
        }
        self.client = try RedisClient(configuration: configuration.redis, logger: logger)
        self.configuration = configuration
        self.clock = clock
    }

    func topicKey(_ topic: String, _ suffix: String) -> [UInt8] { Array("\(configuration.keyPrefix)t:\(topic):\(suffix)".utf8) }

    /// Creates `topic` with `partitions` partitions; creating it again with the same count is a no-op.
    /// - Throws: ``ExactlyOnceError/Code/invalidConfiguration`` when it exists with another count.
    public func createTopic(_ topic: String, partitions: Int) async throws {
        guard partitions >= 1 else { throw ExactlyOnceError(.invalidConfiguration, "a topic needs at least one partition") }
        let key = topicKey(topic, "n")
        _ = try await client.command([Array("SET".utf8), key, Array(String(partitions).utf8), Array("NX".utf8)])
        let existing = try await partitionCount(of: topic)
        guard existing == partitions else {
            throw ExactlyOnceError(.invalidConfiguration, "topic \(topic) exists with \(existing) partitions, not \(partitions)")
        }
    }

    /// The number of partitions of `topic`.
    /// - Throws: ``ExactlyOnceError/Code/transportFailure`` for an unknown topic.
    public func partitionCount(of topic: String) async throws -> Int {
        let reply = try await client.command([Array("GET".utf8), topicKey(topic, "n")])
        if reply == .null { throw ExactlyOnceError(.transportFailure, "unknown topic \(topic)") }
        let n = try ReplyDecoding.int64(reply, "partition count")
        guard n >= 1, let count = Int(exactly: n) else { throw ReplyDecoding.unexpected("partition count", reply) }
        return count
    }

    /// Appends `record` to its partition's stream (one script: offset allocation and `XADD`).
    public func publish(_ record: OutgoingRecord, to topic: String, partitioning: Partitioning) async throws -> RecordPosition {
        let count = try await partitionCount(of: topic)
        let p = try partitioning.resolve(key: record.key, partitionCount: count)
        var args: [[UInt8]] = [Array("p".utf8), record.payload]
        if let key = record.key {
            args.append(Array("k".utf8))
            args.append(key)
        }
        for (name, value) in record.headers.sorted(by: { $0.key < $1.key }) {
            args.append(Array("h:\(name)".utf8))
            args.append(Array(value.utf8))
        }
        let keys = [topicKey(topic, "\(p.rawValue):seq"), topicKey(topic, "\(p.rawValue)")]
        let reply = try await client.command([Array("EVAL".utf8), StreamScripts.publish.body, [UInt8(ascii: "2")]] + keys + args)
        let offset = try ReplyDecoding.int64(reply, "publish")
        guard offset >= 0 else { throw ReplyDecoding.unexpected("publish", reply) }
        return RecordPosition(partition: p, offset: Offset(offset))
    }

    /// Whether `group` has committed every partition of `topic` to its end (no lag), for
    /// operations and tests. Reads Redis only; does not join the group.
    public func isFullyCommitted(group: String, topic: String) async throws -> Bool {
        let count = try await partitionCount(of: topic)
        let committedKey = Array("\(configuration.keyPrefix)g:\(group):\(topic):committed".utf8)
        var commands: [[[UInt8]]] = []
        for p in 0..<count {
            commands.append([Array("GET".utf8), topicKey(topic, "\(p):seq")])
            commands.append([Array("HGET".utf8), committedKey, Array(String(p).utf8)])
        }
        let replies = try await client.pipeline(commands)
        for p in 0..<count {
            let end = replies[2 * p] == .null ? 0 : try ReplyDecoding.int64(replies[2 * p], "end offset")
            let committed = replies[2 * p + 1] == .null ? 0 : try ReplyDecoding.int64(replies[2 * p + 1], "committed offset")
            if committed < end { return false }
        }
        return true
    }

    /// Joins `group` on `topic` as `memberID` (the group rebalances at once).
    public func subscribe(topic: String, group: String, memberID: String) async throws -> RedisStreamsSubscription {
        let count = try await partitionCount(of: topic)
        let subscription = RedisStreamsSubscription(transport: self, topic: topic, group: group, memberID: memberID, partitions: count)
        try await subscription.ensureGroups()
        _ = try await subscription.heartbeat(leaving: false)
        return subscription
    }
}

/// One member of a consumer group on a ``RedisStreamsTransport``.
public final class RedisStreamsSubscription: TransportSubscription {
    /// The member id.
    public let memberID: String
    private let transport: RedisStreamsTransport
    private let topic: String
    private let partitions: Int
    private let groupKeys: [[UInt8]]
    private let committedKey: [UInt8]
    /// The Redis consumer group (one per partition stream) has the transport group's name.
    private let groupName: [UInt8]

    private struct State {
        var assignment: [PartitionID: UInt64] = [:]
        /// The next offset to hand out, per owned partition.
        var positions: [PartitionID: Offset] = [:]
        /// Partitions whose pending entries (delivered to the group, not acknowledged) are
        /// being taken over with `XAUTOCLAIM` before new entries are read.
        var recovering: Set<PartitionID> = []
        /// One past the highest offset this subscription received from the group, per
        /// partition: below it, re-reads after a seek use `XRANGE`.
        var delivered: [PartitionID: Offset] = [:]
        var closed = false
    }

    /// How one partition is read in one poll.
    private enum ReadMode { case claimPending, readNew, reread(until: Offset) }
    private let state = Mutex(State())

    init(transport: RedisStreamsTransport, topic: String, group: String, memberID: String, partitions: Int) {
        self.transport = transport
        self.topic = topic
        self.memberID = memberID
        self.partitions = partitions
        let base = "\(transport.configuration.keyPrefix)g:\(group):\(topic):"
        // members, generation, owners, owner epochs, epoch counter
        self.groupKeys = ["members", "gen", "owners", "epochs", "epoch"].map { Array((base + $0).utf8) }
        self.committedKey = Array((base + "committed").utf8)
        self.groupName = Array(group.utf8)
    }

    /// Creates the Redis consumer group on every partition stream (`XGROUP CREATE ... 0
    /// MKSTREAM`); an existing group is left as it is.
    func ensureGroups() async throws {
        let replies = try await transport.client.pipeline((0..<partitions).map { p in
            [Array("XGROUP".utf8), Array("CREATE".utf8), transport.topicKey(topic, "\(p)"), groupName, Array("0".utf8), Array("MKSTREAM".utf8)]
        })
        for reply in replies {
            if case .error(let e) = reply, !e.hasPrefix("BUSYGROUP") { throw ReplyDecoding.unexpected("XGROUP CREATE", reply) }
        }
    }

    /// Renews this member's session, rebalances if membership changed, and returns the
    /// generation and this member's partitions with their epochs.
    func heartbeat(leaving: Bool) async throws -> (UInt64, [PartitionID: UInt64]) {
        let now = transport.clock.now()
        let args: [[UInt8]] = [
            Array(String(now.milliseconds).utf8), Array(memberID.utf8),
            Array(String(now.advanced(by: transport.configuration.sessionTimeout).milliseconds).utf8),
            Array(String(partitions).utf8), Array((leaving ? "1" : "0").utf8),
        ]
        let reply = try await transport.client.command([Array("EVAL".utf8), StreamScripts.heartbeat.body, Array("5".utf8)] + groupKeys + args)
        let parts = try ReplyDecoding.array(reply, "heartbeat", count: 2)
        let generation = try ReplyDecoding.uint64(parts[0], "generation")
        let owned = try ReplyDecoding.array(parts[1], "assignment")
        guard owned.count % 2 == 0 else { throw ReplyDecoding.unexpected("assignment", reply) }
        var assignment: [PartitionID: UInt64] = [:]
        for i in stride(from: 0, to: owned.count, by: 2) {
            let p = try ReplyDecoding.int64(owned[i], "partition")
            guard p >= 0, p < Int64(partitions) else { throw ReplyDecoding.unexpected("assignment", reply) }
            assignment[PartitionID(Int(p))] = try ReplyDecoding.uint64(owned[i + 1], "epoch")
        }
        return (generation, assignment)
    }

    private func ensureOpen() throws {
        if state.withLock({ $0.closed }) { throw ExactlyOnceError(.shutDown, "subscription of \(memberID) is closed") }
    }

    /// Heartbeats, takes the current assignment, and reads up to `maxRecords` records.
    public func poll(maxRecords: Int) async throws -> PollResult {
        try ensureOpen()
        let (generation, assignment) = try await heartbeat(leaving: false)
        // Newly assigned partitions (or ones that came back with a new epoch) start from the
        // committed offset.
        let fresh = state.withLock { s in assignment.filter { s.assignment[$0.key] != $0.value }.map(\.key) }
        var committed: [PartitionID: Offset] = [:]
        if !fresh.isEmpty {
            let replies = try await transport.client.pipeline(fresh.map { [Array("HGET".utf8), committedKey, Array(String($0.rawValue).utf8)] })
            for (p, reply) in zip(fresh, replies) where reply != .null {
                committed[p] = Offset(try ReplyDecoding.int64(reply, "committed offset"))
            }
        }
        let plan: [(PartitionID, Offset, ReadMode)] = state.withLock { s in
            s.assignment = assignment
            s.positions = s.positions.filter { assignment[$0.key] != nil }
            s.recovering = s.recovering.filter { assignment[$0] != nil }
            s.delivered = s.delivered.filter { assignment[$0.key] != nil }
            for p in fresh {
                s.positions[p] = committed[p] ?? Offset(0)
                s.recovering.insert(p)
                s.delivered[p] = nil
            }
            return s.positions.keys.sorted().map { p in
                let pos = s.positions[p]!
                if s.recovering.contains(p) { return (p, pos, .claimPending) }
                if let d = s.delivered[p], pos < d { return (p, pos, .reread(until: d)) }
                return (p, pos, .readNew)
            }
        }
        let perPartition = max(1, maxRecords / max(1, plan.count))
        let count = Array(String(perPartition).utf8)
        var records: [ConsumedRecord] = []
        var endOffsets: [PartitionID: Offset] = [:]
        var next: [PartitionID: Offset] = [:]
        var receivedUpTo: [PartitionID: Offset] = [:]
        var doneRecovering: Set<PartitionID> = []
        var gaps: Set<PartitionID> = []
        var round = plan
        // Round 1 reads every owned partition; a partition whose recovery found nothing pending
        // reads new entries in round 2 of the same poll.
        while !round.isEmpty {
            var commands: [[[UInt8]]] = []
            for (p, pos, mode) in round {
                let stream = transport.topicKey(topic, "\(p.rawValue)")
                switch mode {
                case .claimPending:
                    // Take over what earlier owners received but did not commit, from our
                    // position on. Min idle 0: ownership was already decided (lease and epoch in
                    // Redis); a zombie's later commit is refused and its store operations fenced.
                    commands.append([Array("XAUTOCLAIM".utf8), stream, groupName, Array(memberID.utf8), Array("0".utf8),
                                     Array("0-\(pos.rawValue + 1)".utf8), Array("COUNT".utf8), count])
                case .readNew:
                    commands.append([Array("XREADGROUP".utf8), Array("GROUP".utf8), groupName, Array(memberID.utf8),
                                     Array("COUNT".utf8), count, Array("STREAMS".utf8), stream, Array(">".utf8)])
                case .reread(let until):
                    commands.append([Array("XRANGE".utf8), stream, Array("0-\(pos.rawValue + 1)".utf8), Array("0-\(until.rawValue)".utf8),
                                     Array("COUNT".utf8), count])
                }
                commands.append([Array("GET".utf8), transport.topicKey(topic, "\(p.rawValue):seq")])
            }
            let replies = try await transport.client.pipeline(commands)
            if replies.contains(where: { if case .error(let e) = $0 { e.hasPrefix("NOGROUP") } else { false } }) {
                // A stream or its consumer group was deleted behind our back (FLUSHDB, a
                // restore): recreate the groups; the next poll reads again from the committed offsets.
                try await ensureGroups()
                state.withLock { s in for p in s.assignment.keys { s.recovering.insert(p) } }
                throw ExactlyOnceError(.transportFailure, "the consumer group of \(topic) was missing in Redis and was recreated")
            }
            var again: [(PartitionID, Offset, ReadMode)] = []
            for (i, (p, pos, mode)) in round.enumerated() {
                let entries: [RedisReply]
                switch mode {
                case .claimPending:
                    // Redis 7: [next cursor, [entries], [deleted ids]]; 6.2: [cursor, [entries]].
                    let parts = try ReplyDecoding.array(replies[2 * i], "XAUTOCLAIM", atLeast: 2)
                    entries = try ReplyDecoding.array(parts[1], "XAUTOCLAIM entries")
                    // Nothing pending from our position on: what follows was never delivered.
                    if entries.allSatisfy({ $0 == .null }) {
                        doneRecovering.insert(p)
                        again.append((p, pos, .readNew))
                    }
                case .readNew:
                    if replies[2 * i] == .null {
                        entries = []
                    } else {
                        let streams = try ReplyDecoding.array(replies[2 * i], "XREADGROUP", count: 1)
                        entries = try ReplyDecoding.array(try ReplyDecoding.array(streams[0], "XREADGROUP stream", count: 2)[1], "XREADGROUP entries")
                    }
                case .reread:
                    entries = try ReplyDecoding.array(replies[2 * i], "XRANGE")
                }
                var expected = pos
                for entry in entries where entry != .null {
                    let record = try Self.decodeEntry(entry, topic: topic, partition: p)
                    if case .reread = mode {} else {
                        // Received from the group (pending under our name until committed).
                        receivedUpTo[p] = max(receivedUpTo[p] ?? Offset(0), record.offset.next)
                    }
                    if record.offset < expected { continue }  // below a forward seek: skipped
                    if record.offset > expected, case .readNew = mode {
                        // Another member (one that lost the partition while reading) received the
                        // entries in between: they are pending under its name. Claim them before
                        // going on; the entries read here stay pending under ours.
                        gaps.insert(p)
                        break
                    }
                    // (After XAUTOCLAIM or XRANGE a jump means entries were deleted or trimmed.)
                    records.append(record)
                    expected = record.offset.next
                    next[p] = expected
                }
                endOffsets[p] = Offset(replies[2 * i + 1] == .null ? 0 : try ReplyDecoding.int64(replies[2 * i + 1], "end offset"))
            }
            round = again
        }
        // Records of a partition handed out in this poll must be contiguous from its position.
        if !gaps.isEmpty {
            records.removeAll { gaps.contains($0.partition) && $0.offset >= (next[$0.partition] ?? Offset(0)) }
        }
        state.withLock { s in
            for (p, o) in next where s.assignment[p] != nil { s.positions[p] = o }
            for (p, o) in receivedUpTo where s.assignment[p] != nil { s.delivered[p] = max(s.delivered[p] ?? Offset(0), o) }
            for p in doneRecovering { s.recovering.remove(p) }
            for p in gaps where s.assignment[p] != nil { s.recovering.insert(p) }
        }
        return PollResult(generation: generation, assignment: assignment, records: records, endOffsets: endOffsets)
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
        for i in stride(from: 0, to: fields.count, by: 2) {
            let name = try ReplyDecoding.text(fields[i], "stream field")
            let value = try ReplyDecoding.bytes(fields[i + 1], "stream value")
            switch name {
            case "p": payload = value
            case "k": key = value
            default:
                if name.hasPrefix("h:") { headers[String(name.dropFirst(2))] = String(decoding: value, as: UTF8.self) }
            }
        }
        guard let payload else { throw ReplyDecoding.unexpected("stream entry without payload", entry) }
        return ConsumedRecord(topic: topic, partition: partition, offset: Offset(seq - 1), key: key, payload: payload, headers: headers)
    }

    /// Stores committed offsets atomically, or throws ``ExactlyOnceError/Code/staleGeneration``.
    public func commit(_ offsets: [PartitionID: Offset], generation: UInt64) async throws {
        if offsets.isEmpty { return }
        var args: [[UInt8]] = [Array(memberID.utf8), Array(String(generation).utf8), groupName]
        var keys = [groupKeys[1], groupKeys[2], committedKey]
        for (p, o) in offsets.sorted(by: { $0.key < $1.key }) {
            args.append(Array(String(p.rawValue).utf8))
            args.append(Array(String(o.rawValue).utf8))
            keys.append(transport.topicKey(topic, "\(p.rawValue)"))
        }
        let reply = try await transport.client.command([Array("EVAL".utf8), StreamScripts.commit.body, Array(String(keys.count).utf8)] + keys + args)
        switch reply {
        case .status("OK"): return
        case .string(let b) where b == Array("STALE".utf8):
            throw ExactlyOnceError(.staleGeneration, "member \(memberID) with generation \(generation) no longer owns the partitions it commits")
        default:
            throw ReplyDecoding.unexpected("commit", reply)
        }
    }

    /// Moves this member's read position of an owned partition.
    public func seek(_ partition: PartitionID, to offset: Offset) async throws {
        try ensureOpen()
        try state.withLock { s in
            guard s.assignment[partition] != nil else {
                throw ExactlyOnceError(.staleGeneration, "member \(memberID) does not own partition \(partition)")
            }
            s.positions[partition] = offset
        }
    }

    /// The group's committed offset of `partition`, if any.
    public func committedOffset(_ partition: PartitionID) async throws -> Offset? {
        let reply = try await transport.client.command([Array("HGET".utf8), committedKey, Array(String(partition.rawValue).utf8)])
        return reply == .null ? nil : Offset(try ReplyDecoding.int64(reply, "committed offset"))
    }

    /// Leaves the group; its partitions move to the remaining members at once.
    public func close() async throws {
        let wasOpen = state.withLock { s in
            defer { s.closed = true; s.assignment = [:]; s.positions = [:] }
            return !s.closed
        }
        if wasOpen { _ = try await heartbeat(leaving: true) }
    }
}

/// The transport's scripts (run with `EVAL`; they are small and called once per poll or publish).
enum StreamScripts {
    /// KEYS: sequence counter, stream. ARGV: field/value pairs. Returns the new record's offset.
    static let publish = RedisScript("""
    local n = redis.call('INCR', KEYS[1])
    redis.call('XADD', KEYS[2], '0-' .. n, unpack(ARGV))
    return n - 1
    """)

    /// KEYS: members, generation, owners, owner epochs, epoch counter.
    /// ARGV: now, member, session end, partition count, leaving (1/0).
    /// Returns `{generation, {partition, epoch, ...}}` for this member.
    static let heartbeat = RedisScript("""
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
      end
    end
    return {tonumber(gen), mine}
    """)

    /// KEYS: generation, owners, committed, then the stream of each committed partition.
    /// ARGV: member, generation, consumer group, then partition/offset pairs.
    /// Stores the offsets and acknowledges (`XACK`) every pending entry below them, or returns
    /// `STALE` and does nothing.
    static let commit = RedisScript("""
    if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[2] then return 'STALE' end
    for i = 4, #ARGV, 2 do
      if redis.call('HGET', KEYS[2], ARGV[i]) ~= ARGV[1] then return 'STALE' end
    end
    local k = 4
    for i = 4, #ARGV, 2 do
      redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
      local upto = tonumber(ARGV[i + 1])
      if upto > 0 then
        while true do
          local pending = redis.call('XPENDING', KEYS[k], ARGV[3], '-', '0-' .. upto, 1000)
          if #pending == 0 then break end
          local ids = {}
          for j = 1, #pending do ids[j] = pending[j][1] end
          redis.call('XACK', KEYS[k], ARGV[3], unpack(ids))
          if #pending < 1000 then break end
        end
      end
      k = k + 1
    end
    return redis.status_reply('OK')
    """)
}
