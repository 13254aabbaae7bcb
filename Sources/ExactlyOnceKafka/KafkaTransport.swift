import CRdKafka
import Dispatch
import ExactlyOnce
import Synchronization

/// Runs a blocking librdkafka call on `queue` (never on Swift's cooperative pool) and hands the
/// result back.
func onQueue<T: Sendable>(_ queue: DispatchQueue, _ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { c in
        queue.async {
            do { c.resume(returning: try body()) } catch { c.resume(throwing: error) }
        }
    }
}

/// A `MessageTransport` over Apache Kafka, through librdkafka.
///
/// - Publishing: an idempotent producer with `acks=all`; a record is reported accepted only on
///   its delivery report, with the offset the broker gave it. Partitions are resolved in Swift
///   (`Partitioning/murmur2` is the same partition a Java client, or librdkafka with
///   `partitioner=murmur2_random`, picks for a key) and given to librdkafka explicitly.
/// - Consuming: one librdkafka consumer per ``KafkaSubscription``, in a consumer group with
///   `enable.auto.commit=false`; offsets are committed by ``KafkaSubscription/commit(_:generation:)``
///   only. Every blocking librdkafka call of a subscription runs on its own serial queue and a
///   poll hands a whole batch to Swift.
/// - Epochs: a partition's epoch is the group generation in which this member was assigned it
///   (Kafka's generations grow with every rebalance of a group); the fencing scope names the
///   cluster id (for librdkafka's mock cluster, its id and its brokers' ports), the group and
///   the topic.
public final class KafkaTransport: MessageTransport, Sendable {
    /// The subscription type.
    public typealias Subscription = KafkaSubscription

    /// The configuration.
    public let configuration: Configuration
    let producer: KafkaProducer
    private let adminQueue = DispatchQueue(label: "exactly-once.kafka.admin")
    private let readQueue = DispatchQueue(label: "exactly-once.kafka.read")
    private let partitionCounts = Mutex<[String: Int]>([:])
    private let groupReaders = Mutex<[String: KafkaHandle]>([:])
    private let reader = Mutex<KafkaHandle?>(nil)
    private let clusterIDCache = Mutex<String?>(nil)
    private let fencingNameCache = Mutex<String?>(nil)
    let registry = SubscriptionRegistry()

    /// Connects (lazily: nothing is sent until the first call) to `configuration`'s cluster.
    /// - Throws: `ExactlyOnceError/Code/invalidConfiguration` for a property librdkafka refuses.
    public init(configuration: Configuration) throws {
        try configuration.validate()
        self.configuration = configuration
        producer = try KafkaProducer(configuration: configuration)
    }

    /// The cluster id (part of every fencing scope).
    public func clusterID() async throws -> String {
        if let id = clusterIDCache.withLock({ $0 }) { return id }
        let rk = producer.handle
        let timeout = milliseconds(configuration.operationTimeout)
        let id: String = try await onQueue(adminQueue) {
            guard let p = rd_kafka_clusterid(rk.pointer, timeout) else {
                throw ExactlyOnceError(.transportUnavailable, "the Kafka cluster id is unknown: no broker of \(self.configuration.bootstrapServers) answered in time")
            }
            defer { rd_kafka_mem_free(rk.pointer, p) }
            return String(cString: p)
        }
        clusterIDCache.withLock { $0 = id }
        return id
    }

    /// The cluster's name in fencing scopes: its cluster id, except for librdkafka's mock
    /// cluster. A mock's id is `mockCluster` and its memory address: two mocks one after the
    /// other in a process (or in two processes without address space randomization) have the
    /// same id, while their generations start again from 1, so a store that outlives one mock
    /// would fence the next. A mock's name is therefore its id and its brokers' ports (which
    /// the system chose for that very instance): `mockCluster1ffd65008614@38207,38211,40967`.
    func fencingClusterName() async throws -> String {
        if let name = fencingNameCache.withLock({ $0 }) { return name }
        let id = try await clusterID()
        var name = id
        if id.hasPrefix("mockCluster") {
            let rk = producer.handle
            let timeout = milliseconds(configuration.operationTimeout)
            let ports: [(id: Int32, port: Int32)] = try await onQueue(adminQueue) {
                var md: UnsafePointer<rd_kafka_metadata>?
                let err = rd_kafka_metadata(rk.pointer, 1, nil, &md, timeout)
                guard err == RD_KAFKA_RESP_ERR_NO_ERROR, let md else { throw kafkaError(err, "broker list of the mock cluster \(id)") }
                defer { rd_kafka_metadata_destroy(md) }
                return (0..<Int(md.pointee.broker_cnt)).map { (md.pointee.brokers[$0].id, md.pointee.brokers[$0].port) }
            }
            guard !ports.isEmpty else { throw ExactlyOnceError(.transportUnavailable, "the mock cluster \(id) lists no brokers") }
            name += "@" + ports.sorted { $0.id < $1.id }.map { "\($0.port)" }.joined(separator: ",")
        }
        fencingNameCache.withLock { $0 = name }
        return name
    }

