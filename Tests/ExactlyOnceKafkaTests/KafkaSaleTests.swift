import CouponKit
import ExactlyOnce
import ExactlyOnceTestKit
import Foundation
import Logging
import Synchronization
import Testing
@testable import ExactlyOnceKafka

/// A failure of a sale harness step, with what was awaited.
struct SaleFailure: Error, CustomStringConvertible {
    var description: String
}

/// Polls `condition` every 100 ms until it holds; throws after `timeout` (a deadline, never a
/// sleep standing in for the condition).
func eventually(_ what: String, within timeout: Duration = .seconds(60), _ condition: () async throws -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while try await !condition() {
        guard ContinuousClock.now < deadline else { throw SaleFailure(description: "not within \(timeout): \(what)") }
        try await Task.sleep(for: .milliseconds(100))
    }
}

extension SharedMock {
    /// The tests' transport configuration for another cluster than the shared one.
    static func configuration(for cluster: KafkaMockCluster) -> KafkaTransport.Configuration {
        var c = configuration()
        c.bootstrapServers = cluster.bootstrapServers
        return c
    }

    /// `count` coupon ids whose record keys (the coupon id) spread over every one of
    /// `partitions` partitions under ``Murmur2Partitioner``.
    static func coupons(_ count: Int, coveringPartitions partitions: Int) throws -> [Int64] {
        let murmur = Murmur2Partitioner()
        var chosen: [Int64] = []
        var covered = Set<PartitionID>()
        var c: Int64 = 0
        while chosen.count < count || covered.count < partitions {
            c += 1
            guard c < 1000 else { throw SaleFailure(description: "no coupon ids cover \(partitions) partitions") }
            let p = try murmur.partition(forKey: CouponRequest(requestId: 0, couponId: c, memberId: 0).recordKey, partitionCount: partitions)
            // Take a coupon when it covers a new partition, or while there is room for it.
            if !covered.contains(p) || chosen.count < count - (partitions - covered.count) {
                chosen.append(c)
                covered.insert(p)
            }
        }
        return chosen
    }
}

/// A flash sale through ``ExactlyOnceConsumer`` (``CouponIssuer`` over an ``InMemoryDedupeStore``)
/// over ``KafkaTransport`` on a mock cluster. Injected faults (request errors, brokers down)
/// reach every client of a cluster, so a faulty sale runs on a cluster of its own, not on
/// ``SharedMock``'s that the tests running beside it use.
final class KafkaSale: Sendable {
    static let partitions = 3
    let cluster: KafkaMockCluster
    let topic: String
    let group = "sale"
    /// The publisher's transport (the shop's front end).
    let publisher: KafkaTransport
    /// The consumer members' transport.
    let consumers: KafkaTransport
    let store: InMemoryDedupeStore
    let stock: [Int64: Int64]
    /// The clicks in the order the shop publishes them.
    let clicks: [CouponRequest]
    /// Every click the transport reported accepted, with the position it reported.
    let accepted = Mutex<[(request: CouponRequest, position: RecordPosition)]>([])
    /// Publishes that failed as a whole or in part (and were published again).
    let failedPublishes = Mutex(0)

