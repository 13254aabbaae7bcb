import CouponService
import ExactlyOnce
import ExactlyOnceRedis
import Foundation
import Hummingbird
import HummingbirdTesting
import Testing

/// Every status code of the API contract (Docs/Service.md, "The API").
@Suite struct ContractTests {
    @Test func couponsClicksOutcomesAndLookups() async throws {
        let core = try makeCore()
        try await running(try core.services()) {
            try await app(core).test(.router) { client in
                #expect(try await client.call(.get, "/health").0 == .ok)
                let metrics = try await client.call(.get, "/metrics")
                #expect(metrics.0 == .ok)

                // POST /coupons: 201, 409, 400.
                let created = try await client.call(.post, "/coupons", #"{"couponId": 1, "stock": 2}"#)
                #expect(created.0 == .created)
                #expect(try await client.call(.post, "/coupons", #"{"couponId": 1, "stock": 5}"#).0 == .conflict)
                #expect(try await client.call(.post, "/coupons", #"{"couponId": "one", "stock": 5}"#).0 == .badRequest)
                #expect(try await client.call(.post, "/coupons", "not json").0 == .badRequest)
                #expect(try await client.call(.post, "/coupons", #"{"couponId": 2, "stock": -1}"#).0 == .badRequest)

                // POST /coupons/{id}/requests: 202 with requestId and position; a repeat: 202, same id.
                let first = try await client.call(.post, "/coupons/1/requests", #"{"memberId": 10}"#)
                #expect(first.0 == .accepted)
                let a = object(first.1)
                #expect(a["requestId"] as? String == "1:10")
                let position = a["position"] as? [String: Any]
                #expect(position?["partition"] as? Int == 1)
                let firstOffset = position?["offset"] as? Int ?? -1
                #expect(firstOffset >= 0)
                let repeatClick = try await client.call(.post, "/coupons/1/requests", #"{"memberId": 10}"#)
                #expect(repeatClick.0 == .accepted)
                #expect(object(repeatClick.1)["requestId"] as? String == "1:10")
                #expect(((object(repeatClick.1)["position"] as? [String: Any])?["offset"] as? Int ?? -1) > firstOffset)
                #expect(try await client.call(.post, "/coupons/99/requests", #"{"memberId": 10}"#).0 == .notFound)
                #expect(try await client.call(.post, "/coupons/1/requests", #"{"member": 10}"#).0 == .badRequest)
                #expect(try await client.call(.post, "/coupons/abc/requests", #"{"memberId": 10}"#).0 == .badRequest)
                _ = try await client.call(.post, "/coupons/1/requests", #"{"memberId": 11}"#)
                _ = try await client.call(.post, "/coupons/1/requests", #"{"memberId": 12}"#)

                // GET /requests/{id}: the stored outcomes (issued with serial, soldOut), pending otherwise.
                let issued = object(try await client.call(.get, "/requests/1:10?waitMs=5000").1)
                #expect(issued["status"] as? String == "issued")
                #expect(issued["serial"] as? Int == 1)
                #expect(object(try await client.call(.get, "/requests/1:11?waitMs=5000").1)["serial"] as? Int == 2)
                let soldOut = try await client.call(.get, "/requests/1:12?waitMs=5000")
                #expect(soldOut.0 == .ok)
                #expect(object(soldOut.1)["status"] as? String == "soldOut")
                #expect(object(try await client.call(.get, "/requests/1:999").1)["status"] as? String == "pending")
                #expect(try await client.call(.get, "/requests/1::2").0 == .badRequest)
                #expect(try await client.call(.get, "/requests/1:10?waitMs=-4").0 == .badRequest)

                // GET /coupons/{id} (no Redis: from the store) and /issued (JSON lines).
                let counts = object(try await client.call(.get, "/coupons/1").1)
                #expect(counts["couponId"] as? Int == 1)
                #expect(counts["stock"] as? Int == 2)
                #expect(counts["issued"] as? Int == 2)
                #expect(counts["remaining"] as? Int == 0)
                #expect(try await client.call(.get, "/coupons/98").0 == .notFound)
                #expect(try await client.call(.get, "/coupons/x").0 == .badRequest)
                let lines = try await client.call(.get, "/coupons/1/issued")
                #expect(lines.0 == .ok)
                let entries = lines.1.split(separator: "\n").map { object(String($0)) }
                #expect(entries.count == 2)
                #expect(entries.map { $0["memberId"] as? Int } == [10, 11])
                #expect(entries.map { $0["serial"] as? Int } == [1, 2])
                #expect(entries.allSatisfy { $0["couponId"] as? Int == 1 })
                #expect(try await client.call(.get, "/coupons/98/issued").0 == .notFound)

                // The legacy design needs Redis: 503 with a clear message.
                let legacy = try await client.call(.post, "/legacy/coupons/1/issue", #"{"memberId": 10}"#)
                #expect(legacy.0 == .serviceUnavailable)
                #expect(legacy.1.contains("--redis-url"))

                // POST /orders/{orderId}/events: 202, 400.
                let event = try await client.call(.post, "/orders/o-1/events", #"{"eventId": "e1", "type": "use", "couponId": 1, "memberId": 10}"#)
                #expect(event.0 == .accepted)
                #expect(object(event.1)["requestId"] as? String == "order:o-1:e1")
                #expect(object(try await client.call(.get, "/requests/order:o-1:e1?waitMs=5000").1)["detail"] as? String == "used")
                #expect(try await client.call(.post, "/orders/o-1/events", #"{"eventId": 2, "type": "sell", "couponId": 1, "memberId": 10}"#).0 == .badRequest)
                #expect(try await client.call(.post, "/orders/o!1/events", #"{"eventId": 2, "type": "use", "couponId": 1, "memberId": 10}"#).0 == .badRequest)
            }
        }
    }

    @Test func aClickStaysPendingUntilProcessed() async throws {
        // --role api: nothing consumes, so the accepted click stays pending.
        let core = try makeCore(role: .api)
        try await running(try core.services()) {
            try await app(core).test(.router) { client in
                _ = try await client.call(.post, "/coupons", #"{"couponId": 3, "stock": 1}"#)
                #expect(try await client.call(.post, "/coupons/3/requests", #"{"memberId": 1}"#).0 == .accepted)
                let r = try await client.call(.get, "/requests/3:1?waitMs=200")
                #expect(r.0 == .ok)
                #expect(object(r.1)["status"] as? String == "pending")
            }
        }
    }

    @Test func brokerUnreachableAnswers503NeverA202() async throws {
        // A Redis Streams transport on a port where nothing listens.
        var redis = try RedisConfiguration(url: "redis://127.0.0.1:\(try freePort())")
        redis.connectAttempts = 1
        redis.connectTimeout = .milliseconds(500)
        let transport = try RedisStreamsTransport(configuration: .init(redis: redis))
        var options = ServiceOptions()
        options.role = .api
        let backend = OpenedBackend(transport: transport, store: try InMemoryDedupeStore(), catalog: MemoryCatalog(), redis: nil, summary: "dead broker")
        let core = try CouponServiceCore(backend: backend, options: options, logger: quiet)
        try await running(try core.services()) {
            try await app(core).test(.router) { client in
                #expect(try await client.call(.post, "/coupons", #"{"couponId": 4, "stock": 1}"#).0 == .created)
                let r = try await client.call(.post, "/coupons/4/requests", #"{"memberId": 1}"#)
                #expect(r.0 == .serviceUnavailable)
                #expect(r.1.contains("error"))
                let e = try await client.call(.post, "/orders/o1/events", #"{"eventId": "e1", "type": "use", "couponId": 4, "memberId": 1}"#)
                #expect(e.0 == .serviceUnavailable)
            }
        }
    }
}
