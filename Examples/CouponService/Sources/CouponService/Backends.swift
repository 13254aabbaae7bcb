import CouponKit
import ExactlyOnce
import ExactlyOnceFileStore
import ExactlyOnceKafka
import ExactlyOnceRedis
import Foundation
import ServiceLifecycle

/// Which log the service publishes clicks and payment events to.
///
/// To add a transport (Kafka, say): add a case here, parse it in the executable's `--transport`
/// flag, and open it in ``Backends/open(_:)`` — the rest of the service is generic over
/// `MessageTransport` and does not change.
public enum TransportKind: String, Sendable, CaseIterable {
    /// The library's `InMemoryTransport`: everything in this process (the embedded default).
    case memory
    /// Redis Streams (`RedisStreamsTransport`), shared by every process that uses the same Redis.
    case redisStreams = "redis-streams"
    /// Kafka (`KafkaTransport`): the cluster of `--kafka-brokers`, whose topics must exist, or
    /// without it librdkafka's in-process mock cluster (topics created, nothing outlives the process).
    case kafka
}

/// Which dedupe store is the source of truth (dedupe records and the issued coupons).
///
/// To add a store: add a case here, open it in ``Backends/open(_:)`` with a ``CouponCatalog``
/// and the ``CouponEffects`` that write its transaction type.
public enum StoreKind: String, Sendable, CaseIterable {
    /// `InMemoryDedupeStore`: everything in this process (the embedded default).
    case memory
    /// `FileDedupeStore`: a journal in the data directory, survives restarts.
    case file
    /// `RedisDedupeStore`.
    case redis
    /// `PostgresDedupeStore`: the coupons, their stock and the issued coupons in plain SQL tables
    /// of schema ``PostgresCoupons/schema``, written in the same SQL transaction as the dedupe
    /// record. Needs the service built with the package trait `Postgres`.
    case postgres
}

/// The coupon side of the source of truth: the handlers that write a click's and a payment
/// event's effect in the store's transaction (so it commits with the dedupe record), and the
/// reads of what they wrote.
public protocol CouponEffects<Transaction>: Sendable {
    /// The store's transaction the handlers write through.
    associatedtype Transaction
    /// Issues the next serial of a clicked coupon while its stock lasts.
    var clickHandler: RecordHandler<Transaction> { get }
    /// Applies a payment event (a coupon's use or its restore).
    var eventHandler: RecordHandler<Transaction> { get }
    /// How many coupons of `couponId` were issued.
    func issued(_ couponId: Int64) async throws -> Int64
    /// The issued coupons of `couponId`, by serial.
    func ledger(_ couponId: Int64) async throws -> [LedgerEntry]
}

/// ``CouponEffects`` in the key-value state of a store whose transaction is an
/// `EffectTransaction` (in memory, file, Redis): ``ClickIssuer`` and ``PaymentHandler``.
public struct KeyValueCouponEffects<Store: DedupeStore<EffectTransaction>>: CouponEffects {
    /// The store whose state holds the coupons.
    public let store: Store
    /// Where the click handler reads stock.
    public let catalog: any CouponCatalog

    /// Effects in `store`'s state, stock from `catalog`.
    public init(store: Store, catalog: any CouponCatalog) {
        self.store = store
        self.catalog = catalog
    }

    /// ``ClickIssuer``.
    public var clickHandler: RecordHandler<EffectTransaction> {
        let issuer = ClickIssuer(catalog: catalog)
        return { ctx in try await issuer.handle(&ctx) }
    }

    /// ``PaymentHandler``.
    public var eventHandler: RecordHandler<EffectTransaction> {
        let handler = PaymentHandler()
        return { ctx in try await handler.handle(&ctx) }
    }

    /// The state key `coupon:<c>:issued`.
    public func issued(_ couponId: Int64) async throws -> Int64 {
        let v = try await store.readState(CouponIssuer.issuedKey(couponId)).value
        return v.flatMap { Int64(String(decoding: $0, as: UTF8.self)) } ?? 0
    }

