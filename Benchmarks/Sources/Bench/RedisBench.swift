import ExactlyOnce
import ExactlyOnceRedis
import Foundation
import Logging
import CouponKit

/// Redis store throughput against `redis-benchmark` on the same throwaway server, in the same
/// run, over the same unix socket.
///
/// - `redisBatchedVsRedisBenchmark`: claims of fresh keys in batches of 64 (one script call per
///   batch) from concurrent tasks, vs `redis-benchmark -P 64` running `SET key val NX` on random
///   keys (50 clients).
/// - `redisUnbatchedVsRedisBenchmark`: one claim per round trip from one task on one
///   connection, vs `redis-benchmark -c 1 SET` (one round trip each).
func runRedisBenchmarks(batchedClaims: Int = 400_000, unbatchedClaims: Int = 20_000) async throws -> [String: Double] {
    let server = try BenchRedisServer()
    defer { server.stop() }
    try await server.waitUntilReady()

    // Baselines first, on an empty server.
    let setNX = try server.redisBenchmark(["-P", "64", "-c", "50", "-n", "\(batchedClaims * 2)", "-r", "100000000",
                                           "SET", "nx:__rand_int__", "v", "NX"])
    let setSingle = try server.redisBenchmark(["-c", "1", "-n", "\(unbatchedClaims)", "-r", "100000000", "SET", "one:__rand_int__", "v"])

    // Batched claims: 64 per call, 16 calls in flight over a pool of 4 connections.
    var batched = RedisDedupeStore.Configuration(redis: server.configuration)
    batched.redis.poolSize = 4
    batched.keyPrefix = "bench-batched:"
    let store = try RedisDedupeStore(configuration: batched)
    let batchSize = 64
    let workers = 16
    let batchesPerWorker = batchedClaims / batchSize / workers
    let fingerprint = PayloadFingerprint.of(Array("payload".utf8))
    let start = ContinuousClock.now
    try await withThrowingTaskGroup(of: Void.self) { group in
        for w in 0..<workers {
            group.addTask {
                for b in 0..<batchesPerWorker {
                    let requests = (0..<batchSize).map { i in
                        ClaimRequest(key: .coupon(couponId: Int64(w), memberId: Int64(b * batchSize + i)), fingerprint: fingerprint, lease: .seconds(30))
                    }
                    let results = try await store.claim(requests)
                    guard results.count == batchSize, case .new = results[0] else {
                        throw ExactlyOnceError(.storeUnavailable, "benchmark claim did not claim")
                    }
                }
            }
        }
        try await group.waitForAll()
    }
    let batchedRate = Double(batchesPerWorker * workers * batchSize) / seconds(ContinuousClock.now - start)

    // One claim per round trip: one task, one connection.
    var single = RedisDedupeStore.Configuration(redis: server.configuration)
    single.redis.poolSize = 1
    single.keyPrefix = "bench-single:"
    let singleStore = try RedisDedupeStore(configuration: single)
    _ = try await singleStore.claim(ClaimRequest(key: .coupon(couponId: -1, memberId: -1), fingerprint: fingerprint, lease: .seconds(30)))
    let singleStart = ContinuousClock.now
    for i in 0..<unbatchedClaims {
        let r = try await singleStore.claim(ClaimRequest(key: .coupon(couponId: 0, memberId: Int64(i)), fingerprint: fingerprint, lease: .seconds(30)))
        guard case .new = r else { throw ExactlyOnceError(.storeUnavailable, "benchmark claim did not claim") }
    }
    let singleRate = Double(unbatchedClaims) / seconds(ContinuousClock.now - singleStart)

    return [
        "redisBatchedClaimsPerSecond": batchedRate,
        "redisBenchmarkSetNXPipelinedPerSecond": setNX,
        "redisBatchedVsRedisBenchmark": batchedRate / setNX,
        "redisUnbatchedClaimsPerSecond": singleRate,
        "redisBenchmarkSetSingleClientPerSecond": setSingle,
        "redisUnbatchedVsRedisBenchmark": singleRate / setSingle,
    ]
}

/// A throwaway `redis-server` on a unix socket in a temporary directory, without persistence.
final class BenchRedisServer {
    let directory: URL
    let socket: String
    private let process: Process

    init(persistent: Bool = false) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("eo-redis-bench-\(getpid())-\(persistent ? "aof" : "mem")")
        try? FileManager.default.removeItem(at: directory)
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        socket = directory.appendingPathComponent("redis.sock").path
        process = Process()
        process.executableURL = try Self.tool("redis-server")
        process.arguments = ["--port", "0", "--unixsocket", socket, "--unixsocketperm", "700", "--save", ""] + (persistent ? ["--appendonly", "yes", "--appendfsync", ProcessInfo.processInfo.environment["BENCH_REDIS_APPENDFSYNC"] ?? "always"] : ["--appendonly", "no"]) + [
                             "--dir", directory.path, "--logfile", directory.appendingPathComponent("redis.log").path]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
    }

    var configuration: RedisConfiguration {
        var c = RedisConfiguration()
        c.endpoint = .unix(path: socket)
        return c
    }

    func waitUntilReady() async throws {
        var c = RedisDedupeStore.Configuration(redis: configuration)
        c.redis.connectAttempts = 1
        let probe = try RedisDedupeStore(configuration: c)
        for _ in 0..<200 {
            if (try? await probe.ping()) != nil { return }
            try await Task.sleep(for: .milliseconds(25))
        }
        throw ExactlyOnceError(.storeUnavailable, "benchmark redis-server did not start")
    }

    /// Runs `redis-benchmark` against this server; returns its requests per second.
    func redisBenchmark(_ arguments: [String]) throws -> Double {
        let p = Process()
        p.executableURL = try Self.tool("redis-benchmark")
        p.arguments = ["-s", socket, "--csv"] + arguments
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = FileHandle.nullDevice
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let lines = String(decoding: data, as: UTF8.self).split(whereSeparator: \.isNewline)
        guard let last = lines.last, let field = last.split(separator: ",").dropFirst().first,
              let rps = Double(field.trimmingCharacters(in: CharacterSet(charactersIn: "\""))) else {
            throw ExactlyOnceError(.ioFailure, "cannot read redis-benchmark output")
        }
        return rps
    }

    func stop() {
        // SIGKILL: there is nothing to save, and a child spawned from a dispatch thread may
        // inherit a signal mask that blocks SIGTERM.
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        try? FileManager.default.removeItem(at: directory)
    }

    static func tool(_ name: String) throws -> URL {
        let dirs = (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":").map(String.init) + ["/usr/bin", "/usr/local/bin", "/opt/homebrew/bin"]
        for dir in dirs where FileManager.default.isExecutableFile(atPath: dir + "/" + name) {
            return URL(fileURLWithPath: dir + "/" + name)
        }
        throw ExactlyOnceError(.invalidConfiguration, "\(name) is not installed (apt-get install -y redis-server redis-tools)")
    }
}

