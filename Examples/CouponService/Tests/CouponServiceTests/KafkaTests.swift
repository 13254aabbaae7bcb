import CouponKit
import CouponService
import ExactlyOnce
import Foundation
import Hummingbird
import HummingbirdTesting
import Testing

/// The service on `--transport kafka` without `--kafka-brokers`: librdkafka's in-process mock
/// cluster (the Kafka protocol over local sockets), opened through the same `Backends.open` the
/// executable uses.
@Suite(.timeLimit(.minutes(3))) struct KafkaServiceTests {
    @Test func flashSaleThroughHTTPOnTheKafkaMockCluster() async throws {
        var options = ServiceOptions()
        options.transport = .kafka
        options.partitions = 3
        let backend = try await Backends.open(options)
        #expect(backend.summary.contains("kafka on an in-process mock cluster"), "\(backend.summary)")
        try await sale(backend, options)
    }

    func sale<B: CouponBackend>(_ backend: B, _ options: ServiceOptions) async throws {
        let core = try CouponServiceCore(backend: backend, options: options, logger: quiet)
        let stock = 30
        let clicks = clickSequence(count: 300, members: 120, seed: 11)
        try await running(try core.services()) {
            try await app(core).test(.router) { client in
                #expect(try await client.call(.post, "/coupons", #"{"couponId": 5, "stock": \#(stock)}"#).0 == .created)
                // A click answers 202 with the position the broker's delivery report gave it.
                let first = try await client.call(.post, "/coupons/5/requests", #"{"memberId": \#(clicks[0])}"#)
                #expect(first.0 == .accepted, "\(first.1)")
                let position = try #require(object(first.1)["position"] as? [String: Any])
                // Kafka's own partitioner for the key "5" (what a Java or kcat producer picks).
                #expect(position["partition"] as? Int == Int(try Murmur2Partitioner().partition(forKey: Array("5".utf8), partitionCount: 3).rawValue))
                #expect((position["offset"] as? Int ?? -1) >= 0)
                let statuses = try await sendClicks(client, coupon: 5, Array(clicks.dropFirst()), workers: 8)
                #expect(statuses.allSatisfy { $0 == .accepted })
                var issued = 0
                var soldOut = 0
                for m in Set(clicks) {
                    let o = object(try await client.call(.get, "/requests/5:\(m)?waitMs=20000").1)
                    if o["status"] as? String == "issued" { issued += 1 } else if o["status"] as? String == "soldOut" { soldOut += 1 }
                }
                #expect(issued == stock)
                #expect(soldOut == Set(clicks).count - stock)
                try await expectFirstComeFirstServed(core: core, client: client, coupon: 5, stock: stock)
            }
        }
    }

    @Test func kafkaCombinationsThatCannotWorkAreRefused() async throws {
        var api = ServiceOptions()
        api.transport = .kafka
        api.role = .api
        await #expect(throws: ServiceError.self) { _ = try await Backends.open(api) }  // the mock lives in one process
        var memory = ServiceOptions()
        memory.transport = .kafka
        memory.kafkaBrokers = "127.0.0.1:9"
        await #expect(throws: ServiceError.self) { _ = try await Backends.open(memory) }  // outcomes must outlive the process
        var brokersWithoutKafka = ServiceOptions()
        brokersWithoutKafka.kafkaBrokers = "127.0.0.1:9"
        await #expect(throws: ServiceError.self) { _ = try await Backends.open(brokersWithoutKafka) }
    }
}