    /// CouponKit's `CouponLedger` over the state.
    public func ledger(_ couponId: Int64) async throws -> [LedgerEntry] {
        try await CouponLedger.read(from: store, coupons: [couponId])
    }
}

/// The opened backends of a running service: the transport, the source of truth, the coupon
/// catalog and (optionally) Redis for the read cache and the legacy lock.
public protocol CouponBackend: Sendable {
    /// The log.
    associatedtype Transport: MessageTransport
    /// The source of truth's dedupe store.
    associatedtype Store: DedupeStore
    /// The coupon handlers and reads for the store's transaction type.
    associatedtype Effects: CouponEffects<Store.Transaction>
    /// The log.
    var transport: Transport { get }
    /// The source of truth.
    var store: Store { get }
    /// The handlers writing the coupons in the store's transaction, and their reads.
    var effects: Effects { get }
    /// Where created coupons and their stock are kept.
    var catalog: any CouponCatalog { get }
    /// Redis, when configured: read cache of coupon counts and the legacy design's lock.
    var redis: RedisCommandClient? { get }
    /// One line saying what was opened, for the startup log.
    var summary: String { get }
    /// Services of the backends themselves (the file store's compaction and close, the
    /// PostgreSQL store's pool), run before the producers and consumers in the same `ServiceGroup`.
    var services: [any Service] { get }
}

/// A ``CouponBackend`` over any transport, store and effects.
public struct OpenedBackend<Transport: MessageTransport, Store: DedupeStore, Effects: CouponEffects<Store.Transaction>>: CouponBackend {
    /// The log.
    public let transport: Transport
    /// The source of truth.
    public let store: Store
    /// The coupon handlers and reads.
    public let effects: Effects
    /// The coupon catalog.
    public let catalog: any CouponCatalog
    /// Redis, when configured.
    public let redis: RedisCommandClient?
    /// What was opened.
    public let summary: String
    /// The backends' own services.
    public let services: [any Service]

    /// Wraps opened backends.
    public init(transport: Transport, store: Store, effects: Effects, catalog: any CouponCatalog, redis: RedisCommandClient?,
                summary: String, services: [any Service] = []) {
        self.transport = transport
        self.store = store
        self.effects = effects
        self.catalog = catalog
        self.redis = redis
        self.summary = summary
        self.services = services
    }

    /// Wraps opened backends whose store has a key-value `EffectTransaction`: the coupons live
    /// in its state (``KeyValueCouponEffects``).
    public init(transport: Transport, store: Store, catalog: any CouponCatalog, redis: RedisCommandClient?, summary: String,
                services: [any Service] = []) where Effects == KeyValueCouponEffects<Store> {
        self.init(transport: transport, store: store, effects: KeyValueCouponEffects(store: store, catalog: catalog),
                  catalog: catalog, redis: redis, summary: summary, services: services)
    }
}

/// Topic names of the service.
public enum ServiceTopics {
    /// Coupon clicks, keyed by coupon id (one coupon, one partition).
    public static let clicks = "coupon-requests"
    /// Payment events, keyed by order id.
    public static let orderEvents = "order-events"
    /// The consumer group.
    public static let group = "coupon-service"
    /// The dead-letter topic of `topic`.
    public static func deadLetters(_ topic: String) -> String { topic + ".dlq" }
}

