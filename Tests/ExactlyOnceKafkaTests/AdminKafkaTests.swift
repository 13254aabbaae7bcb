import CouponKit
import ExactlyOnce
import ExactlyOnceKafka
import ExactlyOnceRedis
import Foundation
import Logging
import TestSupport
import Testing

/// `exactly-once-admin --transport kafka` against a finished coupon-demo sale on a standalone
/// mock cluster (`coupon-demo kafka-mock`, another process) with the Redis store: lag read from
/// the broker, a key, and a conflict dead-lettered by a consumer, listed, shown and replayed.
@Suite("exactly-once-admin on Kafka", .serialized, .timeLimit(.minutes(5)))
struct AdminKafkaTests {
    static var admin: URL { ChildProcess.builtProduct("exactly-once-admin") }
    static var demo: URL { ChildProcess.builtProduct("coupon-demo") }

    static func json(_ text: String) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], "not a JSON object: \(text)")
    }

    @Test func lagKeyAndDeadLettersOfAFinishedDemoSale() async throws {
        try await RedisTestServer.with { server in
            let dir = try KafkaMultiProcessTests.scratch()
            defer { try? FileManager.default.removeItem(at: dir) }
            let mock = try await KafkaMultiProcessTests.Mock.start(in: dir)
            let url = "unix://\(server.socketPath)"
            let ledger = dir.appendingPathComponent("ledger.jsonl").path
            let sale = try await ChildProcess.run(Self.demo, [
                "--store", "redis", "--redis-url", url, "--transport", "kafka", "--kafka-brokers", mock.bootstrap,
                "--requests", "2000", "--coupons", "4", "--stock", "100", "--members", "1500", "--partitions", "3",
                "--consumers", "1", "--session-timeout", "3", "--crash-rate", "0.001", "--json", "--ledger", ledger,
            ], timeout: .seconds(200))
            #expect(sale.status == 0, "\(sale.out) \(sale.err)")
            let summary = try Self.json(sale.out)
            #expect(summary["overIssued"] as? Int == 0 && summary["doubleIssued"] as? Int == 0 && summary["lost"] as? Int == 0)
            let saleID = try #require(summary["sale"] as? String)
            let winner = try DemoLedgerCheck.Issued.first(inLedger: ledger)
            let (couponId, memberId, key) = (winner.couponId, winner.memberId, winner.key)
            let backend = ["--store", "redis", "--redis-url", url, "--transport", "kafka", "--kafka-brokers", mock.bootstrap, "--sale", saleID]

            // Lag from the broker: everything committed; owner and epoch said to be unknown.
            let lag = try await ChildProcess.run(Self.admin, ["lag", "--json"] + backend)
            #expect(lag.status == 0, "\(lag.err)")
            let lagJSON = try Self.json(lag.out)
            #expect(lagJSON["totalLag"] as? Int == 0, "\(lag.out)")
            #expect(lagJSON["ownersKnown"] as? Bool == false)
            #expect((lagJSON["note"] as? String)?.contains("known only inside the consumer processes on Kafka") == true)
            let partitions = try #require(lagJSON["partitions"] as? [[String: Any]])
            #expect(partitions.count == 3)
            #expect(partitions.reduce(0) { $0 + ($1["end"] as? Int ?? 0) } == 2000, "every request is in the log: \(lag.out)")
            #expect(partitions.allSatisfy { $0["committed"] as? Int == $0["end"] as? Int && $0["owner"] == nil && $0["epoch"] == nil })
            let lagText = try await ChildProcess.run(Self.admin, ["lag"] + backend)
            #expect(lagText.out.contains("\tunknown\tunknown") && lagText.out.contains("total lag 0 records"), "\(lagText.out)")
            #expect(lagText.out.contains("note: owner and epoch are known only inside the consumer processes on Kafka"), "\(lagText.out)")

            let shown = try Self.json(try await ChildProcess.run(Self.admin, ["key", key, "--json"] + backend).out)
            #expect(shown["outcome"] as? String == "applied" && shown["outcomeDetail"] as? String == "\(winner.serial)")
            #expect((shown["fenceScope"] as? String)?.hasPrefix("kafka:") == true, "\(shown)")
            let empty = try Self.json(try await ChildProcess.run(Self.admin, ["dlq", "list", "--json"] + backend).out)
            #expect((empty["letters"] as? [Any])?.isEmpty == true && empty["nextCursor"] == nil, "\(empty)")

            // The winner clicks again with another payload: a consumer in the sale's group
            // dead-letters it as a conflict (G5).
            var config = KafkaTransport.Configuration(bootstrapServers: mock.bootstrap)
            config.sessionTimeout = .seconds(3)
            let kafka = try KafkaTransport(configuration: config)
            let store = try RedisDedupeStore(url: url, keyPrefix: "coupon-demo:\(saleID):store:")
            _ = try await kafka.publish(CouponRequest(requestId: 1_000_000, couponId: couponId, memberId: memberId, variant: 7).outgoing,
                                        to: "coupon-requests", partitioning: .modulo)
            let issuer = CouponIssuer(stock: Dictionary(uniqueKeysWithValues: (1...4).map { (Int64($0), Int64(100)) }))
            var c = ConsumerConfiguration(topic: "coupon-requests", group: "coupon-issuers", memberID: "admin-test")
            c.pollWait = .milliseconds(100)
            let consumer = try ExactlyOnceConsumer(transport: kafka, store: store, configuration: c,
                                                   logger: Logger(label: "t", factory: { _ in SwiftLogNoOpLogHandler() }),
                                                   key: CouponRequest.keyExtractor, handler: { ctx in try await issuer.handle(&ctx) })
            func drain() async throws {
                let session = try await consumer.makeSession()
                let deadline = ContinuousClock.now + .seconds(120)
                while try await !kafka.isFullyCommitted(group: "coupon-issuers", topic: "coupon-requests") {
                    guard ContinuousClock.now < deadline else { Issue.record("the consumer did not commit everything in 120 s"); break }
                    _ = try await session.step()
                }
                try await session.close()
            }
            try await drain()

            let list = try Self.json(try await ChildProcess.run(Self.admin, ["dlq", "list", "--json"] + backend).out)
            let letters = try #require(list["letters"] as? [[String: Any]])
            #expect(letters.count == 1 && letters[0]["key"] as? String == key, "\(list)")
            #expect((letters[0]["reason"] as? String)?.hasPrefix("conflict") == true)
            #expect(letters[0]["originalTopic"] as? String == "coupon-requests" && letters[0]["originalOffset"] is Int)
            let show = try Self.json(try await ChildProcess.run(Self.admin, ["dlq", "show", "--partition", "0", "--offset", "0", "--json"] + backend).out)
            #expect(show["payload"] as? String == "\(couponId),\(memberId),7")
            #expect((show["headers"] as? [String: String])?["x-idempotency-key"] == key)

            // --all skips the conflict (its key holds the first click's outcome); by key it is
            // replayed, and is a conflict again: the coupon stays issued once.
            let all = try Self.json(try await ChildProcess.run(Self.admin, ["dlq", "replay", "--all", "--json"] + backend).out)
            #expect((all["replayed"] as? [Any])?.isEmpty == true)
            #expect((all["skipped"] as? [[String: Any]])?.map { $0["reason"] as? String } == ["answered"], "\(all)")
            let byKey = try await ChildProcess.run(Self.admin, ["dlq", "replay", "--key", key, "--json"] + backend)
            #expect(byKey.status == 0, "\(byKey.err)")
            let replayed = try Self.json(byKey.out)
            #expect((replayed["replayed"] as? [Any])?.count == 1 && (replayed["reopened"] as? [Any])?.isEmpty == true, "\(replayed)")
            try await drain()
            let after = try Self.json(try await ChildProcess.run(Self.admin, ["dlq", "list", "--json"] + backend).out)
            let twice = try #require(after["letters"] as? [[String: Any]])
            #expect(twice.count == 2 && twice[1]["replayedFrom"] as? String == "coupon-requests.dlq/0@0", "\(after)")
            #expect((twice[1]["reason"] as? String)?.hasPrefix("conflict") == true)
            // A page at a time: the cursor of the next page, then the end.
            let first = try Self.json(try await ChildProcess.run(Self.admin, ["dlq", "list", "--limit", "1", "--json"] + backend).out)
            #expect((first["letters"] as? [Any])?.count == 1 && first["nextCursor"] as? String == "0@1", "\(first)")
            let second = try await ChildProcess.run(Self.admin, ["dlq", "list", "--limit", "1", "--cursor", "0@1"] + backend)
            #expect(second.out.contains("0@1\t\(key)\t") && second.out.contains("(1 dead letters in coupon-requests.dlq from 0@1, end of listing)"), "\(second.out)")
            let firstText = try await ChildProcess.run(Self.admin, ["dlq", "list", "--limit", "1"] + backend)
            #expect(firstText.out.contains("more: --cursor '0@1'"), "\(firstText.out)")

            let still = try Self.json(try await ChildProcess.run(Self.admin, ["key", key, "--json"] + backend).out)
            #expect(still["outcomeDetail"] as? String == "\(winner.serial)", "the first click's outcome is untouched")
            let finalLag = try Self.json(try await ChildProcess.run(Self.admin, ["lag", "--json"] + backend).out)
            #expect(finalLag["totalLag"] as? Int == 0)
            #expect((finalLag["partitions"] as? [[String: Any]])?.reduce(0) { $0 + ($1["end"] as? Int ?? 0) } == 2002, "the conflict and its replay")

            let noBrokers = try await ChildProcess.run(Self.admin, ["lag", "--transport", "kafka"])
            #expect(noBrokers.status == 2 && noBrokers.err.contains("--transport kafka needs --kafka-brokers"), "\(noBrokers.err)")
            let badBrokers = try await ChildProcess.run(Self.admin, ["lag", "--transport", "kafka", "--kafka-brokers", "nohost"])
            #expect(badBrokers.status == 2 && badBrokers.err.contains("HOST:PORT"), "\(badBrokers.err)")
            await mock.stop()
        }
    }
}
