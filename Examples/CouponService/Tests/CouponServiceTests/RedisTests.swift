import CouponService
import ExactlyOnce
import ExactlyOnceRedis
import Foundation
import Hummingbird
import HummingbirdTesting
import Testing

/// The parts that need Redis: the legacy design's status codes and the read cache.
@Suite struct RedisTests {
    /// A Redis URL's password never shows: not in the startup summary, not in errors.
    @Test func theRedisPasswordNeverShows() async throws {
        var options = ServiceOptions()
        options.redisURL = "redis://app:s3cret-pw@127.0.0.1:6399/0"
        let backend = try await Backends.open(options)
        #expect(backend.summary.contains("127.0.0.1:6399"), "\(backend.summary)")
        #expect(!backend.summary.contains("s3cret-pw"), "the password leaked: \(backend.summary)")
        var bad = ServiceOptions()
        bad.redisURL = "redis://app:s3cret-pw@127.0.0.1:6399/notadb"
        do {
            _ = try await Backends.open(bad)
            Issue.record("opened Redis with a database that is not a number")
        } catch let e as ServiceError {
            #expect(!e.message.contains("s3cret-pw"), "the password leaked: \(e.message)")
        }
    }

    @Test func legacyDesignStatusCodesAndAudit() async throws {
        try await ThrowawayRedis.with { redis in
            let client = try redis.client()
            let core = try makeCore(redis: client) { $0.legacyWait = .milliseconds(100) }
            try await running(try core.services()) {
                try await app(core).test(.router) { http in
                    #expect(try await http.call(.post, "/coupons", #"{"couponId": 5, "stock": 2}"#).0 == .created)
                    let issued = try await http.call(.post, "/legacy/coupons/5/issue", #"{"memberId": 1}"#)
                    #expect(issued.0 == .ok)
                    #expect(object(issued.1)["status"] as? String == "issued")
                    #expect(object(issued.1)["serial"] as? Int == 1)
                    let again = try await http.call(.post, "/legacy/coupons/5/issue", #"{"memberId": 1}"#)
                    #expect(again.0 == .conflict)
                    #expect(object(again.1)["status"] as? String == "alreadyIssued")
                    #expect(object(try await http.call(.post, "/legacy/coupons/5/issue", #"{"memberId": 2}"#).1)["serial"] as? Int == 2)
                    let soldOut = try await http.call(.post, "/legacy/coupons/5/issue", #"{"memberId": 3}"#)
                    #expect(soldOut.0 == .conflict)
                    #expect(object(soldOut.1)["status"] as? String == "soldOut")
                    #expect(try await http.call(.post, "/legacy/coupons/77/issue", #"{"memberId": 3}"#).0 == .notFound)
                    #expect(try await http.call(.post, "/legacy/coupons/5/issue", "{}").0 == .badRequest)

                    // Someone else holds the lock longer than the wait budget: 503.
                    let lockKey = core.options.keyPrefix + "legacy:coupon:5:lock"
                    #expect(try await client.send(["SET", lockKey, "someone-else", "PX", "5000"]).string == "OK")
                    let timeout = try await http.call(.post, "/legacy/coupons/5/issue", #"{"memberId": 4}"#)
                    #expect(timeout.0 == .serviceUnavailable)
                    #expect(try await client.send(["GET", lockKey]).string == "someone-else", "a failed tryLock leaves the holder's lock alone")
                    _ = try await client.send(["DEL", lockKey])

                    let audit = object(try await http.call(.get, "/legacy/coupons/5/audit").1)
                    #expect(audit["issued"] as? Int == 2)
                    #expect(audit["overIssued"] as? Int == 0)
                    #expect(audit["doubleIssued"] as? Int == 0)
                    #expect(audit["lockTimeouts"] as? Int == 1)
                    // Arrival order 1, 1, 2, 3, 4: winners 1 and 2, as issued.
                    #expect(audit["fcfsViolations"] as? Int == 0)
                }
            }
        }
    }

    @Test func readCacheIsRefreshedAfterCommitsAndTheStoreIsTheFallback() async throws {
        try await ThrowawayRedis.with { redis in
            var config = try RedisConfiguration(url: redis.url)
            config.connectAttempts = 1
            config.connectTimeout = .milliseconds(300)
            config.commandTimeout = .milliseconds(500)
            let client = try RedisCommandClient(configuration: config)
            let core = try makeCore(redis: client)
            try await running(try core.services()) {
                try await app(core).test(.router) { http in
                    #expect(try await http.call(.post, "/coupons", #"{"couponId": 6, "stock": 10}"#).0 == .created)
                    for m in 1...4 { #expect(try await http.call(.post, "/coupons/6/requests", #"{"memberId": \#(m)}"#).0 == .accepted) }
                    for m in 1...4 { _ = try await http.call(.get, "/requests/6:\(m)?waitMs=5000") }
                    // The observer writes the cache after the commit; give it a moment.
                    let cacheKey = core.options.keyPrefix + "cache:issued"
                    let clock = ContinuousClock()
                    let deadline = clock.now + .seconds(5)
                    while try await client.send(["HGET", cacheKey, "6"]).string != "4" && clock.now < deadline {
                        try await Task.sleep(for: .milliseconds(10))
                    }
                    #expect(try await client.send(["HGET", cacheKey, "6"]).string == "4")
                    // The answer comes from the cache: change the cache, the answer follows.
                    _ = try await client.send(["HSET", cacheKey, "6", "3"])
                    #expect(object(try await http.call(.get, "/coupons/6").1)["issued"] as? Int == 3)
                    // Redis away: the store answers.
                    redis.stop()
                    let fallback = try await http.call(.get, "/coupons/6")
                    #expect(fallback.0 == .ok)
                    #expect(object(fallback.1)["issued"] as? Int == 4)
                    #expect(object(fallback.1)["remaining"] as? Int == 6)
                }
            }
        }
    }
}
