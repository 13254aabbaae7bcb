import CouponKit
import ExactlyOnce
import ExactlyOnceRedis
import Foundation
import Logging
import Metrics
import ServiceLifecycle
import Synchronization

/// The coupon service's parts, independent of HTTP: producers, consumers, read cache, lookups
/// and the legacy issuer, over any ``CouponBackend``.
public final class CouponServiceCore<Backend: CouponBackend>: Sendable {
    /// The opened backends.
    public let backend: Backend
    /// The options it was started with.
    public let options: ServiceOptions
    /// The click producer (nil for `--role consumer`).
    public let clickProducer: BufferedProducer<Backend.Transport>?
    /// The payment-event producer (nil for `--role consumer`).
    public let eventProducer: BufferedProducer<Backend.Transport>?
    /// The legacy design (nil without Redis).
    public let legacy: LegacyIssuer?
    let logger: Logger
    let rate = RateMeter()
    /// Responses of the click endpoint (any status), for load tools that wait for the last one.
    public let clickResponses = Atomic<Int>(0)
    /// Responses of the legacy endpoint (any status).
    public let legacyResponses = Atomic<Int>(0)
    let redisCacheFailures = Counter(label: "coupon_service_read_cache_failures")

    /// How clicks (keyed by coupon id) are partitioned: on Kafka where Kafka's own partitioner
    /// puts the key (murmur2, as a Java or kcat producer would), elsewhere `couponId % n`.
    public static func clickPartitioning(_ options: ServiceOptions) -> Partitioning {
        options.transport == .kafka ? .murmur2 : .modulo
    }

    /// Builds the parts; nothing runs until ``services()`` run.
    public init(backend: Backend, options: ServiceOptions, logger: Logger) throws {
        self.backend = backend
        self.options = options
        self.logger = logger
        if options.role != .consumer {
            var pc = BufferedProducer<Backend.Transport>.Configuration()
            pc.linger = options.linger
            clickProducer = try BufferedProducer(transport: backend.transport, topic: ServiceTopics.clicks,
                                                 partitioning: Self.clickPartitioning(options), configuration: pc, logger: logger)
            eventProducer = try BufferedProducer(transport: backend.transport, topic: ServiceTopics.orderEvents,
                                                 partitioning: .keyed(Murmur2Partitioner()), configuration: pc, logger: logger)
        } else {
            clickProducer = nil
            eventProducer = nil
        }
        legacy = backend.redis.map {
            LegacyIssuer(redis: $0, prefix: options.keyPrefix, lease: options.legacyLease, wait: options.legacyWait, workDelay: options.legacyWorkDelay)
        }
    }

    /// The consumer of clicks, as a `Service`. The service runs one; tests make more to restart it.
    public func makeClickConsumer(memberID: String? = nil) throws -> ExactlyOnceConsumer<Backend.Transport, Backend.Store> {
        var config = ConsumerConfiguration(topic: ServiceTopics.clicks, group: ServiceTopics.group, memberID: memberID ?? options.memberID)
        config.pollWait = .milliseconds(20)
        config.lease = .seconds(10)
        let redis = backend.redis
        let cacheKey = options.keyPrefix + "cache:issued"
        let failures = redisCacheFailures
        return try ExactlyOnceConsumer(
            transport: backend.transport, store: backend.store, configuration: config, logger: logger,
            key: CouponRequest.keyExtractor,
            observer: { record, outcome, _ in
                // The read cache, refreshed after each commit (the observer runs after it): the
                // highest serial issued per coupon. Redis is only a cache: a failure is counted,
                // readers fall back to the store.
                guard let redis, outcome.status == .applied, let serial = Int64(outcome.detailText),
                      let (c, _) = try? CouponRequest.decode(record.payload) else { return }
                do {
                    _ = try await redis.evaluate(script: Self.maxScript, keys: [cacheKey], arguments: [String(c), String(serial)])
                } catch {
                    failures.increment()
                }
            },
            handler: backend.effects.clickHandler)
    }

    /// The consumer of payment events.
    public func makeEventConsumer(memberID: String? = nil) throws -> ExactlyOnceConsumer<Backend.Transport, Backend.Store> {
        var config = ConsumerConfiguration(topic: ServiceTopics.orderEvents, group: ServiceTopics.group, memberID: (memberID ?? options.memberID) + "-events")
        config.pollWait = .milliseconds(20)
        return try ExactlyOnceConsumer(transport: backend.transport, store: backend.store, configuration: config, logger: logger,
                                       key: OrderEvent.keyExtractor, handler: backend.effects.eventHandler)
    }