    public func partitionCount(of topic: String) async throws -> Int {
        try await partitionCount(of: topic, timeout: configuration.operationTimeout)
    }

    /// The partition count of `topic`, from the cluster's metadata within `timeout` (the first
    /// answer is kept: later calls do not ask again). A short `timeout` tells a caller quickly
    /// that no broker answers (a closed port, a server that accepts and never answers).
    /// - Throws: `ExactlyOnceError/Code/unknownTopic` when the cluster does not have the
    ///   topic; `ExactlyOnceError/Code/timeout` or `ExactlyOnceError/Code/transportUnavailable`
    ///   (retriable) when no broker answered in time.
    public func partitionCount(of topic: String, timeout: Duration) async throws -> Int {
        if let n = partitionCounts.withLock({ $0[topic] }) { return n }
        guard !topic.isEmpty else { throw ExactlyOnceError(.unknownTopic, "empty topic name") }
        let rk = producer.handle
        let timeout = max(1, milliseconds(timeout))
        let n: Int = try await onQueue(adminQueue) {
            // All topics: a request for one named topic would let the broker create it.
            var md: UnsafePointer<rd_kafka_metadata>?
            let err = rd_kafka_metadata(rk.pointer, 1, nil, &md, timeout)
            guard err == RD_KAFKA_RESP_ERR_NO_ERROR, let md else { throw kafkaError(err, "metadata of \(topic)") }
            defer { rd_kafka_metadata_destroy(md) }
            for i in 0..<Int(md.pointee.topic_cnt) {
                let t = md.pointee.topics[i]
                guard String(cString: t.topic) == topic else { continue }
                guard t.err == RD_KAFKA_RESP_ERR_NO_ERROR else {
                    if t.err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART { throw ExactlyOnceError(.unknownTopic, "unknown topic \(topic)") }
                    throw kafkaError(t.err, "metadata of \(topic)")
                }
                let count = Int(t.partition_cnt)
                guard count > 0 else { throw ExactlyOnceError(.unknownTopic, "topic \(topic) has no partitions") }
                return count
            }
            throw ExactlyOnceError(.unknownTopic, "unknown topic \(topic)")
        }
        partitionCounts.withLock { $0[topic] = n }
        return n
    }

    public func publish(_ record: OutgoingRecord, to topic: String, partitioning: Partitioning) async throws -> RecordPosition {
        let report = try await publish([record], to: topic, partitioning: partitioning)
        if let p = report.positions.first, let p { return p }
        throw report.failure ?? ExactlyOnceError(.transportUnavailable, "publish to \(topic) was not confirmed")
    }

    /// Publishes the batch with many records in flight (librdkafka batches them by
    /// ``Configuration/linger`` and ``Configuration/batchSize``) and waits for every delivery
    /// report (at most ``Configuration/deliveryTimeout``). Per partition, the reported prefix
    /// holds: the idempotent producer keeps each partition's records in order without gaps, and a
    /// record after a failed one is reported not accepted even if the broker took it.
    public func publish(_ records: [OutgoingRecord], to topic: String, partitioning: Partitioning) async throws -> PublishReport {
        let count = try await partitionCount(of: topic)
        let partitions = try records.map { try partitioning.resolve(key: $0.key, partitionCount: count) }
        guard !records.isEmpty else { return PublishReport(positions: [], failure: nil) }
        let (positions, errors) = try await producer.produce(records, partitions: partitions, topic: topic)
        var out = positions
        var failure: ExactlyOnceError?
        var broken = Set<PartitionID>()
        for i in out.indices {
            let p = partitions[i]
            if broken.contains(p) {
                out[i] = nil
                continue
            }
            if out[i] == nil {
                broken.insert(p)
                if failure == nil {
                    failure = kafkaError(errors[i] ?? RD_KAFKA_RESP_ERR__FAIL, "publish to \(topic)/\(p)")
                }
            } else if out[i]!.partition != p {
                throw ExactlyOnceError(.transportFailure, "delivery report of \(topic): record for partition \(p) reported in \(out[i]!.partition)")
            }
        }
        return PublishReport(positions: out, failure: failure)
    }

