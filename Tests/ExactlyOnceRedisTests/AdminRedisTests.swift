import CouponKit
import ExactlyOnce
import ExactlyOnceRedis
import Foundation
import Logging
import TestSupport
import Testing

/// `exactly-once-admin` against Redis: lag, and dead letters listed and replayed (once).
@Suite struct AdminRedisTests {
    @Test func lagAndDeadLetterReplayOnRedis() async throws {
        try await RedisTestServer.with { server in
            var tc = RedisStreamsTransport.Configuration(redis: server.unixConfiguration)
            tc.keyPrefix = "adm-streams:"
            let transport = try RedisStreamsTransport(configuration: tc)
            try await transport.createTopic("coupon-requests", partitions: 2)
            try await transport.createTopic("coupon-requests.dlq", partitions: 1)
            var sc = RedisDedupeStore.Configuration(redis: server.unixConfiguration)
            sc.keyPrefix = "adm-store:"
            let store = try RedisDedupeStore(configuration: sc)
            for m in 1...10 as ClosedRange<Int64> {
                _ = try await transport.publish(CouponRequest(requestId: m, couponId: 1 + m % 2, memberId: m).outgoing, to: "coupon-requests", partitioning: .modulo)
            }
            // Member 7 fails until fixed: dead-lettered after its attempts.
            struct Boom: Error {}
            let issuer = CouponIssuer(stock: [1: 10, 2: 10])
            var c = ConsumerConfiguration(topic: "coupon-requests", group: "coupon-issuers", memberID: "m")
            c.retryBackoff = .none
            c.maxAttempts = 2
            c.pollWait = .milliseconds(10)
            let consumer = try ExactlyOnceConsumer(transport: transport, store: store, configuration: c, logger: Logger(label: "t"),
                                                   key: CouponRequest.keyExtractor, handler: { ctx in
                                                       if try CouponRequest.decode(ctx.record.payload).memberId == 7 { throw Boom() }
                                                       return try await issuer.handle(&ctx)
                                                   })
            let session = try await consumer.makeSession()
            for _ in 0..<100 where !(try await transport.isFullyCommitted(group: "coupon-issuers", topic: "coupon-requests")) { try await session.step() }
            try await session.close()

            let admin = ChildProcess.builtProduct("exactly-once-admin")
            let backend = ["--store", "redis", "--redis-url", "unix://\(server.socketPath)", "--key-prefix", "adm-store:", "--streams-prefix", "adm-streams:"]
            let lag = try await ChildProcess.run(admin, ["lag", "--json"] + backend)
            #expect(lag.status == 0, "\(lag.err)")
            let lagJSON = try #require(try JSONSerialization.jsonObject(with: Data(lag.out.utf8)) as? [String: Any], "\(lag.out)")
            #expect(lagJSON["totalLag"] as? Int == 0)
            #expect((lagJSON["partitions"] as? [[String: Any]])?.map { $0["end"] as? Int } == [5, 5])

            let list = try await ChildProcess.run(admin, ["dlq", "list", "--json"] + backend)
            let letters = try #require(try JSONSerialization.jsonObject(with: Data(list.out.utf8)) as? [[String: Any]], "\(list.out + list.err)")
            #expect(letters.count == 1 && letters[0]["key"] as? String == "2:7" && letters[0]["reason"] as? String == "gave up after 2 attempts")

            // A replay is processed once: the key is released, and a second replay only
            // republishes (answered from the store by the consumer).
            let replay = try await ChildProcess.run(admin, ["dlq", "replay", "--key", "2:7", "--json"] + backend)
            #expect(replay.status == 0, "\(replay.err)")
            let out = try #require(try JSONSerialization.jsonObject(with: Data(replay.out.utf8)) as? [String: Any])
            #expect(out["reopened"] as? [String] == ["2:7"])
            let again = try await ChildProcess.run(admin, ["dlq", "replay", "--all"] + backend)
            #expect(again.out.contains("1 replayed") && again.out.contains("0 dead-lettered outcomes released"), "\(again.out)")
            let key = IdempotencyKey.coupon(couponId: 2, memberId: 7)
            #expect(try await store.records(for: [key])[key]?.phase == .released)
            let noFlag = try await ChildProcess.run(admin, ["dlq", "replay"] + backend)
            #expect(noFlag.status == 2 && noFlag.err.contains("exactly one of"))
        }
    }
}
