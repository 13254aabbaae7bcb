import CouponKit
import ExactlyOnce
import ExactlyOnceTestKit
import Logging
import TestSupport
import Testing
@testable import ExactlyOnceRedis

/// The whole Redis stack: a flash sale through `ExactlyOnceConsumer` over the Redis Streams
/// transport and the Redis dedupe store, with two members, every request published twice, and
/// a member that crashes (is dropped without closing) halfway.
@Suite("Redis end to end", .serialized, .timeLimit(.minutes(1)))
struct RedisEndToEndTests {
    @Test func flashSaleOverRedisStreamsAndRedisStore() async throws {
        try await RedisTestServer.with { server in
            var tc = RedisStreamsTransport.Configuration(redis: server.unixConfiguration)
            tc.keyPrefix = "e2e-streams:"
            tc.sessionTimeout = .milliseconds(300)
            let transport = try RedisStreamsTransport(configuration: tc)
            try await transport.createTopic("coupons", partitions: 3)
            try await transport.createTopic("coupons.dlq", partitions: 1)
            var sc = RedisDedupeStore.Configuration(redis: server.unixConfiguration)
            sc.keyPrefix = "e2e-store:"
            let store = try RedisDedupeStore(configuration: sc)

            let stock: [Int64: Int64] = [1: 5, 2: 10, 3: 40]
            var requests: [CouponRequest] = []
            var rng = SeededRandom(seed: 2026)
            for i in 0..<120 {
                requests.append(CouponRequest(requestId: Int64(i), couponId: Int64.random(in: 1...3, using: &rng), memberId: Int64.random(in: 1...30, using: &rng)))
            }
            for r in requests + requests {  // F9: every request published twice
                _ = try await transport.publish(r.outgoing, to: "coupons", partitioning: .modulo)
            }

            func consumer(_ member: String) throws -> ExactlyOnceConsumer<RedisStreamsTransport, RedisDedupeStore> {
                var c = ConsumerConfiguration(topic: "coupons", group: "g", memberID: member)
                c.retryBackoff = .none
                c.unavailableBackoff = .none
                c.lease = .milliseconds(500)
                return try ExactlyOnceConsumer(transport: transport, store: store, configuration: c,
                                               logger: Logger(label: "e2e", factory: { _ in SwiftLogNoOpLogHandler() }),
                                               key: CouponRequest.keyExtractor, handler: CouponIssuer(stock: stock).handler)
            }
            let a = try await consumer("a").makeSession()
            let crashing = try await consumer("b").makeSession()
            for _ in 0..<3 {
                _ = try await a.step()
                _ = try await crashing.step()
            }
            // b crashes: it never polls or closes again; its session lapses and a takes over.
            var steps = 0
            while try await !transport.isFullyCommitted(group: "g", topic: "coupons"), steps < 2000 {
                _ = try await a.step()
                steps += 1
                if steps % 20 == 0 { try await Task.sleep(for: .milliseconds(20)) }
            }
            #expect(try await transport.isFullyCommitted(group: "g", topic: "coupons"))

            // Independent audit from the published requests and the ledger read back from Redis.
            let ledger = try await CouponLedger.read(from: store, coupons: Array(stock.keys))
            for (coupon, limit) in stock {
                let issued = ledger.filter { $0.couponId == coupon }
                let firstMembers = requests.filter { $0.couponId == coupon }.map(\.memberId).reduce(into: [Int64]()) { if !$0.contains($1) { $0.append($1) } }
                #expect(issued.count == min(Int(limit), firstMembers.count), "coupon \(coupon): over- or under-issued")
                #expect(Set(issued.map(\.memberId)).count == issued.count, "coupon \(coupon) issued twice to one member")
                // G2 with one lane per coupon: the first `limit` distinct members in publish order win.
                #expect(Set(issued.map(\.memberId)) == Set(firstMembers.prefix(Int(limit))), "coupon \(coupon): not first come, first served")
            }
        }
    }
}
