import CouponKit
import ExactlyOnce
import ExactlyOnceFileStore
import ExactlyOnceRedis
import ExactlyOnceTestKit
import Foundation
import Logging
import Synchronization

// coupon-demo: a first-come-first-served coupon flash sale, end to end, on the embedded default
// (in-memory transport and store). See `coupon-demo --help`.

let usage = """
    usage: coupon-demo [options]
           coupon-demo partition --partitioner modulo|murmur2 --partitions N   (keys on stdin, one a line)

    options (defaults in brackets):
      --requests N         click events to publish [20000]
      --coupons C          coupons on sale [5]
      --stock S            stock of each coupon [100]
      --members M          distinct members clicking [5000]
      --duplicate-rate R   share of clicks that repeat an earlier one (double clicks, producer retries) [0.2]
      --partitions P       topic partitions [3]
      --consumers K        consumer group members [3; 1 with --role consume]
      --crash-rate X       chance of a consumer crash at each failure point reached [0.002]
      --seed K             seed of the generated requests and crashes [42]
      --store memory|file|redis              dedupe store [memory]
      --transport memory|redis-streams       transport [memory]
      --redis-url URL      redis://[user:password@]host:port[/db] or unix:///path [redis://127.0.0.1:6379]
      --data-dir D         where the file store keeps the sale (D/sale-<id>, with --store file)
      --role R             all | publish | consume | audit [all]: run one side of the sale in this
                           process (with --transport redis-streams: processes share the sale by seed)
      --member-id NAME     consumer member id with --role consume [issuer-<pid>]
      --session-timeout S  seconds a silent member keeps its partitions (redis-streams) [10]
      --ledger PATH        write issued coupons read back from the store (JSON lines)
      --requests-out PATH  write the published requests in publish order (JSON lines)
      --json               print one JSON object instead of the summary
    """

struct Options {
    var requests = 20_000
    var coupons = 5
    var stock: Int64 = 100
    var members = 5_000
    var duplicateRate = 0.2
    var partitions = 3
    var consumers: Int?
    var crashRate = 0.002
    var seed: UInt64 = 42
    var store = "memory"
    var transport = "memory"
    var redisURL: String?
    var dataDir: String?
    var role = "all"
    var memberID: String?
    var sessionTimeout = 10
    var ledger: String?
    var requestsOut: String?
    var json = false
}

struct UsageError: Error, CustomStringConvertible { var description: String }

