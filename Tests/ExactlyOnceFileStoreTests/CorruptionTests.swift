import ExactlyOnce
@testable import ExactlyOnceFileStore
import Foundation
import Testing

/// Damaged journals: a torn tail is cut and reported, damage in the middle is a clear error
/// that changes nothing (or, with salvage, is dropped and reported), a foreign or broken
/// header is refused. Nothing ever crashes.
@Suite("File store corruption", .serialized, .timeLimit(.minutes(3)))
struct CorruptionTests {
    /// A journal with `n` completed keys, closed cleanly; returns the bytes and where each log
    /// record starts (after the snapshot section: a new journal's end record).
    static func journal(_ dir: TempDirectory, keys n: Int64) async throws -> (bytes: [UInt8], recordStarts: [Int]) {
        let store = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
        try await issue(store, 0..<n)
        await store.close()
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: dir.journal)))
        return (bytes, JournalLayout(bytes).logRecords.map(\.lowerBound))
    }

    static func write(_ bytes: [UInt8], to path: String) throws {
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    static func open(_ dir: TempDirectory, salvage: Bool = false) async throws -> FileDedupeStore {
        var c = FileStoreConfiguration(directory: dir.path)
        c.salvage = salvage
        return try await FileDedupeStore.open(c)
    }

    /// Every operation is a claim record then a completion record; 10 keys = 20 records.
    @Test func truncationAtEveryByteOfTheLastRecordIsATornTail() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let (bytes, starts) = try await Self.journal(dir, keys: 10)
        let last = starts.last!
        for cut in last..<bytes.count {
            try Self.write(Array(bytes[..<cut]), to: dir.journal)
            let store = try await Self.open(dir)
            #expect(store.recovery.truncatedTailBytes == cut - last, "cut at \(cut)")
            #expect(store.recovery.journalRecords == starts.count - 1)
            // The last completion is gone, everything before it is there.
            #expect(try await counterValue(store) == 9)
            #expect(store.count == 10, "the tenth key's claim is there, in progress")
            await store.close()
            // The cut was made durable: the file now ends at the last good record.
            #expect(try Data(contentsOf: URL(fileURLWithPath: dir.journal)).count == last)
        }
    }

    @Test(arguments: ["zeros", "garbage"])
    func tailsOfZerosOrGarbageAreCutAndReported(kind: String) async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let (bytes, starts) = try await Self.journal(dir, keys: 10)
        var rng = SystemRandomNumberGenerator()
        let tail: [UInt8] = kind == "zeros" ? Array(repeating: 0, count: 4096) : (0..<4096).map { _ in UInt8.random(in: 0...255, using: &rng) }
        try Self.write(bytes + tail, to: dir.journal)
        let store = try await Self.open(dir)
        #expect(store.recovery.truncatedTailBytes == 4096)
        #expect(store.recovery.tailProblem != nil)
        #expect(store.recovery.journalRecords == starts.count)
        #expect(try await counterValue(store) == 10)
        try await issue(store, 10..<12)
        await store.close()
        let again = try await Self.open(dir)
        #expect(again.recovery.truncatedTailBytes == 0)
        #expect(try await counterValue(again) == 12)
        await again.close()
    }

    /// A flipped bit anywhere in a record in the middle: a clear error naming the offset, and
    /// the file is left exactly as it was.
    @Test func flippedBitsInTheMiddleAreRefusedAndTouchNothing() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let (bytes, starts) = try await Self.journal(dir, keys: 10)
        let victim = starts[5]
        let end = starts[6]
        for offset in victim..<end {
            for bit in [0, 3, 7] {
                var damaged = bytes
                damaged[offset] ^= UInt8(1 << bit)
                try Self.write(damaged, to: dir.journal)
                let error = await #expect(throws: ExactlyOnceError.self, "byte \(offset) bit \(bit)") { try await Self.open(dir) }
                #expect(error?.code == .corruptData)
                #expect(error?.message.contains("byte \(victim)") == true, "\(String(describing: error))")
                #expect(try [UInt8](Data(contentsOf: URL(fileURLWithPath: dir.journal))) == damaged, "nothing was changed")
            }
        }
    }

    /// Salvage drops the damaged record, reports the range, rewrites a clean journal, and keeps
    /// everything else.
    @Test func salvageDropsTheDamagedRecordAndReportsIt() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let (bytes, starts) = try await Self.journal(dir, keys: 10)
        var damaged = bytes
        damaged[starts[7] + 10] ^= 0xFF  // the completion of key 3 (records: claim, complete, ...)
        try Self.write(damaged, to: dir.journal)
        let store = try await Self.open(dir, salvage: true)
        #expect(store.recovery.salvagedRanges == [starts[7]..<starts[8]])
        #expect(store.recovery.journalRecords == starts.count - 1)
        let records = try await store.records(for: (0..<10).map(key))
        #expect(records[key(3)]?.phase == .inProgress, "key 3's completion was in the dropped bytes")
        #expect(records.values.filter { $0.phase == .completed }.count == 9)
        await store.close()
        let again = try await Self.open(dir)
        #expect(again.recovery.salvagedRanges.isEmpty && again.recovery.truncatedTailBytes == 0, "salvage rewrote a clean journal")
        #expect(again.count == 10)
        await again.close()
    }

    @Test func foreignMissingOrDamagedHeadersAreRefused() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let (bytes, _) = try await Self.journal(dir, keys: 2)
        var wrongVersion = bytes
        wrongVersion[8] = 9
        let crc = CRC32C.checksum(Array(wrongVersion[0..<24]))
        for i in 0..<4 { wrongVersion[24 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
        var badChecksum = bytes
        badChecksum[20] ^= 1
        let cases: [(String, [UInt8], String)] = [
            ("empty", [], "shorter than a journal header"),
            ("short", Array(bytes[0..<10]), "shorter than a journal header"),
            ("foreign", Array("SQLite format 3\0".utf8) + Array(repeating: 0, count: 100), "foreign"),
            ("version", wrongVersion, "format version"),
            ("checksum", badChecksum, "damaged header"),
        ]
        for (name, content, phrase) in cases {
            try Self.write(content, to: dir.journal)
            let error = await #expect(throws: ExactlyOnceError.self, "\(name)") { try await Self.open(dir) }
            #expect(error?.code == .corruptData, "\(name)")
            #expect(error?.message.contains(phrase) == true, "\(name): \(String(describing: error))")
            #expect(try [UInt8](Data(contentsOf: URL(fileURLWithPath: dir.journal))) == content, "\(name): nothing was changed")
        }
    }

    /// Records whose checksum matches but whose content is nonsense (an absurd length, a bad
    /// tag, truncated fields) are corruption, never a crash or a huge allocation.
    @Test func wellChecksummedNonsenseIsCorruptionNotACrash() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let (bytes, _) = try await Self.journal(dir, keys: 2)
        var rng = SystemRandomNumberGenerator()
        for trial in 0..<300 {
            let size = Int.random(in: 4...64, using: &rng)
            var payload = (0..<size).map { _ in UInt8.random(in: 0...255, using: &rng) }
            if trial % 2 == 0 { payload[0] = 1; payload[1] = 0; payload[2] = 0; payload[3] = 0; if size > 4 { payload[4] = UInt8(trial % 7) } }
            let layout = JournalLayout(bytes)
            var framed = ByteWriter()
            framed.buffer = JournalLayout.frame(payload, sequence: layout.nextSequence)
            try Self.write(bytes + framed.buffer, to: dir.journal)
            // At the tail, an undecodable record is a torn tail (cut), a valid one is kept, and
            // one that decodes to something out of place (a second end record) is refused.
            do {
                let store = try await Self.open(dir)
                #expect(store.recovery.truncatedTailBytes == 0 || store.recovery.truncatedTailBytes == framed.buffer.count)
                await store.close()
            } catch let e as ExactlyOnceError {
                #expect(e.code == .corruptData, "\(e)")
            }
        }
        // An absurd length in the middle, with a valid record after it: refused.
        var framed = ByteWriter()
        framed.u32(0xFFFF_FFF0)
        framed.u32(0)
        let layout = JournalLayout(bytes)
        let last = layout.logRecords.last!
        // The absurd length, then an intact record in its right place.
        let following = JournalLayout.frame(Array(bytes[(last.lowerBound + JournalFormat.recordHeaderSize)..<last.upperBound]), sequence: layout.nextSequence)
        try Self.write(bytes + framed.buffer + following, to: dir.journal)
        let error = await #expect(throws: ExactlyOnceError.self) { try await Self.open(dir) }
        #expect(error?.code == .corruptData)
    }

    @Test func crc32cMatchesKnownVectors() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(CRC32C.checksum([]) == 0)
    }
}