    /// A sale of `clickCount` clicks over four coupons of small stock, with repeated clicks, on
    /// a fresh topic of `cluster` (by default a cluster of its own), consumed by members using
    /// `assignor`.
    init(seed: UInt64, clickCount: Int = 1500, cluster shared: KafkaMockCluster? = nil,
         assignor: KafkaTransport.Assignor = .cooperativeSticky) throws {
        cluster = try shared ?? KafkaMockCluster(brokers: 3)
        topic = "sale-\(seed)-\(String(UInt64.random(in: 0 ... .max), radix: 36))"
        try cluster.createTopic(topic, partitions: Self.partitions)
        try cluster.createTopic(topic + ".dlq", partitions: 1)
        // Each partition on its own broker (1-based), so a broker down stops exactly one partition.
        for p in 0..<Self.partitions { try cluster.setPartitionLeader(topic: topic, partition: p, broker: p + 1) }
        publisher = try KafkaTransport(configuration: SharedMock.configuration(for: cluster))
        var members = SharedMock.configuration(for: cluster)
        members.assignor = assignor  // cooperative-sticky: rebalances move only the partitions that change owner
        consumers = try KafkaTransport(configuration: members)
        store = try InMemoryDedupeStore()
        let coupons = try SharedMock.coupons(4, coveringPartitions: Self.partitions)
        stock = Dictionary(uniqueKeysWithValues: zip(coupons, [5, 8, 12, 3] as [Int64]))
        var rng = SeededRandom(seed: seed)
        var out: [CouponRequest] = []
        var id: Int64 = 0
        while out.count < clickCount {
            id += 1
            let c = coupons[Int(rng.next() % UInt64(coupons.count))]
            let m = Int64(1 + rng.next() % 200)
            out.append(CouponRequest(requestId: id, couponId: c, memberId: m))
            if rng.chance(0.2) {  // a double click
                id += 1
                out.append(CouponRequest(requestId: id, couponId: c, memberId: m))
            }
        }
        clicks = out
    }

    /// A consumer member running ``ExactlyOnceConsumer/run()`` until its task is cancelled.
    func startMember(_ member: String) throws -> Task<Void, any Error> {
        var c = ConsumerConfiguration(topic: topic, group: group, memberID: member)
        c.lease = .seconds(5)
        c.retryBackoff = .none
        var unavailable = Backoff()
        unavailable.maximum = .milliseconds(200)
        c.unavailableBackoff = unavailable
        let consumer = try ExactlyOnceConsumer(transport: consumers, store: store, configuration: c,
                                               logger: Logger(label: "kafka-sale", factory: { _ in SwiftLogNoOpLogHandler() }),
                                               key: CouponRequest.keyExtractor, handler: CouponIssuer(stock: stock).handler)
        return Task { try await consumer.run() }
    }

    /// The members that own a partition of the topic, as the consumers' transport knows them.
    func owners() async throws -> [PartitionID: String] {
        var out: [PartitionID: String] = [:]
        for s in try await consumers.partitionStatus(group: group, topic: topic) { if let o = s.owner { out[s.partition] = o } }
        return out
    }

    /// Waits until every partition is owned and each of `members` owns one.
    func awaitAssignment(of members: Set<String>, within timeout: Duration = .seconds(60)) async throws {
        try await eventually("every partition owned, each of \(members.sorted()) owning one", within: timeout) {
            let o = try await owners()
            return o.count == Self.partitions && members.isSubset(of: Set(o.values))
        }
    }

    /// Publishes `clicks` in batches of `batchSize` (partitioned by coupon, murmur2), publishing
    /// again what a publish did not report accepted, and calls `beforeBatch` with each batch's
    /// index first.
    func publish(_ clicks: ArraySlice<CouponRequest>, batchSize: Int = 75, pause: Duration = .milliseconds(30),
                 beforeBatch: (Int) async throws -> Void = { _ in }) async throws {
        var index = 0
        var start = clicks.startIndex
        while start < clicks.endIndex {
            let end = min(start + batchSize, clicks.endIndex)
            try await beforeBatch(index)
            var todo = Array(clicks[start..<end])
            var rounds = 0
            while !todo.isEmpty {
                rounds += 1
                guard rounds <= 30 else { throw SaleFailure(description: "batch \(index) not accepted after 30 publishes") }
                var again: [CouponRequest] = []
                do {
                    let report = try await publisher.publish(todo.map(\.outgoing), to: topic, partitioning: .murmur2)
                    for (r, p) in zip(todo, report.positions) {
                        if let p { accepted.withLock { $0.append((r, p)) } } else { again.append(r) }
                    }
                } catch let e as ExactlyOnceError where e.isRetriable {
                    again = todo
                }
                if !again.isEmpty {
                    failedPublishes.withLock { $0 += 1 }
                    try await Task.sleep(for: .milliseconds(200))
                }
                todo = again
            }
            start = end
            index += 1
            try await Task.sleep(for: pause)
        }
    }

