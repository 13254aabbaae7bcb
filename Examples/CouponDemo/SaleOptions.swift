import ArgumentParser
import ExactlyOnce
import ExactlyOnceKafka
import ExactlyOnceRedis
import Foundation
import Logging
#if Postgres
import ExactlyOncePostgres
#endif

/// The dedupe store a sale runs on.
enum StoreKind: String, ExpressibleByArgument, CaseIterable, Sendable {
    case memory, file, redis, postgres
}

/// The transport a sale runs on.
enum TransportKind: String, ExpressibleByArgument, CaseIterable, Sendable {
    case memory
    case redisStreams = "redis-streams"
    case kafka
}

/// Which side of the sale this process runs.
enum Role: String, ExpressibleByArgument, CaseIterable, Sendable {
    case all, publish, consume, audit
}

/// How a consumer orders one partition's records (see `Ordering` in the library).
enum OrderingKind: String, ExpressibleByArgument, CaseIterable, Sendable {
    case partition, key
}

/// The sale's flags (the demo contract: every name here is used by outside checks).
struct SaleOptions: ParsableArguments, Sendable {
    @Option(help: "Click events to publish.")
    var requests = 20_000

    @Option(help: "Coupons on sale.")
    var coupons = 5

    @Option(help: "Stock of each coupon.")
    var stock: Int64 = 100

    @Option(help: "Distinct members clicking.")
    var members = 5_000

    @Option(name: .customLong("duplicate-rate"), help: "Share of clicks that repeat an earlier one (double clicks, producer retries), 0...1.")
    var duplicateRate = 0.2

    @Option(help: "Topic partitions.")
    var partitions = 3

    @Option(help: "Consumer group members in this process (default: 3; 1 with --role consume).")
    var consumers: Int?

    @Option(name: .customLong("crash-rate"), help: "Chance of a consumer crash at each failure point reached, 0...0.1.")
    var crashRate = 0.002

    @Option(help: "Seed of the generated requests and crashes.")
    var seed: UInt64 = 42

    @Option(help: "Dedupe store.")
    var store: StoreKind = .memory

    @Option(help: "Transport.")
    var transport: TransportKind = .memory

    @Option(name: .customLong("postgres-url"), help: "postgres://USER[:PASSWORD]@HOST:PORT/DB or postgres:///DB?host=/socket/dir (with --store postgres; needs a build with the Postgres trait).")
    var postgresURL: String?

    @Option(name: .customLong("redis-url"), help: "redis://[user:password@]host:port[/db] or unix:///path (default: redis://127.0.0.1:6379).")
    var redisURL: String?

    @Option(name: .customLong("kafka-brokers"), help: "Kafka bootstrap servers HOST:PORT[,...] with --transport kafka (default: an in-process mock cluster).")
    var kafkaBrokers: String?

    @Option(name: .customLong("kafka-property"), help: ArgumentHelp(
        "A librdkafka property NAME=VALUE for the sale's Kafka clients (repeatable): TLS or SASL settings, debug=cgrp.",
        valueName: "name=value"))
    var kafkaProperties: [String] = []

    @Option(name: .customLong("data-dir"), help: "Where the file store keeps the sale (DIR/sale-<id>, with --store file).")
    var dataDir: String?

    @Option(help: "Run one side of the sale in this process; processes share a sale by its options and seed.")
    var role: Role = .all

    @Option(name: .customLong("member-id"), help: "Consumer member id with --role consume (default: issuer-<pid>).")
    var memberID: String?

    @Option(name: .customLong("session-timeout"), help: "Seconds a silent member keeps its partitions (redis-streams).")
    var sessionTimeout = 10

    @Option(help: "Order of one partition's records: partition (one at a time) or key (one sequence per coupon, concurrently).")
    var ordering: OrderingKind = .partition

    @Option(help: "Write the issued coupons read back from the store (JSON lines).")
    var ledger: String?

    @Option(name: .customLong("requests-out"), help: "Write the published requests, each coupon's in publish order (JSON lines).")
    var requestsOut: String?

    @Option(name: .customLong("stall-timeout"), help: "Seconds without progress after which the sale gives up with an error.")
    var stallTimeout = 120

    @Option(name: .customLong("log-level"), help: "The library's log messages on standard error, from this level up: off, trace, debug, info, notice, warning, error.")
    var logLevel: LogLevel = .off