/// `redisEndToEndVsMemory`: the same flash sale (a publisher and a consumer group of 3 in this
/// process, 3 partitions, `clicks` clicks with 30% repeats, no crashes) once on the in-memory
/// transport and store and once on Redis Streams and the Redis store, on a throwaway
/// redis-server with `appendonly yes` and `appendfsync always` (`BENCH_REDIS_APPENDFSYNC=everysec`
/// for a diagnostic run, not the figure). Rates count clicks from the
/// first publish until every partition is committed to its end.
func runRedisEndToEndBenchmarks(clicks: Int = Int(ProcessInfo.processInfo.environment["BENCH_E2E_CLICKS"] ?? "") ?? 200_000) async throws -> [String: Double] {
    let requests: [CouponRequest] = {
        var rng = SplitMix(state: 10)
        var out: [CouponRequest] = []
        out.reserveCapacity(clicks)
        for i in 0..<clicks {
            if i > 100, Int.random(in: 0..<10, using: &rng) < 3 {
                out.append(out[Int.random(in: 0..<out.count, using: &rng)])
            } else {
                out.append(CouponRequest(requestId: Int64(i), couponId: Int64.random(in: 1...30, using: &rng), memberId: Int64.random(in: 1...50_000, using: &rng)))
            }
        }
        return out
    }()
    let stock = Dictionary(uniqueKeysWithValues: (1...30).map { (Int64($0), Int64(1_000)) })

    func sale<T: MessageTransport, S: DedupeStore>(_ transport: T, _ store: S, finished: @escaping @Sendable () async throws -> Bool) async throws -> Double
        where S.Transaction == EffectTransaction
    {
        let start = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                for batch in stride(from: 0, to: requests.count, by: 2_048) {
                    var pending = requests[batch..<min(requests.count, batch + 2_048)].map(\.outgoing)
                    while !pending.isEmpty {
                        let report = try await transport.publish(pending, to: "coupons", partitioning: .modulo)
                        pending = zip(pending, report.positions).filter { $0.1 == nil }.map(\.0)
                    }
                }
            }
            for m in 0..<3 {
                group.addTask {
                    let c = ConsumerConfiguration(topic: "coupons", group: "issuers", memberID: "m\(m)")
                    let consumer = try ExactlyOnceConsumer(transport: transport, store: store, configuration: c,
                                                           logger: Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() }),
                                                           key: CouponRequest.keyExtractor, handler: CouponIssuer(stock: stock).handler)
                    let session = try await consumer.makeSession()
                    var idle = 0
                    while true {
                        let report = try await session.step()
                        if report.records == 0 {
                            idle += 1
                            if idle % 5 == 0, try await finished() { break }
                        }
                    }
                    try await session.close()
                }
            }
            try await group.waitForAll()
        }
        return Double(clicks) / seconds(ContinuousClock.now - start)
    }

    let memoryTransport = try InMemoryTransport(topics: ["coupons": 3, "coupons.dlq": 1])
    var mc = InMemoryDedupeStore.Configuration()
    mc.capacity = clicks + 1_000
    let memoryRate = try await sale(memoryTransport, try InMemoryDedupeStore(configuration: mc)) {
        memoryTransport.isFullyCommitted(group: "issuers", topic: "coupons")
            && memoryTransport.endOffsets(topic: "coupons").values.reduce(0) { $0 + Int($1.rawValue) } == clicks
    }

    let server = try BenchRedisServer(persistent: true)
    defer { server.stop() }
    try await server.waitUntilReady()
    let redisTransport = try RedisStreamsTransport(configuration: .init(redis: server.configuration))
    try await redisTransport.createTopic("coupons", partitions: 3)
    try await redisTransport.createTopic("coupons.dlq", partitions: 1)
    var sc = RedisDedupeStore.Configuration(redis: server.configuration)
    sc.keyPrefix = "bench-e2e:"
    let redisRate = try await sale(redisTransport, try RedisDedupeStore(configuration: sc)) {
        guard try await redisTransport.endOffsets(topic: "coupons").values.reduce(0, { $0 + Int($1.rawValue) }) == clicks else { return false }
        return try await redisTransport.isFullyCommitted(group: "issuers", topic: "coupons")
    }
    return [
        "memoryEndToEndRecordsPerSecond": memoryRate,
        "redisEndToEndRecordsPerSecond": redisRate,
        "redisEndToEndVsMemory": redisRate / memoryRate,
    ]
}

/// A seeded generator (SplitMix64), so both sales get the same clicks.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
