import CRdKafka
import Dispatch
import ExactlyOnce
import Foundation
import Synchronization

/// librdkafka's rebalance callback: runs inside a poll, on the subscription's queue.
private let rebalanceCallback: @convention(c) (OpaquePointer?, rd_kafka_resp_err_t, UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?, UnsafeMutableRawPointer?) -> Void = { rk, err, partitions, opaque in
    guard let opaque, let rk else { return }
    let core = Unmanaged<ConsumerCore>.fromOpaque(opaque).takeUnretainedValue()
    core.rebalance(rk, err, partitions)
}

/// The state of one consumer, touched only on its serial queue (and in the rebalance callback,
/// which librdkafka runs inside a poll on that queue).
final class ConsumerCore: @unchecked Sendable {
    let topic: String
    let group: String
    let memberID: String
    let configuration: KafkaTransport.Configuration
    var handle: KafkaHandle?
    /// Partition to epoch (the generation it was assigned in).
    var assignment: [PartitionID: UInt64] = [:]
    /// The offset after the last record handed out, per assigned partition.
    var delivered: [PartitionID: Int64] = [:]
    /// Commits the broker refused or did not answer, retried while the partition stays ours.
    var pending: [PartitionID: (offset: Int64, epoch: UInt64)] = [:]
    /// The highest offset this member committed, per assigned partition.
    var committed: [PartitionID: Int64] = [:]
    /// The last generation this member was part of (librdkafka's generation when it had one).
    /// It is not reset while librdkafka has none: librdkafka before 2.8.3 forgets its generation
    /// when a commit is answered ILLEGAL_GENERATION during a rejoin (confluentinc/librdkafka#4059),
    /// and a cooperative member keeps its partitions, at their epochs, through that rejoin; what
    /// it finishes meanwhile is committed once the group has formed again (see ``commitsHeld(_:)``).
    var generation: Int32 = -1
    var joined = false
    var rebalanced = false
    var closed = false
    /// Set by ``KafkaTransport/restartMember(_:group:topic:)``: the next subscribe of this member
    /// id takes this consumer over instead of joining anew.
    let restartRequested = StopFlagResettable()
    /// Live ``KafkaSubscription`` objects on this consumer.
    var owners = 0
    /// Records fetched while waiting for the join, handed out by the next poll.
    var carry: [ConsumedRecord] = []
    var lastError: ExactlyOnceError?
    /// Holds commits back while a cooperative group rebalances (see ``CommitHold``).
    var hold: CommitHold
    /// The rebalance protocol, once librdkafka has told it (see ``rebalanceIsCooperative(_:)``).
    var cooperativeProtocol: Bool?
    /// Set while ``KafkaSubscription/close()`` closes the librdkafka consumer.
    var closing = false
    let onAssignment: @Sendable ([PartitionID: UInt64]?) -> Void

    let queue: DispatchQueue

    init(topic: String, group: String, memberID: String, configuration: KafkaTransport.Configuration, queue: DispatchQueue,
         onAssignment: @escaping @Sendable ([PartitionID: UInt64]?) -> Void) {
        self.queue = queue
        self.topic = topic
        self.group = group
        self.memberID = memberID
        self.configuration = configuration
        self.onAssignment = onAssignment
        hold = CommitHold(limit: max(configuration.maxPollInterval, configuration.sessionTimeout))
    }

    func currentGeneration(_ rk: OpaquePointer) -> Int32 {
        var g: Int32 = -1
        if eo_kafka_generation(rk, &g) == 0 { return g }
        return -1
    }

    /// Takes librdkafka's generation when it has one (see ``generation``); returns whether it has.
    @discardableResult
    func refreshGeneration(_ rk: OpaquePointer) -> Bool {
        let g = currentGeneration(rk)
        if g >= 0 { generation = g }
        return g >= 0
    }

