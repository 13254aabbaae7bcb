import ArgumentParser
import ExactlyOnce
import ExactlyOnceFileStore
import ExactlyOnceKafka
import ExactlyOnceRedis
import Foundation
#if Postgres
import ExactlyOncePostgres
#endif

/// The stores the tool knows (`memory` only to refuse it with a reason).
enum AdminStoreKind: String, ExpressibleByArgument, CaseIterable {
    case file, redis, postgres, memory
}

/// The transports the tool knows (`memory` only to refuse it with a reason).
enum AdminTransportKind: String, ExpressibleByArgument, CaseIterable {
    case redisStreams = "redis-streams"
    case kafka
    case memory
}

/// A transport opened for inspection, and whether it can tell who owns each partition.
struct OpenedTransport {
    /// The transport.
    var transport: any MessageTransport
    /// Why owner and epoch are not shown, when this process cannot know them.
    var ownersUnknown: String?
}

/// Where the store and the transport are. Every subcommand takes the same flags, so one set of
/// flags can be reused; a subcommand checks only those it needs.
struct BackendOptions: ParsableArguments {
    @Option(help: "The dedupe store: file, redis or postgres (memory cannot be inspected from another process).")
    var store: AdminStoreKind = .file

    @Option(name: .customLong("data-dir"), help: "The file store's directory (with --sale: the demo's --data-dir, holding sale-<id>).")
    var dataDir: String?

    @Option(name: .customLong("redis-url"), help: "redis://[user:password@]host:port[/db] or unix:///path (default: redis://127.0.0.1:6379).")
    var redisURL: String?

    @Option(name: .customLong("key-prefix"), help: "The Redis store's key prefix (default: exactly-once:; with --sale: the demo's).")
    var keyPrefix: String?

    @Option(name: .customLong("postgres-url"), help: "postgres://USER[:PASSWORD]@HOST:PORT/DB or postgres:///DB?host=/socket/dir (with --store postgres; needs a build with the Postgres trait).")
    var postgresURL: String?

    @Option(help: "The PostgreSQL store's schema (default: exactly_once; with --sale: the demo's eo_sale_<id>).")
    var schema: String?

    @Option(help: "The transport, for lag and dead letters: redis-streams or kafka (memory cannot be inspected from another process).")
    var transport: AdminTransportKind = .redisStreams

    @Option(name: .customLong("streams-prefix"), help: "The Redis Streams transport's key prefix (default: exactly-once-streams:; with --sale: the demo's).")
    var streamsPrefix: String?

    @Option(name: .customLong("kafka-brokers"), help: "Kafka bootstrap servers HOST:PORT[,...] (with --transport kafka).")
    var kafkaBrokers: String?

    @Option(help: "A coupon-demo sale id (the demo prints it as sale): its store and streams, named as the demo names them.")
    var sale: String?

    @Flag(help: "Print JSON instead of text.")
    var json = false

    func validate() throws {
        if store == .memory {
            throw ValidationError("--store memory: an in-memory store lives inside the process that runs it and ends with it, so no other process can read it; inspect a durable store (--store file|redis|postgres), or use the library's records(for:) and listRecords(_:) inside that process")
        }
        if transport == .memory {
            throw ValidationError("--transport memory: an in-memory transport lives inside the process that runs it and ends with it, so no other process can read it; inspect a shared transport (--transport redis-streams|kafka), or use the library's partitionStatus(group:topic:) and DeadLetterQueue inside that process")
        }
        if store == .postgres {
            #if !Postgres
            throw ValidationError("--store postgres needs the PostgreSQL store, which this build leaves out; build and run with the Postgres trait: swift run --traits Postgres exactly-once-admin ... --store postgres --postgres-url postgres://USER@HOST:PORT/DB")
            #endif
        }
        if let sale, sale.isEmpty || sale.utf8.count > 32 || !sale.utf8.allSatisfy({ (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) || (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) }) {
            throw ValidationError("--sale must be a sale id as coupon-demo prints it (lowercase letters and digits), got \"\(sale)\"")
        }
        if dataDir != nil && store != .file { throw ValidationError("--data-dir is used with --store file") }
        if keyPrefix != nil && store != .redis { throw ValidationError("--key-prefix is used with --store redis") }
        if postgresURL != nil && store != .postgres { throw ValidationError("--postgres-url is used with --store postgres") }
        if schema != nil && store != .postgres { throw ValidationError("--schema is used with --store postgres") }
        if streamsPrefix != nil && transport != .redisStreams { throw ValidationError("--streams-prefix is used with --transport redis-streams") }
        if kafkaBrokers != nil && transport != .kafka { throw ValidationError("--kafka-brokers is used with --transport kafka") }
        if redisURL != nil && store != .redis && transport != .redisStreams {
            throw ValidationError("--redis-url is used with --store redis or --transport redis-streams")
        }
        if let redisURL {
            do { _ = try RedisConfiguration(url: redisURL) } catch let e as ExactlyOnceError { throw ValidationError("--redis-url: \(e.message)") }
        }
        #if Postgres
        if store == .postgres {
            do {
                _ = try postgresConfiguration()
            } catch let e as ExactlyOnceError {
                throw ValidationError(e.message)
            }
        }
        #endif
        if let kafkaBrokers, !KafkaTransport.Configuration.isHostPortList(kafkaBrokers) {
            throw ValidationError("--kafka-brokers must be HOST:PORT[,HOST:PORT...], got \"\(kafkaBrokers)\"")
        }
    }

