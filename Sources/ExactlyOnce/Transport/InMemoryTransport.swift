import Synchronization

/// The embedded default transport: partitioned topics, consumer groups, committed offsets and
/// redelivery, all in process memory behind one lock.
///
/// - Partitions are assigned round-robin over the sorted member ids; a partition's epoch is
///   the group generation at which it last changed owner.
/// - Members that do not poll within ``Configuration/sessionTimeout`` (by the injected clock) are
///   expelled on the next group operation, as Kafka expels a member whose session lapsed.
/// - Deterministic: no background tasks, no timers; the same sequence of calls with the same
///   clock gives the same results, which is what the simulator relies on. A poll with a
///   positive `maxWait` and nothing to read waits (in real time) until a record is published to
///   the topic or the wait is over.
/// - Every instance is its own fencing scope (``TransportSubscription/fencingScope`` names a
///   random instance id), so its epochs, which start at 1, never meet another instance's in a
///   durable store.
public final class InMemoryTransport: MessageTransport {
    /// Configuration of the in-memory transport.
    public struct Configuration: Sendable {
        /// A member that has not polled for this long is expelled. Default: 30 seconds.
        public var sessionTimeout: Duration = .seconds(30)
        /// All defaults.
        public init() {}
    }

    struct StoredRecord: Sendable {
        var key: [UInt8]?
        var payload: [UInt8]
        var headers: [String: String]
    }

    struct Member: Sendable {
        var lastSeen: Timestamp
        var knownGeneration: UInt64 = 0
        var positions: [PartitionID: Int64] = [:]
    }

    struct Group: Sendable {
        var topic: String
        var generation: UInt64 = 0
        var members: [String: Member] = [:]
        var owner: [PartitionID: String] = [:]
        var epochs: [PartitionID: UInt64] = [:]
        var committed: [PartitionID: Int64] = [:]
    }

    struct State: Sendable {
        var topics: [String: [[StoredRecord]]] = [:]
        var groups: [String: Group] = [:]
        var delivered = 0
    }

    private let state = Mutex(State())
    let clock: any WallClock
    let configuration: Configuration
    let signal = PublishSignal()
    /// Identifies this instance in fencing scopes.
    let instanceID: String

    /// Creates a transport with `topics` (name to partition count).
    /// - Throws: ``ExactlyOnceError/Code/invalidPartition`` for a partition count below 1,
    ///   ``ExactlyOnceError/Code/invalidConfiguration`` for an empty topic name.
    public init(topics: [String: Int], configuration: Configuration = .init(), clock: any WallClock = SystemWallClock()) throws {
        self.clock = clock
        self.configuration = configuration
        var g = SystemRandomNumberGenerator()
        self.instanceID = String(g.next() as UInt64, radix: 16)
        for (name, count) in topics { try createTopic(name, partitions: count) }
    }

    /// Creates a topic (idempotent for the same partition count).
    /// - Throws: ``ExactlyOnceError/Code/invalidConfiguration`` when it exists with another count.
    public func createTopic(_ name: String, partitions: Int) throws {
        try validatePartitionCount(partitions)
        guard !name.isEmpty else { throw ExactlyOnceError(.invalidConfiguration, "topic name is empty") }
        try state.withLock { s in
            if let existing = s.topics[name] {
                guard existing.count == partitions else {
                    throw ExactlyOnceError(.invalidConfiguration, "topic \(name) exists with \(existing.count) partitions")
                }
                return
            }
            s.topics[name] = Array(repeating: [], count: partitions)
        }
    }

    static func unknownTopic(_ topic: String) -> ExactlyOnceError {
        ExactlyOnceError(.unknownTopic, "unknown topic \(topic)")
    }

    public func partitionCount(of topic: String) async throws -> Int {
        try state.withLock { s in
            guard let t = s.topics[topic] else { throw Self.unknownTopic(topic) }
            return t.count
        }
    }

    public func publish(_ record: OutgoingRecord, to topic: String, partitioning: Partitioning) async throws -> RecordPosition {
        try publishSync(record, to: topic, partitioning: partitioning)
    }

    /// Publishes the whole batch under one lock: every record is accepted, or (for input that
    /// cannot be published) none.
    public func publish(_ records: [OutgoingRecord], to topic: String, partitioning: Partitioning) async throws -> PublishReport {
        let positions: [RecordPosition?] = try state.withLock { s in
            guard let count = s.topics[topic]?.count else { throw Self.unknownTopic(topic) }
            let partitions = try records.map { try partitioning.resolve(key: $0.key, partitionCount: count) }
            var out: [RecordPosition?] = []
            out.reserveCapacity(records.count)
            for (r, p) in zip(records, partitions) {
                let offset = Int64(s.topics[topic]![p.rawValue].count)
                s.topics[topic]![p.rawValue].append(StoredRecord(key: r.key, payload: r.payload, headers: r.headers))
                out.append(RecordPosition(partition: p, offset: Offset(offset)))
            }
            return out
        }
        if !records.isEmpty { signal.bump(topic) }
        return PublishReport(positions: positions, failure: nil)
    }