    /// Sets the hash field to the larger of its value and ARGV[2].
    static var maxScript: String { """
        local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
        if tonumber(ARGV[2]) > v then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
        return 1
        """ }

    /// The services this process runs besides the HTTP server: the producers (role api, all) and
    /// the consumers (role consumer, all).
    public func services() throws -> [any Service] {
        var s: [any Service] = backend.services
        if let clickProducer { s.append(clickProducer) }
        if let eventProducer { s.append(eventProducer) }
        if options.role != .api {
            s.append(try makeClickConsumer())
            s.append(try makeEventConsumer())
        }
        return s
    }

    // MARK: Operations behind the API

    /// Creates a coupon: false when it exists.
    public func createCoupon(_ couponId: Int64, stock: Int64) async throws -> Bool {
        let created = try await backend.catalog.create(couponId: couponId, stock: stock)
        if created, let legacy { try await legacy.create(couponId: couponId, stock: stock) }
        return created
    }

    /// Publishes a click; returns its position once the transport confirmed it.
    public func click(couponId: Int64, memberId: Int64) async throws -> RecordPosition {
        guard let clickProducer else { throw ServiceError("this process runs --role consumer and takes no clicks") }
        let r = CouponRequest(requestId: 0, couponId: couponId, memberId: memberId)
        let p = try await clickProducer.send(r.outgoing)
        rate.tick()
        return p
    }

    /// Publishes a payment event.
    public func publish(_ event: OrderEvent) async throws -> RecordPosition {
        guard let eventProducer else { throw ServiceError("this process runs --role consumer and takes no events") }
        let payload = try JSONEncoder().encode(event)
        return try await eventProducer.send(OutgoingRecord(key: Array(event.orderId.utf8), payload: Array(payload)))
    }

    /// The stored record of a request, waiting up to `wait` for it to be finished.
    public func record(_ key: IdempotencyKey, wait: Duration) async throws -> DedupeRecord? {
        let clock = ContinuousClock()
        let deadline = clock.now + wait
        while true {
            let r = try await backend.store.records(for: [key])[key]
            if let r, r.phase == .completed { return r }
            if clock.now >= deadline { return r }
            try await Task.sleep(for: .milliseconds(5))
        }
    }

    /// A coupon's counts: from the Redis read cache when there is one, else (or when Redis is
    /// away) from the store.
    public func counts(_ couponId: Int64) async throws -> CouponCounts? {
        guard let stock = try await backend.catalog.stock(of: couponId) else { return nil }
        var issued: Int64?
        if let redis = backend.redis {
            do {
                let v = try await redis.send(["HGET", options.keyPrefix + "cache:issued", String(couponId)])
                if v.errorMessage == nil { issued = v.string.flatMap { Int64($0) } ?? 0 }
            } catch {
                redisCacheFailures.increment()
            }
        }
        if issued == nil { issued = try await issuedFromStore(couponId) }
        let n = issued ?? 0
        return CouponCounts(couponId: couponId, stock: stock, issued: n, remaining: max(0, stock - n))
    }

    /// The issued count of a coupon in the source of truth.
    public func issuedFromStore(_ couponId: Int64) async throws -> Int64 {
        try await backend.effects.issued(couponId)
    }

    /// The issued coupons of a coupon from the source of truth.
    public func ledger(_ couponId: Int64) async throws -> [LedgerEntry] {
        try await backend.effects.ledger(couponId)
    }

    /// Clicks accepted per second, over the last full seconds.
    public var requestsPerSecond: Double { rate.perSecond() }
}

/// A coupon's counts, as `GET /coupons/{couponId}` answers them.
public struct CouponCounts: Codable, Sendable, Hashable {
    /// The coupon.
    public var couponId: Int64
    /// Its stock.
    public var stock: Int64
    /// Coupons issued.
    public var issued: Int64
    /// Stock minus issued.
    public var remaining: Int64
}

/// Counts events per second over a short sliding window.
final class RateMeter: Sendable {
    private let buckets = Mutex<[Int64: Int]>([:])
    private static func second() -> Int64 { Int64(Date().timeIntervalSince1970) }

    func tick() {
        let s = Self.second()
        buckets.withLock { b in
            b[s, default: 0] += 1
            if b.count > 8 { b = b.filter { $0.key >= s - 4 } }
        }
    }

    /// Mean over the two seconds before the current one (the current one is still filling).
    func perSecond() -> Double {
        let s = Self.second()
        return buckets.withLock { b in Double((b[s - 1] ?? 0) + (b[s - 2] ?? 0)) / 2 }
    }
}
