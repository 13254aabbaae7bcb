import ExactlyOnce
import ExactlyOnceTestKit
import TestSupport
import Testing
@testable import ExactlyOnceRedis

/// The transport's use of Redis consumer groups, checked through Redis itself (`XPENDING`,
/// `XINFO`): commits acknowledge the finished prefix, a dead member's pending entries are
/// claimed by the next owner, seeks re-read acknowledged entries, and a stale member acks nothing.
@Suite("Redis Streams transport consumer groups", .serialized, .timeLimit(.minutes(1)))
struct RedisStreamsConsumerGroupTests {
    static let topic = "orders"
    static let stream = "cg:t:orders:0"

    /// A transport on `server` with a one-partition topic holding `records` records.
    static func setUp(_ server: RedisTestServer, clock: any WallClock = SystemWallClock(), records: Int) async throws -> RedisStreamsTransport {
        var c = RedisStreamsTransport.Configuration(redis: server.unixConfiguration)
        c.keyPrefix = "cg:"
        let t = try RedisStreamsTransport(configuration: c, clock: clock)
        try await t.createTopic(topic, partitions: 1)
        try await publish(t, 0..<records)
        return t
    }

    static func publish(_ t: RedisStreamsTransport, _ range: Range<Int>) async throws {
        for i in range { _ = try await t.publish(OutgoingRecord(key: nil, payload: Array("r\(i)".utf8)), to: topic, partitioning: .explicit(0)) }
    }

    /// The pending entries of group `g` on partition 0: offset, consumer and delivery count.
    static func pending(_ t: RedisStreamsTransport) async throws -> [(offset: Int64, consumer: String, deliveries: Int64)] {
        let reply = try await t.client.command("XPENDING", stream, "g", "-", "+", "1000")
        return try ReplyDecoding.array(reply, "XPENDING").map { entry in
            let e = try ReplyDecoding.array(entry, "XPENDING entry", count: 4)
            let id = try ReplyDecoding.text(e[0], "id")
            #expect(id.hasPrefix("0-"))
            return (Int64(id.dropFirst(2))! - 1, try ReplyDecoding.text(e[1], "consumer"), try ReplyDecoding.int64(e[3], "deliveries"))
        }
    }

    /// The group's last-delivered ID.
    static func lastDeliveredID(_ t: RedisStreamsTransport) async throws -> String {
        let reply = try await t.client.command("XINFO", "GROUPS", stream)
        return "0-\(try RedisStreamsSubscription.lastDelivered(reply, group: "g"))"
    }

    static func offsets(_ records: [ConsumedRecord]) -> [Int64] { records.map(\.offset.rawValue) }

    @Test func subscribeCreatesTheRedisGroupAndCommitAcknowledgesTheFinishedPrefix() async throws {
        try await RedisTestServer.with { server in
            let t = try await Self.setUp(server, records: 10)
            let a = try await t.subscribe(topic: Self.topic, group: "g", memberID: "a")
            #expect(try await Self.lastDeliveredID(t) == "0-0")
            let r = try await a.poll(maxRecords: 100)
            #expect(Self.offsets(r.records) == Array(0..<10))
            #expect(try await Self.lastDeliveredID(t) == "0-10")
            let before = try await Self.pending(t)
            #expect(before.map(\.offset) == Array(0..<10))
            #expect(before.allSatisfy { $0.consumer == "a" && $0.deliveries == 1 })
            #expect(try await t.pendingCount(group: "g", topic: Self.topic) == 10)

            try await a.commit([0: Offset(6)], generation: r.generation)
            #expect(try await Self.pending(t).map(\.offset) == [6, 7, 8, 9])
            #expect(try await t.pendingCount(group: "g", topic: Self.topic) == 4)
            // Committing backwards stores the lower offset (as before) and acknowledges nothing new.
            try await a.commit([0: Offset(5)], generation: r.generation)
            #expect(try await a.committedOffset(0) == Offset(5))
            #expect(try await Self.pending(t).map(\.offset) == [6, 7, 8, 9])
            try await a.commit([0: Offset(10)], generation: r.generation)
            #expect(try await Self.pending(t).isEmpty)
            #expect(try await t.pendingCount(group: "g", topic: Self.topic) == 0)
            #expect(try await t.isFullyCommitted(group: "g", topic: Self.topic))
            // A second subscriber does not reset the existing Redis group.
            let b = try await t.subscribe(topic: Self.topic, group: "g", memberID: "b")
            #expect(try await Self.lastDeliveredID(t) == "0-10")
            try await b.close()
            try await a.close()
        }
    }

