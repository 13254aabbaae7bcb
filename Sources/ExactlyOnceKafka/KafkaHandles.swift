import CRdKafka
import ExactlyOnce

/// librdkafka's error callback. Without one, librdkafka prints every client-level error to
/// stderr ("3/3 brokers are down" while a cluster restarts or after it is gone). Those errors are
/// informational: librdkafka retries them, and what they cost reaches the caller through the
/// operation they affect (a delivery report, a poll, a commit, a metadata request with its
/// deadline), where the transport maps it to an `ExactlyOnceError`.
private let ignoreClientError: @convention(c) (OpaquePointer?, Int32, UnsafePointer<CChar>?, UnsafeMutableRawPointer?) -> Void = { _, _, _, _ in }

/// Owns an `rd_kafka_conf_t` until it is handed to `rd_kafka_new` (which takes it over).
final class KafkaConf {
    private(set) var pointer: OpaquePointer?

    init(_ properties: [(String, String)]) throws {
        guard let conf = rd_kafka_conf_new() else { throw ExactlyOnceError(.transportFailure, "rd_kafka_conf_new failed") }
        pointer = conf
        rd_kafka_conf_set_error_cb(conf, ignoreClientError)
        for (name, value) in properties { try set(name, value) }
    }

    func set(_ name: String, _ value: String) throws {
        guard let pointer else { return }
        var err = [CChar](repeating: 0, count: 512)
        let rc = rd_kafka_conf_set(pointer, name, value, &err, err.count)
        guard rc == RD_KAFKA_CONF_OK else {
            let text = String(decoding: err.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw ExactlyOnceError(.invalidConfiguration, "librdkafka property \(name): \(text)")
        }
    }

    /// Gives the configuration up (to `rd_kafka_new`, which owns it from then on).
    func take() -> OpaquePointer? {
        defer { pointer = nil }
        return pointer
    }

    deinit { if let pointer { rd_kafka_conf_destroy(pointer) } }
}

/// Owns an `rd_kafka_t` (producer or consumer): destroyed in `deinit`.
final class KafkaHandle: @unchecked Sendable {
    let pointer: OpaquePointer
    let isConsumer: Bool

    init(type: rd_kafka_type_t, conf: KafkaConf) throws {
        var err = [CChar](repeating: 0, count: 512)
        guard let c = conf.take() else { throw ExactlyOnceError(.transportFailure, "configuration already used") }
        guard let rk = rd_kafka_new(type, c, &err, err.count) else {
            rd_kafka_conf_destroy(c)
            let text = String(decoding: err.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw ExactlyOnceError(.invalidConfiguration, "rd_kafka_new: \(text)")
        }
        pointer = rk
        isConsumer = type == RD_KAFKA_CONSUMER
    }

    deinit {
        if isConsumer {
            // The group was left (or given up) by the owner before; never block here.
            rd_kafka_destroy_flags(pointer, Int32(RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE))
        } else {
            rd_kafka_destroy(pointer)
        }
    }
}

/// Owns an `rd_kafka_topic_t`.
final class KafkaTopicHandle: @unchecked Sendable {
    let pointer: OpaquePointer
    let handle: KafkaHandle

    init(_ handle: KafkaHandle, name: String) throws {
        guard let t = rd_kafka_topic_new(handle.pointer, name, nil) else {
            throw ExactlyOnceError(.transportFailure, "rd_kafka_topic_new(\(name)): \(kafkaErrorText(rd_kafka_last_error()))")
        }
        self.handle = handle
        pointer = t
    }

    deinit { rd_kafka_topic_destroy(pointer) }
}

/// Owns an `rd_kafka_queue_t`.
final class KafkaQueue: @unchecked Sendable {
    let pointer: OpaquePointer

    init(_ handle: KafkaHandle) throws {
        guard let q = rd_kafka_queue_new(handle.pointer) else { throw ExactlyOnceError(.transportFailure, "rd_kafka_queue_new failed") }
        pointer = q
    }

    deinit { rd_kafka_queue_destroy(pointer) }
}

/// Owns an `rd_kafka_topic_partition_list_t`.
final class KafkaPartitionList {
    let pointer: UnsafeMutablePointer<rd_kafka_topic_partition_list_t>

    init(capacity: Int = 4) {
        pointer = rd_kafka_topic_partition_list_new(Int32(max(1, capacity)))
    }

    /// Adds `topic`/`partition`, with `offset` when given.
    func add(_ topic: String, _ partition: Int, offset: Int64? = nil) {
        let e = rd_kafka_topic_partition_list_add(pointer, topic, Int32(partition))
        if let offset, let e { e.pointee.offset = offset }
    }

    /// The entries: topic, partition, offset, error.
    var entries: [(topic: String, partition: Int, offset: Int64, error: rd_kafka_resp_err_t)] {
        let list = pointer.pointee
        return (0..<Int(list.cnt)).map { i in
            let e = list.elems[i]
            return (String(cString: e.topic), Int(e.partition), e.offset, e.err)
        }
    }

    deinit { rd_kafka_topic_partition_list_destroy(pointer) }
}

/// The text of a librdkafka error code.
func kafkaErrorText(_ err: rd_kafka_resp_err_t) -> String {
    String(cString: rd_kafka_err2name(err)) + ": " + String(cString: rd_kafka_err2str(err))
}

/// Maps a librdkafka error to the library's codes.
func kafkaError(_ err: rd_kafka_resp_err_t, _ what: String) -> ExactlyOnceError {
    let text = "\(what): \(kafkaErrorText(err))"
    // librdkafka's error name (`UNKNOWN_TOPIC_OR_PART`, `_TIMED_OUT`), kept for diagnostics.
    let cause = ExactlyOnceError.Cause(type: "rd_kafka_resp_err_t", code: String(cString: rd_kafka_err2name(err)))
    switch err {
    case RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART, RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC:
        return ExactlyOnceError(.unknownTopic, text, cause: cause)
    case RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION:
        return ExactlyOnceError(.invalidPartition, text, cause: cause)
    case RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION, RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID, RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID:
        return ExactlyOnceError(.staleGeneration, text, cause: cause)
    case RD_KAFKA_RESP_ERR__TIMED_OUT, RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT, RD_KAFKA_RESP_ERR__MSG_TIMED_OUT:
        return ExactlyOnceError(.timeout, text, cause: cause)
    case RD_KAFKA_RESP_ERR__INVALID_ARG, RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE, RD_KAFKA_RESP_ERR_INVALID_CONFIG,
         RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED, RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED,
         RD_KAFKA_RESP_ERR__FATAL, RD_KAFKA_RESP_ERR__FENCED, RD_KAFKA_RESP_ERR_INVALID_RECORD:
        return ExactlyOnceError(.transportFailure, text, cause: cause)
    default:
        // Broker and connection trouble (down, not leader, coordinator moving, rebalancing):
        // trying again later can help.
        return ExactlyOnceError(.transportUnavailable, text, cause: cause)
    }
}

/// Milliseconds of a duration for librdkafka's `int` timeouts (at least 0, at most a day).
func milliseconds(_ d: Duration) -> Int32 {
    let (s, atto) = d.components
    let ms = s * 1000 + atto / 1_000_000_000_000_000
    return Int32(clamping: max(0, min(ms, 86_400_000)))
}