func parseOptions(_ args: [String]) throws -> Options {
    var o = Options()
    var i = 0
    func value(_ flag: String) throws -> String {
        i += 1
        guard i < args.count else { throw UsageError(description: "\(flag) needs a value") }
        return args[i]
    }
    func int(_ flag: String, _ range: ClosedRange<Int>) throws -> Int {
        let raw = try value(flag)
        guard let v = Int(raw), range.contains(v) else { throw UsageError(description: "\(flag) must be an integer in \(range.lowerBound)...\(range.upperBound), got '\(raw)'") }
        return v
    }
    func rate(_ flag: String) throws -> Double {
        let raw = try value(flag)
        guard let v = Double(raw), v >= 0, v <= 1 else { throw UsageError(description: "\(flag) must be a number in 0...1, got '\(raw)'") }
        return v
    }
    while i < args.count {
        let a = args[i]
        switch a {
        case "--requests": o.requests = try int(a, 0...50_000_000)
        case "--coupons": o.coupons = try int(a, 1...1_000_000)
        case "--stock": o.stock = Int64(try int(a, 0...1_000_000_000))
        case "--members": o.members = try int(a, 1...1_000_000_000)
        case "--duplicate-rate": o.duplicateRate = try rate(a)
        case "--partitions": o.partitions = try int(a, 1...1024)
        case "--consumers": o.consumers = try int(a, 1...64)
        case "--crash-rate": o.crashRate = try rate(a)
        case "--seed":
            let raw = try value(a)
            guard let s = UInt64(raw) else { throw UsageError(description: "--seed must be a non-negative integer, got '\(raw)'") }
            o.seed = s
        case "--store": o.store = try value(a)
        case "--transport": o.transport = try value(a)
        case "--redis-url": o.redisURL = try value(a)
        case "--data-dir": o.dataDir = try value(a)
        case "--role": o.role = try value(a)
        case "--member-id": o.memberID = try value(a)
        case "--session-timeout": o.sessionTimeout = try int(a, 1...3600)
        case "--ledger": o.ledger = try value(a)
        case "--requests-out": o.requestsOut = try value(a)
        case "--json": o.json = true
        case "-h", "--help": print(usage); exit(0)
        default: throw UsageError(description: "unknown option '\(a)'")
        }
        i += 1
    }
    guard ["memory", "file", "redis"].contains(o.store) else { throw UsageError(description: "--store must be memory, file or redis, got '\(o.store)'") }
    guard ["memory", "redis-streams"].contains(o.transport) else { throw UsageError(description: "--transport must be memory or redis-streams, got '\(o.transport)'") }
    guard ["all", "publish", "consume", "audit"].contains(o.role) else { throw UsageError(description: "--role must be all, publish, consume or audit, got '\(o.role)'") }
    if o.store == "file" && o.dataDir == nil { throw UsageError(description: "--store file needs --data-dir DIRECTORY (created when missing)") }
    if o.dataDir != nil && o.store != "file" { throw UsageError(description: "--data-dir is used with --store file") }
    if o.store == "file" && o.role != "all" {
        throw UsageError(description: "--store file is one process's store (its directory is locked while open); --role splits a sale across processes: use --store redis")
    }
    if o.transport == "redis-streams" && o.store == "memory" {
        throw UsageError(description: "--transport redis-streams keeps the sale's records and offsets across runs, so it needs a durable store: add --store redis (or --store file)")
    }
    if o.role != "all" && o.transport != "redis-streams" {
        throw UsageError(description: "--role \(o.role) splits the sale across processes, which needs --transport redis-streams (and a shared store: --store redis)")
    }
    if o.redisURL != nil && o.store != "redis" && o.transport != "redis-streams" {
        throw UsageError(description: "--redis-url is used with --store redis or --transport redis-streams")
    }
    if o.memberID != nil && o.role != "consume" { throw UsageError(description: "--member-id is used with --role consume") }
    return o
}

/// Generates the sale's clicks from the seed: the same seed always gives the same requests in the same order.
func generateRequests(_ o: Options) -> [CouponRequest] {
    var rng = SeededRandom(seed: o.seed)
    var out: [CouponRequest] = []
    out.reserveCapacity(o.requests)
    for i in 0..<o.requests {
        if !out.isEmpty && rng.chance(o.duplicateRate) {
            var again = out[Int(rng.next() % UInt64(out.count))]
            // Half are producer retries (same request id), half double clicks (new request id).
            if rng.chance(0.5) { again.requestId = Int64(i + 1) }
            out.append(again)
        } else {
            out.append(CouponRequest(requestId: Int64(i + 1), couponId: Int64(1 + rng.next() % UInt64(o.coupons)),
                                     memberId: Int64(1 + rng.next() % UInt64(o.members))))
        }
    }
    return out
}

/// Crashes a consumer at a failure point with the configured chance.
final class DemoFaults: FaultInjector {
    let rate: Double
    let rng: Mutex<SeededRandom>
    init(rate: Double, seed: UInt64) {
        self.rate = rate
        self.rng = Mutex(SeededRandom(seed: seed ^ 0xC0FFEE))
    }
    func reach(_ point: FailurePoint, _ context: FaultContext) async throws {
        if rate > 0, rng.withLock({ $0.chance(rate) }) { throw InjectedCrash(at: point) }
    }
}

final class Counters: Sendable {
    let polled = Atomic<Int>(0)
    let unavailable = Atomic<Int>(0)
    let duplicates = Atomic<Int>(0)
    let crashes = Atomic<Int>(0)
    let done = Atomic<Bool>(false)
}

func writeLines<T: Encodable>(_ items: [T], to path: String) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    var data = Data()
    for item in items {
        data.append(try encoder.encode(item))
        data.append(0x0A)
    }
    guard FileManager.default.createFile(atPath: path, contents: data) else {
        throw UsageError(description: "cannot write \(path)")
    }
}

struct PublishedRequest: Encodable {
    var requestId: Int64
    var couponId: Int64
    var memberId: Int64
}

let saleTopic = "coupon-requests"
let saleGroup = "coupon-issuers"

