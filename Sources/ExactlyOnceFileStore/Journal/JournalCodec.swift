import ExactlyOnce

/// The journal's byte layout (Docs/FileStore.md has the same description).
///
/// ```
/// segment  := header record*
/// header   := magic "EXONCEJ\0" (8) | format version u32 | flags u32 | generation u64 |
///             crc32c of the previous 24 bytes u32 | reserved u32                   (32 bytes)
/// record   := payload length u32 | crc32c(payload) u32 | payload
/// payload  := change count u32 | change*
/// change   := 1 record | 2 removed | 3 state | 4 fence | 5 token     (tag u8, then fields)
/// ```
/// Integers are little-endian. One record is one store operation (a claim batch, a batch of
/// completions with their effects, a release, a purge), so an operation is on disk entirely or
/// not at all.
enum JournalFormat {
    static let magic: [UInt8] = Array("EXONCEJ\0".utf8)
    static let version: UInt32 = 1
    static let headerSize = 32
    static let recordHeaderSize = 8
    /// The largest payload a record may have; a bigger length on disk is corruption.
    static let maximumPayload = 64 << 20

    static func header(generation: UInt64) -> [UInt8] {
        var w = ByteWriter()
        w.bytes(magic)
        w.u32(version)
        w.u32(0)
        w.u64(generation)
        let crc = CRC32C.checksum(w.buffer)
        w.u32(crc)
        w.u32(0)
        return w.buffer
    }

    enum HeaderProblem: Error { case tooShort, foreign, badChecksum, unsupportedVersion(UInt32) }

    /// Validates a header; returns its generation.
    static func parseHeader(_ bytes: UnsafeRawBufferPointer) throws(HeaderProblem) -> UInt64 {
        guard bytes.count >= headerSize else { throw .tooShort }
        guard Array(bytes[0..<8]) == magic else { throw .foreign }
        guard CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<24])) == readU32(bytes, 24) else { throw .badChecksum }
        let version = readU32(bytes, 8)
        guard version == JournalFormat.version else { throw .unsupportedVersion(version) }
        return readU64(bytes, 16)
    }

    static func readU32(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt32 {
        UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24
    }

    static func readU64(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt64 {
        UInt64(readU32(b, at)) | UInt64(readU32(b, at + 4)) << 32
    }

    /// Appends one framed record holding `changes` to `out`.
    static func appendRecord(_ changes: [DedupeStateMachine.Change], token: UInt64?, to out: inout [UInt8]) {
        let start = out.count
        out.append(contentsOf: [0, 0, 0, 0, 0, 0, 0, 0])
        var w = ByteWriter(buffer: out)
        out = []
        w.u32(UInt32(changes.count + (token == nil ? 0 : 1)))
        for c in changes { w.change(c) }
        if let token {
            w.u8(5)
            w.u64(token)
        }
        out = w.buffer
        let length = out.count - start - recordHeaderSize
        let crc = out.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[(start + recordHeaderSize)...])) }
        for i in 0..<4 {
            out[start + i] = UInt8(truncatingIfNeeded: UInt32(length) >> (8 * UInt32(i)))
            out[start + 4 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i)))
        }
    }
}

/// A growing little-endian buffer.
struct ByteWriter {
    var buffer: [UInt8] = []

    mutating func u8(_ v: UInt8) { buffer.append(v) }
    mutating func u16(_ v: UInt16) { buffer.append(UInt8(v & 0xFF)); buffer.append(UInt8(v >> 8)) }
    mutating func u32(_ v: UInt32) {
        buffer.append(UInt8(v & 0xFF)); buffer.append(UInt8((v >> 8) & 0xFF))
        buffer.append(UInt8((v >> 16) & 0xFF)); buffer.append(UInt8(v >> 24))
    }
    mutating func u64(_ v: UInt64) { u32(UInt32(v & 0xFFFF_FFFF)); u32(UInt32(v >> 32)) }
    mutating func bytes(_ b: [UInt8]) { buffer.append(contentsOf: b) }
    /// A length-prefixed (u32) byte string.
    mutating func blob(_ b: [UInt8]) { u32(UInt32(b.count)); buffer.append(contentsOf: b) }
    mutating func string(_ s: String) {
        var s = s
        s.withUTF8 { u32(UInt32($0.count)); buffer.append(contentsOf: $0) }
    }

    mutating func change(_ c: DedupeStateMachine.Change) {
        switch c {
        case .record(let r):
            u8(1)
            string(r.key.rawValue)
            u8(UInt8(r.fingerprint.bytes.count))
            bytes(r.fingerprint.bytes)
            u8(r.phase.rawValue)
            u32(UInt32(clamping: max(0, r.attempts)))
            u64(r.token.rawValue)
            u64(UInt64(bitPattern: r.leaseExpiresAt.milliseconds))
            var flags: UInt8 = 0
            if r.outcome != nil { flags |= 1 }
            if r.expiresAt != nil { flags |= 2 }
            if r.lastFailure != nil { flags |= 4 }
            if r.fence != nil { flags |= 8 }
            u8(flags)
            if let o = r.outcome {
                u8(o.status.rawValue)
                blob(o.detail)
            }
            if let e = r.expiresAt { u64(UInt64(bitPattern: e.milliseconds)) }
            if let f = r.lastFailure { string(f) }
            if let f = r.fence {
                string(f.scope)
                u64(f.epoch)
            }
        case .removed(let k):
            u8(2)
            string(k.rawValue)
        case .state(let key, let value):
            u8(3)
            string(key)
            u64(value.version)
            if let v = value.value {
                u8(1)
                blob(v)
            } else {
                u8(0)
            }
        case .fence(let scope, let epoch):
            u8(4)
            string(scope)
            u64(epoch)
        }
    }
}