    var url: String { redisURL ?? "redis://127.0.0.1:6379" }

    #if Postgres
    /// The PostgreSQL store's configuration: opens an existing store only, never creates one.
    func postgresConfiguration() throws -> PostgresStoreConfiguration {
        guard let postgresURL else {
            throw ExactlyOnceError(.invalidConfiguration, "--store postgres needs --postgres-url postgres://USER@HOST:PORT/DB (or postgres:///DB?host=/socket/dir)")
        }
        var c: PostgresStoreConfiguration
        do {
            c = try PostgresStoreConfiguration(url: postgresURL)
        } catch let e as ExactlyOnceError {
            throw ExactlyOnceError(.invalidConfiguration, "--postgres-url: \(e.message)")
        }
        if let s = schema ?? sale.map({ "eo_sale_\($0)" }) { c.schema = s }
        c.createsSchema = false
        c.poolSize = 2
        do {
            try c.validate()
        } catch let e as ExactlyOnceError {
            throw ExactlyOnceError(.invalidConfiguration, "--schema: \(e.message)")
        }
        return c
    }
    #endif

    /// Opens the store, runs `body`, and closes it (the file store's directory lock is held meanwhile).
    func withStore<R>(_ body: (any DedupeStore) async throws -> R) async throws -> R {
        switch store {
        case .file:
            guard var dir = dataDir else { throw AdminError(message: "--store file needs --data-dir DIRECTORY", status: 2) }
            if let sale { dir += "/sale-" + sale }
            guard FileManager.default.fileExists(atPath: dir) else { throw AdminError(message: "no file store at \(dir)") }
            let file = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir))
            do {
                let r = try await body(file)
                await file.close()
                return r
            } catch {
                await file.close()
                throw error
            }
        case .redis:
            let prefix = keyPrefix ?? sale.map { "coupon-demo:\($0):store:" } ?? "exactly-once:"
            return try await body(try RedisDedupeStore(url: url, keyPrefix: prefix))
        case .postgres:
            #if Postgres
            let config = try postgresConfiguration()
            let pg: PostgresDedupeStore
            do {
                pg = try await PostgresDedupeStore.connect(config)
            } catch let e as ExactlyOnceError where e.code == .invalidConfiguration {
                // The schema holds no store: not found, as a missing file store directory.
                throw AdminError(message: e.message)
            }
            do {
                let r = try await body(pg)
                await pg.shutdown()
                return r
            } catch {
                await pg.shutdown()
                throw error
            }
            #else
            throw AdminError(message: "--store postgres needs a build with the Postgres trait", status: 2)
            #endif
        case .memory:
            throw AdminError(message: "an in-memory store cannot be inspected from outside its process", status: 2)
        }
    }

    /// Opens the transport.
    func makeTransport() throws -> OpenedTransport {
        switch transport {
        case .redisStreams:
            var c = RedisStreamsTransport.Configuration(redis: try RedisConfiguration(url: url))
            c.keyPrefix = streamsPrefix ?? sale.map { "coupon-demo:\($0):streams:" } ?? "exactly-once-streams:"
            return OpenedTransport(transport: try RedisStreamsTransport(configuration: c), ownersUnknown: nil)
        case .kafka:
            guard let kafkaBrokers else {
                throw AdminError(message: "--transport kafka needs --kafka-brokers HOST:PORT[,...] (the cluster the consumers use)", status: 2)
            }
            var c = KafkaTransport.Configuration(bootstrapServers: kafkaBrokers)
            // librdkafka's own log lines would repeat on stderr what the tool reports once.
            c.logLevel = 0
            return OpenedTransport(
                transport: try KafkaTransport(configuration: c),
                ownersUnknown: "owner and epoch are known only inside the consumer processes on Kafka (the group's assignment lives in its members); committed, end and lag are the broker's")
        case .memory:
            throw AdminError(message: "an in-memory transport cannot be inspected from outside its process", status: 2)
        }
    }
}
