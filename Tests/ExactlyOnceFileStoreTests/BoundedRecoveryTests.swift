import ExactlyOnce
@testable import ExactlyOnceFileStore
import Foundation
import TestSupport
import Testing

/// Recovery in bounded memory and time: journals of 2 GiB and 10 GiB (sparse, made with
/// `ftruncate`, so they cost no disk) are opened in a child process of their own (an
/// allocation failure would kill the child, not the test runner), which reports its peak
/// resident memory before and after the open. Each open must end in seconds, with its peak
/// memory grown by a few MiB at most (not by the file's size), with a correct recovery or a
/// clear error.
@Suite("File store bounded recovery", .serialized, .timeLimit(.minutes(5)))
struct BoundedRecoveryTests {
    static let gib = 1 << 30
    /// Peak memory growth allowed for an open (the read window is 1 MiB; a record at most 64).
    static let allowedGrowthKiB = 96 * 1024

    struct Opened {
        var ok: Bool
        var code: String?
        var message: String?
        var records: Int?
        var counter: Int?
        var truncatedTailBytes: Int?
        var salvageActions: Int?
        var growthKiB: Int
        /// Growth of the peak virtual memory: reservations, touched or not.
        var virtualGrowthKiB: Int
        /// Whether the child could read its peak virtual memory (Linux's `/proc/self/status`).
        var virtualPeakKnown: Bool
        var seconds: Double
    }

