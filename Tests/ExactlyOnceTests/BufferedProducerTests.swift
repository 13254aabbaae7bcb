import ExactlyOnce
import Logging
import ServiceLifecycle
import Synchronization
import Testing

/// A transport around the in-memory one that counts batch calls, can accept only a prefix of a
/// batch and then fail, and can hold batches at a gate.
final class BatchSpyTransport: MessageTransport {
    let base: InMemoryTransport
    let batchCalls = Atomic<Int>(0)
    /// When set, a batch accepts this many records, then reports the rest failed.
    let acceptOnly = Mutex<Int?>(nil)
    let gate = Mutex<[CheckedContinuation<Void, Never>]?>(nil)
    init(base: InMemoryTransport) { self.base = base }

    func closeGate() { gate.withLock { $0 = [] } }
    func openGate() {
        let waiters = gate.withLock { g -> [CheckedContinuation<Void, Never>] in
            defer { g = nil }
            return g ?? []
        }
        for w in waiters { w.resume() }
    }

    func partitionCount(of topic: String) async throws -> Int { try await base.partitionCount(of: topic) }
    func publish(_ record: OutgoingRecord, to topic: String, partitioning: Partitioning) async throws -> RecordPosition {
        try await base.publish(record, to: topic, partitioning: partitioning)
    }
    func publish(_ records: [OutgoingRecord], to topic: String, partitioning: Partitioning) async throws -> PublishReport {
        batchCalls.add(1, ordering: .relaxed)
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let wait = gate.withLock { g -> Bool in
                if g != nil { g!.append(c); return true }
                return false
            }
            if !wait { c.resume() }
        }
        guard let k = acceptOnly.withLock({ $0 }), k < records.count else {
            return try await base.publish(records, to: topic, partitioning: partitioning)
        }
        let head = try await base.publish(Array(records.prefix(k)), to: topic, partitioning: partitioning)
        return PublishReport(positions: head.positions + Array(repeating: nil, count: records.count - k),
                             failure: ExactlyOnceError(.transportUnavailable, "broker went away mid-batch (injected)"))
    }
    func subscribe(topic: String, group: String, memberID: String) async throws -> InMemoryTransport.Subscription {
        try await base.subscribe(topic: topic, group: group, memberID: memberID)
    }
    func partitionStatus(group: String, topic: String) async throws -> [PartitionStatus] { try await base.partitionStatus(group: group, topic: topic) }
    func read(topic: String, partition: PartitionID, from offset: Offset, maxRecords: Int) async throws -> [ConsumedRecord] {
        try await base.read(topic: topic, partition: partition, from: offset, maxRecords: maxRecords)
    }
}