    func rebalance(_ rk: OpaquePointer, _ err: rd_kafka_resp_err_t, _ partitions: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>?) {
        let cooperative = rebalanceIsCooperative(rk)
        var listed: [PartitionID] = []
        if let partitions {
            for i in 0..<Int(partitions.pointee.cnt) {
                let e = partitions.pointee.elems[i]
                if String(cString: e.topic) == topic { listed.append(PartitionID(Int(e.partition))) }
            }
        }
        refreshGeneration(rk)
        rebalanced = true
        if err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            let epoch = UInt64(max(0, generation))
            if cooperative {
                if let error = rd_kafka_incremental_assign(rk, partitions) { rd_kafka_error_destroy(error) }
            } else {
                _ = rd_kafka_assign(rk, partitions)
                assignment = [:]
                delivered = [:]
                committed = [:]
            }
            for p in listed {
                assignment[p] = epoch
                delivered[p] = nil
                committed[p] = nil
            }
            joined = true
            if cooperative { hold.assigned() }
            retryPending(rk)
        } else {
            // Revocation: the member has finished (or given up) what it was handed, since this
            // runs inside its next poll; commit what is still pending before letting go.
            let revoked = cooperative ? listed : Array(assignment.keys)
            let lost = rd_kafka_assignment_lost(rk) != 0
            // Sent now, before librdkafka joins again (after this callback), so it cannot be in
            // flight across the next JoinGroup (see CommitHold).
            if !lost { retryPending(rk, only: Set(revoked), evenIfHeld: true) }
            if cooperative { hold.revoked(lost: lost) }
            if cooperative {
                if let error = rd_kafka_incremental_unassign(rk, partitions) { rd_kafka_error_destroy(error) }
            } else {
                _ = rd_kafka_assign(rk, nil)
            }
            for p in revoked {
                assignment[p] = nil
                delivered[p] = nil
                pending[p] = nil
                committed[p] = nil
            }
            carry.removeAll { revoked.contains($0.partition) }
        }
        onAssignment(assignment)
    }

    /// Whether commits are held back now: while librdkafka has no generation (a commit would
    /// carry none, and be refused), and in cooperative groups while the group rebalances (see
    /// ``CommitHold``). Held commits stay in ``pending``.
    func commitsHeld(_ rk: OpaquePointer) -> Bool {
        if !refreshGeneration(rk) { return true }
        guard !configuration.assignor.isEager else { return false }
        return hold.isHeld()
    }

    /// Broker answers to a commit that say the group is rebalancing, or has moved on without
    /// this member's generation.
    static func meansRebalancing(_ err: rd_kafka_resp_err_t) -> Bool {
        err == RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS || err == RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION
            || err == RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID
    }

    /// Whether the group rebalances cooperatively: the protocol librdkafka negotiated, asked once
    /// and kept (it never changes for a consumer). Never asked while closing: there
    /// `rd_kafka_rebalance_protocol` returns NULL, or blocks for good (confluentinc/librdkafka#4041);
    /// then, and before the first join, the configured assignor decides.
    func rebalanceIsCooperative(_ rk: OpaquePointer) -> Bool {
        if let cooperativeProtocol { return cooperativeProtocol }
        if !closing, let name = rd_kafka_rebalance_protocol(rk).map({ String(cString: $0) }), name != "NONE" {
            cooperativeProtocol = name == "COOPERATIVE"
            return name == "COOPERATIVE"
        }
        return !configuration.assignor.isEager
    }

    /// Keeps a commit of `partition` at `offset` in ``pending`` (at the partition's current
    /// epoch; nothing when it is no longer assigned), to be retried by later polls.
    func keepPending(_ partition: PartitionID, _ offset: Int64) {
        if let epoch = assignment[partition] { pending[partition] = (max(offset, pending[partition]?.offset ?? 0), epoch) }
    }

    /// Commits `offsets` synchronously with a deadline; returns per-partition errors.
    func commitNow(_ rk: OpaquePointer, _ offsets: [PartitionID: Int64]) -> (rd_kafka_resp_err_t, [PartitionID: rd_kafka_resp_err_t]) {
        guard !offsets.isEmpty else { return (RD_KAFKA_RESP_ERR_NO_ERROR, [:]) }
        guard let q = rd_kafka_queue_new(rk) else { return (RD_KAFKA_RESP_ERR__FAIL, [:]) }
        defer { rd_kafka_queue_destroy(q) }
        let list = KafkaPartitionList(capacity: offsets.count)
        for (p, o) in offsets { list.add(topic, p.rawValue, offset: o) }
        let err = rd_kafka_commit_queue(rk, list.pointer, q, nil, nil)
        guard err == RD_KAFKA_RESP_ERR_NO_ERROR else { return (err, [:]) }
        let deadline = ContinuousClock.now + configuration.operationTimeout
        while true {
            let left = deadline - ContinuousClock.now
            guard left > .zero else { return (RD_KAFKA_RESP_ERR__TIMED_OUT, [:]) }
            guard let ev = rd_kafka_queue_poll(q, min(100, milliseconds(left))) else { continue }
            defer { rd_kafka_event_destroy(ev) }
            guard rd_kafka_event_type(ev) == RD_KAFKA_EVENT_OFFSET_COMMIT else { continue }
            let top = rd_kafka_event_error(ev)
            var per: [PartitionID: rd_kafka_resp_err_t] = [:]
            if let l = rd_kafka_event_topic_partition_list(ev) {
                for i in 0..<Int(l.pointee.cnt) {
                    let e = l.pointee.elems[i]
                    per[PartitionID(Int(e.partition))] = e.err
                }
            }
            if Self.meansRebalancing(top) || per.values.contains(where: Self.meansRebalancing) { hold.commitRefusedByRebalance() }
            return (top, per)
        }
    }

    /// A restart of this member in place: what was handed out and not committed is forgotten,
    /// every assigned partition is read again from its committed offset (as read from the broker),
    /// and the next subscribe of the member id takes the consumer over.
    func restart() throws {
        guard let rk = handle?.pointer, !closed else { return }
        pending = [:]
        carry = []
        guard !assignment.isEmpty else { return }
        let list = KafkaPartitionList(capacity: assignment.count)
        for p in assignment.keys { list.add(topic, p.rawValue) }
        let err = rd_kafka_committed(rk, list.pointer, milliseconds(configuration.operationTimeout))
        guard err == RD_KAFKA_RESP_ERR_NO_ERROR else { throw kafkaError(err, "committed offsets of \(topic)") }
        let seekList = KafkaPartitionList(capacity: assignment.count)
        var positions: [PartitionID: Int64] = [:]
        for e in list.entries where e.error == RD_KAFKA_RESP_ERR_NO_ERROR {
            let p = PartitionID(e.partition)
            guard assignment[p] != nil else { continue }
            // A committed offset is only trusted within what this member read of the partition.
            let start = e.offset >= 0 ? e.offset : Int64(RD_KAFKA_OFFSET_BEGINNING)
            if let read = delivered[p], start > read { continue }
            seekList.add(topic, p.rawValue, offset: start)
            positions[p] = max(0, start)
        }
        if let error = rd_kafka_seek_partitions(rk, seekList.pointer, milliseconds(configuration.operationTimeout)) {
            let code = rd_kafka_error_code(error)
            rd_kafka_error_destroy(error)
            throw kafkaError(code, "seek \(topic) back to committed offsets")
        }
        for e in seekList.entries where e.error == RD_KAFKA_RESP_ERR_NO_ERROR {
            delivered[PartitionID(e.partition)] = positions[PartitionID(e.partition)]
        }
    }

    /// Retries pending commits of partitions still owned at the epoch they were made in (not
    /// while commits are held, unless `evenIfHeld`).
    func retryPending(_ rk: OpaquePointer, only: Set<PartitionID>? = nil, evenIfHeld: Bool = false) {
        guard !pending.isEmpty, evenIfHeld || !commitsHeld(rk) else { return }
        var todo: [PartitionID: Int64] = [:]
        for (p, c) in pending {
            if let only, !only.contains(p) { continue }
            guard assignment[p] == c.epoch else {
                pending[p] = nil
                continue
            }
            todo[p] = c.offset
        }
        guard !todo.isEmpty else { return }
        let (top, per) = commitNow(rk, todo)
        for (p, o) in todo where top == RD_KAFKA_RESP_ERR_NO_ERROR && (per[p] ?? RD_KAFKA_RESP_ERR_NO_ERROR) == RD_KAFKA_RESP_ERR_NO_ERROR {
            pending[p] = nil
            committed[p] = max(committed[p] ?? 0, o)
        }
    }
}

