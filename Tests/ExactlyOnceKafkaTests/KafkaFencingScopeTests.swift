import ExactlyOnce
import Testing
@testable import ExactlyOnceKafka

/// The fencing scope of Kafka subscriptions: one per cluster, group and topic, the same for every
/// member of a group whatever brokers it was given, and a new one for each new mock cluster.
@Suite("Kafka fencing scopes", .timeLimit(.minutes(2)))
struct KafkaFencingScopeTests {
    /// Mock clusters one after the other in one process: librdkafka names a mock after its
    /// memory address, which the next mock often reuses, so their cluster ids can be the same;
    /// their fencing scopes never are (they name the brokers' ports too). Two transports on one
    /// mock, one given all its brokers and one a single broker, share the scope.
    @Test func eachMockClusterHasAScopeOfItsOwnAndEveryMemberOfItTheSame() async throws {
        var ids: [String] = []
        var scopes: [String] = []
        for _ in 0..<4 {
            let cluster = try KafkaMockCluster(brokers: 3)
            try cluster.createTopic("t", partitions: 1)
            var config = SharedMock.configuration(for: cluster)
            config.sessionTimeout = .seconds(3)
            let all = try KafkaTransport(configuration: config)
            config.bootstrapServers = String(cluster.bootstrapServers.split(separator: ",").last!)
            let one = try KafkaTransport(configuration: config)
            ids.append(try await all.clusterID())
            let a = try await all.subscribe(topic: "t", group: "g", memberID: "a")
            let b = try await one.subscribe(topic: "t", group: "g", memberID: "b")
            #expect(a.fencingScope == b.fencingScope, "members of one group on one cluster share the scope")
            #expect(a.fencingScope.hasPrefix("kafka:\(ids.last!)@") && a.fencingScope.hasSuffix("/g/t"), "\(a.fencingScope)")
            scopes.append(a.fencingScope)
            try await a.close()
            try await b.close()
            cluster.shutDown()
        }
        #expect(Set(scopes).count == scopes.count, "a scope per mock cluster: \(scopes) (cluster ids \(ids))")
    }
}