    public func subscribe(topic: String, group: String, memberID: String) async throws -> KafkaSubscription {
        guard !group.isEmpty, !memberID.isEmpty else {
            throw ExactlyOnceError(.invalidConfiguration, "group and member id must not be empty")
        }
        let partitions = try await partitionCount(of: topic)
        let scope = "kafka:\(try await fencingClusterName())/\(group)/\(topic)"
        if let core = restarting.withLock({ $0.removeValue(forKey: Self.memberKey(group, topic, memberID)) }) {
            let sub = KafkaSubscription(adopting: core, transport: self, partitions: partitions, fencingScope: scope)
            try await sub.adopt()
            return sub
        }
        let sub = try KafkaSubscription(transport: self, topic: topic, group: group, memberID: memberID,
                                        partitions: partitions, fencingScope: scope)
        try await sub.start()
        live.withLock { $0[Self.memberKey(group, topic, memberID)] = Weak(sub.core) }
        return sub
    }

    private let live = Mutex<[String: Weak]>([:])
    private let restarting = Mutex<[String: ConsumerCore]>([:])

    static func memberKey(_ group: String, _ topic: String, _ member: String) -> String { "\(group)\u{1}\(topic)\u{1}\(member)" }

    /// Restarts member `memberID` of `group` on `topic` in place, as a process that crashed and
    /// came back at once under a static member id would: what it was handed and did not commit is
    /// forgotten, its partitions are read again from their committed offsets, and the next
    /// ``subscribe(topic:group:memberID:)`` with this member id takes its consumer over without a
    /// rebalance (its epochs stay). The demo's and simulator's injected crashes use this; a
    /// member unknown to this process is ignored.
    public func restartMember(_ memberID: String, group: String, topic: String) {
        let key = Self.memberKey(group, topic, memberID)
        guard let core = live.withLock({ $0[key]?.core }) else { return }
        core.restartRequested.set()
        restarting.withLock { $0[key] = core }
    }

    /// A consumer handle in `group` that never joins it (for committed offsets).
    private func groupReader(_ group: String) throws -> KafkaHandle {
        try groupReaders.withLock { r in
            if let h = r[group] { return h }
            let conf = try KafkaConf(configuration.consumerProperties(group: group, clientID: "exactly-once-status"))
            let h = try KafkaHandle(type: RD_KAFKA_CONSUMER, conf: conf)
            r[group] = h
            return h
        }
    }

    /// The low and high watermarks (log start, end) of every partition of `topic`.
    func watermarks(topic: String, partitions: Int) async throws -> [(low: Int64, high: Int64)] {
        let rk = producer.handle
        let timeout = milliseconds(configuration.operationTimeout)
        return try await onQueue(adminQueue) {
            try (0..<partitions).map { p in
                var low: Int64 = 0
                var high: Int64 = 0
                let err = rd_kafka_query_watermark_offsets(rk.pointer, topic, Int32(p), &low, &high, timeout)
                guard err == RD_KAFKA_RESP_ERR_NO_ERROR else { throw kafkaError(err, "end offset of \(topic)/\(p)") }
                guard low >= 0, high >= low else {
                    throw ExactlyOnceError(.transportFailure, "implausible watermarks of \(topic)/\(p): \(low)...\(high)")
                }
                return (low, high)
            }
        }
    }

    /// The committed offsets of `group` on `topic` (nil where it never committed).
    func committedOffsets(group: String, topic: String, partitions: Int) async throws -> [Int64?] {
        let h = try groupReader(group)
        let timeout = milliseconds(configuration.operationTimeout)
        return try await onQueue(adminQueue) {
            let list = KafkaPartitionList(capacity: partitions)
            for p in 0..<partitions { list.add(topic, p) }
            let err = rd_kafka_committed(h.pointer, list.pointer, timeout)
            guard err == RD_KAFKA_RESP_ERR_NO_ERROR else { throw kafkaError(err, "committed offsets of \(group) on \(topic)") }
            var out = [Int64?](repeating: nil, count: partitions)
            for e in list.entries where e.partition >= 0 && e.partition < partitions {
                guard e.error == RD_KAFKA_RESP_ERR_NO_ERROR else { throw kafkaError(e.error, "committed offset of \(topic)/\(e.partition)") }
                if e.offset >= 0 { out[e.partition] = e.offset }
            }
            return out
        }
    }

    public func partitionStatus(group: String, topic: String) async throws -> [PartitionStatus] {
        let count = try await partitionCount(of: topic)
        let marks = try await watermarks(topic: topic, partitions: count)
        let committed = try await committedOffsets(group: group, topic: topic, partitions: count)
        let owners = registry.owners(group: group, topic: topic)
        return (0..<count).map { p in
            let pid = PartitionID(p)
            let c = committed[p].map(Offset.init)
            let end = marks[p].high
            return PartitionStatus(partition: pid, committed: c, end: Offset(end),
                                   lag: max(0, end - max(marks[p].low, c?.rawValue ?? marks[p].low)),
                                   owner: owners[pid]?.member, epoch: owners[pid]?.epoch)
        }
    }