/// The one place where the service's backends are chosen and opened.
public enum Backends {
    /// Opens the transport, store, catalog and Redis client `options` name, and creates the topics.
    /// - Throws: ``ServiceError`` with a clear message for a combination that cannot work, or
    ///   the backend's error when it cannot be opened.
    public static func open(_ options: ServiceOptions) async throws -> any CouponBackend {
        let redis: RedisCommandClient?
        var redisConfig: RedisConfiguration?
        if let url = options.redisURL {
            do {
                var config = try RedisConfiguration(url: url)
                config.poolSize = max(config.poolSize, options.redisPoolSize)
                redisConfig = config
                redis = try RedisCommandClient(configuration: config)
            } catch {
                // The URL may hold a password: name it through the parsed configuration (which
                // masks it) or not at all.
                let named = redisConfig.map { "\($0)" } ?? "(unparsable URL)"
                throw ServiceError("--redis-url \(named) is not usable: \(ExactlyOnceError.Cause(of: error))")
            }
        } else {
            redis = nil
        }
        if options.role != .all && options.transport == .memory {
            throw ServiceError("--role \(options.role.rawValue) needs a transport shared between processes (--transport redis-streams or kafka); the in-memory transport lives in one process, use --role all")
        }
        if options.kafkaBrokers != nil && options.transport != .kafka {
            throw ServiceError("--kafka-brokers is used with --transport kafka")
        }
        if options.transport == .kafka && options.kafkaBrokers == nil && options.role != .all {
            throw ServiceError("--role \(options.role.rawValue) with --transport kafka needs a shared cluster: --kafka-brokers HOST:PORT[,...]; without it the mock cluster lives in this process, use --role all")
        }
        if options.transport == .kafka && options.kafkaBrokers != nil && options.store == .memory {
            throw ServiceError("--kafka-brokers keeps the clicks and offsets across restarts, so the outcomes must outlive the process too: add --store file, redis or postgres")
        }
        if options.transport == .redisStreams && options.store == .memory {
            // Several processes share the log; the outcomes and the catalog must be shared too.
            throw ServiceError("--transport redis-streams needs a shared store: --store redis or postgres")
        }
        if options.role != .all && options.store != .redis && options.store != .postgres {
            throw ServiceError("--role \(options.role.rawValue) splits the service across processes, which share the outcomes and the coupon catalog: --store redis or postgres")
        }
        if options.postgresURL != nil && options.store != .postgres {
            throw ServiceError("--postgres-url is used with --store postgres")
        }
        if options.store == .postgres {
            #if Postgres
            guard options.postgresURL != nil else {
                throw ServiceError("--store postgres needs --postgres-url postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (or COUPON_SERVICE_POSTGRES_URL)")
            }
            #else
            throw ServiceError("--store postgres needs the service built with the package trait Postgres: swift run --traits Postgres coupon-service --store postgres --postgres-url URL")
            #endif
        }
        let topics = [ServiceTopics.clicks, ServiceTopics.orderEvents]

        var services: [any Service] = []
        let transport: any MessageTransport
        switch options.transport {
        case .memory:
            var t: [String: Int] = [:]
            for topic in topics {
                t[topic] = options.partitions
                t[ServiceTopics.deadLetters(topic)] = 1
            }
            transport = try InMemoryTransport(topics: t)
        case .redisStreams:
            guard let url = options.redisURL else { throw ServiceError("--transport redis-streams needs --redis-url") }
            var config = RedisStreamsTransport.Configuration(redis: try RedisConfiguration(url: url))
            config.keyPrefix = options.keyPrefix + "streams:"
            let streams = try RedisStreamsTransport(configuration: config)
            for topic in topics {
                try await streams.createTopic(topic, partitions: options.partitions)
                try await streams.createTopic(ServiceTopics.deadLetters(topic), partitions: 1)
            }
            transport = streams
        case .kafka:
            let kafka: KafkaTransport
            if let brokers = options.kafkaBrokers {
                kafka = try KafkaTransport(configuration: kafkaConfiguration(brokers, options))
                for topic in topics + topics.map(ServiceTopics.deadLetters) {
                    do {
                        _ = try await kafka.partitionCount(of: topic)
                    } catch let e as ExactlyOnceError where e.code == .unknownTopic {
                        throw ServiceError("topic \(topic) does not exist on \(brokers): create it (and \(ServiceTopics.deadLetters(topic))) before starting the service")
                    }
                }
            } else {
                let mock = try KafkaMockCluster(brokers: 1)
                for topic in topics {
                    try mock.createTopic(topic, partitions: options.partitions)
                    try mock.createTopic(ServiceTopics.deadLetters(topic), partitions: 1)
                }
                kafka = try KafkaTransport(configuration: kafkaConfiguration(mock.bootstrapServers, options))
                services.append(MockClusterService(cluster: mock))
            }
            transport = kafka
        }

        let summary = "transport \(options.transport.rawValue)"
            + (options.transport == .kafka ? (options.kafkaBrokers.map { " on \($0)" } ?? " on an in-process mock cluster") : "")
            + ", store \(options.store.rawValue)"
            + (options.store == .file ? " in \(options.dataDir)" : "")
            + (redis == nil ? ", no Redis (read cache falls back to the store, legacy endpoint answers 503)" : ", Redis \(redisConfig.map { "\($0.endpoint) db \($0.database)" } ?? "")")
        let store: any DedupeStore<EffectTransaction>
        let catalog: any CouponCatalog
        switch options.store {
        case .memory:
            var c = InMemoryDedupeStore.Configuration()
            c.capacity = options.memoryStoreCapacity
            store = try InMemoryDedupeStore(configuration: c)
            catalog = MemoryCatalog()
        case .file:
            do {
                try FileManager.default.createDirectory(atPath: options.dataDir, withIntermediateDirectories: true)
            } catch {
                throw ServiceError("--data-dir \(options.dataDir) cannot be created (\(ExactlyOnceError.Cause(of: error)))")
            }
            let file = try await FileDedupeStore.open(FileStoreConfiguration(directory: options.dataDir + "/store"))
            store = file
            services.append(file)
            catalog = try FileCatalog(path: options.dataDir + "/coupons.json")
        case .redis:
            guard let url = options.redisURL, let redis else { throw ServiceError("--store redis needs --redis-url") }
            store = try RedisDedupeStore(url: url, keyPrefix: options.keyPrefix + "store:")
            catalog = RedisCatalog(redis: redis, key: options.keyPrefix + "coupons")
        case .postgres:
            #if Postgres
            let pg = try await PostgresCoupons.open(options)
            // The store's pool is closed after the consumers stopped (services stop in reverse order).
            return make(transport, pg.store, pg.effects, pg.catalog, redis, summary + ", PostgreSQL \(pg.store.configuration)", [pg.store] + services)
            #else
            throw ServiceError("--store postgres needs the service built with the package trait Postgres")
            #endif
        }
        return make(transport, store, catalog, redis, summary, services)
    }

