import CRdKafka
import CouponKit
import ExactlyOnce
import ExactlyOnceKafka
import Foundation
import Logging

/// Kafka through the library against raw librdkafka, on one in-process mock cluster
/// (`rd_kafka_mock_cluster_new`, 3 brokers), same records, same run.
///
/// - `kafkaConsumerVsRawLibrdkafka`: an ``ExactlyOnceConsumer`` session (claim, effect,
///   complete, commit after every step; in-memory store, the coupon issuer's effect) reading
///   `records` records of 4 partitions, against a raw librdkafka consumer loop
///   (`rd_kafka_consumer_poll` on a dedicated thread, same group settings) that decodes each
///   record, applies the same effect to a dictionary, and commits once at the end. Each side
///   joins its own fresh group first; the group join (about 3 s on the mock) is not timed: the
///   library's clock starts when its session has joined, the raw loop's at its first record.
/// - `kafkaProducerVsRawLibrdkafka`: `KafkaTransport.publish` in batches of 10 000, four batches
///   in flight at a time (each awaited for every delivery report; a publisher that keeps several
///   batches in flight, as `BufferedProducer` does), against a raw loop of
///   `rd_kafka_producev` (through the same fixed-arity shim) and one `rd_kafka_flush`, both with
///   the library's producer properties (idempotent, acks=all, linger 5 ms), to a fresh topic each.
///
/// Best of 3 rounds per side. `BENCH_KAFKA_RECORDS=<n>` changes the record count.
func runKafkaBenchmarks(records: Int = Int(ProcessInfo.processInfo.environment["BENCH_KAFKA_RECORDS"] ?? "") ?? 100_000) async throws -> [String: Double] {
    let rounds = 3
    let partitions = 4
    let mock = try KafkaMockCluster(brokers: 3)
    defer { mock.shutDown() }
    var config = KafkaTransport.Configuration(bootstrapServers: mock.bootstrapServers)
    config.sessionTimeout = .seconds(6)
    let requests = (0..<records).map { i in CouponRequest(requestId: Int64(i), couponId: Int64(i % 64), memberId: Int64(i)) }
    let outgoing = requests.map(\.outgoing)
    let stock = Dictionary(uniqueKeysWithValues: (0..<64).map { (Int64($0), Int64(records)) })

    // The consumers' topic, filled once (not timed).
    try mock.createTopic("kbench-consume", partitions: partitions)
    try mock.createTopic("kbench-consume.dlq", partitions: 1)
    let filler = try KafkaTransport(configuration: config)
    for start in stride(from: 0, to: records, by: 10_000) {
        let report = try await filler.publish(Array(outgoing[start..<min(records, start + 10_000)]), to: "kbench-consume", partitioning: .modulo)
        precondition(report.allAccepted, "filling the consumers' topic")
    }
    let filled = try await filler.endOffsets(topic: "kbench-consume").values.reduce(0) { $0 + Int($1.rawValue) }
    precondition(filled == records, "the consumers' topic holds \(filled) of \(records) records")

    var rawConsumerBest = Double.infinity
    var libConsumerBest = Double.infinity
    for round in 0..<rounds {
        rawConsumerBest = min(rawConsumerBest, try await rawConsume(bootstrap: mock.bootstrapServers, topic: "kbench-consume",
                                                                       group: "raw-\(round)", records: records, stock: stock))
        let rawCommitted = try await filler.isFullyCommitted(group: "raw-\(round)", topic: "kbench-consume")
        precondition(rawCommitted, "raw consumer committed every record")

        let transport = try KafkaTransport(configuration: config)
        let store = try InMemoryDedupeStore(configuration: {
            var c = InMemoryDedupeStore.Configuration()
            c.capacity = records * 2
            return c
        }())
        var cc = ConsumerConfiguration(topic: "kbench-consume", group: "eo-\(round)", memberID: "eo")
        cc.pollWait = .milliseconds(5)
        let consumer = try ExactlyOnceConsumer(
            transport: transport, store: store, configuration: cc, logger: Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() }),
            key: CouponRequest.keyExtractor, handler: CouponIssuer(stock: stock).handler)
        let session = try await consumer.makeSession()
        let start = ContinuousClock.now
        var finished = 0
        while finished < records {
            let r = try await session.step()
            finished += r.processed + r.duplicates + r.deadLettered
        }
        libConsumerBest = min(libConsumerBest, seconds(ContinuousClock.now - start))
        precondition(finished == records, "consumer finished \(finished) of \(records)")
        let libCommitted = try await transport.isFullyCommitted(group: "eo-\(round)", topic: "kbench-consume")
        precondition(libCommitted, "consumer committed every record")
        let ledger = try await CouponLedger.read(from: store, coupons: Array(0..<64))
        precondition(ledger.count == records, "consumer applied every effect once")
        try await session.close()
    }

    var rawProducerBest = Double.infinity
    var libProducerBest = Double.infinity
    let probe = try KafkaTransport(configuration: config)
    for round in 0..<rounds {
        let rawTopic = "kbench-produce-raw-\(round)"
        try mock.createTopic(rawTopic, partitions: partitions)
        let partitionOf = try outgoing.map { try Partitioning.modulo.resolve(key: $0.key, partitionCount: partitions).rawValue }
        rawProducerBest = min(rawProducerBest, try await rawProduce(bootstrap: mock.bootstrapServers, topic: rawTopic, records: outgoing, partitions: partitionOf))
        let rawEnd = try await probe.endOffsets(topic: rawTopic).values.reduce(0) { $0 + Int($1.rawValue) }
        precondition(rawEnd == records + 1, "raw producer delivered \(rawEnd) of \(records + 1) records")

        let libTopic = "kbench-produce-lib-\(round)"
        try mock.createTopic(libTopic, partitions: partitions)
        let transport = try KafkaTransport(configuration: config)
        // Warm-up (not timed): metadata, the idempotent producer's id; the raw side does the same.
        let warm = try await transport.publish([outgoing[0]], to: libTopic, partitioning: .modulo)
        precondition(warm.allAccepted, "warm-up publish")
        let start = ContinuousClock.now
        try await withThrowingTaskGroup(of: Bool.self) { group in
            var inFlight = 0
            for s in stride(from: 0, to: records, by: 10_000) {
                if inFlight == 4, let accepted = try await group.next() {
                    precondition(accepted, "library publish accepted")
                    inFlight -= 1
                }
                let batch = Array(outgoing[s..<min(records, s + 10_000)])
                group.addTask { try await transport.publish(batch, to: libTopic, partitioning: .modulo).allAccepted }
                inFlight += 1
            }
            for try await accepted in group { precondition(accepted, "library publish accepted") }
        }
        libProducerBest = min(libProducerBest, seconds(ContinuousClock.now - start))
        let libEnd = try await probe.endOffsets(topic: libTopic).values.reduce(0) { $0 + Int($1.rawValue) }
        precondition(libEnd == records + 1, "library producer delivered \(libEnd) of \(records + 1) records")
    }

    return [
        "kafkaConsumerRecordsPerSecond": Double(records) / libConsumerBest,
        "kafkaRawConsumerRecordsPerSecond": Double(records) / rawConsumerBest,
        "kafkaConsumerVsRawLibrdkafka": rawConsumerBest / libConsumerBest,
        "kafkaProducerRecordsPerSecond": Double(records) / libProducerBest,
        "kafkaRawProducerRecordsPerSecond": Double(records) / rawProducerBest,
        "kafkaProducerVsRawLibrdkafka": rawProducerBest / libProducerBest,
    ]
}