/// Where the sale's clicks go, and how a process knows the sale is over.
protocol SaleTransport: Sendable {
    associatedtype Transport: MessageTransport
    var transport: Transport { get }
    /// Publishes the requests not published yet, in order (a rerun resumes a killed run).
    func publish(_ requests: [CouponRequest]) async throws
    /// Whether all `total` requests are published and the group has committed all of them.
    func isFinished(total: Int) async throws -> Bool
    /// An injected crash killed `memberID`; its partitions must move on.
    func crashed(memberID: String)
    /// Records delivered to this process's members, when the transport counts them (polls that
    /// an injected crash interrupted included).
    var deliveredRecords: Int? { get }
}

/// The embedded default: everything in this process.
struct MemorySale: SaleTransport {
    let transport: InMemoryTransport
    init(partitions: Int) throws {
        transport = try InMemoryTransport(topics: [saleTopic: partitions, saleTopic + ".dlq": 1])
    }
    func publish(_ requests: [CouponRequest]) async throws {
        for r in requests { _ = try transport.publishSync(r.outgoing, to: saleTopic, partitioning: .modulo) }
    }
    func isFinished(total: Int) async throws -> Bool {
        transport.endOffsets(topic: saleTopic).values.reduce(0) { $0 + Int($1.rawValue) } == total
            && transport.isFullyCommitted(group: saleGroup, topic: saleTopic)
    }
    func crashed(memberID: String) { transport.expel(memberID: memberID, group: saleGroup, topic: saleTopic) }
    var deliveredRecords: Int? { transport.deliveredRecords }
}

/// Redis Streams, shared by every process that runs the same sale (same parameters and seed).
struct RedisSale: SaleTransport {
    let transport: RedisStreamsTransport
    init(url: String, keyPrefix: String, sessionTimeout: Duration, partitions: Int) async throws {
        var config = RedisStreamsTransport.Configuration(redis: try RedisConfiguration(url: url))
        config.keyPrefix = keyPrefix
        config.sessionTimeout = sessionTimeout
        transport = try RedisStreamsTransport(configuration: config)
        // A Redis that is not there at the start is a setup error: say so after a few tries.
        try await retrying(attempts: 20) { try await transport.createTopic(saleTopic, partitions: partitions) }
        try await retrying { try await transport.createTopic(saleTopic + ".dlq", partitions: 1) }
    }
    func publish(_ requests: [CouponRequest]) async throws {
        try await retrying {
            // Records are published one at a time, in order, so the streams hold a prefix of the
            // requests: after a kill or an unknown outcome, count and go on from there.
            var next = try await transport.endOffsets(topic: saleTopic).values.reduce(0) { $0 + Int($1.rawValue) }
            guard next <= requests.count else {
                throw UsageError(description: "the sale's streams hold \(next) records, more than its \(requests.count) requests")
            }
            while next < requests.count {
                _ = try await transport.publish(requests[next].outgoing, to: saleTopic, partitioning: .modulo)
                next += 1
            }
        }
    }
    func isFinished(total: Int) async throws -> Bool {
        let published = try await transport.endOffsets(topic: saleTopic).values.reduce(0) { $0 + Int($1.rawValue) }
        guard published == total else { return false }
        return try await transport.isFullyCommitted(group: saleGroup, topic: saleTopic)
    }
    // The member comes back under the same id: its new session starts from the committed offsets.
    func crashed(memberID: String) {}
    var deliveredRecords: Int? { nil }
}

/// Retries `body` while Redis (or another backend) is unreachable, for up to about a minute.
func retrying<T>(attempts: Int = 600, _ body: () async throws -> T) async throws -> T {
    var failures = 0
    while true {
        do {
            return try await body()
        } catch let e as ExactlyOnceError where e.isRetriable && failures + 1 < attempts {
            failures += 1
            try await Task.sleep(for: .milliseconds(100))
        }
    }
}

/// Names the sale's keys in a shared backend: the same parameters and seed are the same sale, so
/// a rerun (or another process) continues it; other parameters never see its keys.
func runID(_ o: Options) -> String {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in "\(o.seed)|\(o.requests)|\(o.coupons)|\(o.stock)|\(o.members)|\(o.duplicateRate)|\(o.partitions)".utf8 {
        h = (h ^ UInt64(b)) &* 0x100_0000_01b3
    }
    return String(h, radix: 16)
}