@Suite(.timeLimit(.minutes(2))) struct BufferedProducerTests {
    static func withProducer<R: Sendable>(_ t: BatchSpyTransport, configure: (inout BufferedProducer<BatchSpyTransport>.Configuration) -> Void = { _ in },
                                          _ body: @escaping @Sendable (BufferedProducer<BatchSpyTransport>) async throws -> R) async throws -> R {
        var c = BufferedProducer<BatchSpyTransport>.Configuration()
        configure(&c)
        let producer = try BufferedProducer(transport: t, topic: "t", partitioning: .murmur2, configuration: c)
        let group = ServiceGroup(configuration: .init(services: [producer], logger: quietLogger))
        return try await withThrowingTaskGroup(of: R?.self) { tasks in
            tasks.addTask { try await group.run(); return nil }
            let result = try await body(producer)
            await group.triggerGracefulShutdown()
            var out: R?
            for try await r in tasks { if let r { out = r } }
            return out ?? result
        }
    }

    /// Many concurrent senders: every record confirmed at the position it holds in the log,
    /// each key in its sender's order, with far fewer transport calls than records.
    @Test func concurrentSendsAreBatchedAndConfirmedInOrder() async throws {
        let t = BatchSpyTransport(base: try InMemoryTransport(topics: ["t": 4]))
        let positions = try await Self.withProducer(t) { producer in
            try await withThrowingTaskGroup(of: (Int, [RecordPosition]).self) { senders in
                for s in 0..<100 {
                    senders.addTask {
                        var mine: [RecordPosition] = []
                        for i in 0..<30 {
                            mine.append(try await producer.send(OutgoingRecord(key: Array("sender-\(s)".utf8), payload: Array("\(s):\(i)".utf8))))
                        }
                        return (s, mine)
                    }
                }
                var all: [Int: [RecordPosition]] = [:]
                for try await (s, mine) in senders { all[s] = mine }
                return all
            }
        }
        var total = 0
        for (s, mine) in positions {
            #expect(Set(mine.map(\.partition)).count == 1, "one key, one partition")
            #expect(zip(mine, mine.dropFirst()).allSatisfy { $0.offset < $1.offset }, "sender \(s)'s records in its order")
            let log = t.base.records(topic: "t", partition: mine[0].partition)
            for (i, p) in mine.enumerated() {
                #expect(log[Int(p.offset.rawValue)].payload == Array("\(s):\(i)".utf8), "the confirmed position holds the record")
            }
            total += mine.count
        }
        #expect(total == 3000)
        #expect(t.base.endOffsets(topic: "t").values.reduce(0) { $0 + $1.rawValue } == 3000, "nothing published twice")
        #expect(t.batchCalls.load(ordering: .relaxed) < 1000, "batched: \(t.batchCalls.load(ordering: .relaxed)) calls for 3000 records")
    }

    /// A batch the transport accepts only in part: the accepted records get their positions,
    /// the rest (and what was buffered behind them) get errors and are not in the log.
    @Test func aPartlyAcceptedBatchReportsExactlyWhatWasAccepted() async throws {
        let t = BatchSpyTransport(base: try InMemoryTransport(topics: ["t": 1]))
        t.acceptOnly.withLock { $0 = 3 }
        let results = try await Self.withProducer(t, configure: { $0.maxBatchSize = 8; $0.linger = .milliseconds(20) }) { producer in
            try await withThrowingTaskGroup(of: (Int, Result<RecordPosition, ExactlyOnceError>).self) { senders in
                for i in 0..<20 {
                    senders.addTask {
                        do {
                            return (i, .success(try await producer.send(OutgoingRecord(key: Array("k".utf8), payload: Array("\(i)".utf8)))))
                        } catch let e as ExactlyOnceError {
                            return (i, .failure(e))
                        }
                    }
                }
                var out: [Int: Result<RecordPosition, ExactlyOnceError>] = [:]
                for try await (i, r) in senders { out[i] = r }
                return out
            }
        }
        let log = t.base.records(topic: "t", partition: 0)
        let accepted = results.compactMap { i, r -> (Int, RecordPosition)? in if case .success(let p) = r { (i, p) } else { nil } }
        #expect(accepted.count == log.count, "every record in the log was reported accepted, and no other")
        for (i, p) in accepted { #expect(log[Int(p.offset.rawValue)].payload == Array("\(i)".utf8)) }
        let failedPayloads = Set(results.compactMap { i, r -> String? in if case .failure = r { "\(i)" } else { nil } })
        #expect(!failedPayloads.isEmpty)
        #expect(accepted.count >= 3, "the first batch accepted its prefix (accepted \(accepted.count), failed \(failedPayloads.count))")
        #expect(log.allSatisfy { !failedPayloads.contains(String(decoding: $0.payload, as: UTF8.self)) }, "a failed record is not in the log")
        for case .failure(let e) in results.values { #expect(e.isRetriable) }
    }

    @Test func aRecordThatCannotBePartitionedFailsAlone() async throws {
        let t = BatchSpyTransport(base: try InMemoryTransport(topics: ["t": 2]))
        let (good, bad) = try await Self.withProducer(t, configure: { $0.linger = .milliseconds(20) }) { producer in
            async let a = producer.send(OutgoingRecord(key: Array("x".utf8), payload: [1]))
            async let b: ExactlyOnceError? = {
                do { _ = try await producer.send(OutgoingRecord(key: nil, payload: [2])); return nil } catch let e as ExactlyOnceError { return e } catch { return nil }
            }()
            async let c = producer.send(OutgoingRecord(key: Array("y".utf8), payload: [3]))
            return (try await [a, c], await b)
        }
        #expect(good.count == 2)
        #expect(bad?.code == .invalidKey, "the keyless record fails alone: \(String(describing: bad))")
    }

    /// Back-pressure: no more than maxBufferedRecords wait in the producer.
    @Test func sendersWaitWhenTheWindowIsFull() async throws {
        let t = BatchSpyTransport(base: try InMemoryTransport(topics: ["t": 1]))
        t.closeGate()
        let maxSeen = try await Self.withProducer(t, configure: { $0.maxBatchSize = 5; $0.maxBufferedRecords = 10; $0.linger = .zero }) { producer in
            try await withThrowingTaskGroup(of: Void.self) { senders in
                for i in 0..<60 {
                    senders.addTask { _ = try await producer.send(OutgoingRecord(key: Array("k".utf8), payload: Array("\(i)".utf8))) }
                }
                var maxSeen = 0
                for _ in 0..<50 {
                    maxSeen = max(maxSeen, producer.bufferedCount)
                    try await Task.sleep(for: .milliseconds(2))
                }
                t.openGate()
                try await senders.waitForAll()
                return maxSeen
            }
        }
        #expect(maxSeen == 10, "the window filled up to its bound and no further (saw \(maxSeen))")
        #expect(t.base.endOffsets(topic: "t")[0] == Offset(60))
    }

    /// Graceful shutdown publishes what is buffered; later sends fail with shutDown.
    @Test func shutdownFlushesThenRefuses() async throws {
        let t = BatchSpyTransport(base: try InMemoryTransport(topics: ["t": 1]))
        let producer = try BufferedProducer(transport: t, topic: "t", partitioning: .murmur2, configuration: {
            var c = BufferedProducer<BatchSpyTransport>.Configuration()
            c.linger = .milliseconds(200)
            return c
        }())
        let group = ServiceGroup(configuration: .init(services: [producer], logger: quietLogger))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            tasks.addTask { _ = try await producer.send(OutgoingRecord(key: Array("k".utf8), payload: [1])) }
            try await Task.sleep(for: .milliseconds(50))  // buffered, lingering
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        #expect(t.base.endOffsets(topic: "t")[0] == Offset(1), "the lingering record was published on shutdown")
        let late = await #expect(throws: ExactlyOnceError.self) { _ = try await producer.send(OutgoingRecord(key: Array("k".utf8), payload: [2])) }
        #expect(late?.code == .shutDown)
    }
}
