#if Postgres
import CouponKit
import ExactlyOnce
import ExactlyOncePostgres
import ExactlyOnceTestKit
import Logging
import PostgresNIO
import Testing
import TestSupport

let quiet = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

/// A seeded flash sale: a few coupons with small stock, more members than stock, double clicks
/// and a conflicting payload now and then (the workload of the simulations, smaller).
struct SeededSale {
    var requests: [CouponRequest] = []
    var stock: [Int64: Int64] = [:]

    init(seed: UInt64) {
        var rng = SeededRandom(seed: seed ^ 0x5eed)
        let coupons = Int64(1 + rng.next() % 3)
        for c in 1...coupons { stock[c] = Int64(1 + rng.next() % 6) }
        let members = Int64(4 + rng.next() % 12)
        var id: Int64 = 0
        for _ in 0..<(20 + Int(rng.next() % 60)) {
            id += 1
            let c = Int64(1 + rng.next() % UInt64(coupons))
            let m = Int64(1 + rng.next() % UInt64(members))
            requests.append(CouponRequest(requestId: id, couponId: c, memberId: m, variant: rng.next() % 25 == 0 ? 1 : 0))
            if rng.next() % 6 == 0, let last = requests.last {
                id += 1
                requests.append(CouponRequest(requestId: id, couponId: last.couponId, memberId: last.memberId))
            }
        }
    }
}

/// The audit of a sale on PostgreSQL: the ledger is read back from the user's own
/// `issued_coupons` table, the records from the store.
func auditSale(published: [CouponRequest], stock: [Int64: Int64], tables: PostgresCouponTables, store: PostgresDedupeStore,
               maxAttempts: Int = .max) async throws -> (CouponAudit, givenUp: Int) {
    let ledger = try await tables.ledger(from: store)
    let records = try await store.records(for: Array(Set(published.map(\.key))))
    // A record may be given up on (dead-lettered) only when injected crashes used up its
    // attempts; it is then legitimately not issued. Conflicting payloads (a second payload for
    // a key) are dead-lettered without touching the first payload's record.
    let givenUp = Set(records.filter { $0.value.outcome?.status == .deadLettered && $0.value.attempts > maxAttempts }.map(\.key))
    let early = records.filter { $0.value.outcome?.status == .deadLettered && $0.value.attempts <= maxAttempts }
    guard early.isEmpty else { throw ExactlyOnceError(.corruptData, "dead-lettered before their attempts ran out: \(early.keys)") }
    return (CouponAudit.audit(requests: published, ledger: ledger, stock: stock, records: records, excluded: givenUp), givenUp.count)
}