    /// The Kafka transport's configuration for the service: a short linger (a click is answered
    /// when its delivery report arrives) and the mock's shortest workable session.
    private static func kafkaConfiguration(_ brokers: String, _ options: ServiceOptions) -> KafkaTransport.Configuration {
        var c = KafkaTransport.Configuration(bootstrapServers: brokers)
        c.linger = options.linger
        c.sessionTimeout = .seconds(4)
        return c
    }

    private static func make<T: MessageTransport, S: DedupeStore<EffectTransaction>>(
        _ t: T, _ s: S, _ catalog: any CouponCatalog, _ redis: RedisCommandClient?, _ summary: String, _ services: [any Service]
    ) -> any CouponBackend {
        OpenedBackend(transport: t, store: s, catalog: catalog, redis: redis, summary: summary, services: services)
    }

    private static func make<T: MessageTransport, S: DedupeStore, E: CouponEffects<S.Transaction>>(
        _ t: T, _ s: S, _ effects: E, _ catalog: any CouponCatalog, _ redis: RedisCommandClient?, _ summary: String, _ services: [any Service]
    ) -> any CouponBackend {
        OpenedBackend(transport: t, store: s, effects: effects, catalog: catalog, redis: redis, summary: summary, services: services)
    }
}

/// Keeps the in-process mock Kafka cluster alive while the service runs, and shuts it down last
/// (backend services start first and stop after the producers and consumers).
struct MockClusterService: Service {
    let cluster: KafkaMockCluster

    func run() async throws {
        try? await gracefulShutdown()
        cluster.shutDown()
    }
}