/// A librdkafka handle, passed to the thread that uses it.
private struct RawHandle: @unchecked Sendable {
    let pointer: OpaquePointer
}

/// Creates a raw librdkafka handle with `properties`.
private func rawHandle(_ type: rd_kafka_type_t, _ properties: [(String, String)]) throws -> RawHandle {
    guard let conf = rd_kafka_conf_new() else { throw ExactlyOnceError(.transportFailure, "rd_kafka_conf_new failed") }
    var err = [CChar](repeating: 0, count: 512)
    for (k, v) in properties where rd_kafka_conf_set(conf, k, v, &err, err.count) != RD_KAFKA_CONF_OK {
        rd_kafka_conf_destroy(conf)
        throw ExactlyOnceError(.invalidConfiguration, "\(k)=\(v): \(text(err))")
    }
    guard let rk = rd_kafka_new(type, conf, &err, err.count) else {
        rd_kafka_conf_destroy(conf)
        throw ExactlyOnceError(.invalidConfiguration, "rd_kafka_new: \(text(err))")
    }
    return RawHandle(pointer: rk)
}

/// A NUL-terminated C buffer as text.
private func text(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// Runs blocking `body` on a thread of its own (never on the cooperative pool).
private func onThread<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { c in
        let t = Thread { c.resume(returning: body()) }
        t.start()
    }
}

