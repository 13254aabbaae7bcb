import Logging
import ServiceLifecycle
import Synchronization

/// A producer that keeps many publishes in flight: concurrent ``send(_:)`` calls are gathered
/// into batches (up to ``Configuration/maxBatchSize`` records, waiting at most
/// ``Configuration/linger`` for more), each published with one
/// `publish(_:to:partitioning:)` call of the transport, and every caller is resumed with its
/// record's position once the transport confirmed it — the shape of librdkafka's linger/batch
/// with delivery reports, on any ``MessageTransport``.
///
/// - **Order.** Batches are published one at a time, in the order the records were sent, and
///   the transport keeps per-partition order within a batch, so records of one key keep the
///   order in which their `send` calls were made (a caller that awaits each `send` before the
///   next gets exactly its own order).
/// - **Nothing reported that was not accepted.** A caller gets a position only for a record the
///   transport confirmed; otherwise it gets the error. When a batch is only partly accepted,
///   the records buffered behind it are not sent and fail too (`transportUnavailable`): sending
///   them would let a later record of a key overtake an earlier one that the caller retries.
///   A record reported failed may still be in the log (an unknown outcome); publishing it again
///   is safe because the consumer's dedupe makes the repeat harmless (F9).
/// - **Back-pressure.** At most ``Configuration/maxBufferedRecords`` records wait in the
///   producer; further `send` calls suspend until there is room.
/// - **Bad input** (a record whose partition cannot be resolved) fails that record alone.
///
/// Run it as a `Service` in the same `ServiceGroup` as its callers: ``run()`` publishes the
/// batches; on graceful shutdown it stops taking new records, publishes what is buffered and
/// returns. Sends made before `run()` starts wait for it; sends made once it is shutting down
/// fail with ``ExactlyOnceError/Code/shutDown``.
public final class BufferedProducer<Transport: MessageTransport>: Service {
    /// Configuration of a ``BufferedProducer``.
    public struct Configuration: Sendable {
        /// Most records in one batch. Default: 1,000.
        public var maxBatchSize: Int = 1_000
        /// How long a batch smaller than ``maxBatchSize`` waits for more records before it is
        /// published (Kafka's `linger.ms`). Default: 1 ms.
        public var linger: Duration = .milliseconds(1)
        /// Most records waiting in the producer (buffered and in flight); `send` suspends when
        /// it is full. Default: 10,000.
        public var maxBufferedRecords: Int = 10_000
        /// All defaults.
        public init() {}

        func validate() throws {
            guard maxBatchSize >= 1 else { throw ExactlyOnceError(.invalidConfiguration, "maxBatchSize must be at least 1") }
            guard maxBufferedRecords >= maxBatchSize else {
                throw ExactlyOnceError(.invalidConfiguration, "maxBufferedRecords must be at least maxBatchSize")
            }
            guard linger >= .zero, linger <= .seconds(10) else { throw ExactlyOnceError(.invalidConfiguration, "linger must be in 0...10 s") }
        }
    }

    let transport: Transport
    let topic: String
    let partitioning: Partitioning
    let configuration: Configuration
    let logger: Logger
    private let machine: Mutex<ProducerStateMachine>

    /// Creates a producer for `topic`. Nothing is sent until ``run()`` runs.
    /// - Throws: ``ExactlyOnceError/Code/invalidConfiguration``.
    public init(transport: Transport, topic: String, partitioning: Partitioning, configuration: Configuration = .init(),
                logger: Logger = Logger(label: "exactly-once.producer", factory: { _ in SwiftLogNoOpLogHandler() })) throws {
        try configuration.validate()
        self.transport = transport
        self.topic = topic
        self.partitioning = partitioning
        self.configuration = configuration
        self.logger = logger
        self.machine = Mutex(ProducerStateMachine(capacity: configuration.maxBufferedRecords))
    }

    /// Sends `record` and returns its position once the transport confirmed it.
    /// - Throws: the transport's error for this record (or for the batch it was in),
    ///   ``ExactlyOnceError/Code/shutDown`` after the producer stopped, `CancellationError` when
    ///   the calling task is cancelled while it waits for room.
    ///
    /// The current task's trace context (swift-distributed-tracing) travels in the record's
    /// headers, so the consumer's span of this record continues the caller's trace.
    public func send(_ record: OutgoingRecord) async throws -> RecordPosition {
        let record = record.withTraceContext()
        // Wait for room first (back-pressure), then hand the record over and wait for its report.
        try await waitForRoom()
        return try await withCheckedThrowingContinuation { (c: CheckedContinuation<RecordPosition, any Error>) in
            let action = machine.withLock { $0.enqueue(record, c) }
            perform(action)
        }
    }

