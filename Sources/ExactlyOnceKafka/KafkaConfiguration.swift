import ExactlyOnce

extension KafkaTransport {
    /// How consumers of one group split partitions (`partition.assignment.strategy`).
    ///
    /// Every member of a group must use the same assignor (members that list assignors
    /// differently break rebalances; librdkafka's mock cluster crashes on it).
    public enum Assignor: String, Sendable, CaseIterable {
        /// Incremental cooperative rebalancing: a rebalance revokes only the partitions that
        /// move; the others keep being consumed (and committed) through it. The default.
        case cooperativeSticky = "cooperative-sticky"
        /// Eager: every rebalance revokes every partition of every member first.
        case range = "range"
        /// Eager, round robin over partitions.
        case roundRobin = "roundrobin"

        /// Whether the assignor rebalances eagerly (all partitions revoked on every rebalance).
        public var isEager: Bool { self != .cooperativeSticky }
    }

    /// The configuration of a ``KafkaTransport``. Every default is documented with its property.
    public struct Configuration: Sendable {
        /// `bootstrap.servers`: `host:port[,host:port...]`.
        public var bootstrapServers: String
        /// `linger.ms`: how long the producer waits to fill a batch. Default: 5 ms.
        public var linger: Duration = .milliseconds(5)
        /// `batch.num.messages`: most records in one produce batch. Default: 10 000.
        public var batchSize: Int = 10_000
        /// `queue.buffering.max.messages`: records the producer buffers before a publish waits
        /// for delivery reports (back-pressure). Default: 200 000.
        public var maxBufferedRecords: Int = 200_000
        /// `message.timeout.ms`: a record not acknowledged by the broker within this time is
        /// reported failed (its outcome unknown). Default: 30 s. Bounds every publish.
        public var deliveryTimeout: Duration = .seconds(30)
        /// `session.timeout.ms`: a consumer that sends no heartbeat for this long leaves the group.
        /// Default: 6 s (librdkafka's mock cluster needs at least 3 s to form a group).
        public var sessionTimeout: Duration = .seconds(6)
        /// `max.poll.interval.ms`: a member that does not poll for this long leaves the group
        /// (and a partition it holds is revoked); the time a batch may take. Default: 60 s.
        public var maxPollInterval: Duration = .seconds(60)
        /// `partition.assignment.strategy`. Default: ``Assignor/cooperativeSticky``.
        public var assignor: Assignor = .cooperativeSticky
        /// The deadline of each metadata, offset, commit and seek request, and of leaving a
        /// group. Default: 10 s.
        public var operationTimeout: Duration = .seconds(10)
        /// How long ``KafkaTransport/subscribe(topic:group:memberID:)`` waits for the first
        /// group join before it returns (the assignment then arrives with later polls).
        /// Default: 30 s.
        public var joinTimeout: Duration = .seconds(30)
        /// `fetch.wait.max.ms`: how long a broker holds a fetch that has no data. Default: 50 ms.
        public var fetchWait: Duration = .milliseconds(50)
        /// More librdkafka properties for every client (producer, consumers, readers), applied
        /// last: they override the settings above (not `enable.auto.commit`, which stays false,
        /// nor `group.id`).
        public var extraProperties: [String: String] = [:]
        /// librdkafka's `log_level` (syslog levels; 3 = errors only). Default: 3.
        public var logLevel: Int = 3

        /// A configuration for `bootstrapServers` with every default.
        public init(bootstrapServers: String) {
            self.bootstrapServers = bootstrapServers
        }

        /// Whether `servers` is a list of `HOST:PORT` entries separated by commas, each with a
        /// non-empty host (which may itself hold colons: a `SCHEME://host` prefix, an IPv6
        /// address) and a port in 1...65535: the form the command-line tools accept for
        /// `--kafka-brokers`. (librdkafka itself also takes a host without a port.)
        package static func isHostPortList(_ servers: String) -> Bool {
            servers.split(separator: ",", omittingEmptySubsequences: false).allSatisfy { entry in
                let parts = entry.split(separator: ":", omittingEmptySubsequences: false)
                guard parts.count >= 2, let port = Int(parts.last!) else { return false }
                return !parts.dropLast().joined(separator: ":").isEmpty && (1...65535).contains(port)
            }
        }

        func validate() throws {
            guard !bootstrapServers.isEmpty else { throw ExactlyOnceError(.invalidConfiguration, "Kafka bootstrap servers are empty") }
            guard batchSize >= 1, maxBufferedRecords >= 1 else { throw ExactlyOnceError(.invalidConfiguration, "batch size and buffered records must be positive") }
            guard sessionTimeout >= .seconds(1), deliveryTimeout >= .milliseconds(100), operationTimeout >= .milliseconds(100) else {
                throw ExactlyOnceError(.invalidConfiguration, "session timeout must be at least 1 s, delivery and operation timeouts at least 100 ms")
            }
        }

        var common: [(String, String)] {
            [("bootstrap.servers", bootstrapServers), ("log_level", "\(logLevel)"), ("allow.auto.create.topics", "false"),
             ("socket.timeout.ms", "\(max(1000, milliseconds(operationTimeout)))"), ("topic.metadata.refresh.interval.ms", "10000")]
        }

        var producerProperties: [(String, String)] {
            common + [
                ("acks", "all"), ("enable.idempotence", "true"), ("linger.ms", "\(milliseconds(linger))"),
                ("batch.num.messages", "\(batchSize)"), ("queue.buffering.max.messages", "\(maxBufferedRecords)"),
                ("message.timeout.ms", "\(max(100, milliseconds(deliveryTimeout)))"),
            ] + extraProperties.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
        }

        func consumerProperties(group: String?, clientID: String) -> [(String, String)] {
            var p = common + [
                ("client.id", clientID), ("enable.auto.offset.store", "false"), ("auto.offset.reset", "earliest"),
                ("enable.partition.eof", "false"), ("fetch.wait.max.ms", "\(milliseconds(fetchWait))"),
                ("session.timeout.ms", "\(milliseconds(sessionTimeout))"),
                ("heartbeat.interval.ms", "\(max(100, milliseconds(sessionTimeout) / 3))"),
                ("max.poll.interval.ms", "\(max(milliseconds(sessionTimeout), milliseconds(maxPollInterval)))"),
                ("partition.assignment.strategy", assignor.rawValue),
            ]
            p += extraProperties.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
            p.append(("enable.auto.commit", "false"))
            if let group { p.append(("group.id", group)) }
            return p
        }
    }
}