func makeStore(_ o: Options) async throws -> any DedupeStore {
    switch o.store {
    case "file":
        // The sale's journal lives in a subdirectory named after the sale, so one --data-dir
        // can hold several sales and a rerun with the same options continues its own.
        let parent = o.dataDir ?? "."
        if !FileManager.default.fileExists(atPath: parent) {
            try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
        }
        return try await FileDedupeStore.open(FileStoreConfiguration(directory: parent + "/sale-" + runID(o)))
    case "redis":
        return try RedisDedupeStore(url: o.redisURL ?? defaultRedisURL, keyPrefix: "coupon-demo:\(runID(o)):store:")
    default:
        return try InMemoryDedupeStore()
    }
}

let defaultRedisURL = "redis://127.0.0.1:6379"

func runSale(_ o: Options) async throws -> Int32 {
    let store = try await makeStore(o)
    do {
        let status = try await runSale(o, store: store)
        if let file = store as? FileDedupeStore { await file.close() }
        return status
    } catch {
        if let file = store as? FileDedupeStore { await file.close() }
        throw error
    }
}

func runSale(_ o: Options, store: any DedupeStore) async throws -> Int32 {
    if o.store == "redis" {
        // A Redis that is not there at the start is a setup error: say so after a few tries.
        _ = try await retrying(attempts: 20) { try await store.readState("coupon-demo:probe") }
    }
    if o.transport == "redis-streams" {
        let sale = try await RedisSale(url: o.redisURL ?? defaultRedisURL, keyPrefix: "coupon-demo:\(runID(o)):streams:",
                                       sessionTimeout: .seconds(o.sessionTimeout), partitions: o.partitions)
        return try await runSale(o, sale: sale, store: store)
    }
    return try await runSale(o, sale: try MemorySale(partitions: o.partitions), store: store)
}

