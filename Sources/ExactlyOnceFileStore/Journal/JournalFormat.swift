import ExactlyOnce

/// The journal's byte layout (Docs/FileStore.md has the same description).
///
/// Format version 2 (written by this build):
/// ```
/// segment  := header snapshot-record* end-record log-record*
/// header   := magic "EXONCEJ\0" (8) | version u32 (=2) | flags u32 (=0) | generation u64 |
///             records hint u64 | state hint u64 | crc32c of the previous 40 bytes u32 |
///             reserved u32                                                      (48 bytes)
/// record   := length u32 | sequence u64 | header check u32 | crc u32 | payload  (20 + length)
///   header check = crc32c(domain u64 | length | sequence)
///   crc          = crc32c(domain u64 | length | sequence | payload)
///   domain       = the generation for snapshot records (sequence bit 63 set), 0 for log records
/// payload  := change count u32 | change*
/// change   := 1 record | 2 removed | 3 state | 4 fence | 5 token | 6 end   (tag u8, then fields)
/// ```
/// Snapshot records are numbered `1 << 63 | 0, 1, 2, ...` in their segment; the last one (the
/// *end record*) carries the token high-water mark and an end change (`next sequence u64 |
/// snapshot records u64`) and makes the segment complete. Log records are numbered from the end
/// record's next sequence on, one more each, and the numbering continues across generations, so
/// a record that repeats, goes missing or moves is seen on replay.
///
/// Format version 1 (read, and migrated to version 2 when opened): a 32-byte header (`magic |
/// version u32 (=1) | flags u32 | generation u64 | crc32c u32 | reserved u32`) and records
/// `length u32 | crc32c(payload) u32 | payload`, with the same payload encoding but no end record
/// and no sequence numbers.
///
/// Integers are little-endian. One record is one store operation (a claim batch, a batch of
/// completions with their effects, a release, a purge), so an operation is on disk entirely or
/// not at all.
enum JournalFormat {
    static let magic: [UInt8] = Array("EXONCEJ\0".utf8)
    /// The version this build writes.
    static let version: UInt32 = 2
    /// The versions this build reads.
    static let readableVersions: ClosedRange<UInt32> = 1...2
    /// Size of a version 2 header.
    static let headerSize = 48
    /// Size of a version 1 header.
    static let version1HeaderSize = 32
    /// Bytes before a version 2 record's payload.
    static let recordHeaderSize = 20
    /// Bytes before a version 1 record's payload.
    static let version1RecordHeaderSize = 8
    /// The largest payload a record may have; a bigger length on disk is corruption, never an
    /// allocation.
    static let maximumPayload = 64 << 20
    /// Set in the sequence field of snapshot records (the rest is the index in the snapshot).
    static let snapshotBit: UInt64 = 1 << 63
    /// The smallest encoded dedupe-record change and state change, for bounding hints.
    static let minimumRecordChange = 40
    static let minimumStateChange = 18

    // MARK: Header

    struct Header: Equatable {
        var version: UInt32
        var generation: UInt64
        /// Dedupe records and state keys in the segment's snapshot (reservation hints only).
        var recordsHint: UInt64 = 0
        var stateHint: UInt64 = 0
        var size: Int { version == 1 ? JournalFormat.version1HeaderSize : JournalFormat.headerSize }
    }

    static func header(generation: UInt64, recordsHint: Int, stateHint: Int) -> [UInt8] {
        var w = ByteWriter()
        w.bytes(magic)
        w.u32(version)
        w.u32(0)
        w.u64(generation)
        w.u64(UInt64(recordsHint))
        w.u64(UInt64(stateHint))
        let crc = CRC32C.checksum(w.buffer)
        w.u32(crc)
        w.u32(0)
        return w.buffer
    }

    enum HeaderProblem: Error, Equatable { case tooShort, foreign, badChecksum, unsupportedVersion(UInt32) }

