import CouponKit
import CouponService
import ExactlyOnce
import ExactlyOnceRedis
import Foundation
import Hummingbird
import HummingbirdTesting
import Testing

#if Postgres
/// `--store postgres`: the coupons, their stock and the issued coupons in plain SQL tables of a
/// throwaway PostgreSQL server, opened through the same `Backends.open` the executable uses.
@Suite(.timeLimit(.minutes(5))) struct PostgresTests {
    @Test func flashSaleOnPostgresWithRepeatedClicks() async throws {
        let (server, db, url) = try await ThrowawayPostgres.database()
        var options = ServiceOptions()
        options.store = .postgres
        options.postgresURL = url
        let backend = try await Backends.open(options)
        #expect(backend.summary.contains("store postgres"), "\(backend.summary)")
        #expect(backend.summary.contains("PostgreSQL"), "\(backend.summary)")
        try await serve(backend, options) { (core: any SaleCore, client: any TestClientProtocol) async throws in
            let clicks = clickSequence(count: 400, members: 150, seed: 17)
            try await flashSale(core: core, client: client, coupon: 7, stock: 40, clicks: clicks)
            // The same sale as a person sees it with psql: plain tables, serials 1...40, one row
            // per winner, the stock row's count; and the HTTP ledger is those rows.
            #expect(try await server.psql("SELECT stock, issued FROM coupon_service.coupon_stock WHERE coupon_id = 7", database: db) == "40|40")
            #expect(try await server.psql("SELECT count(*), count(DISTINCT member_id), min(serial), max(serial) FROM coupon_service.issued_coupons WHERE coupon_id = 7", database: db) == "40|40|1|40")
            let rows = try await server.psql("SELECT member_id || ':' || serial FROM coupon_service.issued_coupons WHERE coupon_id = 7 ORDER BY serial", database: db)
            let http = try await client.call(.get, "/coupons/7/issued").1.split(separator: "\n").map { object(String($0)) }
                .map { "\($0["memberId"] as? Int ?? -1):\($0["serial"] as? Int ?? -1)" }
            #expect(rows.split(separator: "\n").map(String.init) == http)
            // Each outcome in the store's own records: 150 distinct keys at most, all completed.
            let records = try await server.psql("SELECT count(*), count(*) FILTER (WHERE phase = 3) FROM exactly_once.records WHERE key LIKE '7:%'", database: db)
            #expect(records == "\(Set(clicks).count)|\(Set(clicks).count)")
            // A row changed by hand in the database is what the API answers: the counts come from PostgreSQL.
            _ = try await server.psql("UPDATE coupon_service.coupon_stock SET issued = 39 WHERE coupon_id = 7", database: db)
            #expect(object(try await client.call(.get, "/coupons/7").1)["issued"] as? Int == 39)
        }
    }

    @Test func paymentEventsOnPostgres() async throws {
        let (_, _, url) = try await ThrowawayPostgres.database()
        var options = ServiceOptions()
        options.store = .postgres
        options.postgresURL = url
        try await serve(try await Backends.open(options), options) { (_: any SaleCore, client: any TestClientProtocol) async throws in try await paymentEvents(client) }
    }

    @Test func outcomesAndCatalogSurviveARestart() async throws {
        let (_, _, url) = try await ThrowawayPostgres.database()
        var options = ServiceOptions()
        options.store = .postgres
        options.postgresURL = url
        try await serve(try await Backends.open(options), options) { (_: any SaleCore, client: any TestClientProtocol) async throws in
            #expect(try await client.call(.post, "/coupons", #"{"couponId": 9, "stock": 1}"#).0 == .created)
            #expect(try await client.call(.post, "/coupons/9/requests", #"{"memberId": 1}"#).0 == .accepted)
            #expect(try await client.call(.post, "/coupons/9/requests", #"{"memberId": 2}"#).0 == .accepted)
            #expect(object(try await client.call(.get, "/requests/9:2?waitMs=10000").1)["status"] as? String == "soldOut")
        }
        // A new process in effect: the in-memory log starts empty, PostgreSQL keeps the rest.
        try await serve(try await Backends.open(options), options) { (_: any SaleCore, client: any TestClientProtocol) async throws in
            #expect(try await client.call(.post, "/coupons", #"{"couponId": 9, "stock": 5}"#).0 == .conflict)
            let r = object(try await client.call(.get, "/requests/9:1").1)
            #expect(r["status"] as? String == "issued")
            #expect(r["serial"] as? Int == 1)
            #expect(try await client.call(.post, "/coupons/9/requests", #"{"memberId": 1}"#).0 == .accepted)
            #expect(try await client.call(.post, "/coupons/9/requests", #"{"memberId": 3}"#).0 == .accepted)
            #expect(object(try await client.call(.get, "/requests/9:3?waitMs=10000").1)["status"] as? String == "soldOut")
            #expect(try await client.call(.get, "/coupons/9/issued").1.split(separator: "\n").count == 1)
        }
    }

    /// The "Kafka + PostgreSQL + Redis" configuration: the log on Kafka (librdkafka's in-process
    /// mock cluster), the source of truth in PostgreSQL, Redis as the read cache of the counts.
    @Test func kafkaPostgresAndRedisTogether() async throws {
        let (server, db, url) = try await ThrowawayPostgres.database()
        try await ThrowawayRedis.with { redis in
            var options = ServiceOptions()
            options.transport = .kafka
            options.partitions = 3
            options.store = .postgres
            options.postgresURL = url
            options.redisURL = redis.url
            let backend = try await Backends.open(options)
            #expect(backend.summary.contains("kafka on an in-process mock cluster"), "\(backend.summary)")
            #expect(backend.summary.contains("store postgres"), "\(backend.summary)")
            #expect(backend.summary.contains("Redis"), "\(backend.summary)")
            let cache = try redis.client()
            let cacheKey = options.keyPrefix + "cache:issued"
            try await serve(backend, options) { (core: any SaleCore, client: any TestClientProtocol) async throws in
                let stock = 30
                try await flashSale(core: core, client: client, coupon: 5, stock: stock, clicks: clickSequence(count: 300, members: 120, seed: 23), waitMs: 20_000)
                // The read cache was refreshed by the consumer after its commits: it holds the
                // highest serial, which is what PostgreSQL says.
                let clock = ContinuousClock()
                let deadline = clock.now + .seconds(10)
                while try await cache.send(["HGET", cacheKey, "5"]).string != String(stock) && clock.now < deadline {
                    try await Task.sleep(for: .milliseconds(20))
                }
                #expect(try await cache.send(["HGET", cacheKey, "5"]).string == String(stock))
                    #expect(try await server.psql("SELECT issued FROM coupon_service.coupon_stock WHERE coupon_id = 5", database: db) == String(stock))
                // GET /coupons answers from the cache (change it and the answer follows) ...
                _ = try await cache.send(["HSET", cacheKey, "5", "29"])
                #expect(object(try await client.call(.get, "/coupons/5").1)["issued"] as? Int == 29)
                // ... and from PostgreSQL when Redis is away.
                redis.stop()
                let fallback = try await client.call(.get, "/coupons/5")
                #expect(fallback.0 == .ok)
                #expect(object(fallback.1)["issued"] as? Int == stock)
            }
        }
    }

    @Test func postgresSettingsThatCannotWorkAreRefused() async throws {
        var noURL = ServiceOptions()
        noURL.store = .postgres
        await #expect(throws: ServiceError.self) { _ = try await Backends.open(noURL) }
        var urlWithoutStore = ServiceOptions()
        urlWithoutStore.postgresURL = "postgres://u@127.0.0.1/db"
        await #expect(throws: ServiceError.self) { _ = try await Backends.open(urlWithoutStore) }
        var notAURL = ServiceOptions()
        notAURL.store = .postgres
        notAURL.postgresURL = "mysql://u@h/db"
        await #expect(throws: ServiceError.self) { _ = try await Backends.open(notAURL) }
        // Nothing listens there: a clear error, without the password.
        var unreachable = ServiceOptions()
        unreachable.store = .postgres
        unreachable.postgresURL = "postgres://app:s3cret-pw@127.0.0.1:\(try freePort())/shop"
        do {
            _ = try await Backends.open(unreachable)
            Issue.record("opened a PostgreSQL store where no server listens")
        } catch let e as ServiceError {
            #expect(e.message.contains("PostgreSQL at"), "\(e.message)")
            #expect(e.message.contains("storeUnavailable"), "\(e.message)")
            #expect(!e.message.contains("s3cret-pw"), "the password leaked: \(e.message)")
        }
    }
}
#else
/// Without the package trait `Postgres` the service has no PostgreSQL backend, and says so.
@Suite struct PostgresTests {
    @Test func storePostgresNeedsTheTrait() async throws {
        var options = ServiceOptions()
        options.store = .postgres
        options.postgresURL = "postgres://u@127.0.0.1/db"
        do {
            _ = try await Backends.open(options)
            Issue.record("--store postgres opened in a build without the Postgres trait")
        } catch let e as ServiceError {
            #expect(e.message.contains("--traits Postgres"), "\(e.message)")
        }
    }
}
#endif
