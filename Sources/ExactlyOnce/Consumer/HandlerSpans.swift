import Tracing

/// Writes trace context into record headers.
struct RecordHeadersInjector: Injector {
    func inject(_ value: String, forKey key: String, into carrier: inout [String: String]) { carrier[key] = value }
}

/// Reads trace context from record headers.
struct RecordHeadersExtractor: Extractor {
    func extract(key: String, from carrier: [String: String]) -> String? { carrier[key] }
}

extension OutgoingRecord {
    /// A copy of the record carrying `context` (by default the current task's) in its headers,
    /// written by the bootstrapped instrument (swift-distributed-tracing), so the consumer runs
    /// the record's handler in a span of the same trace. ``BufferedProducer`` does this for
    /// every record it sends; call it yourself when you publish through a transport directly.
    public func withTraceContext(_ context: ServiceContext? = .current) -> OutgoingRecord {
        guard let context else { return self }
        var copy = self
        InstrumentationSystem.instrument.inject(context, into: &copy.headers, using: RecordHeadersInjector())
        return copy
    }
}

/// The span attributes the consumer sets on a handler's span.
public enum ConsumerSpanAttributes {
    /// The topic (`messaging.destination.name`).
    public static let topic = "messaging.destination.name"
    /// The partition (`messaging.destination.partition.id`).
    public static let partition = "messaging.destination.partition.id"
    /// The record's offset (`messaging.message.offset`).
    public static let offset = "messaging.message.offset"
    /// The idempotency key (`exactly_once.key`).
    public static let key = "exactly_once.key"
    /// The attempt number of the claim (`exactly_once.attempt`).
    public static let attempt = "exactly_once.attempt"
    /// The outcome's status (`exactly_once.outcome`): `applied`, `rejected`, or `failed` when the handler threw.
    public static let outcome = "exactly_once.outcome"
}

/// Runs `body` in a consumer span continuing the trace found in `record`'s headers (when a
/// tracer is bootstrapped), with the record's attributes and, at the end, its outcome.
func withHandlerSpan(_ record: ConsumedRecord, key: IdempotencyKey, attempt: Int, enabled: Bool,
                     _ body: () async throws -> Outcome) async throws -> Outcome {
    guard enabled else { return try await body() }
    var context = ServiceContext.topLevel
    InstrumentationSystem.instrument.extract(record.headers, into: &context, using: RecordHeadersExtractor())
    return try await withSpan("process \(record.topic)", context: context, ofKind: .consumer) { span in
        span.attributes[ConsumerSpanAttributes.topic] = record.topic
        span.attributes[ConsumerSpanAttributes.partition] = record.partition.rawValue
        span.attributes[ConsumerSpanAttributes.offset] = Int(record.offset.rawValue)
        span.attributes[ConsumerSpanAttributes.key] = key.rawValue
        span.attributes[ConsumerSpanAttributes.attempt] = attempt
        do {
            let outcome = try await body()
            span.attributes[ConsumerSpanAttributes.outcome] = "\(outcome.status)"
            return outcome
        } catch {
            span.attributes[ConsumerSpanAttributes.outcome] = "failed"
            throw error
        }
    }
}

/// Whether a real tracer is bootstrapped (checked once per consumer: the no-op tracer costs
/// the hot path nothing then).
func tracingEnabled() -> Bool { !(InstrumentationSystem.tracer is NoOpTracer) }