    /// A member reads without committing and dies; the next owner claims its pending entries
    /// with `XAUTOCLAIM` from the committed offset, in order, then reads new ones with
    /// `XREADGROUP`. The dead member's late commit is refused and acknowledges nothing.
    @Test func deadMembersPendingEntriesAreClaimedByTheNextOwner() async throws {
        try await RedisTestServer.with { server in
            let clock = ManualClock()
            let t = try await Self.setUp(server, clock: clock, records: 8)
            let a = try await t.subscribe(topic: Self.topic, group: "g", memberID: "a")
            let ra = try await a.poll(maxRecords: 100)
            #expect(Self.offsets(ra.records) == Array(0..<8))
            try await a.commit([0: Offset(3)], generation: ra.generation)

            let b = try await t.subscribe(topic: Self.topic, group: "g", memberID: "b")
            #expect(try await b.poll(maxRecords: 100).records.isEmpty, "a still owns the only partition")
            // a stops polling; its session lapses.
            clock.advance(by: .seconds(11))
            let rb = try await b.poll(maxRecords: 100)
            #expect(rb.assignment[0].map { $0 > ra.assignment[0]! } == true)
            #expect(Self.offsets(rb.records) == Array(3..<8))
            #expect(rb.records.map { String(decoding: $0.payload, as: UTF8.self) } == (3..<8).map { "r\($0)" })
            let claimed = try await Self.pending(t)
            #expect(claimed.map(\.offset) == Array(3..<8))
            #expect(claimed.allSatisfy { $0.consumer == "b" && $0.deliveries == 2 }, "claimed by XAUTOCLAIM: \(claimed)")

            // The zombie's commit is refused and acknowledges nothing.
            let zombie = await #expect(throws: ExactlyOnceError.self) {
                try await a.commit([0: Offset(8)], generation: ra.generation)
            }
            #expect(zombie?.code == .staleGeneration)
            let afterZombie = try await Self.pending(t)
            #expect(afterZombie.map(\.offset) == claimed.map(\.offset) && afterZombie.map(\.consumer) == claimed.map(\.consumer))
            #expect(try await b.committedOffset(0) == Offset(3))

            // New entries come through XREADGROUP.
            try await Self.publish(t, 8..<10)
            let more = try await b.poll(maxRecords: 100)
            #expect(Self.offsets(more.records) == [8, 9])
            #expect(try await Self.lastDeliveredID(t) == "0-10")
            let all = try await Self.pending(t)
            #expect(all.map(\.offset) == Array(3..<10))
            #expect(all.filter { $0.offset >= 8 }.allSatisfy { $0.consumer == "b" && $0.deliveries == 1 })
            try await b.commit(more.endOffsets, generation: more.generation)
            #expect(try await Self.pending(t).isEmpty)
        }
    }

    /// A former owner that still reads (its `XREADGROUP` ran after the partition moved) takes
    /// entries out of the group's new-entry stream; the new owner notices the gap and still
    /// delivers every record from its position, in order.
    @Test func entriesReadByAFormerOwnerAreNotSkipped() async throws {
        try await RedisTestServer.with { server in
            let clock = ManualClock()
            let t = try await Self.setUp(server, clock: clock, records: 3)
            let a = try await t.subscribe(topic: Self.topic, group: "g", memberID: "a")
            #expect(Self.offsets(try await a.poll(maxRecords: 100).records) == [0, 1, 2])
            let b = try await t.subscribe(topic: Self.topic, group: "g", memberID: "b")
            clock.advance(by: .seconds(11))
            var got = try await b.poll(maxRecords: 100).records
            #expect(Self.offsets(got) == [0, 1, 2])
            try await Self.publish(t, 3..<6)
            // a's in-flight read, as the stale consumer "a".
            let stolen = try await t.client.command("XREADGROUP", "GROUP", "g", "a", "COUNT", "100", "STREAMS", Self.stream, ">")
            #expect(Self.offsets(try RedisStreamsSubscription.decodeReadGroup(stolen, topic: Self.topic, partition: 0)) == [3, 4, 5])
            try await Self.publish(t, 6..<8)
            for _ in 0..<5 { got += try await b.poll(maxRecords: 100).records }
            #expect(Self.offsets(got) == Array(0..<8))
            #expect(try await Self.pending(t).allSatisfy { $0.consumer == "b" })
        }
    }

    @Test func seekBackwardsRereadsAcknowledgedEntriesAndSeekForwardSkips() async throws {
        try await RedisTestServer.with { server in
            let t = try await Self.setUp(server, records: 6)
            let a = try await t.subscribe(topic: Self.topic, group: "g", memberID: "a")
            let r = try await a.poll(maxRecords: 100)
            #expect(Self.offsets(r.records) == Array(0..<6))
            try await a.commit([0: Offset(6)], generation: r.generation)
            #expect(try await Self.pending(t).isEmpty)

            try await a.seek(0, to: Offset(1))
            let again = try await a.poll(maxRecords: 3)
            #expect(Self.offsets(again.records) == [1, 2, 3])
            #expect(Self.offsets(try await a.poll(maxRecords: 3).records) == [4, 5])
            #expect(try await Self.pending(t).isEmpty, "re-reading acknowledged entries does not make them pending")

            // Seek into entries not delivered yet: the ones below the position are delivered to
            // the Redis group but skipped, and stay pending until a commit passes them.
            try await Self.publish(t, 6..<12)
            try await a.seek(0, to: Offset(9))
            let forward = try await a.poll(maxRecords: 100)
            #expect(Self.offsets(forward.records) == [9, 10, 11])
            #expect(try await Self.pending(t).map(\.offset) == Array(6..<12))
            try await a.commit([0: Offset(12)], generation: forward.generation)
            #expect(try await Self.pending(t).isEmpty)
            #expect(try await a.poll(maxRecords: 100).records.isEmpty)
        }
    }

    /// Seeking back to an offset that is still pending claims it again and re-reads from there,
    /// mixing pending (claimed) and acknowledged (read by range) entries correctly.
    @Test func seekAcrossPendingAndAcknowledgedEntries() async throws {
        try await RedisTestServer.with { server in
            let t = try await Self.setUp(server, records: 8)
            let a = try await t.subscribe(topic: Self.topic, group: "g", memberID: "a")
            let r = try await a.poll(maxRecords: 100)
            try await a.commit([0: Offset(4)], generation: r.generation)
            try await a.seek(0, to: Offset(2))
            var got: [ConsumedRecord] = []
            for _ in 0..<4 { got += try await a.poll(maxRecords: 100).records }
            #expect(Self.offsets(got) == Array(2..<8))
            #expect(try await Self.pending(t).map(\.offset) == Array(4..<8))
        }
    }

    @Test func consumerGroupRepliesAreDecodedDefensively() throws {
        var gen = ReplyGenerator(rng: SeededRandom(seed: 91))
        for _ in 0..<3000 {
            let reply = gen.tree(depth: 4)
            for decode in [
                { try RedisStreamsSubscription.decodeReadGroup(reply, topic: "t", partition: 0).count },
                { try RedisStreamsSubscription.decodeAutoClaim(reply, topic: "t", partition: 0).count },
                { Int(try RedisStreamsSubscription.lastDelivered(reply, group: "g")) },
                { try RedisStreamsSubscription.checkCreateGroup(reply); return 0 },
            ] as [() throws -> Int] {
                do { _ = try decode() } catch is ExactlyOnceError {} catch { Issue.record("foreign error \(error)") }
            }
        }
        let s = { (t: String) in RedisReply.string(Array(t.utf8)) }
        let entry = { (id: String) in RedisReply.array([s(id), .array([s("p"), s("x")])]) }
        // Redis 7: [cursor, entries, deleted ids]; Redis 6.2: deleted entries as nil.
        let claimed = try RedisStreamsSubscription.decodeAutoClaim(.array([s("0-0"), .array([entry("0-2"), .null, entry("0-4")]), .array([s("0-3")])]), topic: "t", partition: 0)
        #expect(Self.offsets(claimed) == [1, 3])
        let unordered = #expect(throws: ExactlyOnceError.self) {
            try RedisStreamsSubscription.decodeAutoClaim(.array([s("0-0"), .array([entry("0-4"), entry("0-2")])]), topic: "t", partition: 0)
        }
        #expect(unordered?.code == .storeUnavailable)
        #expect(try RedisStreamsSubscription.decodeReadGroup(.null, topic: "t", partition: 0).isEmpty)
        #expect(Self.offsets(try RedisStreamsSubscription.decodeReadGroup(.array([.array([s("k"), .array([entry("0-1")])])]), topic: "t", partition: 0)) == [0])
        #expect(try RedisStreamsSubscription.lastDelivered(.array([.array([s("name"), s("g"), s("last-delivered-id"), s("0-7")])]), group: "g") == 7)
        #expect(try RedisStreamsSubscription.lastDelivered(.array([.array([s("name"), s("other"), s("last-delivered-id"), s("0-7")])]), group: "g") == 0)
        #expect(throws: ExactlyOnceError.self) { try RedisStreamsSubscription.checkCreateGroup(.error("WRONGTYPE Operation against a key")) }
        try RedisStreamsSubscription.checkCreateGroup(.error("BUSYGROUP Consumer Group name already exists"))
    }
}