/// A change as decoded from the journal: a state-machine change or the token high-water mark.
enum JournalEntry {
    case change(DedupeStateMachine.Change)
    case token(UInt64)
}

/// Why a record's payload did not decode (the record's checksum matched, so this is a bug or
/// deliberate tampering, treated like any other corruption).
struct MalformedPayload: Error {
    var reason: String
}

/// A bounds-checked little-endian reader: every read throws instead of trapping.
struct ByteReader {
    let base: UnsafeRawBufferPointer
    var at: Int
    let end: Int

    init(_ base: UnsafeRawBufferPointer, from: Int, to: Int) {
        self.base = base
        self.at = from
        self.end = to
    }

    mutating func need(_ n: Int) throws(MalformedPayload) {
        guard n >= 0, end - at >= n else { throw MalformedPayload(reason: "truncated field at byte \(at)") }
    }
    mutating func u8() throws(MalformedPayload) -> UInt8 {
        try need(1)
        defer { at += 1 }
        return base[at]
    }
    mutating func u32() throws(MalformedPayload) -> UInt32 {
        try need(4)
        defer { at += 4 }
        return JournalFormat.readU32(base, at)
    }
    mutating func u64() throws(MalformedPayload) -> UInt64 {
        try need(8)
        defer { at += 8 }
        return JournalFormat.readU64(base, at)
    }
    mutating func bytes(_ n: Int) throws(MalformedPayload) -> [UInt8] {
        try need(n)
        defer { at += n }
        return Array(UnsafeRawBufferPointer(rebasing: base[at..<(at + n)]))
    }
    mutating func blob() throws(MalformedPayload) -> [UInt8] { try bytes(Int(try u32())) }
    mutating func string() throws(MalformedPayload) -> String {
        let n = Int(try u32())
        try need(n)
        defer { at += n }
        let slice = UnsafeRawBufferPointer(rebasing: base[at..<(at + n)])
        guard let s = String(validating: slice.bindMemory(to: UInt8.self), as: UTF8.self) else {
            throw MalformedPayload(reason: "invalid UTF-8 at byte \(at)")
        }
        return s
    }

    mutating func entry() throws(MalformedPayload) -> JournalEntry {
        let tag = try u8()
        switch tag {
        case 1:
            let key = try key()
            let fpCount = Int(try u8())
            guard let fingerprint = try? PayloadFingerprint(bytes: try bytes(fpCount)) else { throw MalformedPayload(reason: "bad fingerprint") }
            guard let phase = DedupeRecord.Phase(rawValue: try u8()) else { throw MalformedPayload(reason: "bad phase") }
            let attempts = Int(try u32())
            let token = FencingToken(try u64())
            let lease = Timestamp(milliseconds: Int64(bitPattern: try u64()))
            let flags = try u8()
            guard flags & ~0x0F == 0 else { throw MalformedPayload(reason: "unknown record flags \(flags)") }
            var record = DedupeRecord(key: key, fingerprint: fingerprint, phase: phase, attempts: attempts, token: token, leaseExpiresAt: lease)
            if flags & 1 != 0 {
                let status = Outcome.Status(rawValue: try u8())
                record.outcome = Outcome(status: status, detail: try blob())
            }
            if flags & 2 != 0 { record.expiresAt = Timestamp(milliseconds: Int64(bitPattern: try u64())) }
            if flags & 4 != 0 { record.lastFailure = try string() }
            if flags & 8 != 0 {
                let scope = try string()
                record.fence = PartitionFence(scope: scope, epoch: try u64())
            }
            return .change(.record(record))
        case 2:
            return .change(.removed(try key()))
        case 3:
            let key = try string()
            let version = try u64()
            switch try u8() {
            case 0: return .change(.state(key: key, value: VersionedValue(value: nil, version: version)))
            case 1: return .change(.state(key: key, value: VersionedValue(value: try blob(), version: version)))
            default: throw MalformedPayload(reason: "bad state value flag")
            }
        case 4:
            let scope = try string()
            return .change(.fence(scope: scope, epoch: try u64()))
        case 5:
            return .token(try u64())
        default:
            throw MalformedPayload(reason: "unknown change tag \(tag)")
        }
    }

    mutating func key() throws(MalformedPayload) -> IdempotencyKey {
        let raw = try string()
        guard let key = try? IdempotencyKey(rawValue: raw) else { throw MalformedPayload(reason: "invalid idempotency key") }
        return key
    }
}
