import ExactlyOnce
import Logging
import ServiceLifecycle
import Testing

/// The README's "Use it" sample, kept compiling and correct.
@Suite struct ReadmeExampleTests {
    @Test func readmeSampleIssuesOncePerMember() async throws {
        let transport = try InMemoryTransport(topics: ["coupon-requests": 3, "coupon-requests.dlq": 1])
        let store = try InMemoryDedupeStore()
        for member in ["1001", "1002", "1001"] {
            _ = try await transport.publish(
                OutgoingRecord(key: Array("42".utf8), payload: Array("42,\(member)".utf8)),
                to: "coupon-requests", partitioning: .modulo)
        }
        let consumer = try ExactlyOnceConsumer(
            transport: transport, store: store,
            configuration: ConsumerConfiguration(topic: "coupon-requests", group: "issuers", memberID: "issuer-1"),
            logger: quietLogger,
            key: { record in
                let fields = String(decoding: record.payload, as: UTF8.self).split(separator: ",")
                return try IdempotencyKey.coupon(couponId: String(fields[0]), memberId: String(fields[1]))
            },
            handler: { ctx in
                let issued = try await ctx.transaction.getInt("coupon:42:issued") ?? 0
                guard issued < 100 else { return .rejected("sold out") }
                ctx.transaction.setInt("coupon:42:issued", issued + 1)
                return .applied("serial \(issued + 1)")
            })
        let group = ServiceGroup(services: [consumer], logger: quietLogger)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            for _ in 0..<2000 where !transport.isFullyCommitted(group: "issuers", topic: "coupon-requests") {
                try await Task.sleep(for: .milliseconds(1))
            }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        #expect(try await store.readState("coupon:42:issued").value == Array("2".utf8))
    }
}
