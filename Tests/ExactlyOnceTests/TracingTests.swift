import CouponKit
import ExactlyOnce
import InMemoryTracing
import ServiceLifecycle
import Synchronization
import Testing
import Tracing

#if canImport(Glibc)
import Glibc
#endif

/// The producer injects the caller's trace context into the record's headers; the consumer
/// extracts it and runs the handler in a span of the same trace, with the record's attributes.
@Suite struct TracingTests {
    /// swift-distributed-tracing bootstraps once per process, and a recording tracer would keep
    /// every other test's spans: the check runs in a process of its own (an exit test).
    @Test func aClickIsTracedFromTheProducerThroughTheHandler() async {
        await #expect(processExitsWith: .success) {
            do {
                try await TracingTests.traceOneClick()
            } catch {
                print("tracing check failed: \(error)")
                exit(1)
            }
        }
    }

    struct Failed: Error, CustomStringConvertible { var description: String }

    static func check(_ condition: Bool, _ what: String) throws {
        if !condition { throw Failed(description: what) }
    }

    static func traceOneClick() async throws {
        let tracer = InMemoryTracer()
        InstrumentationSystem.bootstrap(tracer)
        let t = try InMemoryTransport(topics: ["traced": 2, "traced.dlq": 1])
        let store = try InMemoryDedupeStore()
        let producer = try BufferedProducer(transport: t, topic: "traced", partitioning: .modulo)
        let group = ServiceGroup(configuration: .init(services: [producer], logger: quietLogger))
        let (traceID, position) = try await withThrowingTaskGroup(of: (String, RecordPosition)?.self) { tasks in
            tasks.addTask { try await group.run(); return nil }
            let result = try await withSpan("POST /coupons/3/requests", ofKind: .server) { span in
                let p = try await producer.send(CouponRequest(requestId: 1, couponId: 3, memberId: 77).outgoing)
                return ((span as! InMemorySpan).traceID, p)
            }
            await group.triggerGracefulShutdown()
            for try await _ in tasks {}
            return result
        }
        let record = t.records(topic: "traced", partition: position.partition)[Int(position.offset.rawValue)]
        try check(record.headers[InMemoryTracer.traceIDKey] == traceID, "the trace context travels in the record's headers")

        // Two more clicks: member 88's handler fails once and then succeeds (two spans: failed,
        // then applied at attempt 2); coupon 4 has no stock (rejected).
        _ = try await t.publish(CouponRequest(requestId: 2, couponId: 3, memberId: 88).outgoing, to: "traced", partitioning: .modulo)
        _ = try await t.publish(CouponRequest(requestId: 3, couponId: 4, memberId: 99).outgoing, to: "traced", partitioning: .modulo)
        struct Flaky: Error {}
        let failedOnce = Mutex(false)
        let issuer = CouponIssuer(stock: [3: 5, 4: 0])
        var c = config("tracer", topic: "traced")
        c.maxAttempts = 3
        let consumer = try ExactlyOnceConsumer(transport: t, store: store, configuration: c, logger: quietLogger,
                                               key: CouponRequest.keyExtractor, handler: { ctx in
                                                   if try CouponRequest.decode(ctx.record.payload).memberId == 88,
                                                      failedOnce.withLock({ f in defer { f = true }; return !f }) { throw Flaky() }
                                                   return try await issuer.handle(&ctx)
                                               })
        let session = try await consumer.makeSession()
        for _ in 0..<100 where !t.isFullyCommitted(group: "g", topic: "traced") { try await session.step() }
        let spans = tracer.finishedSpans.filter { $0.operationName == "process traced" }
        guard let span = spans.first(where: { $0.traceID == traceID }) else {
            throw Failed(description: "no consumer span in the producer's trace: \(tracer.finishedSpans.map(\.operationName))")
        }
        try check(span.kind == .consumer, "span kind")
        let a = span.attributes
        try check(a[ConsumerSpanAttributes.topic]?.toSpanAttribute() == "traced".toSpanAttribute(), "topic")
        try check(a[ConsumerSpanAttributes.partition]?.toSpanAttribute() == position.partition.rawValue.toSpanAttribute(), "partition")
        try check(a[ConsumerSpanAttributes.offset]?.toSpanAttribute() == Int(position.offset.rawValue).toSpanAttribute(), "offset")
        try check(a[ConsumerSpanAttributes.key]?.toSpanAttribute() == "3:77".toSpanAttribute(), "key")
        try check(a[ConsumerSpanAttributes.attempt]?.toSpanAttribute() == 1.toSpanAttribute(), "attempt")
        try check(a[ConsumerSpanAttributes.outcome]?.toSpanAttribute() == "applied".toSpanAttribute(), "outcome")

        func outcomes(key: String) -> [(attempt: SpanAttribute?, outcome: SpanAttribute?)] {
            spans.filter { $0.attributes[ConsumerSpanAttributes.key]?.toSpanAttribute() == key.toSpanAttribute() }
                .map { ($0.attributes[ConsumerSpanAttributes.attempt]?.toSpanAttribute(), $0.attributes[ConsumerSpanAttributes.outcome]?.toSpanAttribute()) }
        }
        let retried = outcomes(key: "3:88")
        try check(retried.count == 2, "a failed attempt and its retry are two spans: \(retried)")
        try check(retried.first?.outcome == "failed".toSpanAttribute() && retried.first?.attempt == 1.toSpanAttribute(), "first span failed at attempt 1: \(retried)")
        try check(retried.last?.outcome == "applied".toSpanAttribute() && retried.last?.attempt == 2.toSpanAttribute(), "the retry applied at attempt 2: \(retried)")
        let rejected = outcomes(key: "4:99")
        try check(rejected.count == 1 && rejected.first?.outcome == "rejected".toSpanAttribute(), "a sold-out click is a rejected span: \(rejected)")
    }
}