    /// The end offset of every partition of `topic`.
    public func endOffsets(topic: String) async throws -> [PartitionID: Offset] {
        let count = try await partitionCount(of: topic)
        let marks = try await watermarks(topic: topic, partitions: count)
        var out: [PartitionID: Offset] = [:]
        for (p, m) in marks.enumerated() { out[PartitionID(p)] = Offset(m.high) }
        return out
    }

    /// Whether `group` has committed every partition of `topic` to its end.
    public func isFullyCommitted(group: String, topic: String) async throws -> Bool {
        try await partitionStatus(group: group, topic: topic).allSatisfy { $0.end.rawValue == 0 || ($0.committed ?? Offset(0)) >= $0.end }
    }

    public func read(topic: String, partition: PartitionID, from offset: Offset, maxRecords: Int) async throws -> [ConsumedRecord] {
        let count = try await partitionCount(of: topic)
        guard partition.rawValue >= 0, partition.rawValue < count else {
            throw ExactlyOnceError(.invalidPartition, "partition \(partition) is outside 0..<\(count)")
        }
        guard maxRecords > 0 else { return [] }
        let marks = try await watermarks(topic: topic, partitions: count)
        let high = marks[partition.rawValue].high
        let start = max(offset.rawValue, marks[partition.rawValue].low)
        guard start < high else { return [] }
        let want = Int(min(Int64(maxRecords), high - start))
        let h = try reader.withLock { r in
            if let r { return r }
            // librdkafka's assign needs a group id; the reader never joins nor commits.
            let conf = try KafkaConf(configuration.consumerProperties(group: "exactly-once-reader", clientID: "exactly-once-reader"))
            let h = try KafkaHandle(type: RD_KAFKA_CONSUMER, conf: conf)
            r = h
            return h
        }
        let deadline = ContinuousClock.now + configuration.operationTimeout
        return try await onQueue(readQueue) {
            let list = KafkaPartitionList(capacity: 1)
            list.add(topic, partition.rawValue, offset: start)
            let err = rd_kafka_assign(h.pointer, list.pointer)
            guard err == RD_KAFKA_RESP_ERR_NO_ERROR else { throw kafkaError(err, "read \(topic)/\(partition)") }
            defer { _ = rd_kafka_assign(h.pointer, nil) }
            var out: [ConsumedRecord] = []
            var next = start
            while out.count < want {
                let left = deadline - ContinuousClock.now
                guard left > .zero else {
                    throw ExactlyOnceError(.timeout, "read \(topic)/\(partition) from \(start): \(out.count) of \(want) records within \(self.configuration.operationTimeout)")
                }
                guard let m = rd_kafka_consumer_poll(h.pointer, min(100, milliseconds(left))) else { continue }
                defer { rd_kafka_message_destroy(m) }
                guard m.pointee.err == RD_KAFKA_RESP_ERR_NO_ERROR else {
                    let e = m.pointee.err
                    if e == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART || e == RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE { throw kafkaError(e, "read \(topic)/\(partition)") }
                    continue
                }
                let rec = KafkaSubscription.record(m, topic: topic)
                // Only the records asked for, in order (a stale fetch from an earlier read is skipped).
                guard rec.partition == partition, rec.offset.rawValue >= next else { continue }
                next = rec.offset.rawValue + 1
                out.append(rec)
            }
            return out
        }
    }

    /// Waits up to `timeout` for records still buffered by the producer to be delivered.
    public func flush(timeout: Duration = .seconds(10)) async {
        await producer.flush(timeout)
    }
}

/// A weak reference to a consumer.
struct Weak: @unchecked Sendable {
    weak var core: ConsumerCore?
    init(_ core: ConsumerCore) { self.core = core }
}

/// The live subscriptions of this process (owners and epochs for ``KafkaTransport/partitionStatus(group:topic:)``).
final class SubscriptionRegistry: Sendable {
    private let state = Mutex<[String: [String: [PartitionID: UInt64]]]>([:])

    func set(group: String, topic: String, member: String, assignment: [PartitionID: UInt64]?) {
        state.withLock { s in
            let key = group + "\u{1}" + topic
            s[key, default: [:]][member] = assignment
        }
    }

    func owners(group: String, topic: String) -> [PartitionID: (member: String, epoch: UInt64)] {
        state.withLock { s in
            var out: [PartitionID: (member: String, epoch: UInt64)] = [:]
            for (m, a) in s[group + "\u{1}" + topic] ?? [:] { for (p, e) in a { out[p] = (m, e) } }
            return out
        }
    }
}