    /// Synchronous publish (the in-memory transport never suspends); the simulator's path.
    package func publishSync(_ record: OutgoingRecord, to topic: String, partitioning: Partitioning) throws -> RecordPosition {
        let position = try state.withLock { s in
            guard s.topics[topic] != nil else { throw Self.unknownTopic(topic) }
            let p = try partitioning.resolve(key: record.key, partitionCount: s.topics[topic]!.count)
            let offset = Int64(s.topics[topic]![p.rawValue].count)
            s.topics[topic]![p.rawValue].append(StoredRecord(key: record.key, payload: record.payload, headers: record.headers))
            return RecordPosition(partition: p, offset: Offset(offset))
        }
        signal.bump(topic)
        return position
    }

    /// All records of a topic partition (inspection, dead-letter audits).
    public func records(topic: String, partition: PartitionID) -> [ConsumedRecord] {
        state.withLock { s in
            guard let t = s.topics[topic], partition.rawValue >= 0, partition.rawValue < t.count else { return [] }
            return t[partition.rawValue].enumerated().map { i, r in
                ConsumedRecord(topic: topic, partition: partition, offset: Offset(Int64(i)), key: r.key, payload: r.payload, headers: r.headers)
            }
        }
    }

    public func read(topic: String, partition: PartitionID, from offset: Offset, maxRecords: Int) async throws -> [ConsumedRecord] {
        try state.withLock { s in
            guard let t = s.topics[topic] else { throw Self.unknownTopic(topic) }
            guard partition.rawValue >= 0, partition.rawValue < t.count else {
                throw ExactlyOnceError(.invalidPartition, "partition \(partition) is outside 0..<\(t.count)")
            }
            let log = t[partition.rawValue]
            let start = Int(min(max(0, offset.rawValue), Int64(log.count)))
            let end = min(log.count, start + max(0, maxRecords))
            return (start..<end).map { i in
                ConsumedRecord(topic: topic, partition: partition, offset: Offset(Int64(i)), key: log[i].key, payload: log[i].payload, headers: log[i].headers)
            }
        }
    }

    /// The end offset (number of records) of each partition of `topic`.
    public func endOffsets(topic: String) -> [PartitionID: Offset] {
        state.withLock { s in
            var out: [PartitionID: Offset] = [:]
            for (i, p) in (s.topics[topic] ?? []).enumerated() { out[PartitionID(i)] = Offset(Int64(p.count)) }
            return out
        }
    }

    /// The committed offsets of `group` on `topic`.
    public func committedOffsets(group: String, topic: String) -> [PartitionID: Offset] {
        state.withLock { s in
            (s.groups[Self.groupKey(group, topic)]?.committed ?? [:]).mapValues { Offset($0) }
        }
    }

    public func partitionStatus(group: String, topic: String) async throws -> [PartitionStatus] {
        try state.withLock { s in
            guard let t = s.topics[topic] else { throw Self.unknownTopic(topic) }
            let g = s.groups[Self.groupKey(group, topic)]
            return t.indices.map { i in
                let p = PartitionID(i)
                let committed = g?.committed[p].map(Offset.init)
                let end = Int64(t[i].count)
                return PartitionStatus(partition: p, committed: committed, end: Offset(end), lag: max(0, end - (committed?.rawValue ?? 0)),
                                       owner: g?.owner[p], epoch: g?.owner[p] == nil ? nil : g?.epochs[p])
            }
        }
    }

    /// Whether every partition of `topic` is committed to its end by `group`.
    public func isFullyCommitted(group: String, topic: String) -> Bool {
        let ends = endOffsets(topic: topic)
        let committed = committedOffsets(group: group, topic: topic)
        return ends.allSatisfy { p, end in end.rawValue == 0 || (committed[p] ?? Offset(0)) >= end }
    }

    /// Records handed out by polls so far, over all groups (redeliveries counted each time).
    public var deliveredRecords: Int { state.withLock { $0.delivered } }

    /// Removes a member as if its session lapsed (a crash): no commit, partitions move at once.
    /// The simulator's and the demo's way to kill a member.
    package func expel(memberID: String, group: String, topic: String) {
        state.withLock { s in
            let key = Self.groupKey(group, topic)
            guard var g = s.groups[key], g.members[memberID] != nil else { return }
            g.members[memberID] = nil
            Self.rebalance(&g, partitionCount: s.topics[topic]?.count ?? 0)
            s.groups[key] = g
        }
    }

