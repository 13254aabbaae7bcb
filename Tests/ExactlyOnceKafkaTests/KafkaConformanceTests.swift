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
}
