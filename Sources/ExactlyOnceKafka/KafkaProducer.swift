import CRdKafka
import Dispatch
import ExactlyOnce
import Foundation
import Synchronization

/// One batch publish waiting for its delivery reports.
final class DeliveryBatch: @unchecked Sendable {
    struct State {
        var positions: [RecordPosition?]
        var errors: [rd_kafka_resp_err_t?]
        var remaining: Int
        var continuation: CheckedContinuation<([RecordPosition?], [rd_kafka_resp_err_t?]), Never>?
        var done = false
    }
    let state: Mutex<State>

    init(count: Int) {
        state = Mutex(State(positions: Array(repeating: nil, count: count), errors: Array(repeating: nil, count: count), remaining: count))
    }

    /// Records the outcome of record `index`; resumes the waiter after the last one.
    func report(_ index: Int, position: RecordPosition?, error: rd_kafka_resp_err_t?) {
        let c: CheckedContinuation<([RecordPosition?], [rd_kafka_resp_err_t?]), Never>? = state.withLock { s in
            guard index >= 0, index < s.positions.count, !s.done else { return nil }
            s.positions[index] = position
            s.errors[index] = error
            s.remaining -= 1
            guard s.remaining == 0 else { return nil }
            s.done = true
            defer { s.continuation = nil }
            return s.continuation
        }
        if let c {
            let (p, e) = state.withLock { ($0.positions, $0.errors) }
            c.resume(returning: (p, e))
        }
    }

    /// Waits for every report.
    func wait() async -> ([RecordPosition?], [rd_kafka_resp_err_t?]) {
        await withCheckedContinuation { c in
            let now: ([RecordPosition?], [rd_kafka_resp_err_t?])? = state.withLock { s in
                if s.remaining == 0 { return (s.positions, s.errors) }
                s.continuation = c
                return nil
            }
            if let now { c.resume(returning: now) }
        }
    }
}

/// The per-message opaque: which batch, which record.
final class DeliveryRef {
    let batch: DeliveryBatch
    let index: Int
    init(batch: DeliveryBatch, index: Int) {
        self.batch = batch
        self.index = index
    }
}

/// librdkafka's delivery report callback: runs on the producer's poller thread.
private let deliveryCallback: @convention(c) (OpaquePointer?, UnsafePointer<rd_kafka_message_t>?, UnsafeMutableRawPointer?) -> Void = { _, message, _ in
    guard let message, let opaque = message.pointee._private else { return }
    let ref = Unmanaged<DeliveryRef>.fromOpaque(opaque).takeRetainedValue()
    let m = message.pointee
    if m.err == RD_KAFKA_RESP_ERR_NO_ERROR && m.offset >= 0 {
        ref.batch.report(ref.index, position: RecordPosition(partition: PartitionID(Int(m.partition)), offset: Offset(m.offset)), error: nil)
    } else {
        ref.batch.report(ref.index, position: nil, error: m.err == RD_KAFKA_RESP_ERR_NO_ERROR ? RD_KAFKA_RESP_ERR__FAIL : m.err)
    }
}

/// The transport's producer: an idempotent librdkafka producer (acks=all) whose delivery
/// reports a dedicated thread serves; `produce` calls run on a serial queue of their own.
final class KafkaProducer: @unchecked Sendable {
    let handle: KafkaHandle
    private let queue = DispatchQueue(label: "exactly-once.kafka.producer")
    private let topics = Mutex<[String: KafkaTopicHandle]>([:])
    private let poller: Thread

    init(configuration: KafkaTransport.Configuration) throws {
        let conf = try KafkaConf(configuration.producerProperties)
        if let c = conf.pointer { rd_kafka_conf_set_dr_msg_cb(c, deliveryCallback) }
        let h = try KafkaHandle(type: RD_KAFKA_PRODUCER, conf: conf)
        handle = h
        let flag = StopFlag()
        poller = Thread {
            while !flag.isSet { rd_kafka_poll(h.pointer, 100) }
        }
        self.stopFlag = flag
        poller.name = "exactly-once.kafka.producer-poll"
        poller.start()
    }

    private let stopFlag: StopFlag

    func topic(_ name: String) throws -> KafkaTopicHandle {
        try topics.withLock { t in
            if let h = t[name] { return h }
            let h = try KafkaTopicHandle(handle, name: name)
            t[name] = h
            return h
        }
    }

    /// Produces `records` to the resolved `partitions` and waits for every delivery report.
    func produce(_ records: [OutgoingRecord], partitions: [PartitionID], topic: String) async throws -> ([RecordPosition?], [rd_kafka_resp_err_t?]) {
        let rkt = try self.topic(topic)
        let batch = DeliveryBatch(count: records.count)
        let h = handle
        queue.async { [stopFlag] in
            let rk = h.pointer
            for (i, r) in records.enumerated() {
                var headers: OpaquePointer?
                if !r.headers.isEmpty {
                    headers = rd_kafka_headers_new(r.headers.count)
                    for (k, v) in r.headers.sorted(by: { $0.key < $1.key }) {
                        let bytes = Array(v.utf8)
                        _ = bytes.withUnsafeBytes { rd_kafka_header_add(headers, k, -1, $0.baseAddress, $0.count) }
                    }
                }
                let ref = Unmanaged.passRetained(DeliveryRef(batch: batch, index: i)).toOpaque()
                var err: rd_kafka_resp_err_t = RD_KAFKA_RESP_ERR_NO_ERROR
                while true {
                    err = r.payload.withUnsafeBytes { p in
                        let key = r.key ?? []
                        return key.withUnsafeBytes { k in
                            eo_kafka_produce(rk, rkt.pointer, Int32(partitions[i].rawValue), p.baseAddress, p.count,
                                             r.key == nil ? nil : k.baseAddress, r.key == nil ? 0 : k.count, headers, ref)
                        }
                    }
                    // A full local queue: wait for deliveries (served by the poller thread).
                    guard err == RD_KAFKA_RESP_ERR__QUEUE_FULL, !stopFlag.isSet else { break }
                    usleep(1_000)
                }
                if err != RD_KAFKA_RESP_ERR_NO_ERROR {
                    if let headers { rd_kafka_headers_destroy(headers) }
                    Unmanaged<DeliveryRef>.fromOpaque(ref).release()
                    batch.report(i, position: nil, error: err)
                }
            }
            _ = rkt
        }
        return await batch.wait()
    }

    /// Waits up to `timeout` for buffered records to be delivered.
    func flush(_ timeout: Duration) async {
        let h = handle
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            queue.async {
                _ = rd_kafka_flush(h.pointer, milliseconds(timeout))
                c.resume()
            }
        }
    }

    deinit {
        stopFlag.set()
    }
}

/// A flag a thread checks to end its loop.
final class StopFlag: Sendable {
    private let value = Atomic<Bool>(false)
    var isSet: Bool { value.load(ordering: .acquiring) }
    func set() { value.store(true, ordering: .releasing) }
}

/// A flag that can be set and cleared.
final class StopFlagResettable: Sendable {
    private let value = Atomic<Bool>(false)
    var isSet: Bool { value.load(ordering: .acquiring) }
    func set() { value.store(true, ordering: .releasing) }
    func clear() { value.store(false, ordering: .releasing) }
}