func runSale<Sale: SaleTransport, Store: DedupeStore>(_ o: Options, sale: Sale, store: Store) async throws -> Int32 {
    let requests = generateRequests(o)
    let stock = Dictionary(uniqueKeysWithValues: (1...Int64(o.coupons)).map { ($0, o.stock) })
    let issuer = CouponIssuer(stock: stock)
    let logger = Logger(label: "coupon-demo", factory: { _ in SwiftLogNoOpLogHandler() })
    let faults = DemoFaults(rate: o.crashRate, seed: o.seed)
    let counters = Counters()
    let memberIDs: [String]
    switch o.role {
    case "consume":
        let base = o.memberID ?? "issuer-\(ProcessInfo.processInfo.processIdentifier)"
        memberIDs = o.consumers.map { n in (0..<n).map { "\(base)-\($0)" } } ?? [base]
    case "all": memberIDs = (0..<(o.consumers ?? 3)).map { "issuer-\($0)" }
    default: memberIDs = []
    }

    let start = ContinuousClock.now
    try await withThrowingTaskGroup(of: Void.self) { tasks in
        if o.role == "all" || o.role == "publish" {
            // The API side: publish every click at once, in order; each coupon's clicks keep their order.
            tasks.addTask { try await sale.publish(requests) }
        }
        for id in memberIDs {
            tasks.addTask {
                var config = ConsumerConfiguration(topic: saleTopic, group: saleGroup, memberID: id)
                config.idleWait = .milliseconds(1)
                config.concurrentLanes = false  // one member per lane set; members run in parallel
                let consumer = try ExactlyOnceConsumer(
                    transport: sale.transport, store: store, configuration: config, logger: logger,
                    key: CouponRequest.keyExtractor, faults: faults, handler: issuer.handler)
                var session: ConsumerSession<Sale.Transport, Store>?
                var failures = 0
                while !counters.done.load(ordering: .acquiring) {
                    do {
                        if session == nil { session = try await consumer.makeSession() }
                        let r = try await session!.step()
                        failures = 0
                        counters.polled.add(r.records, ordering: .relaxed)
                        counters.duplicates.add(r.duplicates, ordering: .relaxed)
                        if r.records == 0 { try await Task.sleep(for: .milliseconds(1)) }
                    } catch is InjectedCrash {
                        // The process "dies": its in-flight state is gone, its partitions move on,
                        // and it comes back as a new process that resumes from committed offsets.
                        counters.crashes.add(1, ordering: .relaxed)
                        sale.crashed(memberID: id)
                        session = nil
                    } catch let e as ExactlyOnceError where e.code == .staleGeneration {
                        session = nil
                    } catch let e as ExactlyOnceError where e.isRetriable {
                        // The backend is unreachable (for example Redis restarting): wait, poll again.
                        failures += 1
                        counters.unavailable.add(1, ordering: .relaxed)
                        try await Task.sleep(for: config.unavailableBackoff.delay(forRetry: failures))
                    }
                }
                try? await session?.close()
            }
        }
        if !memberIDs.isEmpty {
            tasks.addTask {
                while !((try? await sale.isFinished(total: requests.count)) ?? false) {
                    try await Task.sleep(for: .milliseconds(Sale.self == MemorySale.self ? 2 : 20))
                }
                counters.done.store(true, ordering: .releasing)
            }
        }
        try await tasks.waitForAll()
    }
    let elapsed = ContinuousClock.now - start
    let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    if o.role == "publish" || o.role == "consume" {
        let polled = counters.polled.load(ordering: .relaxed)
        if o.json {
            print("{\"role\":\"\(o.role)\",\"sale\":\"\(runID(o))\",\"requests\":\(requests.count),\"polled\":\(polled),\"crashes\":\(counters.crashes.load(ordering: .relaxed)),\"elapsedSeconds\":\(String(format: "%.3f", seconds))}")
        } else {
            print("coupon-demo \(o.role): done in \(String(format: "%.2f", seconds)) s (sale \(runID(o)), \(requests.count) requests, \(polled) records polled here)")
        }
        return 0
    }

    // The audit: from the ledger (read back from the store) and the published requests only.
    let ledger = try await retrying { try await CouponLedger.read(from: store, coupons: Array(stock.keys)) }
    let records = try await retrying { try await store.records(for: Array(Set(requests.map(\.key)))) }
    // Requests given up on (dead-lettered after exhausting their attempts, e.g. under a very high
    // crash rate) are accounted for, not lost; they are left out of the first-come expectation.
    let deadLettered = Set(records.filter { $0.value.outcome?.status == .deadLettered }.keys)
    let audit = CouponAudit.audit(requests: requests, ledger: ledger, stock: stock, records: records, excluded: deadLettered)
    if let path = o.ledger { try writeLines(ledger, to: path) }
    if let path = o.requestsOut {
        try writeLines(requests.map { PublishedRequest(requestId: $0.requestId, couponId: $0.couponId, memberId: $0.memberId) }, to: path)
    }
    let polled = sale.deliveredRecords ?? counters.polled.load(ordering: .relaxed)
    let crashes = counters.crashes.load(ordering: .relaxed)
    let duplicates = counters.duplicates.load(ordering: .relaxed)
    let redelivered = max(0, polled - requests.count)
    let rps = seconds > 0 ? Double(requests.count) / seconds : 0
    let clean = audit.overIssued == 0 && audit.doubleIssued == 0 && audit.lost == 0 && audit.fcfsViolations == 0
    let consumers = memberIDs.count

    if o.json {
        let fields: [(String, String)] = [
            ("requests", "\(requests.count)"), ("issued", "\(audit.issued)"), ("soldOut", "\(audit.soldOut)"),
            ("duplicatesSuppressed", "\(duplicates)"), ("redelivered", "\(redelivered)"), ("crashes", "\(crashes)"),
            ("overIssued", "\(audit.overIssued)"), ("doubleIssued", "\(audit.doubleIssued)"), ("lost", "\(audit.lost)"),
            ("fcfsViolations", "\(audit.fcfsViolations)"), ("duplicateRequests", "\(audit.duplicateRequests)"),
            ("deadLettered", "\(deadLettered.count)"), ("backendUnavailable", "\(counters.unavailable.load(ordering: .relaxed))"),
            ("elapsedSeconds", String(format: "%.3f", seconds)), ("recordsPerSecond", String(format: "%.0f", rps)),
            ("coupons", "\(o.coupons)"), ("stock", "\(o.stock)"), ("partitions", "\(o.partitions)"), ("seed", "\(o.seed)"),
            ("store", "\"\(o.store)\""), ("transport", "\"\(o.transport)\""), ("role", "\"\(o.role)\""), ("sale", "\"\(runID(o))\""),
        ]
        print("{" + fields.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",") + "}")
    } else {
        let distinct = requests.count - audit.duplicateRequests
        print("""
            Flash sale: \(requests.count) clicks on \(o.coupons) coupons (stock \(o.stock) each) by up to \(o.members) members
              over \(o.partitions) partitions, \(consumers) consumers, seed \(o.seed), store \(o.store), transport \(o.transport)

              sold       \(audit.issued) coupons issued (total stock \(Int64(o.coupons) * o.stock))
              sold out   \(audit.soldOut) member-coupon requests came too late and were told "sold out"
              repeats    \(audit.duplicateRequests) clicks repeated an earlier one (\(distinct) distinct member-coupon pairs);
                         \(duplicates) records were answered from the dedupe store instead of issuing again
              crashes    \(crashes) consumer crashes injected (rate \(o.crashRate) per failure point);
                         \(redelivered) records were delivered again after crashes and rebalances
              given up   \(deadLettered.count) requests dead-lettered after \(ConsumerConfiguration(topic: "t", group: "g", memberID: "m").maxAttempts) attempts each (to the dead-letter topic, not lost)

            Audit (from the ledger read back from the store and the published requests, not from counters):
              overIssued \(audit.overIssued)   doubleIssued \(audit.doubleIssued)   lost \(audit.lost)   fcfsViolations \(audit.fcfsViolations)
              \(clean ? "OK: every coupon went to exactly the first \(o.stock) distinct members who clicked, once each." : "FAILED: see the counts above.")

            \(String(format: "%.2f", seconds)) s, \(String(format: "%.0f", rps)) requests/s\(o.store == "memory" && o.transport == "memory" ? "" : "   (sale \(runID(o)): rerun with the same options to resume or re-audit it)")
            """)
    }
    return clean ? 0 : 1
}

