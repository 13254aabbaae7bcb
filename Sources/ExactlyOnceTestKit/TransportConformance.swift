import ExactlyOnce

/// The transport conformance suite: every transport must pass it. It checks the contract on
/// ``MessageTransport``: positions, ordering, group assignment, epochs, committed offsets,
/// redelivery and refusal of stale commits.
///
/// `makeTransport(topic, partitions)` must return a transport where `topic` exists with
/// `partitions` partitions and holds no records or groups. Each check gets a fresh one.
public enum TransportConformance {
    /// The names of all checks, in the order they run.
    public static let checks = ["publish-positions", "single-member-reads-all", "resume-from-commit", "split-and-epochs", "stale-commit-refused", "seek-rereads"]

    /// Runs every check.
    public static func run<T: MessageTransport>(makeTransport: (String, Int) async throws -> T) async throws {
        for check in checks {
            let topic = "conf-\(check)"
            try await run(check, transport: try await makeTransport(topic, 3), topic: topic)
        }
    }

    static func rec(_ s: String, key: String? = nil) -> OutgoingRecord {
        OutgoingRecord(key: key.map { Array($0.utf8) }, payload: Array(s.utf8))
    }

    /// Polls until `count` records arrived or `maxPolls` polls were made.
    static func drain(_ sub: some TransportSubscription, count: Int, maxPolls: Int = 200) async throws -> ([ConsumedRecord], PollResult?) {
        var out: [ConsumedRecord] = []
        var last: PollResult?
        var polls = 0
        while out.count < count && polls < maxPolls {
            let r = try await sub.poll(maxRecords: 100)
            out += r.records
            last = r
            polls += 1
            if r.records.isEmpty { try await Task.sleep(for: .milliseconds(2)) }
        }
        return (out, last)
    }

    static func run<T: MessageTransport>(_ check: String, transport: T, topic: String) async throws {
        switch check {
        case "publish-positions":
            try require(try await transport.partitionCount(of: topic) == 3, check, "partition count")
            var last: [PartitionID: Offset] = [:]
            for i in 0..<30 {
                let pos = try await transport.publish(rec("r\(i)", key: "\(i % 7)"), to: topic, partitioning: .modulo)
                try require(pos.partition == PartitionID((i % 7) % 3), check, "modulo partition of key \(i % 7) should be \((i % 7) % 3), got \(pos.partition)")
                if let prev = last[pos.partition] { try require(pos.offset > prev, check, "offsets must grow within a partition") }
                last[pos.partition] = pos.offset
            }
            let explicit = try await transport.publish(rec("x"), to: topic, partitioning: .explicit(2))
            try require(explicit.partition == 2, check, "explicit partition ignored")
            do {
                _ = try await transport.publish(rec("y"), to: topic, partitioning: .explicit(3))
                throw ConformanceFailure(check: check, detail: "publishing to partition 3 of 3 must fail")
            } catch let e as ExactlyOnceError {
                try require(e.code == .invalidPartition, check, "out-of-range partition should be invalidPartition, got \(e)")
            }

        case "single-member-reads-all":
            for i in 0..<20 { _ = try await transport.publish(rec("r\(i)"), to: topic, partitioning: .explicit(PartitionID(i % 3))) }
            let sub = try await transport.subscribe(topic: topic, group: "g", memberID: "m1")
            let (got, last) = try await drain(sub, count: 20)
            try require(got.count == 20, check, "expected 20 records, got \(got.count)")
            try require(last?.assignment.count == 3, check, "a lone member owns all 3 partitions")
            for p in 0..<3 {
                let payloads = got.filter { $0.partition == PartitionID(p) }.map { String(decoding: $0.payload, as: UTF8.self) }
                let expected = stride(from: p, to: 20, by: 3).map { "r\($0)" }
                try require(payloads == expected, check, "partition \(p) order: expected \(expected), got \(payloads)")
            }
            try await sub.close()

        case "resume-from-commit":
            for i in 0..<10 { _ = try await transport.publish(rec("r\(i)"), to: topic, partitioning: .explicit(0)) }
            let sub = try await transport.subscribe(topic: topic, group: "g", memberID: "m1")
            let (got, last) = try await drain(sub, count: 10)
            try require(got.count == 10, check, "expected 10 records, got \(got.count)")
            try await sub.commit([0: Offset(4)], generation: last!.generation)
            try require(try await sub.committedOffset(0) == Offset(4), check, "committed offset not stored")
            try await sub.close()
            let sub2 = try await transport.subscribe(topic: topic, group: "g", memberID: "m2")
            let (again, _) = try await drain(sub2, count: 6)
            try require(again.map(\.offset.rawValue) == Array(4..<10), check, "after a restart, records after the commit are redelivered in order; got \(again.map(\.offset.rawValue))")
            try await sub2.close()

        case "split-and-epochs":
            let a = try await transport.subscribe(topic: topic, group: "g", memberID: "a")
            let (_, ra) = try await drain(a, count: 0, maxPolls: 1)
            let before = ra?.assignment ?? [:]
            let b = try await transport.subscribe(topic: topic, group: "g", memberID: "b")
            var assignA: [PartitionID: UInt64] = [:]
            var assignB: [PartitionID: UInt64] = [:]
            for _ in 0..<20 {
                assignA = try await a.poll(maxRecords: 10).assignment
                assignB = try await b.poll(maxRecords: 10).assignment
                if assignA.count + assignB.count == 3 && !assignA.isEmpty && !assignB.isEmpty { break }
                try await Task.sleep(for: .milliseconds(5))
            }
            try require(Set(assignA.keys).isDisjoint(with: assignB.keys), check, "two members own one partition")
            try require(assignA.count + assignB.count == 3 && !assignB.isEmpty, check, "partitions must be split over both members: \(assignA.keys.sorted()) / \(assignB.keys.sorted())")
            for (p, epoch) in assignB { if let old = before[p] { try require(epoch > old, check, "a moved partition needs a greater epoch (\(old) -> \(epoch))") } }
            try await a.close()
            try await b.close()

        case "stale-commit-refused":
            for i in 0..<6 { _ = try await transport.publish(rec("r\(i)"), to: topic, partitioning: .explicit(PartitionID(i % 3))) }
            let a = try await transport.subscribe(topic: topic, group: "g", memberID: "a")
            let (_, ra) = try await drain(a, count: 6)
            let oldGeneration = ra!.generation
            try await a.close()
            let b = try await transport.subscribe(topic: topic, group: "g", memberID: "b")
            _ = try await drain(b, count: 6)
            do {
                try await a.commit([0: Offset(2)], generation: oldGeneration)
                throw ConformanceFailure(check: check, detail: "a member that left must not commit")
            } catch let e as ExactlyOnceError {
                try require(e.code == .staleGeneration, check, "expected staleGeneration, got \(e)")
            }
            try require(try await b.committedOffset(0) == nil, check, "refused commit must not be stored")
            try await b.close()

        case "seek-rereads":
            for i in 0..<5 { _ = try await transport.publish(rec("r\(i)"), to: topic, partitioning: .explicit(1)) }
            let a = try await transport.subscribe(topic: topic, group: "g", memberID: "a")
            let (got, _) = try await drain(a, count: 5)
            try require(got.count == 5, check, "expected 5 records")
            try await a.seek(1, to: Offset(2))
            let (again, _) = try await drain(a, count: 3)
            try require(again.map(\.offset.rawValue) == [2, 3, 4], check, "seek should re-read from offset 2, got \(again.map(\.offset.rawValue))")
            try await a.close()

        default:
            throw ConformanceFailure(check: check, detail: "unknown check")
        }
    }
}