    /// Waits until the group has committed every partition to its end.
    func awaitDrained(within timeout: Duration = .seconds(60)) async throws {
        try await eventually("group \(group) committed every partition of \(topic) to its end", within: timeout) {
            try await consumers.isFullyCommitted(group: group, topic: topic)
        }
    }

    /// Stops members (cancelling their tasks) and waits for them to leave; a member that ended
    /// with an error is reported.
    static func stop(_ members: [Task<Void, any Error>]) async {
        for m in members { m.cancel() }
        for m in members {
            do { try await m.value } catch { Issue.record("a consumer member ended with \(error)") }
        }
    }

    /// Every record of the topic, partition by partition, in offset order.
    func log() async throws -> [PartitionID: [ConsumedRecord]] {
        let ends = try await publisher.endOffsets(topic: topic)
        var out: [PartitionID: [ConsumedRecord]] = [:]
        for p in 0..<Self.partitions {
            let pid = PartitionID(p)
            var records: [ConsumedRecord] = []
            let end = ends[pid]?.rawValue ?? 0
            while Int64(records.count) < end {
                let got = try await publisher.read(topic: topic, partition: pid, from: Offset(Int64(records.count)), maxRecords: 1000)
                guard !got.isEmpty else { throw SaleFailure(description: "partition \(p) ends at \(end) but reads stop at \(records.count)") }
                records += got
            }
            out[pid] = records
        }
        return out
    }

    /// The audit against what was actually published: the log read back, the publishes reported
    /// accepted (when `publishedHere`: the clicks went through ``publish(_:batchSize:pause:beforeBatch:)``),
    /// and the ledger and records read back from the store.
    func audit(publishedHere: Bool = true) async throws {
        let log = try await log()
        let murmur = Murmur2Partitioner()
        var misplaced: [String] = []
        for (p, records) in log {
            for (i, r) in records.enumerated() {
                if r.offset != Offset(Int64(i)) { misplaced.append("\(p)@\(i) reads as offset \(r.offset)") }
                if try murmur.partition(forKey: r.key ?? [], partitionCount: Self.partitions) != p {
                    misplaced.append("\(p)@\(i) has key \(String(decoding: r.key ?? [], as: UTF8.self))")
                }
            }
        }
        #expect(misplaced.isEmpty, "records out of place (murmur2 by coupon, offsets dense): \(misplaced.prefix(10))")
        // Every publish reported accepted has a position, and the log holds that very request there.
        let accepted = self.accepted.withLock { $0 }
        #expect(publishedHere || accepted.isEmpty)
        #expect(Set(accepted.map(\.position)).count == accepted.count, "two accepted publishes reported the same position")
        var wrong: [String] = []
        for (r, pos) in accepted {
            let at = log[pos.partition].flatMap { pos.offset.rawValue < $0.count ? $0[Int(pos.offset.rawValue)] : nil }
            if at?.payload != r.payload || at?.key != r.recordKey {
                wrong.append("request \(r.requestId) (\(String(decoding: r.payload, as: UTF8.self))) reported at \(pos), the log holds "
                    + (at.map { String(decoding: $0.payload, as: UTF8.self) } ?? "nothing"))
            }
        }
        #expect(wrong.isEmpty, "accepted positions that do not hold their request: \(wrong.count), \(wrong.prefix(10))")
        if publishedHere {
            #expect(Set(accepted.map(\.request.requestId)) == Set(clicks.map(\.requestId)), "a click was never accepted")
        }

        // The requests as the log orders them (one coupon lives in one partition).
        let published = try (0..<Self.partitions).flatMap { p in
            try (log[PartitionID(p)] ?? []).map { r -> CouponRequest in
                let (c, m) = try CouponRequest.decode(r.payload)
                return CouponRequest(requestId: 0, couponId: c, memberId: m)
            }
        }
        #expect(published.count >= clicks.count, "the log holds \(published.count) records for \(clicks.count) accepted clicks")
        let ledger = try await CouponLedger.read(from: store, coupons: Array(stock.keys))
        let records = try await store.records(for: Array(Set(published.map(\.key))))
        let audit = CouponAudit.audit(requests: published, ledger: ledger, stock: stock, records: records)
        #expect(audit.overIssued == 0, "over-issued: \(audit)")
        #expect(audit.doubleIssued == 0, "a member issued twice: \(audit)")
        #expect(audit.lost == 0, "accepted requests without a finished record: \(audit)")
        #expect(audit.fcfsViolations == 0, "winners are not the first distinct members: \(audit)")
        #expect(audit.issued == Int(stock.values.reduce(0, +)), "the sale did not sell out: \(audit)")
        #expect(audit.soldOut > 0 && audit.duplicateRequests > 0, "the sale had no sold-out answers or no repeats: \(audit)")
        // First come, first served in serial order too: serial n went to the n-th distinct member.
        for (coupon, limit) in stock {
            var firsts: [Int64] = []
            for r in published where r.couponId == coupon && !firsts.contains(r.memberId) { firsts.append(r.memberId) }
            let serials = ledger.filter { $0.couponId == coupon }.sorted { $0.serial < $1.serial }.map(\.memberId)
            #expect(serials == Array(firsts.prefix(Int(limit))), "coupon \(coupon): serials \(serials), first members \(firsts.prefix(Int(limit)))")
        }
        let dlq = try await publisher.endOffsets(topic: topic + ".dlq")
        #expect(dlq.values.allSatisfy { $0 == Offset(0) }, "records were dead-lettered: \(dlq)")
    }
}

