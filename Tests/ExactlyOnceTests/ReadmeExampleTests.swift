import ExactlyOnce
import Foundation
import Logging
import ServiceLifecycle
import Testing

/// The README's "Use it" sample, kept compiling and correct.
@Suite struct ReadmeExampleTests {
    /// The README's sample and this test stay the same code: every line of the sample's
    /// consumer (from `let consumer` to the closing `})`) appears in this file.
    @Test func readmeSampleIsTheTestedCode() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let readme = try String(contentsOf: root.appendingPathComponent("README.md"), encoding: .utf8)
        let here = try String(contentsOf: URL(fileURLWithPath: #filePath), encoding: .utf8)
        guard let start = readme.range(of: "let consumer = try ExactlyOnceConsumer("), let end = readme.range(of: "    })", range: start.upperBound..<readme.endIndex) else {
            Issue.record("the README's consumer sample is missing")
            return
        }
        let normalizedHere = Set(here.split(separator: "\n").map { $0.split(separator: "//")[0].trimmingCharacters(in: .whitespaces) })
        for line in readme[start.lowerBound..<end.upperBound].split(separator: "\n") {
            let code = line.split(separator: "//", omittingEmptySubsequences: false)[0].trimmingCharacters(in: .whitespaces)
            if code.isEmpty || code.hasPrefix("logger:") || code.hasPrefix("configuration:") { continue }
            #expect(normalizedHere.contains(code), "README line not in the test: \(code)")
        }
    }

    @Test func readmeSampleIssuesOncePerMember() async throws {
        let transport = try InMemoryTransport(topics: ["coupon-requests": 3, "coupon-requests.dlq": 1])
        let store = try InMemoryDedupeStore()
        for member in ["1001", "1002", "1001"] {
            _ = try await transport.publish(
                OutgoingRecord(key: Array("42".utf8), payload: Array("42,\(member)".utf8)),
                to: "coupon-requests", partitioning: .modulo)
        }
        // A malformed payload must be dead-lettered, not trap the process.
        _ = try await transport.publish(OutgoingRecord(key: Array("42".utf8), payload: Array("42".utf8)), to: "coupon-requests", partitioning: .modulo)
        let consumer = try ExactlyOnceConsumer(
            transport: transport, store: store,
            configuration: ConsumerConfiguration(topic: "coupon-requests", group: "issuers", memberID: "issuer-1"),
            logger: quietLogger,
            key: { record in
                let fields = String(decoding: record.payload, as: UTF8.self).split(separator: ",")
                guard fields.count == 2 else { throw ExactlyOnceError(.invalidPayload, "expected couponId,memberId") }
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
        #expect(transport.records(topic: "coupon-requests.dlq", partition: 0).map(\.payload) == [Array("42".utf8)])
    }
}