/// One member of a Kafka consumer group (one librdkafka consumer), created by
/// ``KafkaTransport/subscribe(topic:group:memberID:)``.
///
/// - The subscription returns once the member has joined the group (or after
///   ``KafkaTransport/Configuration/joinTimeout``).
/// - A poll serves librdkafka's rebalance callbacks: partitions are revoked only inside a poll,
///   so everything handed out by the previous poll is finished (and its commit made, or retried
///   here) before a partition goes.
/// - A commit carries the poll's generation; it is refused with
///   `ExactlyOnceError/Code/staleGeneration` for a partition this member does not own, or owns
///   at a newer epoch, and when the broker refuses it with ILLEGAL_GENERATION or
///   UNKNOWN_MEMBER_ID. A commit the broker did not take because the group is rebalancing (or did
///   not answer in time) is kept and retried at the next polls while the partition stays this
///   member's at the same epoch, and the call throws a retriable error.
/// - A seek moves a position only back to a record already handed out in the current
///   assignment, never past what was read.
public final class KafkaSubscription: TransportSubscription, @unchecked Sendable {
    /// The member id (the librdkafka `client.id`; Kafka gives the group member its own id).
    public let memberID: String
    /// `kafka:<cluster id>/<group>/<topic>`; for librdkafka's mock cluster the cluster part is
    /// its id and its brokers' ports (`mockCluster1ffd65008614@38207,38211,40967`), since a
    /// mock's id can repeat from one mock instance to the next.
    public let fencingScope: String
    let topic: String
    let group: String
    let partitions: Int
    let core: ConsumerCore
    let queue: DispatchQueue
    let transport: KafkaTransport
    private let cancelled = StopFlag()

