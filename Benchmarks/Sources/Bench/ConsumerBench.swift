import CouponKit
import ExactlyOnce
import Foundation
import Logging
import Synchronization

/// The consumer wrapper (claims, transactional effect, completion, commits) against a bare loop
/// that polls the same transport and applies the same effect to the same kind of state without
/// dedupe or commits. One partition, so both are one sequential lane; same records, same run.
///
/// `BENCH_RECORDS=<n>` changes the record count; `BENCH_SIDE=bare|consumer` runs one side only
/// (for instruction counts under `valgrind --tool=callgrind`).
func runConsumerBenchmarks(records: Int = Int(ProcessInfo.processInfo.environment["BENCH_RECORDS"] ?? "") ?? 200_000,
                           partitions: Int = 1) async throws -> [String: Double] {
    let side = ProcessInfo.processInfo.environment["BENCH_SIDE"]
    let rounds = side == nil ? 3 : 1
    let requests = (0..<records).map { i in
        CouponRequest(requestId: Int64(i), couponId: Int64(i % 64), memberId: Int64(i))
    }
    let stock = Dictionary(uniqueKeysWithValues: (0..<64).map { (Int64($0), Int64(records)) })

    func makeTransport() async throws -> InMemoryTransport {
        let t = try InMemoryTransport(topics: ["bench": partitions, "bench.dlq": 1])
        var i = 0
        while i < requests.count {
            let batch = requests[i..<min(i + 4096, requests.count)].map(\.outgoing)
            let report = try await t.publish(batch, to: "bench", partitioning: .modulo)
            precondition(report.allAccepted)
            i += batch.count
        }
        return t
    }

    // Baseline: poll and apply the effect directly.
    var bareBest = Double.infinity
    var consumerBest = Double.infinity
    for _ in 0..<(side == "consumer" ? 0 : rounds) {
        let t = try await makeTransport()
        let state = Mutex<[String: [UInt8]]>([:])
        let sub = try await t.subscribe(topic: "bench", group: "bare", memberID: "bare")
        let start = ContinuousClock.now
        var seen = 0
        while seen < records {
            let batch = try await sub.poll(maxRecords: 512)
            for r in batch.records {
                let (c, m) = try CouponRequest.decode(r.payload)
                state.withLock { s in
                    let issuedKey = CouponIssuer.issuedKey(c)
                    let issued = s[issuedKey].flatMap { Int64(String(decoding: $0, as: UTF8.self)) } ?? 0
                    guard issued < stock[c]! else { return }
                    s[issuedKey] = Array(String(issued + 1).utf8)
                    s[CouponIssuer.serialKey(c, issued + 1)] = Array(String(m).utf8)
                }
            }
            seen += batch.records.count
        }
        bareBest = min(bareBest, seconds(ContinuousClock.now - start))
        precondition(state.withLock { $0.count } == records + 64, "bare loop applied every effect")
    }

    for _ in 0..<(side == "bare" ? 0 : rounds) {
        let t = try await makeTransport()
        let store = try InMemoryDedupeStore(configuration: {
            var c = InMemoryDedupeStore.Configuration()
            c.capacity = records * 2
            return c
        }())
        var config = ConsumerConfiguration(topic: "bench", group: "eo", memberID: "eo")
        config.pollWait = .zero
        let consumer = try ExactlyOnceConsumer(
            transport: t, store: store, configuration: config, logger: Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() }),
            key: CouponRequest.keyExtractor, handler: CouponIssuer(stock: stock).handler)
        let session = try await consumer.makeSession()
        let start = ContinuousClock.now
        while !t.isFullyCommitted(group: "eo", topic: "bench") { try await session.step() }
        consumerBest = min(consumerBest, seconds(ContinuousClock.now - start))
        let ledger = try await CouponLedger.read(from: store, coupons: Array(0..<64))
        precondition(ledger.count == records, "consumer applied every effect once")
    }
    if side == "bare" { return ["bareLoopRecordsPerSecond": Double(records) / bareBest] }
    if side == "consumer" { return ["consumerRecordsPerSecond": Double(records) / consumerBest] }
    return [
        "bareLoopRecordsPerSecond": Double(records) / bareBest,
        "consumerRecordsPerSecond": Double(records) / consumerBest,
        "consumerVsBareLoop": bareBest / consumerBest,
    ]
}

func seconds(_ d: Duration) -> Double {
    Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
}

/// Key ordering against partition ordering: 64 coupon keys in one partition, a handler that
/// awaits 1 ms of simulated I/O per record. Same records, same store kind, same run.
func runOrderingBenchmarks(keys: Int = 64, perKey: Int = 24) async throws -> [String: Double] {
    let requests = (0..<perKey).flatMap { m in (0..<keys).map { c in CouponRequest(requestId: Int64(m * keys + c), couponId: Int64(c), memberId: Int64(m)) } }
    let stock = Dictionary(uniqueKeysWithValues: (0..<keys).map { (Int64($0), Int64(perKey)) })
    let issuer = CouponIssuer(stock: stock)
    func run(_ ordering: Ordering) async throws -> Double {
        let t = try InMemoryTransport(topics: ["bench": 1, "bench.dlq": 1])
        let report = try await t.publish(requests.map(\.outgoing), to: "bench", partitioning: .modulo)
        precondition(report.allAccepted)
        let store = try InMemoryDedupeStore()
        var config = ConsumerConfiguration(topic: "bench", group: "eo", memberID: "eo")
        config.pollWait = .zero
        config.ordering = ordering
        let consumer = try ExactlyOnceConsumer(
            transport: t, store: store, configuration: config, logger: Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() }),
            key: CouponRequest.keyExtractor, handler: { ctx in
                try await Task.sleep(for: .milliseconds(1))  // the handler's I/O
                return try await issuer.handle(&ctx)
            })
        let session = try await consumer.makeSession()
        let start = ContinuousClock.now
        while !t.isFullyCommitted(group: "eo", topic: "bench") { try await session.step() }
        let elapsed = seconds(ContinuousClock.now - start)
        let ledger = try await CouponLedger.read(from: store, coupons: Array(0..<Int64(keys)))
        precondition(ledger.count == requests.count, "every click issued once")
        return Double(requests.count) / elapsed
    }
    let partition = try await run(.partition)
    let key = try await run(.key(maxConcurrency: keys))
    return [
        "partitionOrderingRecordsPerSecond": partition,
        "keyOrderingRecordsPerSecond": key,
        "keyOrderingSpeedup": key / partition,
    ]
}