    /// Opens the store in `dir` in a child process.
    static func openInChild(_ dir: TempDirectory, salvage: Bool = false) async throws -> Opened? {
        let child = try ChildProcess(ChildProcess.builtProduct("FileStoreCrashChild"), ["open", dir.path] + (salvage ? ["salvage"] : []),
                                     name: "bounded-open")
        let status = await child.wait(timeout: .seconds(120))
        #expect(status == 0 && !child.wasSignalled, "the child must end normally (status \(status)): \(child.stderr)")
        guard status == 0, let line = child.stdout.split(separator: "\n").last,
              let json = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
            Issue.record("no report from the child: \(child.stdout) \(child.stderr)")
            return nil
        }
        let before = json["peakKiBBefore"] as? Int ?? 0
        let after = json["peakKiBAfter"] as? Int ?? Int.max
        return Opened(ok: json["ok"] as? Bool ?? false, code: json["code"] as? String, message: json["message"] as? String,
                      records: json["records"] as? Int, counter: json["counter"] as? Int,
                      truncatedTailBytes: json["truncatedTailBytes"] as? Int, salvageActions: json["salvageActions"] as? Int,
                      growthKiB: after - before,
                      virtualGrowthKiB: (json["peakVirtualKiBAfter"] as? Int ?? Int.max) - (json["peakVirtualKiBBefore"] as? Int ?? 0),
                      virtualPeakKnown: (json["peakVirtualKiBBefore"] as? Int ?? -1) > 0,
                      seconds: json["seconds"] as? Double ?? .infinity)
    }

    static func setSize(_ path: String, _ size: Int) throws {
        let fd = open(path, O_RDWR)
        #expect(fd >= 0)
        defer { close(fd) }
        #expect(ftruncate(fd, off_t(size)) == 0)
    }

    static func write(_ bytes: [UInt8], at offset: Int, to path: String) throws {
        let fd = open(path, O_RDWR)
        #expect(fd >= 0)
        defer { close(fd) }
        let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
        #expect(n == bytes.count)
    }

    static func size(_ path: String) throws -> Int {
        (try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? -1
    }

    /// A journal of 10 keys followed by a sparse tail of zeros up to 2 GiB / 10 GiB: a correct
    /// recovery (the zeros hold nothing: cut as a torn tail), in bounded memory and time.
    @Test(arguments: [2, 10])
    func aSparseTailOfGibibytesIsCutInBoundedMemory(gib: Int) async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let (bytes, _) = try await CorruptionTests.journal(dir, keys: 10)
        try Self.setSize(dir.journal, gib * Self.gib)
        guard let opened = try await Self.openInChild(dir) else { return }
        #expect(opened.ok, "\(String(describing: opened.message))")
        #expect(opened.records == 10 && opened.counter == 10)
        #expect(opened.truncatedTailBytes == gib * Self.gib - bytes.count)
        #expect(opened.growthKiB < Self.allowedGrowthKiB, "peak memory grew by \(opened.growthKiB) KiB opening a \(gib) GiB journal")
        #expect(opened.seconds < 30, "opened in \(opened.seconds) s")
        #expect(try Self.size(dir.journal) == bytes.count, "the journal was cut back to its records")
    }

    /// A hole of gibibytes in the middle, with an intact record after it: a clear error naming
    /// the offsets (nothing changed), in bounded memory and time; salvage drops the hole.
    @Test(arguments: [2, 10])
    func aSparseHoleOfGibibytesInTheMiddleIsAClearError(gib: Int) async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let (bytes, _) = try await CorruptionTests.journal(dir, keys: 10)
        let layout = JournalLayout(bytes)
        let last = layout.logRecords.last!
        let after = JournalLayout.frame(JournalLayout.payload(bytes, last), sequence: layout.nextSequence)
        let total = gib * Self.gib
        try Self.setSize(dir.journal, total)
        try Self.write(after, at: total - after.count, to: dir.journal)
        guard let opened = try await Self.openInChild(dir) else { return }
        #expect(!opened.ok && opened.code == "corruptData")
        #expect(opened.message?.contains("byte \(bytes.count)") == true && opened.message?.contains("byte \(total - after.count)") == true,
                "\(String(describing: opened.message))")
        #expect(opened.growthKiB < Self.allowedGrowthKiB, "peak memory grew by \(opened.growthKiB) KiB")
        #expect(opened.seconds < 30)
        #expect(try Self.size(dir.journal) == total, "nothing was changed")

        guard let salvaged = try await Self.openInChild(dir, salvage: true) else { return }
        #expect(salvaged.ok && salvaged.records == 10 && salvaged.counter == 10, "\(String(describing: salvaged.message))")
        #expect(salvaged.salvageActions == 1)
        #expect(salvaged.growthKiB < Self.allowedGrowthKiB)
        #expect(try Self.size(dir.journal) < 1 << 20, "salvage rewrote a compact journal")
    }

    /// A 10 GiB file that is nothing but a hole, as the only journal: a clear error (an
    /// incomplete journal with nothing to fall back to), never an allocation or a new sale.
    @Test func aTenGibibyteHoleAsTheOnlyJournalIsAClearError() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let path = JournalCore.segmentPath(dir.path, 3)
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        try Self.setSize(path, 10 * Self.gib)
        guard let opened = try await Self.openInChild(dir) else { return }
        #expect(!opened.ok && opened.code == "corruptData")
        #expect(opened.message?.contains("incomplete") == true, "\(String(describing: opened.message))")
        #expect(opened.growthKiB < Self.allowedGrowthKiB)
        #expect(try Self.size(path) == 10 * Self.gib)
    }

    /// A header whose reservation hints are absurd (2^40 records) reserves what the file's
    /// bytes could hold at most, not what the header says.
    @Test func absurdHintsInAHeaderAreNotTakenOnTrust() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        var (bytes, _) = try await CorruptionTests.journal(dir, keys: 10)
        bytes.replaceSubrange(0..<JournalFormat.headerSize, with: JournalFormat.header(generation: 1, recordsHint: 1 << 40, stateHint: 1 << 40))
        try CorruptionTests.write(bytes, to: dir.journal)
        guard let opened = try await Self.openInChild(dir) else { return }
        #expect(opened.ok && opened.records == 10, "\(String(describing: opened.message))")
        #expect(opened.growthKiB < Self.allowedGrowthKiB)
    }

    /// The same absurd hint in front of a journal whose bytes are really there (a dense tail of
    /// zeros, 512 MiB, which by their size alone could hold 30 M records): recovery reserves a
    /// bounded index, not one sized by the file. Peak *virtual* memory is checked, since an
    /// untouched reservation is not resident but is what fails and aborts on a large file.
    @Test func absurdHintsBeforeADenseFileReserveABoundedIndex() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        var (bytes, _) = try await CorruptionTests.journal(dir, keys: 10)
        bytes.replaceSubrange(0..<JournalFormat.headerSize, with: JournalFormat.header(generation: 1, recordsHint: 1 << 40, stateHint: 1 << 40))
        try CorruptionTests.write(bytes, to: dir.journal)
        let tail = 512 << 20
        let zeros = [UInt8](repeating: 0, count: 4 << 20)
        for at in stride(from: bytes.count, to: bytes.count + tail, by: zeros.count) {
            try Self.write(zeros, at: at, to: dir.journal)
        }
        guard let opened = try await Self.openInChild(dir) else { return }
        #expect(opened.ok && opened.records == 10 && opened.counter == 10, "\(String(describing: opened.message))")
        #expect(opened.truncatedTailBytes == tail)
        #expect(opened.growthKiB < Self.allowedGrowthKiB, "peak memory grew by \(opened.growthKiB) KiB")
        #expect(opened.virtualPeakKnown, "the child read its peak virtual memory")
        // About 0.3 GiB here (thread stacks, malloc arenas, a bounded index); the file's size
        // taken as the index's would reserve about 12 GiB.
        #expect(opened.virtualGrowthKiB < 1024 * 1024, "peak virtual memory grew by \(opened.virtualGrowthKiB) KiB opening a dense 512 MiB journal")
    }
}
