import ExactlyOnce

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

    /// The token high-water mark (tag 5).
    mutating func token(_ token: UInt64) {
        u8(5)
        u64(token)
    }

    /// The end of a snapshot (tag 6): where the log's numbering continues, and how many
    /// snapshot records came before this one.
    mutating func end(nextSequence: UInt64, snapshotRecords: UInt64) {
        u8(6)
        u64(nextSequence)
        u64(snapshotRecords)
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

/// What one record holds, as decoded: state-machine changes, and the token high-water mark and
/// snapshot end when present. Reused from record to record.
struct RecordContents {
    var changes: [DedupeStateMachine.Change] = []
    var token: UInt64?
    var end: (nextSequence: UInt64, snapshotRecords: UInt64)?

    mutating func reset() {
        changes.removeAll(keepingCapacity: true)
        token = nil
        end = nil
    }
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
        let slice = UnsafeRawBufferPointer(rebasing: base[at..<(at + n)]).bindMemory(to: UInt8.self)
        // ASCII (every key the coupon demo writes) needs no validation beyond the check.
        if Self.isASCII(slice) { return String(decoding: slice, as: UTF8.self) }
        guard let s = String(validating: slice, as: UTF8.self) else {
            throw MalformedPayload(reason: "invalid UTF-8 at byte \(at)")
        }
        return s
    }

    @inline(__always)
    static func isASCII(_ b: UnsafeBufferPointer<UInt8>) -> Bool {
        var i = 0
        let raw = UnsafeRawBufferPointer(b)
        while i + 8 <= b.count {
            if raw.loadUnaligned(fromByteOffset: i, as: UInt64.self) & 0x8080_8080_8080_8080 != 0 { return false }
            i += 8
        }
        while i < b.count {
            if b[i] & 0x80 != 0 { return false }
            i += 1
        }
        return true
    }

    /// Decodes a whole payload (`change count u32 | change*`) into `contents`. An end change
    /// (format version 2 only) must be the last change of its record.
    mutating func payload(into contents: inout RecordContents, version: UInt32) throws(MalformedPayload) {
        let count = Int(try u32())
        guard count <= end - at else { throw MalformedPayload(reason: "change count \(count) exceeds the record") }
        contents.changes.reserveCapacity(count)
        for i in 0..<count {
            let tag = try u8()
            switch tag {
            case 1: contents.changes.append(.record(try record()))
            case 2: contents.changes.append(.removed(try key()))
            case 3:
                let key = try string()
                let version = try u64()
                switch try u8() {
                case 0: contents.changes.append(.state(key: key, value: VersionedValue(value: nil, version: version)))
                case 1: contents.changes.append(.state(key: key, value: VersionedValue(value: try blob(), version: version)))
                default: throw MalformedPayload(reason: "bad state value flag")
                }
            case 4:
                let scope = try string()
                contents.changes.append(.fence(scope: scope, epoch: try u64()))
            case 5:
                contents.token = max(contents.token ?? 0, try u64())
            case 6 where version >= 2:
                guard i == count - 1 else { throw MalformedPayload(reason: "a snapshot end that is not the record's last change") }
                contents.end = (try u64(), try u64())
            default:
                throw MalformedPayload(reason: "unknown change tag \(tag)")
            }
        }
        guard at == end else { throw MalformedPayload(reason: "trailing bytes in record") }
    }

    mutating func record() throws(MalformedPayload) -> DedupeRecord {
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
        return record
    }

    mutating func key() throws(MalformedPayload) -> IdempotencyKey {
        let raw = try string()
        guard let key = try? IdempotencyKey(rawValue: raw) else { throw MalformedPayload(reason: "invalid idempotency key") }
        return key
    }
}