    /// Records waiting in the producer now (buffered and in flight).
    public var bufferedCount: Int { machine.withLock { $0.occupied } }

    private func waitForRoom() async throws {
        let id = machine.withLock { $0.nextWaiterID() }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                let action = machine.withLock { $0.reserve(id: id, c, cancelled: Task.isCancelled) }
                perform(action)
            }
        } onCancel: {
            let action = machine.withLock { $0.cancelReservation(id: id) }
            perform(action)
        }
    }

    /// Publishes batches until a graceful shutdown (then flushes what is buffered) or
    /// cancellation (then fails what is buffered).
    public func run() async throws {
        do {
            try await cancelWhenGracefulShutdown { try await self.loop() }
        } catch is CancellationError {
            // Graceful shutdown (or cancellation) interrupted a wait: publish what is left
            // unless the task itself is cancelled.
        }
        let remaining = machine.withLock { $0.stopAccepting() }
        perform(remaining)
        if !Task.isCancelled {
            while let batch = machine.withLock({ $0.takeBatch(max: configuration.maxBatchSize) }) {
                await publish(batch)
            }
        }
        perform(machine.withLock { $0.finish() })
    }

    private func loop() async throws {
        while true {
            try await waitForRecords()
            let buffered = machine.withLock { $0.bufferedCount }
            if buffered < configuration.maxBatchSize && configuration.linger > .zero {
                try await Task.sleep(for: configuration.linger)
            }
            guard let batch = machine.withLock({ $0.takeBatch(max: configuration.maxBatchSize) }) else { continue }
            await publish(batch)
        }
    }

    private func waitForRecords() async throws {
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                let action = machine.withLock { $0.waitForRecords(c, cancelled: Task.isCancelled) }
                perform(action)
            }
        } onCancel: {
            let action = machine.withLock { $0.cancelRecordWait() }
            perform(action)
        }
    }

    /// Publishes one batch and resumes its senders.
    private func publish(_ batch: [ProducerStateMachine.Entry]) async {
        var results: [Result<RecordPosition, any Error>]
        do {
            let report = try await transport.publish(batch.map(\.record), to: topic, partitioning: partitioning)
            results = zip(batch, report.positions).map { _, p in
                p.map { .success($0) } ?? .failure(report.failure ?? ExactlyOnceError(.transportUnavailable, "the transport did not confirm the record"))
            }
            if report.positions.count != batch.count {
                results = batch.map { _ in .failure(ExactlyOnceError(.transportUnavailable, "the transport answered \(report.positions.count) reports for \(batch.count) records")) }
            }
        } catch let e as ExactlyOnceError where (e.code == .invalidKey || e.code == .invalidPartition) && batch.count > 1 {
            // Bad input refuses the whole batch: find the record(s) at fault one at a time.
            results = []
            for entry in batch {
                do {
                    results.append(.success(try await transport.publish(entry.record, to: topic, partitioning: partitioning)))
                } catch {
                    results.append(.failure(error))
                }
            }
        } catch {
            results = batch.map { _ in .failure(error) }
        }
        let failed = results.contains { if case .failure(let e) = $0 { return !Self.isInputError(e) } else { return false } }
        if failed {
            logger.debug("batch not fully accepted; failing the records buffered behind it", metadata: ["topic": "\(topic)"])
        }
        let action = machine.withLock { $0.completed(count: batch.count, failBuffered: failed) }
        for (entry, result) in zip(batch, results) { entry.continuation.resume(with: result) }
        perform(action)
    }

    static func isInputError(_ e: any Error) -> Bool {
        guard let e = e as? ExactlyOnceError else { return false }
        return e.code == .invalidKey || e.code == .invalidPartition
    }

    private func perform(_ action: ProducerStateMachine.Action) {
        for c in action.wakeRoom { c.resume() }
        for c in action.failRoom { c.resume(throwing: ExactlyOnceError(.shutDown, "the producer for \(topic) has stopped")) }
        if let c = action.wakeLoop { c.resume() }
        if let c = action.cancelLoop { c.resume(throwing: CancellationError()) }
        for (entry, error) in action.fail { entry.continuation.resume(throwing: error) }
        if let c = action.cancelRoom { c.resume(throwing: CancellationError()) }
    }
}

/// The producer's shared state: what is buffered, who waits for room, whether the run loop
/// waits for records. Transitions return what to resume; resumes happen after unlocking.
struct ProducerStateMachine {
    struct Entry {
        var record: OutgoingRecord
        var continuation: CheckedContinuation<RecordPosition, any Error>
    }