    /// Takes over a consumer whose member restarted (``KafkaTransport/restartMember(_:group:topic:)``).
    init(adopting core: ConsumerCore, transport: KafkaTransport, partitions: Int, fencingScope: String) {
        self.transport = transport
        topic = core.topic
        group = core.group
        memberID = core.memberID
        self.partitions = partitions
        self.fencingScope = fencingScope
        queue = core.queue
        self.core = core
    }

    /// Finishes a takeover: the consumer reads again from the committed offsets.
    func adopt() async throws {
        let core = self.core
        try await onQueue(queue) {
            core.owners += 1
            defer { core.restartRequested.clear() }
            try core.restart()
        }
    }

    init(transport: KafkaTransport, topic: String, group: String, memberID: String, partitions: Int, fencingScope: String) throws {
        self.transport = transport
        self.topic = topic
        self.group = group
        self.memberID = memberID
        self.partitions = partitions
        self.fencingScope = fencingScope
        let queue = DispatchQueue(label: "exactly-once.kafka.consumer.\(memberID)")
        self.queue = queue
        let registry = transport.registry
        core = ConsumerCore(topic: topic, group: group, memberID: memberID, configuration: transport.configuration, queue: queue) { a in
            registry.set(group: group, topic: topic, member: memberID, assignment: a)
        }
        core.owners = 1
        let conf = try KafkaConf(transport.configuration.consumerProperties(group: group, clientID: memberID))
        if let c = conf.pointer {
            rd_kafka_conf_set_rebalance_cb(c, rebalanceCallback)
            rd_kafka_conf_set_opaque(c, Unmanaged.passUnretained(core).toOpaque())
        }
        core.handle = try KafkaHandle(type: RD_KAFKA_CONSUMER, conf: conf)
    }

