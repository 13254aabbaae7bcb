import ExactlyOnce
import ExactlyOnceTestKit
import Foundation
import TestSupport
import Testing
@testable import ExactlyOnceRedis

/// Issue 10 on Redis: the shape of the traffic, from Redis's own counters (`INFO commandstats`).
@Suite("Redis Streams round trips", .serialized, .timeLimit(.minutes(1)))
struct RedisStreamsRoundTripTests {
    /// Calls of each command since `CONFIG RESETSTAT`.
    static func calls(_ client: RedisClient) async throws -> [String: Int] {
        let info = try ReplyDecoding.text(try await client.command("INFO", "commandstats"), "INFO")
        var out: [String: Int] = [:]
        for line in info.split(whereSeparator: \.isNewline) where line.hasPrefix("cmdstat_") {
            let name = line.dropFirst("cmdstat_".count).prefix { $0 != ":" }
            if let r = line.range(of: "calls="), let n = Int(line[r.upperBound...].prefix { $0.isNumber }) { out[String(name)] = n }
        }
        return out
    }

    @Test func batchPublishIsOnePipelinedScriptCallPerChunkAndPollsWaitOnTheServer() async throws {
        try await RedisTestServer.with { server in
            var c = RedisStreamsTransport.Configuration(redis: server.unixConfiguration)
            c.keyPrefix = "rt:"
            let t = try RedisStreamsTransport(configuration: c)
            try await t.createTopic("coupons", partitions: 3)
            let records = (0..<1_000).map { OutgoingRecord(key: Array("\($0 % 7)".utf8), payload: Array("p\($0)".utf8)) }
            _ = try await t.client.command("CONFIG", "RESETSTAT")
            let report = try await t.publish(records, to: "coupons", partitioning: .modulo)
            #expect(report.allAccepted)
            // Per partition: consecutive offsets from 0, in batch order.
            var next: [PartitionID: Int64] = [:]
            for p in report.positions {
                let p = try #require(p)
                #expect(p.offset.rawValue == next[p.partition, default: 0])
                next[p.partition] = p.offset.rawValue + 1
            }
            var stats = try await Self.calls(t.client)
            #expect(stats["eval"] == nil, "no full script body is sent")
            #expect(stats["get"] == nil, "the partition count is cached")
            // 1,000 records over 3 partitions in chunks of 256: at most 6 script calls.
            #expect((stats["evalsha"] ?? 0) <= 6)
            #expect(stats["xadd"] == 1_000)

            let sub = try await t.subscribe(topic: "coupons", group: "g", memberID: "m")
            var got = 0
            while got < 1_000 { got += try await sub.poll(maxRecords: 512, maxWait: .milliseconds(100)).records.count }
            _ = try await t.client.command("CONFIG", "RESETSTAT")
            // An empty poll waits on the server (one blocking XREADGROUP), it does not spin.
            let clock = ContinuousClock()
            let start = clock.now
            let empty = try await sub.poll(maxRecords: 512, maxWait: .milliseconds(400))
            #expect(empty.records.isEmpty)
            #expect(clock.now - start >= .milliseconds(350))
            stats = try await Self.calls(t.client)
            #expect((stats["xreadgroup"] ?? 0) <= 2, "\(stats)")
            #expect(stats["eval"] == nil)
        }
    }

    /// A chunk that fails makes the rest of its partition's records not accepted; other
    /// partitions are unaffected (per partition, the accepted records are a prefix).
    @Test func aFailedChunkReportsTheRestOfItsPartitionNotAccepted() async throws {
        try await RedisTestServer.with { server in
            var c = RedisStreamsTransport.Configuration(redis: server.unixConfiguration)
            c.keyPrefix = "fail:"
            c.publishChunk = 2
            let t = try RedisStreamsTransport(configuration: c)
            try await t.createTopic("coupons", partitions: 2)
            // Partition 1's offset counter is not a number: its script calls fail.
            _ = try await t.client.command("SET", "fail:t:coupons:1:seq", "not-a-number")
            let records = (0..<10).map { OutgoingRecord(key: nil, payload: [UInt8($0)]) }
            let report = try await t.publish(records, to: "coupons", partitioning: .explicit(PartitionID(1)))
            #expect(report.acceptedCount == 0)
            #expect(report.failure != nil)
            let mixed = try await t.publish(records.prefix(4).map { $0 }, to: "coupons", partitioning: .explicit(PartitionID(0)))
            #expect(mixed.allAccepted)
        }
    }
}