    /// Validates a header (`bytes` are the file's first bytes, at most ``headerSize``).
    static func parseHeader(_ bytes: UnsafeRawBufferPointer) throws(HeaderProblem) -> Header {
        guard bytes.count >= 12 else { throw .tooShort }
        guard Array(bytes[0..<8]) == magic else { throw .foreign }
        let version = readU32(bytes, 8)
        guard readableVersions.contains(version) else { throw .unsupportedVersion(version) }
        let size = version == 1 ? version1HeaderSize : headerSize
        guard bytes.count >= size else { throw .tooShort }
        guard CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<(size - 8)])) == readU32(bytes, size - 8) else { throw .badChecksum }
        var header = Header(version: version, generation: readU64(bytes, 16))
        if version >= 2 {
            header.recordsHint = readU64(bytes, 24)
            header.stateHint = readU64(bytes, 32)
        }
        return header
    }

    // MARK: Records

    /// The CRC register after the 8-byte domain of a record: the generation for snapshot
    /// records, zero for log records.
    static func domainRegister(_ domain: UInt64) -> UInt32 {
        withUnsafeBytes(of: domain.littleEndian) { CRC32C.update(CRC32C.initial, $0) }
    }

    static let logDomainRegister = domainRegister(0)

    /// Appends one framed log record holding `changes`, numbered `sequence`, to `out`.
    static func appendLogRecord(_ changes: [DedupeStateMachine.Change], sequence: UInt64, to out: inout [UInt8]) {
        let start = beginRecord(&out)
        var w = ByteWriter(buffer: out)
        out = []
        w.u32(UInt32(changes.count))
        for c in changes { w.change(c) }
        out = w.buffer
        finishRecord(&out, start: start, sequence: sequence, domain: logDomainRegister)
    }

    /// Reserves a record header; returns where the record starts.
    static func beginRecord(_ out: inout [UInt8]) -> Int {
        let start = out.count
        out.append(contentsOf: repeatElement(0, count: recordHeaderSize))
        return start
    }

    /// Fills in the header of the record that starts at `start` and runs to the end of `out`.
    static func finishRecord(_ out: inout [UInt8], start: Int, sequence: UInt64, domain: UInt32) {
        let length = UInt32(out.count - start - recordHeaderSize)
        out.withUnsafeMutableBytes { b in
            storeU32(b, start, length)
            storeU64(b, start + 4, sequence)
            let register = CRC32C.update(domain, UnsafeRawBufferPointer(rebasing: b[start..<(start + 12)]))
            storeU32(b, start + 12, CRC32C.finish(register))
            let crc = CRC32C.update(register, UnsafeRawBufferPointer(rebasing: b[(start + recordHeaderSize)...]))
            storeU32(b, start + 16, CRC32C.finish(crc))
        }
    }

    /// A record header that passed its header check.
    struct RecordHeader {
        var length: Int
        var sequence: UInt64
        var crc: UInt32
        /// The CRC register after the header, to continue over the payload.
        var register: UInt32
        var isSnapshot: Bool { sequence & JournalFormat.snapshotBit != 0 }
    }

    /// Checks the 20 bytes at the start of `b` as a record header (`snapshotRegister` is
    /// ``domainRegister(_:)`` of the segment's generation); fails with the reason when they
    /// cannot be one.
    @inline(__always)
    static func recordHeader(_ b: UnsafeRawBufferPointer, snapshotRegister: UInt32) -> Result<RecordHeader, MalformedPayload> {
        let length = Int(readU32(b, 0))
        guard length >= 4 else { return .failure(MalformedPayload(reason: length == 0 ? "zero-filled record" : "record too short")) }
        guard length <= maximumPayload else { return .failure(MalformedPayload(reason: "record length \(length) exceeds the limit of \(maximumPayload) bytes")) }
        let sequence = readU64(b, 4)
        let domain = sequence & snapshotBit != 0 ? snapshotRegister : logDomainRegister
        let register = CRC32C.update(domain, UnsafeRawBufferPointer(rebasing: b[0..<12]))
        guard CRC32C.finish(register) == readU32(b, 12) else { return .failure(MalformedPayload(reason: "record header checksum mismatch")) }
        return .success(RecordHeader(length: length, sequence: sequence, crc: readU32(b, 16), register: register))
    }

    // MARK: Integers

    @inline(__always)
    static func readU32(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt32 {
        UInt32(littleEndian: b.loadUnaligned(fromByteOffset: at, as: UInt32.self))
    }

    @inline(__always)
    static func readU64(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt64 {
        UInt64(littleEndian: b.loadUnaligned(fromByteOffset: at, as: UInt64.self))
    }

    static func storeU32(_ b: UnsafeMutableRawBufferPointer, _ at: Int, _ v: UInt32) {
        b.storeBytes(of: v.littleEndian, toByteOffset: at, as: UInt32.self)
    }

    static func storeU64(_ b: UnsafeMutableRawBufferPointer, _ at: Int, _ v: UInt64) {
        b.storeBytes(of: v.littleEndian, toByteOffset: at, as: UInt64.self)
    }
}