@Suite("PostgreSQL sales", .serialized)
struct PostgresSaleTests {
    @Test(arguments: [UInt64(1), 2, 3])
    func seededSimulatedSale(seed: UInt64) async throws {
        let server = try await PostgresTestServer.shared()
        let sale = SeededSale(seed: seed)
        var config = SimulationConfiguration(seed: seed)
        config.maxTicks = 800
        let sim = try Simulator<PostgresDedupeStore>(configuration: config)
        let tables = try PostgresCouponTables(schema: uniqueSchema("coupons"))
        let (report, store) = try await sim.run(
            records: sale.requests.map(\.outgoing), partitioning: .modulo,
            makeStore: { clock in
                let s = try await PostgresDedupeStore.testing(server, clock: clock)
                try await tables.create(on: s, stock: sale.stock)
                return s
            },
            key: CouponRequest.keyExtractor, handler: tables.handler)
        #expect(report.drained, "\(report.summary)")
        #expect(report.crashes + report.storeFaults + report.zombies + report.rebalances > 0, "no faults injected: \(report.summary)")
        let published = try report.log.map { r -> CouponRequest in
            let (c, m) = try CouponRequest.decode(r.payload)
            return CouponRequest(requestId: 0, couponId: c, memberId: m)
        }
        let (audit, _) = try await auditSale(published: published, stock: sale.stock, tables: tables, store: store, maxAttempts: config.maxAttempts)
        #expect(audit.overIssued == 0 && audit.doubleIssued == 0 && audit.lost == 0 && audit.fcfsViolations == 0,
                "seed \(seed): \(audit) — \(report.summary)")
        #expect(audit.issued > 0)
        // The stock table agrees with the ledger.
        let issued = try await store.query("SELECT coalesce(sum(issued), 0)::bigint FROM \(unescaped: tables.schema).coupon_stock").first?.decode(Int64.self)
        #expect(issued == Int64(audit.issued))
        await store.shutdown()
    }

    @Test func aUniqueViolationInAHandlerIsDeadLetteredAndTheRestCommits() async throws {
        let server = try await PostgresTestServer.shared()
        let store = try await PostgresDedupeStore.testing(server)
        let tables = try PostgresCouponTables(schema: uniqueSchema("coupons"))
        try await tables.create(on: store, stock: [1: 100])
        // Member 4 already holds coupon 1 (issued outside the sale, serial 99): the handler's
        // insert for member 4 violates UNIQUE (coupon_id, member_id) on every attempt.
        try await store.query("INSERT INTO \(unescaped: tables.schema).issued_coupons (coupon_id, serial, member_id, request_key) VALUES (1, 99, 4, 'outside')")
        let transport = try InMemoryTransport(topics: ["coupons": 1, "coupons.dlq": 1])
        let requests = (1...8).map { CouponRequest(requestId: $0, couponId: 1, memberId: $0) }
        for r in requests { _ = try await transport.publish(r.outgoing, to: "coupons", partitioning: .modulo) }
        var c = ConsumerConfiguration(topic: "coupons", group: "g", memberID: "a")
        c.pollWait = .zero
        c.retryBackoff = .none
        c.unavailableBackoff = .none
        c.maxAttempts = 2
        let consumer = try ExactlyOnceConsumer(transport: transport, store: store, configuration: c, logger: quiet,
                                               key: CouponRequest.keyExtractor, handler: tables.handler)
        let session = try await consumer.makeSession()
        for _ in 0..<50 where !transport.isFullyCommitted(group: "g", topic: "coupons") { _ = try await session.step() }
        #expect(transport.isFullyCommitted(group: "g", topic: "coupons"))
        let records = try await store.records(for: requests.map(\.key))
        #expect(records[requests[3].key]?.outcome?.status == .deadLettered, "\(String(describing: records[requests[3].key]))")
        for r in requests where r.memberId != 4 {
            #expect(records[r.key]?.outcome?.status == .applied, "member \(r.memberId): \(String(describing: records[r.key]))")
        }
        let dlq = try await transport.read(topic: "coupons.dlq", partition: PartitionID(0), from: Offset(0), maxRecords: 10)
        #expect(dlq.count == 1 && dlq.first?.headers[DeadLetterHeaders.reason]?.contains("gave up") == true, "\(dlq.map(\.headers))")
        let ledger = try await tables.ledger(from: store)
        #expect(ledger.filter { $0.serial != 99 }.map(\.memberId).sorted() == [1, 2, 3, 5, 6, 7, 8], "\(ledger)")
        await store.shutdown()
    }

    @Test func theServerStoppedMidRunPausesTheLaneAndLosesNothing() async throws {
        try await PostgresTestServer.with { server in
            var config = try PostgresStoreConfiguration(url: server.socketURL)
            config.schema = "eo"
            config.connectTimeout = .seconds(1)
            config.statementTimeout = .seconds(2)
            config.acquireTimeout = .seconds(2)
            config.completionBatchLimit = 8
            let store = try await PostgresDedupeStore.connect(config)
            let tables = try PostgresCouponTables(schema: "coupons")
            let stock: [Int64: Int64] = [1: 30, 2: 30]
            try await tables.create(on: store, stock: stock)
            let transport = try InMemoryTransport(topics: ["coupons": 2, "coupons.dlq": 1])
            var requests: [CouponRequest] = []
            for i in 1...120 { requests.append(CouponRequest(requestId: Int64(i), couponId: Int64(1 + i % 2), memberId: Int64(1 + i % 50))) }
            for r in requests { _ = try await transport.publish(r.outgoing, to: "coupons", partitioning: .modulo) }
            var c = ConsumerConfiguration(topic: "coupons", group: "g", memberID: "a")
            c.pollWait = .zero
            c.retryBackoff = .none
            c.unavailableBackoff = .none
            c.maxPollRecords = 10
            let consumer = try ExactlyOnceConsumer(transport: transport, store: store, configuration: c, logger: quiet,
                                                   key: CouponRequest.keyExtractor, handler: tables.handler)
            let session = try await consumer.makeSession()
            for _ in 0..<3 { _ = try await session.step() }
            try await server.stop(mode: "immediate")
            var paused = 0
            for _ in 0..<3 {
                let report = try await session.step()
                paused += report.pausedLanes
                #expect(report.processed == 0, "nothing can be processed while the server is down")
            }
            #expect(paused > 0, "the lanes pause while the server is down")
            try await server.start()
            for _ in 0..<200 where !transport.isFullyCommitted(group: "g", topic: "coupons") { _ = try await session.step() }
            #expect(transport.isFullyCommitted(group: "g", topic: "coupons"))
            let (audit, givenUp) = try await auditSale(published: requests, stock: stock, tables: tables, store: store)
            #expect(givenUp == 0)
            #expect(audit.overIssued == 0 && audit.doubleIssued == 0 && audit.lost == 0 && audit.fcfsViolations == 0, "\(audit)")
            #expect(audit.issued == 50, "\(audit)")
            await store.shutdown()
        }
    }
}
#endif
