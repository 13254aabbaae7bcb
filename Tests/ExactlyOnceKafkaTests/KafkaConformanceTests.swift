import CRdKafka
import ExactlyOnce
import ExactlyOnceTestKit
import Testing
@testable import ExactlyOnceKafka

/// One mock cluster for every Kafka test of this process (its first group join is slow).
enum SharedMock {
    static let cluster: KafkaMockCluster = {
        do { return try KafkaMockCluster(brokers: 3) } catch { fatalError("mock cluster: \(error)") }
    }()
    nonisolated(unsafe) static var counter = 0

    /// A fresh topic name (every test gets its own topics, so tests can share the cluster).
    static func topic(_ base: String, partitions: Int) throws -> String {
        var g = SystemRandomNumberGenerator()
        let name = "\(base)-\(String(g.next() as UInt64, radix: 36))"
        try cluster.createTopic(name, partitions: partitions)
        return name
    }

    static func configuration() -> KafkaTransport.Configuration {
        var c = KafkaTransport.Configuration(bootstrapServers: cluster.bootstrapServers)
        c.sessionTimeout = .seconds(4)
        return c
    }
}

@Suite("Kafka transport conformance", .timeLimit(.minutes(5)))
struct KafkaConformanceTests {
    /// The test kit's transport conformance suite on librdkafka's mock cluster.
    @Test func passesTransportConformance() async throws {
        let transport = try KafkaTransport(configuration: SharedMock.configuration())
        // Each check gets its own topic (and so its own groups' offsets) on the shared cluster.
        try await TransportConformance.run(makeTransport: { topic, partitions in
            try SharedMock.cluster.createTopic(topic, partitions: partitions)
            return transport
        }, topicPrefix: "kconf-\(UInt64.random(in: 0...UInt64.max))-")
    }

    /// librdkafka's errors map to the library's codes, and keep librdkafka's error name as the
    /// cause (never the broker's message): an unknown topic or a refused configuration is not
    /// retriable, a broker that is down is.
    @Test func librdkafkaErrorsKeepTheirNameAsTheCause() {
        let unknown = kafkaError(RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART, "publish")
        #expect(unknown.code == .unknownTopic && !unknown.isRetriable)
        #expect(unknown.cause == ExactlyOnceError.Cause(type: "rd_kafka_resp_err_t", code: "UNKNOWN_TOPIC_OR_PART"))
        let config = kafkaError(RD_KAFKA_RESP_ERR_INVALID_CONFIG, "create topic")
        #expect(config.code == .transportFailure && !config.isRetriable && config.cause?.code == "INVALID_CONFIG")
        let down = kafkaError(RD_KAFKA_RESP_ERR__TRANSPORT, "poll")
        #expect(down.code == .transportUnavailable && down.isRetriable && down.cause?.code == "_TRANSPORT")
        let stale = kafkaError(RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION, "commit")
        #expect(stale.code == .staleGeneration && stale.cause?.code == "ILLEGAL_GENERATION")
    }

    /// The `--kafka-brokers` form both command-line tools accept: every comma-separated entry a
    /// non-empty host (colons allowed in it) and a port in 1...65535.
    @Test func hostPortListsAreCheckedEntryByEntry() {
        for good in ["h:1", "127.0.0.1:9092,127.0.0.1:9093", "PLAINTEXT://kafka:9092", "::1:65535"] {
            #expect(KafkaTransport.Configuration.isHostPortList(good), "\(good)")
        }
        for bad in ["", "nohost", ":9092", "h:0", "h:65536", "h:x", "h:1,", "h:1,,h:2", "h:1,nohost"] {
            #expect(!KafkaTransport.Configuration.isHostPortList(bad), "\(bad)")
        }
    }
}