    /// Subscribes and waits for the first join.
    func start() async throws {
        let core = self.core
        let topic = self.topic
        try await onQueue(queue) {
            guard let rk = core.handle?.pointer else { throw ExactlyOnceError(.shutDown, "subscription closed") }
            let list = KafkaPartitionList(capacity: 1)
            list.add(topic, -1)
            let err = rd_kafka_subscribe(rk, list.pointer)
            guard err == RD_KAFKA_RESP_ERR_NO_ERROR else { throw kafkaError(err, "subscribe to \(topic)") }
            let deadline = ContinuousClock.now + core.configuration.joinTimeout
            while !core.joined && ContinuousClock.now < deadline {
                guard let m = rd_kafka_consumer_poll(rk, 100) else { continue }
                defer { rd_kafka_message_destroy(m) }
                if m.pointee.err == RD_KAFKA_RESP_ERR_NO_ERROR {
                    let r = KafkaSubscription.record(m, topic: topic)
                    if core.assignment[r.partition] != nil {
                        core.carry.append(r)
                        core.delivered[r.partition] = r.offset.rawValue + 1
                    }
                } else if let e = KafkaSubscription.consumeError(m.pointee.err, topic: topic) {
                    throw e
                }
            }
        }
    }

    /// A consumer error that ends a poll (others are informational: librdkafka retries them).
    static func consumeError(_ err: rd_kafka_resp_err_t, topic: String) -> ExactlyOnceError? {
        switch err {
        case RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART, RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC:
            return ExactlyOnceError(.unknownTopic, "unknown topic \(topic)")
        case RD_KAFKA_RESP_ERR__FATAL, RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED, RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED:
            return kafkaError(err, "consume \(topic)")
        default:
            return nil
        }
    }

