@testable import ExactlyOnceFileStore

/// Where the records of a (format version 2) journal file are, for tests that damage, move or
/// forge them.
struct JournalLayout {
    /// Byte ranges of the snapshot records (the end record last).
    var snapshotRecords: [Range<Int>] = []
    /// Byte ranges of the log records, and their sequence numbers.
    var logRecords: [Range<Int>] = []
    var logSequences: [UInt64] = []
    /// The sequence number the next log record would get.
    var nextSequence: UInt64 = 1

    init(_ bytes: [UInt8]) {
        var at = JournalFormat.headerSize
        bytes.withUnsafeBytes { b in
            while at + JournalFormat.recordHeaderSize <= b.count {
                let length = Int(JournalFormat.readU32(b, at))
                let sequence = JournalFormat.readU64(b, at + 4)
                let end = at + JournalFormat.recordHeaderSize + length
                guard length >= 4, end <= b.count else { break }
                if sequence & JournalFormat.snapshotBit != 0 {
                    snapshotRecords.append(at..<end)
                    // The end record: token (9 bytes) then end (tag, next u64, count u64).
                    if b[end - 17] == 6 { nextSequence = JournalFormat.readU64(b, end - 16) }
                } else {
                    logRecords.append(at..<end)
                    logSequences.append(sequence)
                    nextSequence = sequence + 1
                }
                at = end
            }
        }
    }

    /// A well-formed log record holding `payload`, numbered `sequence`.
    static func frame(_ payload: [UInt8], sequence: UInt64) -> [UInt8] {
        var out: [UInt8] = []
        let start = JournalFormat.beginRecord(&out)
        out += payload
        JournalFormat.finishRecord(&out, start: start, sequence: sequence, domain: JournalFormat.logDomainRegister)
        return out
    }

    /// The payload of the record in `range`.
    static func payload(_ bytes: [UInt8], _ range: Range<Int>) -> [UInt8] {
        Array(bytes[(range.lowerBound + JournalFormat.recordHeaderSize)..<range.upperBound])
    }
}
