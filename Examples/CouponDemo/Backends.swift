import CouponKit
import ExactlyOnce
import ExactlyOnceFileStore
import ExactlyOnceRedis
import Foundation

let saleTopic = "coupon-requests"
let saleGroup = "coupon-issuers"
let defaultRedisURL = "redis://127.0.0.1:6379"

/// Where the sale's clicks go, and how a process knows the sale is over.
protocol SaleTransport: Sendable {
    associatedtype Transport: MessageTransport
    var transport: Transport { get }
    /// The end offset of every partition of the sale's topic.
    func endOffsets() async throws -> [PartitionID: Offset]
    /// Whether the group has committed every partition to its end.
    func isFullyCommitted() async throws -> Bool
    /// An injected crash killed `memberID`; its partitions must move on.
    func crashed(memberID: String)
    /// Records delivered to this process's members, when the transport counts them (polls that
    /// an injected crash interrupted included).
    var deliveredRecords: Int? { get }
    /// How the sale's clicks are partitioned, by their key (the coupon id): every click of a
    /// coupon goes to one partition, so the coupon's first come, first served order holds.
    var partitioning: Partitioning { get }
}

extension SaleTransport {
    /// Whether all `total` requests are published and committed.
    func isFinished(total: Int) async throws -> Bool {
        guard try await endOffsets().values.reduce(0, { $0 + Int($1.rawValue) }) == total else { return false }
        return try await isFullyCommitted()
    }
}

/// The embedded default: everything in this process.
struct MemorySale: SaleTransport {
    let transport: InMemoryTransport
    init(partitions: Int) throws {
        transport = try InMemoryTransport(topics: [saleTopic: partitions, saleTopic + ".dlq": 1])
    }
    func endOffsets() async throws -> [PartitionID: Offset] { transport.endOffsets(topic: saleTopic) }
    func isFullyCommitted() async throws -> Bool { transport.isFullyCommitted(group: saleGroup, topic: saleTopic) }
    func crashed(memberID: String) { transport.expel(memberID: memberID, group: saleGroup, topic: saleTopic) }
    var deliveredRecords: Int? { transport.deliveredRecords }
    /// `couponId % partitions` (``ModuloPartitioner``).
    var partitioning: Partitioning { .modulo }
}

/// Redis Streams, shared by every process that runs the same sale (same parameters and seed).
struct RedisSale: SaleTransport {
    let transport: RedisStreamsTransport
    init(url: String, keyPrefix: String, sessionTimeout: Duration, partitions: Int) async throws {
        var config = RedisStreamsTransport.Configuration(redis: try RedisConfiguration(url: url))
        config.keyPrefix = keyPrefix
        config.sessionTimeout = sessionTimeout
        let transport = try RedisStreamsTransport(configuration: config)
        self.transport = transport
        // A Redis that is not there at the start is a setup error: say so after a few tries.
        // Bounded in time too: a server that accepts and never answers costs one command timeout.
        try await retrying(attempts: 20, within: .seconds(5)) { try await transport.createTopic(saleTopic, partitions: partitions) }
        try await retrying { try await transport.createTopic(saleTopic + ".dlq", partitions: 1) }
    }
    func endOffsets() async throws -> [PartitionID: Offset] { try await transport.endOffsets(topic: saleTopic) }
    func isFullyCommitted() async throws -> Bool { try await transport.isFullyCommitted(group: saleGroup, topic: saleTopic) }
    // The member comes back under the same id: its new session starts from the committed offsets.
    func crashed(memberID: String) {}
    var deliveredRecords: Int? { nil }
    /// `couponId % partitions` (``ModuloPartitioner``).
    var partitioning: Partitioning { .modulo }
}