    /// A librdkafka message as a record.
    static func record(_ m: UnsafeMutablePointer<rd_kafka_message_t>, topic: String) -> ConsumedRecord {
        let msg = m.pointee
        let payload = msg.payload.map { Array(UnsafeRawBufferPointer(start: $0, count: msg.len)) } ?? []
        let key = msg.key.map { Array(UnsafeRawBufferPointer(start: $0, count: msg.key_len)) }
        var headers: [String: String] = [:]
        var hdrs: OpaquePointer?
        if rd_kafka_message_headers(m, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR, let hdrs {
            var i = 0
            var name: UnsafePointer<CChar>?
            var value: UnsafeRawPointer?
            var size = 0
            while rd_kafka_header_get_all(hdrs, i, &name, &value, &size) == RD_KAFKA_RESP_ERR_NO_ERROR {
                if let name {
                    headers[String(cString: name)] = value.map { String(decoding: UnsafeRawBufferPointer(start: $0, count: size), as: UTF8.self) } ?? ""
                }
                i += 1
            }
        }
        return ConsumedRecord(topic: topic, partition: PartitionID(Int(msg.partition)), offset: Offset(msg.offset), key: key, payload: payload, headers: headers)
    }

    public func poll(maxRecords: Int, maxWait: Duration) async throws -> PollResult {
        let core = self.core
        let topic = self.topic
        let cancelled = self.cancelled
        let budget = max(1, maxRecords)
        let deadline = ContinuousClock.now + maxWait
        return try await withTaskCancellationHandler {
            try await onQueue(queue) {
                guard let rk = core.handle?.pointer, !core.closed else {
                    throw ExactlyOnceError(.staleGeneration, "member \(core.memberID) has left group \(core.group)")
                }
                core.retryPending(rk)
                core.rebalanced = false
                var records = core.carry
                core.carry = []
                var wait = true
                while records.count < budget && !cancelled.isSet {
                    let left = deadline - ContinuousClock.now
                    let timeout: Int32 = wait ? min(100, milliseconds(left)) : 0
                    let m = rd_kafka_consumer_poll(rk, timeout)
                    if core.rebalanced {
                        // The assignment changed inside this poll: records of revoked partitions go.
                        records.removeAll { core.assignment[$0.partition] == nil }
                        core.retryPending(rk)
                    }
                    if let m {
                        defer { rd_kafka_message_destroy(m) }
                        if m.pointee.err == RD_KAFKA_RESP_ERR_NO_ERROR {
                            let r = KafkaSubscription.record(m, topic: topic)
                            if core.assignment[r.partition] != nil && r.offset.rawValue >= (core.delivered[r.partition] ?? 0) {
                                records.append(r)
                                core.delivered[r.partition] = r.offset.rawValue + 1
                                wait = false
                            }
                        } else if let e = KafkaSubscription.consumeError(m.pointee.err, topic: topic) {
                            throw e
                        }
                        continue
                    }
                    if core.rebalanced && records.isEmpty { break }
                    if !wait || ContinuousClock.now >= deadline { break }
                }
                core.refreshGeneration(rk)
                var ends: [PartitionID: Offset] = [:]
                for p in core.assignment.keys {
                    var low: Int64 = 0
                    var high: Int64 = 0
                    if rd_kafka_get_watermark_offsets(rk, topic, Int32(p.rawValue), &low, &high) == RD_KAFKA_RESP_ERR_NO_ERROR, high >= 0 {
                        ends[p] = Offset(high)
                    }
                }
                return PollResult(generation: UInt64(max(0, core.generation)), assignment: core.assignment, records: records, endOffsets: ends)
            }
        } onCancel: {
            cancelled.set()
        }
    }

    public func commit(_ offsets: [PartitionID: Offset], generation: UInt64) async throws {
        let core = self.core
        let group = self.group
        try await onQueue(queue) {
            guard let rk = core.handle?.pointer, !core.closed else {
                throw ExactlyOnceError(.staleGeneration, "member \(core.memberID) has left group \(group)")
            }
            var todo: [PartitionID: Int64] = [:]
            for (p, o) in offsets {
                guard let epoch = core.assignment[p], generation >= epoch else {
                    throw ExactlyOnceError(.staleGeneration, "member \(core.memberID) does not own partition \(p) in generation \(generation)")
                }
                guard o.rawValue >= 0, o.rawValue <= (core.delivered[p] ?? 0) || o.rawValue <= (core.committed[p] ?? -1) else {
                    throw ExactlyOnceError(.invalidConfiguration, "commit of \(p) at \(o) is past what this member read (\(core.delivered[p] ?? 0))")
                }
                if o.rawValue > (core.committed[p] ?? -1) { todo[p] = o.rawValue }
            }
            guard !todo.isEmpty else { return }
            if core.commitsHeld(rk) {
                // The group is rebalancing: kept, and committed when the rebalance is over.
                for (p, o) in todo { core.keepPending(p, o) }
                throw ExactlyOnceError(.transportUnavailable, "commit of \(core.topic) by \(core.memberID) held while group \(group) rebalances; it is retried when the rebalance is over")
            }
            let (top, per) = core.commitNow(rk, todo)
            var refused: ExactlyOnceError?
            for (p, o) in todo {
                let e = top != RD_KAFKA_RESP_ERR_NO_ERROR ? top : (per[p] ?? RD_KAFKA_RESP_ERR_NO_ERROR)
                if e == RD_KAFKA_RESP_ERR_NO_ERROR {
                    core.committed[p] = max(core.committed[p] ?? 0, o)
                    if let pend = core.pending[p], pend.offset <= o { core.pending[p] = nil }
                    continue
                }
                // Kept while the partition stays ours at this epoch; the next polls retry it.
                core.keepPending(p, o)
                let mapped = kafkaError(e, "commit of \(core.topic)/\(p) by \(core.memberID)")
                if refused == nil || mapped.code == .staleGeneration { refused = mapped }
            }
            if let refused {
                if refused.code == .staleGeneration || refused.isRetriable { throw refused }
                throw ExactlyOnceError(.transportUnavailable, refused.message)
            }
        }
    }

    public func seek(_ partition: PartitionID, to offset: Offset) async throws {
        let core = self.core
        let topic = self.topic
        try await onQueue(queue) {
            guard let rk = core.handle?.pointer, !core.closed, core.assignment[partition] != nil else {
                throw ExactlyOnceError(.staleGeneration, "member \(core.memberID) does not own partition \(partition)")
            }
            // Only back to a record handed out in this assignment (validated), never forward.
            guard let read = core.delivered[partition], offset.rawValue >= 0, offset.rawValue <= read else { return }
            guard offset.rawValue < read else { return }
            let list = KafkaPartitionList(capacity: 1)
            list.add(topic, partition.rawValue, offset: offset.rawValue)
            if let error = rd_kafka_seek_partitions(rk, list.pointer, milliseconds(core.configuration.operationTimeout)) {
                let e = rd_kafka_error_code(error)
                rd_kafka_error_destroy(error)
                throw kafkaError(e, "seek \(topic)/\(partition) to \(offset)")
            }
            if let e = list.entries.first?.error, e != RD_KAFKA_RESP_ERR_NO_ERROR { throw kafkaError(e, "seek \(topic)/\(partition) to \(offset)") }
            core.delivered[partition] = offset.rawValue
            core.carry.removeAll { $0.partition == partition }
        }
    }

    public func committedOffset(_ partition: PartitionID) async throws -> Offset? {
        let core = self.core
        let topic = self.topic
        return try await onQueue(queue) {
            guard let rk = core.handle?.pointer else { throw ExactlyOnceError(.shutDown, "subscription closed") }
            let list = KafkaPartitionList(capacity: 1)
            list.add(topic, partition.rawValue)
            let err = rd_kafka_committed(rk, list.pointer, milliseconds(core.configuration.operationTimeout))
            guard err == RD_KAFKA_RESP_ERR_NO_ERROR else { throw kafkaError(err, "committed offset of \(topic)/\(partition)") }
            guard let e = list.entries.first else { return nil }
            guard e.error == RD_KAFKA_RESP_ERR_NO_ERROR else { throw kafkaError(e.error, "committed offset of \(topic)/\(partition)") }
            return e.offset >= 0 ? Offset(e.offset) : nil
        }
    }

    /// Leaves the group (committing what is pending first), within
    /// ``KafkaTransport/Configuration/operationTimeout``.
    public func close() async throws {
        let core = self.core
        try await onQueue(queue) {
            guard let h = core.handle, !core.closed else { return }
            // Leaving: a commit now cannot cost a later rebalance of this member.
            core.retryPending(h.pointer, evenIfHeld: true)
            // Give the assignment up before closing. librdkafka before 2.4 can hang for good in a
            // rebalance call made while the consumer closes, when the group hands a cooperative
            // member an assignment at that moment (confluentinc/librdkafka#4527): unsubscribe, and
            // serve the revocation (and any rebalance event already queued) in ordinary polls
            // until nothing is assigned and no event comes, within operationTimeout.
            let leaveBy = ContinuousClock.now + core.configuration.operationTimeout
            if rd_kafka_unsubscribe(h.pointer) == RD_KAFKA_RESP_ERR_NO_ERROR {
                var quiet = false
                while !quiet && ContinuousClock.now < leaveBy {
                    core.rebalanced = false
                    let m = rd_kafka_consumer_poll(h.pointer, 100)
                    if let m { rd_kafka_message_destroy(m) }
                    quiet = m == nil && !core.rebalanced && core.assignment.isEmpty
                }
            }
            core.closing = true
            if let q = rd_kafka_queue_new(h.pointer) {
                if let error = rd_kafka_consumer_close_queue(h.pointer, q) { rd_kafka_error_destroy(error) }
                let deadline = ContinuousClock.now + core.configuration.operationTimeout
                while rd_kafka_consumer_closed(h.pointer) == 0 && ContinuousClock.now < deadline {
                    if let ev = rd_kafka_queue_poll(q, 100) {
                        if rd_kafka_event_type(ev) == RD_KAFKA_EVENT_REBALANCE {
                            core.rebalance(h.pointer, rd_kafka_event_error(ev), rd_kafka_event_topic_partition_list(ev))
                        }
                        rd_kafka_event_destroy(ev)
                    }
                }
                rd_kafka_queue_destroy(q)
            }
            core.closed = true
            core.assignment = [:]
            core.onAssignment(nil)
            core.handle = nil
        }
    }

    deinit {
        let core = self.core
        queue.async {
            core.owners -= 1
            // The last owner of a consumer nobody will take over: give the handle up (the member
            // leaves the group when its session lapses, as after a crash).
            if core.owners == 0 && !core.restartRequested.isSet {
                core.onAssignment(nil)
                core.handle = nil
            }
        }
    }
}