    @Flag(help: "Print one JSON object instead of the summary.")
    var json = false

    /// Refuses flags the sale cannot serve, with a message that says what to do.
    func check() throws {
        func bad(_ m: String) -> ValidationError { ValidationError(m) }
        func within<T: Comparable>(_ v: T, _ r: ClosedRange<T>, _ flag: String) throws {
            guard r.contains(v) else { throw bad("\(flag) must be in \(r.lowerBound)...\(r.upperBound), got \(v)") }
        }
        try within(requests, 0...50_000_000, "--requests")
        try within(coupons, 1...1_000_000, "--coupons")
        try within(stock, 0...1_000_000_000, "--stock")
        try within(members, 1...1_000_000_000, "--members")
        try within(partitions, 1...1024, "--partitions")
        try within(sessionTimeout, 1...3600, "--session-timeout")
        try within(stallTimeout, 5...86_400, "--stall-timeout")
        if let consumers { try within(consumers, 1...64, "--consumers") }
        guard duplicateRate.isFinite, (0...1).contains(duplicateRate) else { throw bad("--duplicate-rate must be a number in 0...1, got \(duplicateRate)") }
        guard crashRate.isFinite, (0...1).contains(crashRate) else { throw bad("--crash-rate must be a number in 0...1, got \(crashRate)") }
        if crashRate > 0.1 {
            throw bad("--crash-rate \(crashRate) is too high for a sale to finish: each poll passes several failure points per record, so above 0.1 nearly every poll crashes before it commits; use 0...0.1")
        }
        if store == .postgres {
            #if Postgres
            guard let postgresURL else { throw bad("--store postgres needs --postgres-url postgres://USER@HOST:PORT/DB (or postgres:///DB?host=/socket/dir)") }
            do {
                _ = try PostgresStoreConfiguration(url: postgresURL)
            } catch let e as ExactlyOnceError {
                throw bad("--postgres-url: \(e.message)")
            }
            if role != .all { throw bad("--store postgres runs the whole sale in one process (--role all) in this version") }
            #else
            throw bad("--store postgres needs the PostgreSQL store, which this build leaves out; build and run with the Postgres trait: swift run --traits Postgres coupon-demo --store postgres --postgres-url postgres://USER@HOST:PORT/DB")
            #endif
        }
        if postgresURL != nil && store != .postgres { throw bad("--postgres-url is used with --store postgres") }
        if store == .file && dataDir == nil { throw bad("--store file needs --data-dir DIRECTORY (created when missing)") }
        if let dataDir {
            guard store == .file else { throw bad("--data-dir is used with --store file") }
            try Self.checkDataDir(dataDir)
        }
        if store == .file && role != .all {
            throw bad("--store file is one process's store (its directory is locked while open); --role splits a sale across processes: use --store redis")
        }
        if transport == .redisStreams && store == .memory {
            throw bad("--transport redis-streams keeps the sale's records and offsets across runs, so it needs a durable store: add --store redis (or --store file)")
        }
        if role != .all && transport == .memory {
            throw bad("--role \(role.rawValue) splits the sale across processes, which needs a shared transport (--transport redis-streams or kafka) and a shared store (--store redis)")
        }
        if redisURL != nil && store != .redis && transport != .redisStreams {
            throw bad("--redis-url is used with --store redis or --transport redis-streams")
        }
        if kafkaBrokers != nil && transport != .kafka { throw bad("--kafka-brokers is used with --transport kafka") }
        if !kafkaProperties.isEmpty && transport != .kafka { throw bad("--kafka-property is used with --transport kafka") }
        _ = try Self.parseKafkaProperties(kafkaProperties)
        if let kafkaBrokers {
            guard KafkaTransport.Configuration.isHostPortList(kafkaBrokers) else {
                throw bad("--kafka-brokers must be HOST:PORT[,HOST:PORT...], got \"\(kafkaBrokers)\"")
            }
            if store == .memory {
                throw bad("--kafka-brokers keeps the sale's records and offsets across runs, so it needs a durable store: add --store redis (or --store file)")
            }
        }
        if role != .all && transport == .kafka && kafkaBrokers == nil {
            throw bad("--role \(role.rawValue) with --transport kafka needs a shared cluster: --kafka-brokers HOST:PORT (for example from coupon-demo kafka-mock)")
        }
        if memberID != nil && role != .consume { throw bad("--member-id is used with --role consume") }
        if let memberID, memberID.isEmpty || memberID.utf8.count > 200 || memberID.contains(where: { $0.isNewline || $0 == "\0" }) {
            throw bad("--member-id must be 1 to 200 characters without line breaks")
        }
        for (flag, path) in [("--ledger", ledger), ("--requests-out", requestsOut)] {
            guard let path else { continue }
            if path.isEmpty { throw bad("\(flag) needs a path") }
            // Before the sale, not after it: a directory, a dangling link or a missing parent.
            do { _ = try OutputFile.plan(path, flag: flag) } catch let e as DemoError { throw bad(e.message) }
        }
        if store == .redis || transport == .redisStreams, let redisURL {
            try RedisURLCheck.validate(redisURL)
        }
    }