    /// Current owner of each partition of `group` on `topic`, with its epoch.
    public func assignment(group: String, topic: String) -> [PartitionID: (member: String, epoch: UInt64)] {
        state.withLock { s in
            guard let g = s.groups[Self.groupKey(group, topic)] else { return [:] }
            var out: [PartitionID: (member: String, epoch: UInt64)] = [:]
            for (p, m) in g.owner { out[p] = (m, g.epochs[p] ?? 0) }
            return out
        }
    }

    public func subscribe(topic: String, group: String, memberID: String) async throws -> Subscription {
        guard !group.isEmpty, !memberID.isEmpty else {
            throw ExactlyOnceError(.invalidConfiguration, "group and member id must not be empty")
        }
        let now = clock.now()
        try state.withLock { s in
            guard let t = s.topics[topic] else { throw Self.unknownTopic(topic) }
            let key = Self.groupKey(group, topic)
            var g = s.groups[key] ?? Group(topic: topic)
            Self.expireSessions(&g, now: now, timeout: configuration.sessionTimeout, partitionCount: t.count)
            g.members[memberID] = Member(lastSeen: now)
            Self.rebalance(&g, partitionCount: t.count)
            s.groups[key] = g
        }
        return Subscription(transport: self, topic: topic, group: group, memberID: memberID)
    }

    static func groupKey(_ group: String, _ topic: String) -> String { "\(group)\u{1}\(topic)" }

    static func expireSessions(_ g: inout Group, now: Timestamp, timeout: Duration, partitionCount: Int) {
        let dead = g.members.filter { now >= $0.value.lastSeen.advanced(by: timeout) }.map(\.key)
        guard !dead.isEmpty else { return }
        for m in dead { g.members[m] = nil }
        rebalance(&g, partitionCount: partitionCount)
    }

    static func rebalance(_ g: inout Group, partitionCount: Int) {
        g.generation += 1
        let members = g.members.keys.sorted()
        var newOwner: [PartitionID: String] = [:]
        if !members.isEmpty {
            for p in 0..<partitionCount { newOwner[PartitionID(p)] = members[p % members.count] }
        }
        for p in 0..<partitionCount {
            let pid = PartitionID(p)
            let before = g.owner[pid]
            let after = newOwner[pid]
            if before != after {
                if let before, g.members[before] != nil { g.members[before]!.positions[pid] = nil }
                if let after {
                    g.epochs[pid] = g.generation
                    g.members[after]!.positions[pid] = g.committed[pid] ?? 0
                }
            }
        }
        g.owner = newOwner
    }

    /// A member of a consumer group on the in-memory transport.
    public struct Subscription: TransportSubscription {
        let transport: InMemoryTransport
        let topic: String
        let group: String
        /// The member id.
        public let memberID: String

        private var key: String { InMemoryTransport.groupKey(group, topic) }

        /// `memory:<instance>/<group>/<topic>`: epochs of this instance only.
        public var fencingScope: String { "memory:\(transport.instanceID)/\(group)/\(topic)" }

        public func poll(maxRecords: Int, maxWait: Duration) async throws -> PollResult {
            let seen = transport.signal.version(topic)
            let (first, settled) = try pollNow(maxRecords: maxRecords)
            guard first.records.isEmpty, settled, maxWait > .zero else { return first }
            await transport.signal.wait(topic, after: seen, timeout: maxWait)
            return try pollNow(maxRecords: maxRecords).0
        }

        /// Synchronous poll (never waits); the simulator's path.
        package func pollSync(maxRecords: Int) throws -> PollResult { try pollNow(maxRecords: maxRecords).0 }