@Suite("Kafka flash sale under faults", .timeLimit(.minutes(3)))
struct KafkaSaleTests {
    /// Retriable request errors injected on Produce, Fetch and OffsetCommit all through the sale.
    @Test func saleSurvivesInjectedRequestErrors() async throws {
        let sale = try KafkaSale(seed: 11)
        let members = try [sale.startMember("a"), sale.startMember("b")]
        try await sale.awaitAssignment(of: ["a", "b"])
        try await sale.publish(sale.clicks[...]) { batch in
            try sale.cluster.pushRequestErrors(.produce, [.notLeaderForPartition, .requestTimedOut])
            try sale.cluster.pushRequestErrors(.fetch, [.notLeaderForPartition, .requestTimedOut])
            if batch % 2 == 0 {
                try sale.cluster.pushRequestErrors(.offsetCommit, [.coordinatorNotAvailable, .requestTimedOut, .notCoordinator])
            }
        }
        // More commit errors after the last record was published, while its commits are due.
        try sale.cluster.pushRequestErrors(.offsetCommit, [.requestTimedOut, .coordinatorNotAvailable])
        try await sale.awaitDrained()
        await KafkaSale.stop(members)
        try await sale.audit()
    }

    /// The leader of one partition goes down mid-sale and comes back: publishes and consumption
    /// of its partition wait for it, and the sale finishes after it returns.
    @Test func saleSurvivesABrokerDown() async throws {
        let sale = try KafkaSale(seed: 12)
        let members = try [sale.startMember("a"), sale.startMember("b")]
        try await sale.awaitAssignment(of: ["a", "b"])
        let acceptedIn1 = { @Sendable in sale.accepted.withLock { $0.filter { $0.position.partition == PartitionID(1) }.count } }
        var outage: Task<(before: Int, during: Int), any Error>?
        try await sale.publish(sale.clicks[...]) { batch in
            guard batch == 5 else { return }
            try sale.cluster.setBrokerDown(2)
            outage = Task {
                let before = acceptedIn1()
                // The outage's length (a schedule for the fault, not a wait for a result).
                try await Task.sleep(for: .seconds(3))
                let during = acceptedIn1()
                try sale.cluster.setBrokerUp(2)
                return (before, during)
            }
        }
        let counts = try #require(try await outage?.value)
        // Broker 2 leads partition 1: nothing was accepted there while it was down, and the rest
        // of the sale (published, consumed, committed) went through after it came back.
        #expect(counts.before == counts.during, "records accepted in partition 1 while its leader was down")
        #expect(acceptedIn1() > counts.during, "no record accepted in partition 1 after its leader came back")
        try await sale.awaitDrained()
        await KafkaSale.stop(members)
        try await sale.audit()
    }

