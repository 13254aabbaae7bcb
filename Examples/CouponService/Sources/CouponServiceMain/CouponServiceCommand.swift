import ArgumentParser
import CouponService
import Foundation
import Hummingbird
import Logging
import Metrics
import Prometheus
import ServiceLifecycle

@main
struct CouponServiceCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "coupon-service",
        abstract: "The coupon flash sale as an HTTP service on swift-exactly-once, with the legacy Redis-lock design beside it.",
        discussion: """
        `coupon-service --port 8080` starts on the embedded default: in-memory transport and store,
        everything in this process, nothing survives a restart. --store file keeps the source of
        truth in --data-dir; --store postgres --postgres-url URL in PostgreSQL tables (schema
        coupon_service; a build with the Postgres trait: swift run --traits Postgres coupon-service);
        --redis-url adds the read cache and the legacy endpoint;
        --transport redis-streams --store redis lets several processes (--role api|consumer) share a sale;
        --transport kafka runs on an in-process mock cluster, or on --kafka-brokers HOST:PORT[,...].
        Environment: COUPON_SERVICE_REDIS_URL stands for --redis-url, COUPON_SERVICE_KAFKA_BROKERS for --kafka-brokers,
        COUPON_SERVICE_POSTGRES_URL for --postgres-url (read with --store postgres only).
        """)

    @Option(help: "TCP port to listen on.") var port: Int = 8080
    @Option(help: "Address to bind.") var host: String = "127.0.0.1"
    @Option(help: "What this process runs: api, consumer or all.") var role: String = "all"
    @Option(help: "The log: memory, redis-streams or kafka.") var transport: String = "memory"
    @Option(help: "Kafka bootstrap servers HOST:PORT[,...] with --transport kafka (default: an in-process mock cluster); the topics must exist.") var kafkaBrokers: String?
    @Option(help: "The source of truth: memory, file, redis or postgres.") var store: String = "memory"
    @Option(help: "PostgreSQL URL with --store postgres: postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE or postgres:///DATABASE?host=/socket/dir.") var postgresURL: String?
    @Option(help: "Directory of the file store and its coupon catalog.") var dataDir: String = "coupon-service-data"
    @Option(help: "Redis URL: read cache, legacy lock, Redis transport and store.") var redisURL: String?
    @Option(help: "Partitions per topic.") var partitions: Int = 4
    @Option(help: "Prefix of the service's Redis keys.") var keyPrefix: String = "coupon-service:"
    @Option(help: "Legacy design: lock lease in milliseconds.") var legacyLeaseMs: Int = 3_000
    @Option(help: "Legacy design: lock wait budget in milliseconds.") var legacyWaitMs: Int = 1_000
    @Option(help: "Legacy design: milliseconds of work inside the lock standing for a database round trip.") var legacyWorkMs: Int = 0
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") var logLevel: String = "info"

    func validate() throws {
        guard (1...65_535).contains(port) else { throw ValidationError("--port must be in 1...65535") }
        guard Role(rawValue: role) != nil else { throw ValidationError("--role must be api, consumer or all") }
        guard TransportKind(rawValue: transport) != nil else { throw ValidationError("--transport must be memory, redis-streams or kafka") }
        guard StoreKind(rawValue: store) != nil else { throw ValidationError("--store must be memory, file, redis or postgres") }
        guard (1...256).contains(partitions) else { throw ValidationError("--partitions must be in 1...256") }
        guard legacyLeaseMs >= 1, legacyWaitMs >= 0, legacyWorkMs >= 0 else { throw ValidationError("legacy durations must be positive") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("--log-level is not a log level") }
    }

    func run() async throws {
        var options = ServiceOptions()
        options.role = Role(rawValue: role) ?? .all
        options.transport = TransportKind(rawValue: transport) ?? .memory
        options.store = StoreKind(rawValue: store) ?? .memory
        options.dataDir = dataDir
        options.kafkaBrokers = kafkaBrokers ?? ProcessInfo.processInfo.environment["COUPON_SERVICE_KAFKA_BROKERS"]
        options.redisURL = redisURL ?? ProcessInfo.processInfo.environment["COUPON_SERVICE_REDIS_URL"]
        options.postgresURL = postgresURL ?? (options.store == .postgres ? ProcessInfo.processInfo.environment["COUPON_SERVICE_POSTGRES_URL"] : nil)
        options.partitions = partitions
        options.keyPrefix = keyPrefix
        options.legacyLease = .milliseconds(legacyLeaseMs)
        options.legacyWait = .milliseconds(legacyWaitMs)
        options.legacyWorkDelay = .milliseconds(legacyWorkMs)

        var logger = Logger(label: "coupon-service")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))

        let backend: any CouponBackend
        do {
            backend = try await Backends.open(options)
        } catch let e as ServiceError {
            throw ValidationError(e.message)
        }
        try await serve(backend, options, registry, logger)
    }

    func serve<B: CouponBackend>(_ backend: B, _ options: ServiceOptions, _ registry: PrometheusCollectorRegistry, _ logger: Logger) async throws {
        let core = try CouponServiceCore(backend: backend, options: options, logger: logger)
        let app = Application(
            router: CouponRoutes.router(core, registry: registry),
            configuration: .init(address: .hostname(host, port: port), serverName: "coupon-service"),
            services: try core.services(),
            onServerRunning: { channel in
                logger.notice("coupon-service listening", metadata: [
                    "address": "\(channel.localAddress.map { "\($0)" } ?? "?")", "role": "\(options.role.rawValue)", "backends": "\(backend.summary)",
                ])
            },
            logger: logger)
        try await app.runService()
    }
}