    /// A data directory must be a directory we can use, or a path we can create.
    static func checkDataDir(_ path: String) throws {
        guard !path.isEmpty else { throw ValidationError("--data-dir needs a directory path") }
        var isDir: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDir) {
            guard isDir.boolValue else { throw ValidationError("--data-dir \(path) is not a directory") }
            guard FileManager.default.isReadableFile(atPath: path), FileManager.default.isWritableFile(atPath: path),
                  FileManager.default.isExecutableFile(atPath: path)
            else { throw ValidationError("--data-dir \(path) is not readable and writable by this user") }
        } else {
            let parent = (path as NSString).deletingLastPathComponent
            let existing = parent.isEmpty ? "." : parent
            var parentIsDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: existing, isDirectory: &parentIsDir), !parentIsDir.boolValue {
                throw ValidationError("--data-dir \(path) cannot be created: \(existing) is not a directory")
            }
        }
    }

    /// `--kafka-property NAME=VALUE` flags as librdkafka properties (the value may contain `=`).
    static func parseKafkaProperties(_ flags: [String]) throws -> [String: String] {
        var out: [String: String] = [:]
        for flag in flags {
            guard let eq = flag.firstIndex(of: "="), eq != flag.startIndex,
                  !flag.contains(where: { $0.isNewline || $0 == "\0" })
            else { throw ValidationError("--kafka-property must be NAME=VALUE (a librdkafka property), got \"\(flag.prefix(100))\"") }
            let name = String(flag[..<eq])
            guard !["group.id", "enable.auto.commit"].contains(name) else {
                throw ValidationError("--kafka-property \(name) is fixed by the library (the sale's group, manual commits)")
            }
            out[name] = String(flag[flag.index(after: eq)...])
        }
        return out
    }

    /// The number of consumer members this process runs.
    var memberCount: Int {
        switch role {
        case .all: consumers ?? 3
        case .consume: consumers ?? 1
        case .publish, .audit: 0
        }
    }

    /// Names the sale in shared backends: the same parameters, seed and transport are the same
    /// sale, so a rerun (or another process) continues it; anything that makes other requests,
    /// other stock or another log is another sale and never sees its keys.
    var saleID: String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        let identity = "\(seed)|\(requests)|\(coupons)|\(stock)|\(members)|\(duplicateRate)|\(partitions)|\(transport.rawValue)"
        for b in identity.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return String(h, radix: 16)
    }
}

/// Checks a Redis URL without connecting (and without ever repeating its password).
enum RedisURLCheck {
    static func validate(_ url: String) throws {
        do {
            _ = try RedisConfiguration(url: url)
        } catch let e as ExactlyOnceError {
            throw ValidationError("--redis-url: \(e.message)")
        }
    }
}

/// `--log-level`: which of the library's log messages the sale prints on standard error.
enum LogLevel: String, ExpressibleByArgument, CaseIterable, Sendable {
    case off, trace, debug, info, notice, warning, error
}

extension SaleOptions {
    /// The sale's logger: nothing with `--log-level off` (the default), else standard error.
    func makeLogger() -> Logger {
        guard logLevel != .off, let level = Logger.Level(rawValue: logLevel.rawValue) else {
            return Logger(label: "coupon-demo", factory: { _ in SwiftLogNoOpLogHandler() })
        }
        var logger = Logger(label: "coupon-demo", factory: { label in StreamLogHandler.standardError(label: label) })
        logger.logLevel = level
        return logger
    }
}
