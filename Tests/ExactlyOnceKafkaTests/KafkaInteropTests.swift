import CouponKit
import ExactlyOnce
import Foundation
import TestSupport
import Testing
@testable import ExactlyOnceKafka

/// `kcat` (librdkafka's command-line client), run as a child process: these tests fail, not
/// skip, when it is missing (`scripts/install-deps.sh test` installs it).
enum Kcat {
    struct Missing: Error, CustomStringConvertible {
        var description: String {
            "kcat is not installed (looked in PATH, /usr/bin, /usr/local/bin, /opt/homebrew/bin). "
                + "Install it: scripts/install-deps.sh test, or apt-get install -y kcat (brew install kcat)."
        }
    }

    struct Failed: Error, CustomStringConvertible {
        var arguments: [String]
        var status: Int32
        var stderr: String
        var description: String { "kcat \(arguments.joined(separator: " ")) exited with \(status): \(stderr)" }
    }

    /// Runs kcat with `arguments` (and `stdin`) to its exit, off the cooperative pool; returns
    /// its standard output, or throws when it exits with a failure.
    static func run(_ arguments: [String], stdin: String? = nil) async throws -> String {
        guard let kcat = ChildProcess.which("kcat") else { throw Missing() }
        let (status, out, err) = try await ChildProcess.run(kcat, arguments, stdin: stdin, timeout: .seconds(60))
        guard status == 0 else { throw Failed(arguments: arguments, status: status, stderr: err) }
        return out
    }

    /// One message as `kcat -C -J` prints it.
    struct Message {
        var partition: Int
        var offset: Int64
        var key: String?
        var payload: String?
        var headers: [String: String]
    }

    /// Reads every message of `topic` from the beginning to the current end (`-C -e -J`).
    static func consume(topic: String, bootstrap: String) async throws -> [Message] {
        let out = try await run(["-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q", "-J"])
        return try out.split(separator: "\n").map { line in
            let any = try JSONSerialization.jsonObject(with: Data(line.utf8))
            guard let o = any as? [String: Any], let p = o["partition"] as? Int, let off = (o["offset"] as? NSNumber)?.int64Value else {
                throw SaleFailure(description: "unexpected kcat -J line: \(line)")
            }
            var headers: [String: String] = [:]
            if let h = o["headers"] as? [Any] {  // [name, value, name, value, ...]
                var i = 0
                while i + 1 < h.count {
                    if let n = h[i] as? String { headers[n] = h[i + 1] as? String ?? "" }
                    i += 2
                }
            }
            return Message(partition: p, offset: off, key: o["key"] as? String, payload: o["payload"] as? String, headers: headers)
        }
    }
}

@Suite("Kafka interop with kcat", .timeLimit(.minutes(2)))
struct KafkaInteropTests {
    /// kcat publishes coupon requests keyed by coupon id, with Java's partitioner (murmur2): each
    /// lands on the partition ``Murmur2Partitioner`` gives its key, and the library's consumer
    /// issues them first come, first served.
    @Test func kcatPublishesAndTheConsumerIssues() async throws {
        let sale = try KafkaSale(seed: 21, clickCount: 400, cluster: SharedMock.cluster)
        // key:payload lines, the key the coupon id (kcat's default partitioner is consistent_random).
        let lines = sale.clicks.map { "\(String(decoding: $0.recordKey, as: UTF8.self)):\(String(decoding: $0.payload, as: UTF8.self))\n" }
        let scratch = try ScratchDirectory("eo-kcat")
        defer { scratch.cleanup() }
        let input = scratch.url.appendingPathComponent("clicks.txt")
        try lines.joined().write(to: input, atomically: true, encoding: .utf8)
        _ = try await Kcat.run(["-P", "-b", sale.cluster.bootstrapServers, "-t", sale.topic, "-K:", "-H", "source=kcat",
                                "-X", "partitioner=murmur2_random", "-X", "enable.idempotence=true", "-l", input.path])
        let members = try [sale.startMember("a"), sale.startMember("b")]
        try await sale.awaitDrained()
        await KafkaSale.stop(members)

        // Every click is in the log once, in the partition murmur2 gives its key, in kcat's order.
        let log = try await sale.log()
        let murmur = Murmur2Partitioner()
        for p in 0..<KafkaSale.partitions {
            let pid = PartitionID(p)
            let expected = try sale.clicks.filter { try murmur.partition(forKey: $0.recordKey, partitionCount: KafkaSale.partitions) == pid }
            let got = log[pid] ?? []
            #expect(got.map { String(decoding: $0.payload, as: UTF8.self) } == expected.map { String(decoding: $0.payload, as: UTF8.self) },
                    "partition \(p) does not hold its keys' clicks in kcat's order")
            #expect(got.allSatisfy { $0.headers == ["source": "kcat"] }, "kcat's header did not arrive")
        }
        #expect(log.values.filter { !$0.isEmpty }.count == KafkaSale.partitions, "the coupons do not spread over every partition")
        try await sale.audit(publishedHere: false)
    }

    /// The library's producer publishes keyed records with headers; kcat reads them back from the
    /// same partitions and offsets, with payloads and headers intact.
    @Test func kcatReadsWhatTheLibraryPublishes() async throws {
        let topic = try SharedMock.topic("interop-read", partitions: 3)
        let transport = try KafkaTransport(configuration: SharedMock.configuration())
        let keys = ["alpha", "beta", "gamma", "delta", "epsilon", "ζήτα", "coupon:42"]
        var records: [OutgoingRecord] = []
        for i in 0..<60 {
            let key = keys[i % keys.count]
            var headers = ["seq": "\(i)", "content-type": "text/plain; charset=utf-8"]
            if i % 5 == 0 { headers = [:] }
            if i % 7 == 0 { headers["trace"] = "00-\(i)-ü" }
            records.append(OutgoingRecord(key: Array(key.utf8), payload: Array("payload \(i) of \(key), with spaces: ✓".utf8), headers: headers))
        }
        let report = try await transport.publish(records, to: topic, partitioning: .murmur2)
        #expect(report.allAccepted)
        let positions = report.positions.compactMap { $0 }
        try #require(positions.count == records.count)

        let messages = try await Kcat.consume(topic: topic, bootstrap: SharedMock.cluster.bootstrapServers)
        #expect(messages.count == records.count)
        let byPosition = Dictionary(messages.map { (RecordPosition(partition: PartitionID($0.partition), offset: Offset($0.offset)), $0) },
                                    uniquingKeysWith: { a, _ in a })
        let murmur = Murmur2Partitioner()
        var partitionOfKey: [String: Int] = [:]
        for (r, pos) in zip(records, positions) {
            let key = String(decoding: r.key ?? [], as: UTF8.self)
            #expect(try murmur.partition(forKey: r.key ?? [], partitionCount: 3) == pos.partition)
            guard let m = byPosition[pos] else {
                Issue.record("kcat did not read \(key) at \(pos)")
                continue
            }
            #expect(m.key == key)
            #expect(m.payload == String(decoding: r.payload, as: UTF8.self))
            #expect(m.headers == r.headers, "headers of \(pos): kcat read \(m.headers), published \(r.headers)")
            if let p = partitionOfKey[key] { #expect(p == m.partition, "key \(key) in partitions \(p) and \(m.partition)") }
            partitionOfKey[key] = m.partition
        }
        #expect(Set(partitionOfKey.values).count > 1, "every key in one partition: the check says little")
    }
}
