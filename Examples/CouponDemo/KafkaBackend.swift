import ArgumentParser
import ExactlyOnce
import ExactlyOnceKafka
import Foundation

/// Kafka (through librdkafka): brokers given with --kafka-brokers, or an in-process mock cluster.
struct KafkaSale: SaleTransport {
    let transport: KafkaTransport
    /// The in-process cluster when no brokers were given (kept alive with the sale).
    let mock: KafkaMockCluster?

    init(brokers: String?, sessionTimeout: Duration, partitions: Int, properties: [String: String] = [:]) async throws {
        var mock: KafkaMockCluster?
        let bootstrap: String
        if let brokers {
            bootstrap = brokers
        } else {
            let m = try KafkaMockCluster(brokers: 3)
            try m.createTopic(saleTopic, partitions: partitions)
            try m.createTopic(saleTopic + ".dlq", partitions: 1)
            mock = m
            bootstrap = m.bootstrapServers
        }
        var config = KafkaTransport.Configuration(bootstrapServers: bootstrap)
        // The mock cluster forms no group below 3 s; a shorter session moves a dead member's
        // partitions sooner.
        config.sessionTimeout = max(.seconds(3), min(sessionTimeout, .seconds(30)))
        // librdkafka's own log (connection refused, brokers down) stays off standard error: what
        // it costs reaches the sale as errors. --kafka-property log_level=3 (or debug=...) shows it.
        config.logLevel = 2
        config.extraProperties = properties
        let transport = try KafkaTransport(configuration: config)
        self.transport = transport
        self.mock = mock
        // Brokers that are not there at the start are a setup error: say so after a few seconds
        // (each try bounded too: a closed port fails fast, a server that never answers does not).
        // The in-process mock answers at once; it gets more time on a loaded machine.
        let bound: Duration = mock == nil ? .seconds(5) : .seconds(30)
        func topicPartitions(_ topic: String) async throws -> Int {
            do {
                return try await retrying(attempts: 1_000, within: bound) {
                    try await transport.partitionCount(of: topic, timeout: .seconds(2))
                }
            } catch let e as ExactlyOnceError where e.isRetriable {
                throw DemoError(message: "no Kafka broker of \(bootstrap) answered within \(bound) (\(e.message))")
            }
        }
        let count = try await topicPartitions(saleTopic)
        guard count == partitions else {
            throw DemoError.usage("topic \(saleTopic) on \(bootstrap) has \(count) partitions, the sale wants --partitions \(partitions)")
        }
        _ = try await topicPartitions(saleTopic + ".dlq")
    }

    func endOffsets() async throws -> [PartitionID: Offset] { try await transport.endOffsets(topic: saleTopic) }
    func isFullyCommitted() async throws -> Bool { try await transport.isFullyCommitted(group: saleGroup, topic: saleTopic) }
    // The member comes back at once under the same id, from the committed offsets.
    func crashed(memberID: String) { transport.restartMember(memberID, group: saleGroup, topic: saleTopic) }
    var deliveredRecords: Int? { nil }
    /// Kafka's own partitioner, murmur2 of the key: the partition a Java producer, or
    /// librdkafka/kcat with `partitioner=murmur2_random`, picks for the same coupon.
    var partitioning: Partitioning { .murmur2 }
}

/// `coupon-demo kafka-mock --brokers 3 --bootstrap-file F`: a standalone mock Kafka cluster for
/// other processes (multi-process sales, kcat), until SIGTERM or SIGINT.
struct KafkaMockCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kafka-mock",
        abstract: "Run librdkafka's mock Kafka cluster until SIGTERM; writes its bootstrap servers to a file.",
        discussion: """
            Creates the sale's topics (\(saleTopic) with --partitions partitions and \(saleTopic).dlq), \
            writes host:port,... to --bootstrap-file once the cluster listens, and keeps it alive until \
            SIGTERM or SIGINT. Point other coupon-demo processes at it with --transport kafka \
            --kafka-brokers "$(cat F)". The mock keeps only about 5 MiB per partition.
            """)

    @Option(help: "Brokers in the cluster (1...32).")
    var brokers = 3

    @Option(name: .customLong("bootstrap-file"), help: "Where to write the bootstrap servers.")
    var bootstrapFile: String

    @Option(help: "Partitions of the sale's topic.")
    var partitions = 3

    @Option(name: .customLong("kafka-property"), help: ArgumentHelp(
        "A librdkafka property NAME=VALUE of the handle hosting the cluster (repeatable): debug=mock logs its group state machine.",
        valueName: "name=value"))
    var kafkaProperties: [String] = []

    mutating func validate() throws {
        guard (1...32).contains(brokers) else { throw ValidationError("--brokers must be in 1...32, got \(brokers)") }
        guard (1...1024).contains(partitions) else { throw ValidationError("--partitions must be in 1...1024, got \(partitions)") }
        guard !bootstrapFile.isEmpty else { throw ValidationError("--bootstrap-file needs a path") }
        _ = try SaleOptions.parseKafkaProperties(kafkaProperties)
    }

    mutating func run() async throws {
        let cluster = try KafkaMockCluster(brokers: brokers, properties: try SaleOptions.parseKafkaProperties(kafkaProperties))
        try cluster.createTopic(saleTopic, partitions: partitions)
        try cluster.createTopic(saleTopic + ".dlq", partitions: 1)
        signal(SIGTERM, SIG_IGN)
        signal(SIGINT, SIG_IGN)
        let stop = AsyncStream<Void> { continuation in
            for sig in [SIGTERM, SIGINT] {
                let source = DispatchSource.makeSignalSource(signal: sig, queue: .main)
                source.setEventHandler { continuation.yield() }
                source.resume()
                KafkaMockCommand.sources.append(source)
            }
        }
        // Written whole, then renamed: a reader never sees half a line.
        let tmp = bootstrapFile + ".tmp-\(ProcessInfo.processInfo.processIdentifier)"
        do {
            try Data((cluster.bootstrapServers + "\n").utf8).write(to: URL(fileURLWithPath: tmp))
            if FileManager.default.fileExists(atPath: bootstrapFile) { try FileManager.default.removeItem(atPath: bootstrapFile) }
            try FileManager.default.moveItem(atPath: tmp, toPath: bootstrapFile)
        } catch {
            throw DemoError.usage("--bootstrap-file \(bootstrapFile) cannot be written (\(ExactlyOnceError.Cause(of: error)))")
        }
        FileHandle.standardError.write(Data("coupon-demo: mock Kafka cluster of \(brokers) brokers at \(cluster.bootstrapServers)\n".utf8))
        for await _ in stop { break }
        cluster.shutDown()
    }

    nonisolated(unsafe) static var sources: [any DispatchSourceSignal] = []
}