/// The raw consumer: subscribe, poll, decode, apply the effect, commit once; seconds from the
/// first record to the commit of the last.
private func rawConsume(bootstrap: String, topic: String, group: String, records: Int, stock: [Int64: Int64]) async throws -> Double {
    let h = try rawHandle(RD_KAFKA_CONSUMER, [
        ("bootstrap.servers", bootstrap), ("log_level", "3"), ("allow.auto.create.topics", "false"),
        ("group.id", group), ("client.id", group), ("enable.auto.commit", "false"), ("enable.auto.offset.store", "true"), ("auto.offset.reset", "earliest"),
        ("enable.partition.eof", "false"), ("fetch.wait.max.ms", "50"), ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "2000"), ("partition.assignment.strategy", "cooperative-sticky"),
    ])
    let result: (Double, Int, Int, rd_kafka_resp_err_t) = await onThread {
        let rk = h.pointer
        let list = rd_kafka_topic_partition_list_new(1)
        rd_kafka_topic_partition_list_add(list, topic, -1)
        _ = rd_kafka_subscribe(rk, list)
        rd_kafka_topic_partition_list_destroy(list)
        var state: [String: [UInt8]] = [:]
        var seen = 0
        var start: ContinuousClock.Instant?
        let giveUp = ContinuousClock.now + .seconds(120)
        while seen < records && ContinuousClock.now < giveUp {
            guard let m = rd_kafka_consumer_poll(rk, 100) else { continue }
            defer { rd_kafka_message_destroy(m) }
            guard m.pointee.err == RD_KAFKA_RESP_ERR_NO_ERROR else { continue }
            if start == nil { start = .now }
            let payload = Array(UnsafeRawBufferPointer(start: m.pointee.payload, count: m.pointee.len))
            if let d = try? CouponRequest.decode(payload) {
                let (c, member) = (d.couponId, d.memberId)
                let issuedKey = CouponIssuer.issuedKey(c)
                let issued = state[issuedKey].flatMap { Int64(String(decoding: $0, as: UTF8.self)) } ?? 0
                if issued < stock[c]! {
                    state[issuedKey] = Array(String(issued + 1).utf8)
                    state[CouponIssuer.serialKey(c, issued + 1)] = Array(String(member).utf8)
                }
            }
            seen += 1
        }
        let err = rd_kafka_commit(rk, nil, 0)
        let elapsed = start.map { seconds(ContinuousClock.now - $0) } ?? .infinity
        _ = rd_kafka_consumer_close(rk)
        rd_kafka_destroy(rk)
        return (elapsed, seen, state.count, err)
    }
    precondition(result.1 == records, "raw consumer read \(result.1) of \(records) records")
    precondition(result.2 == records + 64, "raw consumer applied every effect")
    precondition(result.3 == RD_KAFKA_RESP_ERR_NO_ERROR, "raw consumer's commit: \(String(cString: rd_kafka_err2str(result.3)))")
    return result.0
}

/// The raw producer: `rd_kafka_producev` for every record (retrying a full local queue), then
/// one `rd_kafka_flush`; seconds for both. One warm-up record first (not timed).
private func rawProduce(bootstrap: String, topic: String, records: [OutgoingRecord], partitions: [Int]) async throws -> Double {
    let h = try rawHandle(RD_KAFKA_PRODUCER, [
        ("bootstrap.servers", bootstrap), ("log_level", "3"), ("allow.auto.create.topics", "false"),
        ("acks", "all"), ("enable.idempotence", "true"), ("linger.ms", "5"), ("batch.num.messages", "10000"),
        ("queue.buffering.max.messages", "200000"), ("message.timeout.ms", "30000"),
    ])
    let result: (Double, Int32) = await onThread {
        let rk = h.pointer
        guard let rkt = rd_kafka_topic_new(rk, topic, nil) else { preconditionFailure("rd_kafka_topic_new(\(topic))") }
        func produce(_ r: OutgoingRecord, _ partition: Int) {
            while true {
                let err = r.payload.withUnsafeBytes { p in
                    (r.key ?? []).withUnsafeBytes { k in
                        eo_kafka_produce(rk, rkt, Int32(partition), p.baseAddress, p.count, k.baseAddress, k.count, nil, nil)
                    }
                }
                guard err == RD_KAFKA_RESP_ERR__QUEUE_FULL else { precondition(err == RD_KAFKA_RESP_ERR_NO_ERROR, "producev"); return }
                rd_kafka_poll(rk, 1)
            }
        }
        produce(records[0], partitions[0])
        _ = rd_kafka_flush(rk, 30_000)
        let start = ContinuousClock.now
        for (i, r) in records.enumerated() { produce(r, partitions[i]) }
        _ = rd_kafka_flush(rk, 60_000)
        let elapsed = seconds(ContinuousClock.now - start)
        let left = rd_kafka_outq_len(rk)
        rd_kafka_topic_destroy(rkt)
        rd_kafka_destroy(rk)
        return (elapsed, left)
    }
    precondition(result.1 == 0, "raw producer left \(result.1) records undelivered")
    return result.0
}
