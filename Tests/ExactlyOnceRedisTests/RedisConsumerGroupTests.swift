import ExactlyOnce
import ExactlyOnceTestKit
import Testing
@testable import ExactlyOnceRedis

/// The Redis consumer-group side of the Streams transport, checked directly in Redis: reads go
/// through `XREADGROUP`, a commit `XACK`s the finished prefix, a new owner takes a dead or
/// zombie member's pending entries over with `XAUTOCLAIM`, and a stale member acknowledges
/// nothing.
@Suite("Redis Streams consumer groups", .serialized, .timeLimit(.minutes(1)))
struct RedisConsumerGroupTests {
    static let stream = Array("cg:t:coupons:0".utf8)

    /// Pending entries of the group on the partition's stream: (offset, consumer).
    static func pending(_ server: RedisTestServer) throws -> [(Int64, String)] {
        let c = try RedisConnection.connect(server.unixConfiguration)
        let reply = try c.command([Array("XPENDING".utf8), stream, Array("g".utf8), Array("-".utf8), Array("+".utf8), Array("1000".utf8)])
        return try ReplyDecoding.array(reply, "XPENDING").map { e in
            let f = try ReplyDecoding.array(e, "entry", atLeast: 2)
            let id = try ReplyDecoding.text(f[0], "id")
            return (Int64(id.dropFirst(2))! - 1, try ReplyDecoding.text(f[1], "consumer"))
        }
    }

    static func setUp(_ server: RedisTestServer, clock: ManualClock, records: Int) async throws -> RedisStreamsTransport {
        var c = RedisStreamsTransport.Configuration(redis: server.unixConfiguration)
        c.keyPrefix = "cg:"
        let t = try RedisStreamsTransport(configuration: c, clock: clock)
        try await t.createTopic("coupons", partitions: 1)
        for i in 0..<records { _ = try await t.publish(OutgoingRecord(key: nil, payload: [UInt8(i)]), to: "coupons", partitioning: .explicit(PartitionID(0))) }
        return t
    }

    @Test func commitAcknowledgesTheFinishedPrefix() async throws {
        try await RedisTestServer.with { server in
            let t = try await Self.setUp(server, clock: ManualClock(), records: 10)
            let a = try await t.subscribe(topic: "coupons", group: "g", memberID: "a")
            let poll = try await a.poll(maxRecords: 6)
            #expect(poll.records.map(\.offset.rawValue) == [0, 1, 2, 3, 4, 5])
            #expect(try Self.pending(server).map(\.0) == [0, 1, 2, 3, 4, 5], "read through XREADGROUP: pending under a")
            try await a.commit([PartitionID(0): Offset(4)], generation: poll.generation)
            #expect(try Self.pending(server).map(\.0) == [4, 5], "the finished prefix 0..<4 was acknowledged")
            #expect(try Self.pending(server).allSatisfy { $0.1 == "a" })
        }
    }

    /// A member dies holding pending entries; the next owner claims them (XAUTOCLAIM) and reads
    /// them in order from the committed offset, then new entries; a zombie that grabs entries
    /// after losing the partition leaves a gap the owner notices and claims; the zombie's
    /// commit acknowledges nothing.
    @Test func newOwnerClaimsPendingEntriesAndFillsAZombiesGap() async throws {
        try await RedisTestServer.with { server in
            let clock = ManualClock()
            let t = try await Self.setUp(server, clock: clock, records: 12)
            let a = try await t.subscribe(topic: "coupons", group: "g", memberID: "a")
            let first = try await a.poll(maxRecords: 4)
            #expect(first.records.map(\.offset.rawValue) == [0, 1, 2, 3])
            try await a.commit([PartitionID(0): Offset(2)], generation: first.generation)

            clock.advance(by: .seconds(11))  // a's session lapses
            let b = try await t.subscribe(topic: "coupons", group: "g", memberID: "b")
            let taken = try await b.poll(maxRecords: 4)
            #expect(taken.records.map(\.offset.rawValue) == [2, 3], "a's uncommitted entries, claimed from the committed offset")
            #expect(try Self.pending(server).map(\.1) == ["b", "b"], "XAUTOCLAIM moved them to b")

            // The zombie a reads on (as if its poll raced the rebalance): 4, 5, 6 go pending under a.
            let raw = try RedisConnection.connect(server.unixConfiguration)
            _ = try raw.command(["XREADGROUP", "GROUP", "g", "a", "COUNT", "3", "STREAMS", "cg:t:coupons:0", ">"].map { Array($0.utf8) })
            var seen: [Int64] = taken.records.map(\.offset.rawValue)
            for _ in 0..<6 {
                let p = try await b.poll(maxRecords: 4)
                seen += p.records.map(\.offset.rawValue)
            }
            #expect(seen == Array(2..<12), "b got every entry once, in order, despite the zombie's gap")
            let stale = await #expect(throws: ExactlyOnceError.self) {
                try await a.commit([PartitionID(0): Offset(12)], generation: first.generation)
            }
            #expect(stale?.code == .staleGeneration)
            #expect(try Self.pending(server).count == 10, "the zombie's commit acknowledged nothing")
            let last = try await b.poll(maxRecords: 4)
            try await b.commit([PartitionID(0): Offset(12)], generation: last.generation)
            #expect(try Self.pending(server).isEmpty)
            #expect(try await t.isFullyCommitted(group: "g", topic: "coupons"))
        }
    }

    /// Seeking back re-reads entries the group already acknowledged (XRANGE), then goes on with
    /// new ones.
    @Test func seekBackRereadsAcknowledgedEntries() async throws {
        try await RedisTestServer.with { server in
            let t = try await Self.setUp(server, clock: ManualClock(), records: 8)
            let a = try await t.subscribe(topic: "coupons", group: "g", memberID: "a")
            let p1 = try await a.poll(maxRecords: 5)
            try await a.commit([PartitionID(0): Offset(5)], generation: p1.generation)
            try await a.seek(PartitionID(0), to: Offset(1))
            let p2 = try await a.poll(maxRecords: 8)
            let p3 = try await a.poll(maxRecords: 8)
            #expect((p2.records + p3.records).map(\.offset.rawValue) == [1, 2, 3, 4, 5, 6, 7])
        }
    }
}