/// Retries `body` while a backend is unreachable, for up to about a minute (`attempts` × 100 ms).
/// With `within`, no new attempt starts once that much time has passed since the first.
func retrying<T>(attempts: Int = 600, within: Duration? = nil, _ body: () async throws -> T) async throws -> T {
    var failures = 0
    let start = ContinuousClock.now
    while true {
        do {
            return try await body()
        } catch let e as ExactlyOnceError where e.isRetriable && failures + 1 < attempts && within.map({ ContinuousClock.now - start < $0 }) ?? true {
            failures += 1
            try await Task.sleep(for: .milliseconds(100))
        }
    }
}

/// Makes the sale's dedupe store.
func makeStore(_ o: SaleOptions) async throws -> any DedupeStore<EffectTransaction> {
    switch o.store {
    case .file:
        // The sale's journal lives in a subdirectory named after the sale, so one --data-dir
        // can hold several sales and a rerun with the same options continues its own.
        let parent = o.dataDir ?? "."
        do {
            if !FileManager.default.fileExists(atPath: parent) {
                try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
            }
        } catch {
            throw DemoError.usage("--data-dir \(parent) cannot be created (\(ExactlyOnceError.Cause(of: error)))")
        }
        return try await FileDedupeStore.open(FileStoreConfiguration(directory: parent + "/sale-" + o.saleID))
    case .redis:
        return try RedisDedupeStore(url: o.redisURL ?? defaultRedisURL, keyPrefix: "coupon-demo:\(o.saleID):store:")
    case .postgres:
        // The PostgreSQL store has its own transaction type; SaleRunner runs it (runPostgres).
        throw DemoError.usage("--store postgres is run by SaleRunner.runPostgres")
    case .memory:
        // Sized from the flags: every request may be a distinct key.
        var c = InMemoryDedupeStore.Configuration()
        c.capacity = max(1_000, o.requests)
        return try InMemoryDedupeStore(configuration: c)
    }
}

/// Publishes the requests that are not in the log yet, in batches, each coupon's in publish
/// order: per partition, the log holds a prefix of that partition's requests (batches are
/// accepted as per-partition prefixes), so after a kill or an unknown outcome the end offsets
/// say exactly where to go on.
func publishSale<T: MessageTransport>(_ requests: [CouponRequest], partitions: Int, partitioning: Partitioning, transport: T,
                                      endOffsets: () async throws -> [PartitionID: Offset],
                                      published: @Sendable (Int) -> Void) async throws {
    // Each partition's requests in publish order, by the partition the transport puts them in.
    var queues = Array(repeating: [CouponRequest](), count: partitions)
    for r in requests { queues[try partitioning.resolve(key: r.recordKey, partitionCount: partitions).rawValue].append(r) }
    let batchSize = 2_048
    while true {
        let ends = try await retrying { try await endOffsets() }
        var next = [Int](repeating: 0, count: partitions)
        for p in 0..<partitions {
            let n = Int(ends[PartitionID(p)]?.rawValue ?? 0)
            guard n <= queues[p].count else {
                throw DemoError(message: "partition \(p) of the sale holds \(n) records, more than its \(queues[p].count) requests: another sale wrote to it")
            }
            next[p] = n
        }
        published(next.reduce(0, +))
        var failed = false
        while !failed {
            // The next batch: round-robin over partitions, in each partition's order.
            var batch: [OutgoingRecord] = []
            batch.reserveCapacity(batchSize)
            var taken = next
            var progress = true
            while batch.count < batchSize && progress {
                progress = false
                for p in 0..<partitions where taken[p] < queues[p].count && batch.count < batchSize {
                    batch.append(queues[p][taken[p]].outgoing)
                    taken[p] += 1
                    progress = true
                }
            }
            if batch.isEmpty { return }
            do {
                let report = try await transport.publish(batch, to: saleTopic, partitioning: partitioning)
                if report.allAccepted {
                    next = taken
                    published(next.reduce(0, +))
                } else {
                    failed = true
                }
            } catch let e as ExactlyOnceError where e.isRetriable {
                failed = true
            }
        }
        // Unknown outcomes: the log is the truth; read where each partition ends and go on.
        try await Task.sleep(for: .milliseconds(100))
    }
}