    struct Action {
        var wakeRoom: [CheckedContinuation<Void, any Error>] = []
        var failRoom: [CheckedContinuation<Void, any Error>] = []
        var cancelRoom: CheckedContinuation<Void, any Error>?
        var wakeLoop: CheckedContinuation<Void, any Error>?
        var cancelLoop: CheckedContinuation<Void, any Error>?
        var fail: [(Entry, any Error)] = []
        static let none = Action()
    }

    enum Phase { case accepting, draining, finished }

    let capacity: Int
    var phase = Phase.accepting
    var buffer: [Entry] = []
    var inFlight = 0
    /// Places promised to senders that reserved room and have not enqueued yet.
    var reserved = 0
    var roomWaiters: [(id: UInt64, continuation: CheckedContinuation<Void, any Error>)] = []
    var cancelledReservations = Set<UInt64>()
    var loopWaiter: CheckedContinuation<Void, any Error>?
    var waiterIDs: UInt64 = 0

    init(capacity: Int) { self.capacity = capacity }

    var occupied: Int { buffer.count + inFlight + reserved }
    var bufferedCount: Int { buffer.count }

    mutating func nextWaiterID() -> UInt64 {
        waiterIDs &+= 1
        return waiterIDs
    }

    mutating func reserve(id: UInt64, _ c: CheckedContinuation<Void, any Error>, cancelled: Bool) -> Action {
        var a = Action()
        if phase != .accepting {
            a.failRoom = [c]
        } else if cancelled || cancelledReservations.remove(id) != nil {
            a.cancelRoom = c
        } else if occupied < capacity && roomWaiters.isEmpty {
            reserved += 1
            a.wakeRoom = [c]
        } else {
            roomWaiters.append((id, c))
        }
        return a
    }

    mutating func cancelReservation(id: UInt64) -> Action {
        if let i = roomWaiters.firstIndex(where: { $0.id == id }) {
            var a = Action()
            a.cancelRoom = roomWaiters.remove(at: i).continuation
            return a
        }
        cancelledReservations.insert(id)
        return .none
    }

    mutating func enqueue(_ record: OutgoingRecord, _ c: CheckedContinuation<RecordPosition, any Error>) -> Action {
        reserved -= 1
        var a = Action()
        if phase == .finished {
            a.fail = [(Entry(record: record, continuation: c), ExactlyOnceError(.shutDown, "the producer has stopped"))]
            return a
        }
        buffer.append(Entry(record: record, continuation: c))
        if let w = loopWaiter {
            loopWaiter = nil
            a.wakeLoop = w
        }
        return a
    }

    mutating func waitForRecords(_ c: CheckedContinuation<Void, any Error>, cancelled: Bool) -> Action {
        var a = Action()
        if cancelled { a.cancelLoop = c } else if !buffer.isEmpty { a.wakeLoop = c } else { loopWaiter = c }
        return a
    }

    mutating func cancelRecordWait() -> Action {
        var a = Action()
        a.cancelLoop = loopWaiter
        loopWaiter = nil
        return a
    }

    mutating func takeBatch(max: Int) -> [Entry]? {
        guard !buffer.isEmpty else { return nil }
        let n = min(max, buffer.count)
        let batch = Array(buffer.prefix(n))
        buffer.removeFirst(n)
        inFlight += n
        return batch
    }

    /// A batch was reported. With `failBuffered`, the records behind it fail unsent.
    mutating func completed(count: Int, failBuffered: Bool) -> Action {
        inFlight -= count
        var a = Action()
        if failBuffered && !buffer.isEmpty {
            let error = ExactlyOnceError(.transportUnavailable, "not sent: an earlier record of this producer was not accepted; send again in order")
            a.fail = buffer.map { ($0, error) }
            buffer.removeAll()
        }
        admit(into: &a)
        return a
    }

    private mutating func admit(into a: inout Action) {
        while occupied < capacity, !roomWaiters.isEmpty {
            reserved += 1
            a.wakeRoom.append(roomWaiters.removeFirst().continuation)
        }
    }

    mutating func stopAccepting() -> Action {
        phase = .draining
        var a = Action()
        a.failRoom = roomWaiters.map(\.continuation)
        roomWaiters.removeAll()
        a.cancelLoop = loopWaiter
        loopWaiter = nil
        return a
    }

    mutating func finish() -> Action {
        phase = .finished
        var a = Action()
        let error = ExactlyOnceError(.shutDown, "the producer stopped before this record was sent")
        a.fail = buffer.map { ($0, error) }
        buffer.removeAll()
        return a
    }
}