    /// A member rejoins its group (a heartbeat answered REBALANCE_IN_PROGRESS) while records
    /// flow, and a commit it makes meanwhile is answered ILLEGAL_GENERATION: librdkafka 2.0.2
    /// then forgets its generation until the group forms again (confluentinc/librdkafka#4059),
    /// and, cooperative, keeps its partitions through the rebalance, so nothing is read again.
    /// What the member finished in that window must still be committed once the group has
    /// formed: seen under load as a sale whose partition stayed committed at 512 of 17,915 for
    /// good, every record processed, because the commits made without a generation were
    /// dropped as stale instead of kept.
    @Test(arguments: KafkaTransport.Assignor.allCases)
    func commitsRefusedWhileTheMemberRejoinsAreMadeOnceTheGroupHasFormed(assignor: KafkaTransport.Assignor) async throws {
        let sale = try KafkaSale(seed: 14, assignor: assignor)
        let member = try sale.startMember("a")
        try await sale.awaitAssignment(of: ["a"])
        let half = sale.clicks.count / 2
        try await sale.publish(sale.clicks[..<half])
        try await sale.awaitDrained()
        // The fault's schedule. The next heartbeat (every 1.3 s with a 4 s session) sends the
        // member back to JoinGroup, where the mock holds it 3 s (and holds its commits meanwhile).
        // Its first commit after that is answered ILLEGAL_GENERATION (librdkafka forgets its
        // generation) and its SyncGroup REBALANCE_IN_PROGRESS (it joins again, keeping its
        // partitions: another 3 s). The second half is published over about 5 s, so records are
        // processed all through, without a generation for the last seconds of it.
        try sale.cluster.pushRequestErrors(.heartbeat, [.rebalanceInProgress])
        try await Task.sleep(for: .seconds(2))
        try sale.cluster.pushRequestErrors(.offsetCommit, [.illegalGeneration])
        try sale.cluster.pushRequestErrors(.syncGroup, [.rebalanceInProgress])
        try await sale.publish(sale.clicks[half...], batchSize: 25, pause: .milliseconds(150))
        try await sale.awaitDrained()
        await KafkaSale.stop([member])
        try await sale.audit()
    }

    /// A member is cancelled mid-sale (it leaves the group) and another joins: rebalances while
    /// records flow, cooperative (only the partitions that move are revoked) and eager (`range`,
    /// `roundrobin`: every rebalance revokes every partition of every member first).
    @Test(arguments: KafkaTransport.Assignor.allCases)
    func saleSurvivesAMemberLeavingAndAnotherJoining(assignor: KafkaTransport.Assignor) async throws {
        let sale = try KafkaSale(seed: 13, assignor: assignor)
        let a = try sale.startMember("a")
        let b = try sale.startMember("b")
        try await sale.awaitAssignment(of: ["a", "b"])
        let half = sale.clicks.count / 2
        try await sale.publish(sale.clicks[..<half])
        try await eventually("some offsets committed before b stops") {
            try await sale.consumers.partitionStatus(group: sale.group, topic: sale.topic).contains { ($0.committed?.rawValue ?? 0) > 0 }
        }
        b.cancel()
        let c = try sale.startMember("c")
        try await sale.publish(sale.clicks[half...])
        try await sale.awaitAssignment(of: ["a", "c"])
        let owners = try await sale.owners()
        #expect(!owners.values.contains("b"), "b still owns a partition after it left: \(owners)")
        try await sale.awaitDrained()
        if assignor.isEager {
            // Eager: the last rebalance revoked everything and handed every partition out again,
            // so all of them carry that generation as their epoch (cooperative members keep the
            // epochs of the partitions that did not move).
            let epochs = try await sale.consumers.partitionStatus(group: sale.group, topic: sale.topic).map(\.epoch)
            #expect(epochs.allSatisfy { $0 != nil } && Set(epochs).count == 1, "epochs after an eager rebalance: \(epochs)")
        }
        await KafkaSale.stop([a, b, c])
        try await sale.audit()
    }
}