func runPartition(_ args: [String]) throws -> Int32 {
    var partitioner: (any Partitioner)?
    var count: Int?
    var i = 0
    while i < args.count {
        switch args[i] {
        case "--partitioner":
            i += 1
            guard i < args.count else { throw UsageError(description: "--partitioner needs a value") }
            switch args[i] {
            case "modulo": partitioner = ModuloPartitioner()
            case "murmur2": partitioner = Murmur2Partitioner()
            default: throw UsageError(description: "--partitioner must be modulo or murmur2, got '\(args[i])'")
            }
        case "--partitions":
            i += 1
            guard i < args.count, let n = Int(args[i]), n > 0 else { throw UsageError(description: "--partitions needs a positive integer") }
            count = n
        default: throw UsageError(description: "unknown option '\(args[i])' for partition")
        }
        i += 1
    }
    guard let partitioner, let count else { throw UsageError(description: "partition needs --partitioner and --partitions") }
    var failures = 0
    while let line = readLine(strippingNewline: true) {
        let key = line.hasSuffix("\r") ? String(line.dropLast()) : line
        do {
            let p = try partitioner.partition(forKey: Array(key.utf8), partitionCount: count)
            print("\(key)\t\(p.rawValue)")
        } catch let e as ExactlyOnceError {
            failures += 1
            FileHandle.standardError.write(Data("coupon-demo partition: line \(IdempotencyKey.abbreviateForDisplay(key)): \(e.message)\n".utf8))
        }
    }
    return failures == 0 ? 0 : 1
}

extension IdempotencyKey {
    static func abbreviateForDisplay(_ s: String) -> String { s.utf8.count > 64 ? String(decoding: s.utf8.prefix(40), as: UTF8.self) + "…" : s }
}

let args = Array(CommandLine.arguments.dropFirst())
do {
    if args.first == "partition" {
        exit(try runPartition(Array(args.dropFirst())))
    }
    let options = try parseOptions(args)
    exit(try await runSale(options))
} catch let e as UsageError {
    FileHandle.standardError.write(Data("coupon-demo: \(e.description)\n\n\(usage)\n".utf8))
    exit(2)
} catch let e as ExactlyOnceError where e.code == .invalidConfiguration {
    FileHandle.standardError.write(Data("coupon-demo: \(e.message)\n".utf8))
    exit(2)
} catch let e as ExactlyOnceError where e.code == .storeUnavailable {
    FileHandle.standardError.write(Data("coupon-demo: cannot reach the backend: \(e.message)\n".utf8))
    exit(1)
} catch {
    FileHandle.standardError.write(Data("coupon-demo: \(error)\n".utf8))
    exit(1)
}
