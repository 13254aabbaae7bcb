import CouponKit
import ExactlyOnce
import ExactlyOnceRedis
import Foundation
import Logging
import Synchronization
import TestSupport
import Testing

/// `exactly-once-admin` against Redis: a finished coupon-demo sale (key, keys, lag), and dead
/// letters listed, shown and replayed — once — with the consumer running after the replay.
@Suite struct AdminRedisTests {
    static var admin: URL { ChildProcess.builtProduct("exactly-once-admin") }
    static var demo: URL { ChildProcess.builtProduct("coupon-demo") }

    static func json(_ text: String) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], "not a JSON object: \(text)")
    }

    @Test func answersForAKeyOfAFinishedDemoSaleOnRedis() async throws {
        try await RedisTestServer.with { server in
            let dir = try ScratchDirectory("admin-redis")
            defer { dir.cleanup() }
            let ledger = dir.path + "/ledger.jsonl"
            let url = "unix://\(server.socketPath)"
            let sale = try await ChildProcess.run(Self.demo, ["--store", "redis", "--transport", "redis-streams", "--redis-url", url,
                                                              "--requests", "3000", "--crash-rate", "0.002", "--json", "--ledger", ledger])
            #expect(sale.status == 0, "\(sale.err)")
            let summary = try Self.json(sale.out)
            #expect(summary["overIssued"] as? Int == 0 && summary["doubleIssued"] as? Int == 0 && summary["lost"] as? Int == 0)
            let saleID = try #require(summary["sale"] as? String)
            let winner = try DemoLedgerCheck.Issued.first(inLedger: ledger)
            let key = winner.key
            let backend = ["--store", "redis", "--transport", "redis-streams", "--redis-url", url, "--sale", saleID]

            let shown = try await ChildProcess.run(Self.admin, ["key", key, "--json"] + backend)
            #expect(shown.status == 0, "\(shown.err)")
            let record = try Self.json(shown.out)
            #expect(record["key"] as? String == key)
            #expect(record["phase"] as? String == "completed")
            #expect(record["outcome"] as? String == "applied")
            #expect(record["outcomeDetail"] as? String == "\(winner.serial)", "the stored outcome is the issued serial")
            #expect((record["fenceScope"] as? String)?.hasPrefix("redis:coupon-demo:\(saleID):streams:") == true, "\(record)")
            let text = try await ChildProcess.run(Self.admin, ["key", key] + backend)
            #expect(text.out.contains("phase        completed") && text.out.contains("outcome      applied (\(winner.serial))"), "\(text.out)")

            let stuck = try await ChildProcess.run(Self.admin, ["keys", "--phase", "inProgress", "--json"] + backend)
            #expect(stuck.status == 0, "\(stuck.err)")
            #expect((try Self.json(stuck.out)["records"] as? [Any])?.isEmpty == true, "a finished sale has nothing in progress: \(stuck.out)")
            let stuckText = try await ChildProcess.run(Self.admin, ["keys", "--phase", "inProgress"] + backend)
            #expect(stuckText.out.contains("(0 records, end of listing)"), "\(stuckText.out)")

            let lag = try await ChildProcess.run(Self.admin, ["lag", "--json"] + backend)
            #expect(lag.status == 0, "\(lag.err)")
            let lagJSON = try Self.json(lag.out)
            #expect(lagJSON["totalLag"] as? Int == 0)
            #expect(lagJSON["ownersKnown"] as? Bool == true)
            let partitions = try #require(lagJSON["partitions"] as? [[String: Any]])
            #expect(partitions.count == 3)
            #expect(partitions.reduce(0) { $0 + ($1["end"] as? Int ?? 0) } == 3000, "every request is in the log: \(lag.out)")
            #expect(partitions.allSatisfy { $0["committed"] as? Int == $0["end"] as? Int && $0["lag"] as? Int == 0 })
            let lagText = try await ChildProcess.run(Self.admin, ["lag"] + backend)
            #expect(lagText.out.contains("total lag 0 records (group coupon-issuers, topic coupon-requests)"), "\(lagText.out)")

            let letters = try await ChildProcess.run(Self.admin, ["dlq", "list", "--json"] + backend)
            #expect(letters.status == 0, "\(letters.err)")
            #expect((try Self.json(letters.out)["letters"] as? [Any])?.isEmpty == true, "the demo's sale dead-letters nothing: \(letters.out)")
        }
    }

    @Test func lagAndDeadLetterReplayOnRedis() async throws {
        try await RedisTestServer.with { server in
            var tc = RedisStreamsTransport.Configuration(redis: server.unixConfiguration)
            tc.keyPrefix = "adm-streams:"
            let transport = try RedisStreamsTransport(configuration: tc)
            try await transport.createTopic("coupon-requests", partitions: 2)
            try await transport.createTopic("coupon-requests.dlq", partitions: 1)
            var sc = RedisDedupeStore.Configuration(redis: server.unixConfiguration)
            sc.keyPrefix = "adm-store:"
            let store = try RedisDedupeStore(configuration: sc)
            for m in 1...10 as ClosedRange<Int64> {
                _ = try await transport.publish(CouponRequest(requestId: m, couponId: 1 + m % 2, memberId: m).outgoing, to: "coupon-requests", partitioning: .modulo)
            }
            // Member 7 fails until fixed: dead-lettered after its attempts.
            struct Boom: Error {}
            let fixed = Atomic<Bool>(false)
            let issuer = CouponIssuer(stock: [1: 10, 2: 10])
            var c = ConsumerConfiguration(topic: "coupon-requests", group: "coupon-issuers", memberID: "m")
            c.retryBackoff = .none
            c.maxAttempts = 2
            c.pollWait = .milliseconds(10)
            let consumer = try ExactlyOnceConsumer(transport: transport, store: store, configuration: c, logger: Logger(label: "t"),
                                                   key: CouponRequest.keyExtractor, handler: { ctx in
                                                       if try CouponRequest.decode(ctx.record.payload).memberId == 7 && !fixed.load(ordering: .relaxed) { throw Boom() }
                                                       return try await issuer.handle(&ctx)
                                                   })
            func drain() async throws {
                let session = try await consumer.makeSession()
                for _ in 0..<100 where !(try await transport.isFullyCommitted(group: "coupon-issuers", topic: "coupon-requests")) { try await session.step() }
                try await session.close()
                #expect(try await transport.isFullyCommitted(group: "coupon-issuers", topic: "coupon-requests"))
            }
            try await drain()

            let backend = ["--store", "redis", "--redis-url", "unix://\(server.socketPath)", "--key-prefix", "adm-store:", "--streams-prefix", "adm-streams:"]
            let lag = try await ChildProcess.run(Self.admin, ["lag", "--json"] + backend)
            #expect(lag.status == 0, "\(lag.err)")
            let lagJSON = try Self.json(lag.out)
            #expect(lagJSON["totalLag"] as? Int == 0)
            #expect((lagJSON["partitions"] as? [[String: Any]])?.map { $0["end"] as? Int } == [5, 5])

            let list = try await ChildProcess.run(Self.admin, ["dlq", "list", "--json"] + backend)
            let letters = try #require(try Self.json(list.out)["letters"] as? [[String: Any]], "\(list.out + list.err)")
            #expect(letters.count == 1 && letters[0]["key"] as? String == "2:7" && letters[0]["reason"] as? String == "gave up after 2 attempts")
            let listText = try await ChildProcess.run(Self.admin, ["dlq", "list"] + backend)
            #expect(listText.out.contains("0@0\t2:7\tfrom coupon-requests/0@3\tgave up after 2 attempts"), "\(listText.out)")
            #expect(listText.out.contains("(1 dead letters in coupon-requests.dlq, end of listing)"), "\(listText.out)")

            // The store's side: the key is dead-lettered, and its last failure is the handler's error.
            let dead = try Self.json(try await ChildProcess.run(Self.admin, ["keys", "--outcome", "deadLettered", "--json"] + backend).out)
            #expect((dead["records"] as? [[String: Any]])?.map { $0["key"] as? String } == ["2:7"], "\(dead)")
            // A key being retried shows its last failure (a dead-lettered one no longer does: its
            // dead letter says why it was given up on).
            guard case .new(let claim) = try await store.claim(ClaimRequest(key: IdempotencyKey(rawValue: "9:9"), fingerprint: PayloadFingerprint(bytes: [9]), lease: .seconds(30))) else {
                Issue.record("a fresh key is claimable")
                return
            }
            try await store.release(claim, reason: "payment gateway timeout")
            let failing = try await ChildProcess.run(Self.admin, ["keys", "--failure", "gateway"] + backend)
            #expect(failing.out.contains("9:9\treleased\tattempts 1\t-\tlast failure: payment gateway timeout"), "\(failing.out) \(failing.err)")
            #expect(failing.out.contains("(1 records, end of listing)") && !failing.out.contains("2:7"), "\(failing.out)")
            let anyFailure = try Self.json(try await ChildProcess.run(Self.admin, ["keys", "--failure", "", "--json"] + backend).out)
            #expect((anyFailure["records"] as? [[String: Any]])?.map { $0["lastFailure"] as? String } == ["payment gateway timeout"], "\(anyFailure)")
            let released = try Self.json(try await ChildProcess.run(Self.admin, ["keys", "--phase", "released", "--json"] + backend).out)
            #expect((released["records"] as? [[String: Any]])?.map { $0["key"] as? String } == ["9:9"], "\(released)")

            // One entry, with its headers and payload.
            let show = try await ChildProcess.run(Self.admin, ["dlq", "show", "--partition", "0", "--offset", "0"] + backend)
            #expect(show.status == 0, "\(show.err)")
            #expect(show.out.contains("header x-dead-letter-reason: gave up after 2 attempts"), "\(show.out)")
            #expect(show.out.contains("header x-idempotency-key: 2:7") && show.out.contains("payload (3 bytes): 2,7"), "\(show.out)")
            let showJSON = try Self.json(try await ChildProcess.run(Self.admin, ["dlq", "show", "--offset", "0", "--json"] + backend).out)
            #expect((showJSON["letter"] as? [String: Any])?["originalOffset"] as? Int == 3)
            #expect((showJSON["headers"] as? [String: String])?["x-original-topic"] == "coupon-requests")
            #expect(showJSON["payload"] as? String == "2,7")
            let none = try await ChildProcess.run(Self.admin, ["dlq", "show", "--offset", "5"] + backend)
            #expect(none.status == 1 && none.err.contains("no dead letter at coupon-requests.dlq 0@5"), "\(none.err)")

            // Replayed twice before the consumer runs again: the key is released once, and the
            // record goes back twice.
            let replay = try await ChildProcess.run(Self.admin, ["dlq", "replay", "--key", "2:7", "--json"] + backend)
            #expect(replay.status == 0, "\(replay.err)")
            #expect(try Self.json(replay.out)["reopened"] as? [String] == ["2:7"])
            let again = try await ChildProcess.run(Self.admin, ["dlq", "replay", "--all"] + backend)
            #expect(again.out.contains("1 replayed") && again.out.contains("0 dead-lettered outcomes released"), "\(again.out)")
            let key = IdempotencyKey.coupon(couponId: 2, memberId: 7)
            #expect(try await store.records(for: [key])[key]?.phase == .released)

            // The handler is fixed and the consumer runs: member 7 is issued a coupon once.
            fixed.store(true, ordering: .relaxed)
            try await drain()
            let ledger = try await CouponLedger.read(from: store, coupons: [1, 2])
            #expect(ledger.filter { $0.memberId == 7 }.count == 1, "issued once, though replayed twice: \(ledger)")
            #expect(ledger.count == 10, "every member holds one coupon")
            #expect(try await store.records(for: [key])[key]?.outcome == .applied("5"), "issued after members 1, 3, 5 and 9 of coupon 2")
            let after = try Self.json(try await ChildProcess.run(Self.admin, ["key", "2:7", "--json"] + backend).out)
            #expect(after["phase"] as? String == "completed" && after["outcome"] as? String == "applied" && after["outcomeDetail"] as? String == "5")
            #expect(try await transport.read(topic: "coupon-requests.dlq", partition: 0, from: Offset(0), maxRecords: 10).count == 1,
                    "nothing dead-lettered again")

            // Replaying everything again now skips it: its key holds an outcome.
            let third = try Self.json(try await ChildProcess.run(Self.admin, ["dlq", "replay", "--all", "--json"] + backend).out)
            #expect((third["replayed"] as? [Any])?.isEmpty == true)
            let skipped = try #require(third["skipped"] as? [[String: Any]])
            #expect(skipped.count == 1 && skipped[0]["reason"] as? String == "answered", "\(third)")
            let byReason = try await ChildProcess.run(Self.admin, ["dlq", "replay", "--reason", "gave up"] + backend)
            #expect(byReason.out.contains("skipped  0@0\t2:7\t") && byReason.out.contains("already processed: its key holds the outcome applied (5)"), "\(byReason.out)")
            #expect(byReason.out.contains("0 replayed (reason containing \"gave up\"), 0 dead-lettered outcomes released, 1 skipped"), "\(byReason.out)")
            var ends = try await transport.endOffsets(topic: "coupon-requests")
            #expect(ends.values.reduce(0) { $0 + $1.rawValue } == 12, "10 clicks and 2 replays, no more")

            // Forced with --include-answered, it goes back and is only answered.
            let forced = try Self.json(try await ChildProcess.run(Self.admin, ["dlq", "replay", "--reason", "gave up", "--include-answered", "--json"] + backend).out)
            #expect((forced["replayed"] as? [Any])?.count == 1 && (forced["reopened"] as? [Any])?.isEmpty == true, "\(forced)")
            try await drain()
            ends = try await transport.endOffsets(topic: "coupon-requests")
            #expect(ends.values.reduce(0) { $0 + $1.rawValue } == 13)
            #expect(try await CouponLedger.read(from: store, coupons: [1, 2]).count == 10)
            #expect(try await store.records(for: [key])[key]?.outcome == .applied("5"))
            let misuse = try await ChildProcess.run(Self.admin, ["dlq", "replay", "--key", "2:7", "--include-answered"] + backend)
            #expect(misuse.status == 2 && misuse.err.contains("--include-answered is for --all and --reason"), "\(misuse.err)")

            let noFlag = try await ChildProcess.run(Self.admin, ["dlq", "replay"] + backend)
            #expect(noFlag.status == 2 && noFlag.err.contains("exactly one of"))
            let badCursor = try await ChildProcess.run(Self.admin, ["dlq", "list", "--cursor", "x"] + backend)
            #expect(badCursor.status == 2 && badCursor.err.contains("PARTITION@OFFSET"), "\(badCursor.err)")
        }
    }
}
