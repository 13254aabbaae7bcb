import ExactlyOnce
import ExactlyOnceTestKit
import TestSupport
import Testing
@testable import ExactlyOnceRedis

@Suite("Redis Streams transport", .serialized, .timeLimit(.minutes(1)))
struct RedisStreamsTransportTests {
    static func transport(_ server: RedisTestServer, clock: any WallClock = SystemWallClock(), prefix: String) throws -> RedisStreamsTransport {
        var c = RedisStreamsTransport.Configuration(redis: server.unixConfiguration)
        c.keyPrefix = prefix
        return try RedisStreamsTransport(configuration: c, clock: clock)
    }

    @Test func passesTransportConformance() async throws {
        try await RedisTestServer.with { server in
            var n = 0
            try await TransportConformance.run { topic, partitions in
                n += 1
                let t = try Self.transport(server, prefix: "conformance-\(n):")
                try await t.createTopic(topic, partitions: partitions)
                return t
            }
        }
    }

    /// Two transport objects stand for two processes: they share one group through Redis, split
    /// the partitions, and a member whose session lapsed loses its partitions (with new epochs)
    /// and can no longer commit.
    @Test func membersInTwoProcessesSplitAndFailOver() async throws {
        try await RedisTestServer.with { server in
            let clock = ManualClock()
            let one = try Self.transport(server, clock: clock, prefix: "procs:")
            let two = try Self.transport(server, clock: clock, prefix: "procs:")
            try await one.createTopic("coupons", partitions: 4)
            try await two.createTopic("coupons", partitions: 4)
            for i in 0..<8 { _ = try await one.publish(OutgoingRecord(key: Array("\(i)".utf8), payload: [UInt8(i)], headers: ["h": "v\(i)"]), to: "coupons", partitioning: .modulo) }
            let a = try await one.subscribe(topic: "coupons", group: "g", memberID: "a")
            let b = try await two.subscribe(topic: "coupons", group: "g", memberID: "b")
            let pa = try await a.poll(maxRecords: 100)
            let pb = try await b.poll(maxRecords: 100)
            #expect(Set(pa.assignment.keys).isDisjoint(with: pb.assignment.keys))
            #expect(pa.assignment.count == 2 && pb.assignment.count == 2)
            #expect(pa.records.count + pb.records.count == 8)
            #expect((pa.records + pb.records).allSatisfy { $0.headers["h"] == "v\(Int($0.payload[0]))" && $0.key == Array("\(Int($0.payload[0]))".utf8) })
            #expect(pa.generation == pb.generation)

            // b stops polling; after its session lapses, a takes everything over with new epochs.
            clock.advance(by: .seconds(11))
            let taken = try await a.poll(maxRecords: 100)
            #expect(taken.assignment.count == 4)
            for (p, epoch) in pb.assignment { #expect(taken.assignment[p]! > epoch) }
            // b's records were never committed: a reads them again from the start.
            #expect(Set(taken.records.map(\.partition)) == Set(pb.assignment.keys))
            let zombie = await #expect(throws: ExactlyOnceError.self) {
                try await b.commit([pb.assignment.keys.first!: Offset(1)], generation: pb.generation)
            }
            #expect(zombie?.code == .staleGeneration)
            try await a.commit(taken.endOffsets, generation: taken.generation)
            for (p, end) in taken.endOffsets { #expect(try await a.committedOffset(p) == end) }
        }
    }

    @Test func unknownTopicAndBadPartitionCounts() async throws {
        try await RedisTestServer.with { server in
            let t = try Self.transport(server, prefix: "errors:")
            let unknown = await #expect(throws: ExactlyOnceError.self) { try await t.partitionCount(of: "nope") }
            #expect(unknown?.code == .unknownTopic && unknown?.isRetriable == false)
            try await t.createTopic("x", partitions: 2)
            let mismatch = await #expect(throws: ExactlyOnceError.self) { try await t.createTopic("x", partitions: 3) }
            #expect(mismatch?.code == .invalidConfiguration)
        }
    }

    @Test func streamEntryDecodingRefusesMalformedEntries() throws {
        var gen = ReplyGenerator(rng: SeededRandom(seed: 77))
        for _ in 0..<3000 {
            do {
                let r = try RedisStreamsSubscription.decodeEntry(gen.tree(depth: 3), topic: "t", partition: 0)
                #expect(r.offset.rawValue >= 0)
            } catch is ExactlyOnceError {
            } catch {
                Issue.record("foreign error \(error)")
            }
        }
        let s = { (t: String) in RedisReply.string(Array(t.utf8)) }
        let ok = try RedisStreamsSubscription.decodeEntry(.array([s("0-5"), .array([s("p"), .string([0, 1]), s("h:x"), s("y")])]), topic: "t", partition: 2)
        #expect(ok == ConsumedRecord(topic: "t", partition: 2, offset: Offset(4), key: nil, payload: [0, 1], headers: ["x": "y"]))
    }
}
