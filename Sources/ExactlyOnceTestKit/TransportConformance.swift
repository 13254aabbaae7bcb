import ExactlyOnce

/// The transport conformance suite: every transport must pass it. It checks the contract on
/// `MessageTransport`: positions, ordering, group assignment, epochs, committed offsets,
/// redelivery and refusal of stale commits.
///
/// `makeTransport(topic, partitions)` must return a transport where `topic` exists with
/// `partitions` partitions and holds no records or groups. Each check gets a fresh one.
public enum TransportConformance {
    /// The names of all checks, in the order they run.
    public static let checks = [
        "publish-positions", "batch-publish", "unknown-topic", "single-member-reads-all", "resume-from-commit", "split-and-epochs",
        "stale-commit-refused", "seek-rereads", "poll-waits", "partition-status", "read-outside-group", "fencing-scope",
    ]

    /// Runs every check. Each check's topic is `topicPrefix` + the check's name (a transport on
    /// a shared cluster passes a prefix of its own, so runs do not meet).
    public static func run<T: MessageTransport>(makeTransport: (String, Int) async throws -> T, topicPrefix: String = "conf-") async throws {
        for check in checks {
            let topic = topicPrefix + check
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
            let r = try await sub.poll(maxRecords: 100, maxWait: .milliseconds(20))
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

        case "batch-publish":
            let batch = (0..<40).map { rec("b\($0)", key: "\($0 % 5)") }
            let report = try await transport.publish(batch, to: topic, partitioning: .modulo)
            try require(report.allAccepted && report.positions.count == 40, check, "every record of a batch is accepted: \(report.acceptedCount)/40, \(String(describing: report.failure))")
            var last: [PartitionID: Offset] = [:]
            for (i, pos) in report.positions.enumerated() {
                guard let pos else { continue }
                try require(pos.partition == PartitionID((i % 5) % 3), check, "batch record \(i) in partition \(pos.partition)")
                if let prev = last[pos.partition] { try require(pos.offset > prev, check, "offsets grow within a partition in batch order") }
                last[pos.partition] = pos.offset
            }
            let sub = try await transport.subscribe(topic: topic, group: "g", memberID: "m1")
            let (got, _) = try await drain(sub, count: 40)
            for p in 0..<3 {
                let payloads = got.filter { $0.partition == PartitionID(p) }.map { String(decoding: $0.payload, as: UTF8.self) }
                let expected = (0..<40).filter { ($0 % 5) % 3 == p }.map { "b\($0)" }
                try require(payloads == expected, check, "partition \(p) holds the batch in order: \(payloads)")
            }
            try await sub.close()
            // A batch with a record that cannot be partitioned is refused whole, before anything is sent.
            let ends = try await transport.partitionStatus(group: "g", topic: topic).map(\.end)
            do {
                _ = try await transport.publish([rec("ok", key: "1"), rec("no key")], to: topic, partitioning: .modulo)
                throw ConformanceFailure(check: check, detail: "a batch with an unpartitionable record must be refused")
            } catch let e as ExactlyOnceError {
                try require(e.code == .invalidKey, check, "expected invalidKey, got \(e)")
            }
            let after = try await transport.partitionStatus(group: "g", topic: topic).map(\.end)
            try require(after == ends, check, "a refused batch publishes nothing: \(ends) -> \(after)")

        case "unknown-topic":
            for attempt in ["partitionCount", "publish", "subscribe"] {
                do {
                    switch attempt {
                    case "partitionCount": _ = try await transport.partitionCount(of: topic + "-missing")
                    case "publish": _ = try await transport.publish(rec("x"), to: topic + "-missing", partitioning: .explicit(0))
                    default: _ = try await transport.subscribe(topic: topic + "-missing", group: "g", memberID: "m")
                    }
                    throw ConformanceFailure(check: check, detail: "\(attempt) on a missing topic must fail")
                } catch let e as ExactlyOnceError {
                    try require(e.code == .unknownTopic && !e.isRetriable, check, "\(attempt): expected unknownTopic (not retriable), got \(e)")
                }
            }

        case "poll-waits":
            let sub = try await transport.subscribe(topic: topic, group: "g", memberID: "m1")
            for _ in 0..<50 {
                let r = try await sub.poll(maxRecords: 10, maxWait: .milliseconds(20))
                if r.assignment.count == 3 { break }
            }
            // Nothing to read: the poll waits (about) its maxWait and returns empty.
            let clock = ContinuousClock()
            let t0 = clock.now
            let empty = try await sub.poll(maxRecords: 10, maxWait: .milliseconds(300))
            let waited = clock.now - t0
            try require(empty.records.isEmpty, check, "nothing was published")
            try require(waited >= .milliseconds(150), check, "an empty poll waits for records up to maxWait (returned after \(waited))")
            // A record published during the wait ends it early.
            let waiting = Task { () -> (Int, Duration) in
                let start = clock.now
                var n = 0
                while n == 0 && clock.now - start < .seconds(120) {
                    n += try await sub.poll(maxRecords: 10, maxWait: .seconds(60)).records.count
                }
                return (n, clock.now - start)
            }
            try await Task.sleep(for: .milliseconds(100))
            _ = try await transport.publish(rec("wake"), to: topic, partitioning: .explicit(0))
            let (n, took) = try await waiting.value
            try require(n == 1 && took < .seconds(30), check, "a publish ends a 60 s wait early: \(n) record(s) after \(took)")
            try await sub.close()

        case "partition-status":
            for i in 0..<5 { _ = try await transport.publish(rec("r\(i)"), to: topic, partitioning: .explicit(0)) }
            let sub = try await transport.subscribe(topic: topic, group: "g", memberID: "m1")
            let (got, last) = try await drain(sub, count: 5)
            try require(got.count == 5, check, "expected 5 records")
            try await sub.commit([0: Offset(3)], generation: last!.generation)
            let status = try await transport.partitionStatus(group: "g", topic: topic)
            try require(status.map(\.partition) == [0, 1, 2], check, "one status per partition, in order: \(status.map(\.partition))")
            let p0 = status[0]
            try require(p0.committed == Offset(3) && p0.end == Offset(5) && p0.lag == 2, check, "partition 0: committed 3, end 5, lag 2; got \(p0)")
            try require(status[1].committed == nil && status[1].lag == 0, check, "an untouched partition has no commit and no lag: \(status[1])")
            if let owner = p0.owner { try require(owner == "m1", check, "owner of partition 0 is m1, got \(owner)") }
            try await sub.close()

        case "read-outside-group":
            for i in 0..<5 { _ = try await transport.publish(rec("r\(i)", key: "k"), to: topic, partitioning: .explicit(1)) }
            let some = try await transport.read(topic: topic, partition: 1, from: Offset(2), maxRecords: 2)
            try require(some.map(\.offset.rawValue) == [2, 3], check, "read from 2, two records: \(some.map(\.offset.rawValue))")
            try require(some.map { String(decoding: $0.payload, as: UTF8.self) } == ["r2", "r3"] && some.allSatisfy { $0.key == Array("k".utf8) }, check, "payloads and keys intact")
            let end = try await transport.read(topic: topic, partition: 1, from: Offset(5), maxRecords: 10)
            try require(end.isEmpty, check, "nothing after the end")
            let status = try await transport.partitionStatus(group: "nobody", topic: topic)
            try require(status.allSatisfy { $0.committed == nil }, check, "reading joins no group and commits nothing")

        case "fencing-scope":
            let a = try await transport.subscribe(topic: topic, group: "g", memberID: "a")
            let b = try await transport.subscribe(topic: topic, group: "g", memberID: "b")
            let other = try await transport.subscribe(topic: topic, group: "g2", memberID: "a")
            try require(!a.fencingScope.isEmpty && a.fencingScope == b.fencingScope, check, "members of one group share a fencing scope: \(a.fencingScope) / \(b.fencingScope)")
            try require(a.fencingScope != other.fencingScope, check, "another group is another scope")
            try await a.close()
            try await b.close()
            try await other.close()

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
            // Brokers rebalance in their own time (Kafka's cooperative protocol takes two rounds of
            // joins): poll both members for up to 30 s, or 20 rounds, whichever is longer.
            let clock = ContinuousClock()
            let start = clock.now
            var rounds = 0
            while rounds < 20 || clock.now - start < .seconds(30) {
                rounds += 1
                assignA = try await a.poll(maxRecords: 10, maxWait: rounds > 20 ? .milliseconds(20) : .zero).assignment
                assignB = try await b.poll(maxRecords: 10, maxWait: rounds > 20 ? .milliseconds(20) : .zero).assignment
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
