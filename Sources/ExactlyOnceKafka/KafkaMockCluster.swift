import CRdKafka
import ExactlyOnce
import Synchronization

/// librdkafka's in-process mock Kafka cluster (`rd_kafka_mock_cluster_new`): real Kafka protocol
/// on local TCP ports, no broker installation. For tests, the demo and benchmarks.
///
/// The mock of librdkafka 2.0.2 supports produce, fetch, consumer groups (join, sync, heartbeat,
/// offset commit and fetch) and idempotent producers; it has no topic administration over the
/// protocol (topics are created here, with ``createTopic(_:partitions:replicationFactor:)``),
/// keeps only about 5 MiB per partition, and its first group join takes about 3 s.
/// The cluster lives until this object is released.
public final class KafkaMockCluster: @unchecked Sendable {
    private let handle: KafkaHandle
    private let lock = Mutex(())
    nonisolated(unsafe) private var cluster: OpaquePointer?
    /// The bootstrap servers (`host:port,...`) of the cluster's brokers.
    public let bootstrapServers: String
    /// The number of brokers.
    public let brokerCount: Int

    /// Starts a cluster of `brokers` brokers on free local ports.
    /// - Parameters:
    ///   - brokers: How many brokers (1...32). Default: 3.
    ///   - properties: librdkafka properties of the handle that hosts the cluster
    ///     (`debug=mock` logs the mock's group state machine on standard error). Default: none.
    /// - Throws: `ExactlyOnceError/Code/invalidConfiguration` for a broker count outside 1...32
    ///   or a property librdkafka refuses, `ExactlyOnceError/Code/transportFailure` when
    ///   librdkafka cannot start it.
    public init(brokers: Int = 3, properties: [String: String] = [:]) throws {
        guard (1...32).contains(brokers) else { throw ExactlyOnceError(.invalidConfiguration, "a mock cluster needs 1...32 brokers, got \(brokers)") }
        let conf = try KafkaConf([("log_level", "3")] + properties.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })
        let h = try KafkaHandle(type: RD_KAFKA_PRODUCER, conf: conf)
        guard let mc = rd_kafka_mock_cluster_new(h.pointer, Int32(brokers)) else {
            throw ExactlyOnceError(.transportFailure, "rd_kafka_mock_cluster_new failed")
        }
        handle = h
        cluster = mc
        bootstrapServers = String(cString: rd_kafka_mock_cluster_bootstraps(mc))
        brokerCount = brokers
    }

    private func withCluster<T>(_ body: (OpaquePointer) throws -> T) throws -> T {
        try lock.withLock { _ in
            guard let c = cluster else { throw ExactlyOnceError(.shutDown, "the mock cluster was shut down") }
            return try body(c)
        }
    }

    /// Creates `topic` with `partitions` partitions.
    /// - Throws: `ExactlyOnceError/Code/invalidConfiguration` when the mock refuses it.
    public func createTopic(_ topic: String, partitions: Int, replicationFactor: Int = 1) throws {
        guard !topic.isEmpty, (1...10_000).contains(partitions) else {
            throw ExactlyOnceError(.invalidConfiguration, "topic \(topic): name must not be empty, partitions in 1...10000 (got \(partitions))")
        }
        let err = try withCluster { rd_kafka_mock_topic_create($0, topic, Int32(partitions), Int32(max(1, min(replicationFactor, brokerCount)))) }
        guard err == RD_KAFKA_RESP_ERR_NO_ERROR else { throw ExactlyOnceError(.invalidConfiguration, "create topic \(topic): \(kafkaErrorText(err))") }
    }

    /// Takes broker `id` (1-based) down: its connections close and it accepts none until
    /// ``setBrokerUp(_:)``.
    public func setBrokerDown(_ id: Int) throws {
        let err = try withCluster { rd_kafka_mock_broker_set_down($0, Int32(id)) }
        guard err == RD_KAFKA_RESP_ERR_NO_ERROR else { throw ExactlyOnceError(.invalidConfiguration, "broker \(id) down: \(kafkaErrorText(err))") }
    }

    /// Brings broker `id` back up.
    public func setBrokerUp(_ id: Int) throws {
        let err = try withCluster { rd_kafka_mock_broker_set_up($0, Int32(id)) }
        guard err == RD_KAFKA_RESP_ERR_NO_ERROR else { throw ExactlyOnceError(.invalidConfiguration, "broker \(id) up: \(kafkaErrorText(err))") }
    }

    /// Makes broker `id` the leader of `topic`'s `partition`.
    public func setPartitionLeader(topic: String, partition: Int, broker id: Int) throws {
        let err = try withCluster { rd_kafka_mock_partition_set_leader($0, topic, Int32(partition), Int32(id)) }
        guard err == RD_KAFKA_RESP_ERR_NO_ERROR else { throw ExactlyOnceError(.invalidConfiguration, "leader of \(topic)/\(partition): \(kafkaErrorText(err))") }
    }

    /// The Kafka API requests whose errors can be injected.
    public enum RequestKind: Int16, Sendable, CaseIterable {
        /// Produce (publishing).
        case produce = 0
        /// Fetch (consuming).
        case fetch = 1
        /// ListOffsets (end offsets).
        case listOffsets = 2
        /// Metadata.
        case metadata = 3
        /// OffsetCommit (commits).
        case offsetCommit = 8
        /// OffsetFetch (committed offsets).
        case offsetFetch = 9
        /// FindCoordinator.
        case findCoordinator = 10
        /// JoinGroup.
        case joinGroup = 11
        /// Heartbeat.
        case heartbeat = 12
        /// SyncGroup.
        case syncGroup = 14
    }

    /// The broker errors that can be injected (a selection of Kafka's error codes).
    public enum InjectedError: Int32, Sendable, CaseIterable {
        /// NOT_LEADER_FOR_PARTITION (retriable).
        case notLeaderForPartition = 6
        /// REQUEST_TIMED_OUT (retriable).
        case requestTimedOut = 7
        /// NOT_ENOUGH_REPLICAS (retriable).
        case notEnoughReplicas = 19
        /// NOT_COORDINATOR (retriable).
        case notCoordinator = 16
        /// COORDINATOR_LOAD_IN_PROGRESS (retriable).
        case coordinatorLoadInProgress = 14
        /// COORDINATOR_NOT_AVAILABLE (retriable: the client looks the coordinator up again).
        case coordinatorNotAvailable = 15
        /// ILLEGAL_GENERATION: the group has moved past the generation the request carries. On
        /// an OffsetCommit, librdkafka before 2.8.3 also forgets its own generation while it
        /// rejoins (confluentinc/librdkafka#4059).
        case illegalGeneration = 22
        /// UNKNOWN_MEMBER_ID: the group does not know the member.
        case unknownMemberId = 25
        /// REBALANCE_IN_PROGRESS: on a Heartbeat, the member joins the group again.
        case rebalanceInProgress = 27
    }

    /// Makes the next `errors.count` requests of `kind` (to any broker) fail, in order, with
    /// `errors` (`rd_kafka_mock_push_request_errors_array`).
    public func pushRequestErrors(_ kind: RequestKind, _ errors: [InjectedError]) throws {
        let codes = errors.map { rd_kafka_resp_err_t(rawValue: $0.rawValue) }
        try withCluster { c in
            codes.withUnsafeBufferPointer { buf in
                rd_kafka_mock_push_request_errors_array(c, kind.rawValue, buf.count, buf.baseAddress)
            }
        }
    }

    /// Stops the cluster (also done when the object is released).
    public func shutDown() {
        lock.withLock { _ in
            if let mc = cluster { rd_kafka_mock_cluster_destroy(mc) }
            cluster = nil
        }
    }

    deinit {
        shutDown()
        _ = handle
    }
}