        /// Polls once; `settled` is false when the poll only took a new assignment.
        private func pollNow(maxRecords: Int) throws -> (PollResult, settled: Bool) {
            let now = transport.clock.now()
            let timeout = transport.configuration.sessionTimeout
            return try transport.state.withLock { s in
                guard let partitions = s.topics[topic], var g = s.groups[key] else {
                    throw InMemoryTransport.unknownTopic(topic)
                }
                InMemoryTransport.expireSessions(&g, now: now, timeout: timeout, partitionCount: partitions.count)
                guard var me = g.members[memberID] else {
                    s.groups[key] = g
                    throw ExactlyOnceError(.staleGeneration, "member \(memberID) is not in group \(group) (expelled or closed)")
                }
                me.lastSeen = now
                var assignment: [PartitionID: UInt64] = [:]
                var ends: [PartitionID: Offset] = [:]
                for (p, owner) in g.owner where owner == memberID {
                    assignment[p] = g.epochs[p] ?? 0
                    ends[p] = Offset(Int64(partitions[p.rawValue].count))
                }
                var records: [ConsumedRecord] = []
                let settled = me.knownGeneration == g.generation
                if settled {
                    let owned = assignment.keys.sorted()
                    let budget = max(1, maxRecords)
                    let share = max(1, budget / max(1, owned.count))
                    for p in owned where records.count < budget {
                        let log = partitions[p.rawValue]
                        let start = Int(me.positions[p] ?? 0)
                        let end = min(log.count, start + min(share, budget - records.count))
                        guard start < end else { continue }
                        records.reserveCapacity(records.count + end - start)
                        for i in start..<end {
                            let r = log[i]
                            records.append(ConsumedRecord(topic: topic, partition: p, offset: Offset(Int64(i)), key: r.key, payload: r.payload, headers: r.headers))
                        }
                        me.positions[p] = Int64(end)
                    }
                    s.delivered += records.count
                } else {
                    me.knownGeneration = g.generation
                }
                g.members[memberID] = me
                s.groups[key] = g
                return (PollResult(generation: g.generation, assignment: assignment, records: records, endOffsets: ends), settled)
            }
        }

        public func commit(_ offsets: [PartitionID: Offset], generation: UInt64) async throws {
            try transport.state.withLock { s in
                guard var g = s.groups[key], g.members[memberID] != nil else {
                    throw ExactlyOnceError(.staleGeneration, "member \(memberID) is not in group \(group)")
                }
                for (p, _) in offsets {
                    guard g.owner[p] == memberID, generation >= (g.epochs[p] ?? 0) else {
                        throw ExactlyOnceError(.staleGeneration, "member \(memberID) does not own partition \(p) in generation \(generation)")
                    }
                }
                for (p, o) in offsets where o.rawValue > (g.committed[p] ?? 0) { g.committed[p] = o.rawValue }
                s.groups[key] = g
            }
        }

        public func seek(_ partition: PartitionID, to offset: Offset) async throws {
            transport.state.withLock { s in
                guard var g = s.groups[key], g.owner[partition] == memberID, g.members[memberID] != nil else { return }
                g.members[memberID]!.positions[partition] = max(0, offset.rawValue)
                s.groups[key] = g
            }
        }

        public func committedOffset(_ partition: PartitionID) async throws -> Offset? {
            transport.state.withLock { s in s.groups[key]?.committed[partition].map(Offset.init) }
        }

        public func close() async throws {
            transport.expel(memberID: memberID, group: group, topic: topic)
        }
    }
}

/// Wakes polls that wait for records: a version per topic, bumped on every publish, and the
/// waiters registered against it. Waits end on a publish, on their timeout, or on cancellation.
final class PublishSignal: Sendable {
    private struct Waiter {
        var topic: String
        var continuation: CheckedContinuation<Void, Never>
    }
    private struct State {
        var versions: [String: UInt64] = [:]
        var waiters: [UInt64: Waiter] = [:]
        var nextID: UInt64 = 0
    }
    private let state = Mutex(State())

    func version(_ topic: String) -> UInt64 { state.withLock { $0.versions[topic] ?? 0 } }

    func bump(_ topic: String) {
        let woken: [CheckedContinuation<Void, Never>] = state.withLock { s in
            s.versions[topic, default: 0] &+= 1
            let ids = s.waiters.filter { $0.value.topic == topic }.map(\.key)
            return ids.compactMap { s.waiters.removeValue(forKey: $0)?.continuation }
        }
        for c in woken { c.resume() }
    }

    /// Waits until `topic`'s version moves past `seen`, `timeout` passes, or the task is cancelled.
    func wait(_ topic: String, after seen: UInt64, timeout: Duration) async {
        let id: UInt64 = state.withLock { s in
            s.nextID &+= 1
            return s.nextID
        }
        await withTaskGroup(of: Void.self) { group in
            group.addTask { [self] in
                await withTaskCancellationHandler {
                    await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                        let resumeNow: Bool = state.withLock { s in
                            if (s.versions[topic] ?? 0) != seen || Task.isCancelled { return true }
                            s.waiters[id] = Waiter(topic: topic, continuation: c)
                            return false
                        }
                        if resumeNow { c.resume() }
                    }
                } onCancel: {
                    let c = state.withLock { $0.waiters.removeValue(forKey: id)?.continuation }
                    c?.resume()
                }
            }
            group.addTask { try? await Task.sleep(for: timeout) }
            await group.next()
            group.cancelAll()
        }
    }
}
