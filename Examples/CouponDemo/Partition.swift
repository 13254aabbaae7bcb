import ArgumentParser
import ExactlyOnce
import Foundation

/// `coupon-demo partition`: which partition a producer puts each key in.
struct PartitionCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "partition",
        abstract: "Map keys (one a line on standard input) to partitions; prints key<TAB>partition lines.",
        discussion: "murmur2 is Kafka's default partitioner, bit for bit (Java client, librdkafka, kcat agree); modulo is couponId % partitions.")

    enum Kind: String, ExpressibleByArgument, CaseIterable {
        case modulo, murmur2
    }

    @Option(help: "The partitioner.")
    var partitioner: Kind

    @Option(help: "The number of partitions.")
    var partitions: Int

    func validate() throws {
        guard partitions > 0 else { throw ValidationError("--partitions needs a positive integer, got \(partitions)") }
    }

    func run() throws {
        let p: any Partitioner = partitioner == .modulo ? ModuloPartitioner() : Murmur2Partitioner()
        var failures = 0
        var out = ""
        while let line = readLine(strippingNewline: true) {
            let key = line.hasSuffix("\r") ? String(line.dropLast()) : line
            do {
                let partition = try p.partition(forKey: Array(key.utf8), partitionCount: partitions)
                out += "\(key)\t\(partition.rawValue)\n"
                if out.utf8.count > 1 << 16 {
                    FileHandle.standardOutput.write(Data(out.utf8))
                    out = ""
                }
            } catch let e as ExactlyOnceError {
                failures += 1
                let shown = key.utf8.count > 64 ? String(decoding: key.utf8.prefix(40), as: UTF8.self) + "…" : key
                FileHandle.standardError.write(Data("coupon-demo partition: line \(shown): \(e.message)\n".utf8))
            }
        }
        FileHandle.standardOutput.write(Data(out.utf8))
        if failures > 0 { throw ExitCode(1) }
    }
}
