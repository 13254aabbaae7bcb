import ExactlyOnce

/// Replays one journal segment into a state machine, streaming it through a ``JournalReader``
/// and checking, record by record, that each one is intact (header check, checksum, decodable)
/// and in its place (the next snapshot index, then the next log sequence number).
///
/// - An intact record out of place (repeated, moved, or after a gap) is corruption wherever it
///   is, the end of the file included: no crash writes one.
/// - A damaged record with no intact record anywhere after it is a torn tail (a crash during a
///   write); with an intact record after it, corruption in the middle.
/// - A segment whose snapshot never reached its end record, with nothing intact after the
///   break, is *incomplete*: a compaction that did not finish. The caller falls back to the
///   older generation.
struct SegmentScanner {
    let reader: JournalReader
    let path: String
    let generation: UInt64
    let salvage: Bool
    var machine: DedupeStateMachine
    var report = RecoveryReport()
    /// The sequence number of the last log record replayed.
    var lastSequence: UInt64 = 0
    private let snapshotRegister: UInt32
    /// Where the index next considers growing.
    private var nextGrowthCheck = SegmentScanner.growthInterval
    static let growthInterval = 8 << 20

    enum Outcome: Equatable {
        /// The segment ends at `validEnd` (anything after it is a torn tail).
        case complete(validEnd: Int)
        /// The segment's snapshot never ended.
        case incomplete(validEnd: Int, reason: String)
    }

    init(reader: JournalReader, path: String, generation: UInt64, salvage: Bool, machine: DedupeStateMachine) {
        self.reader = reader
        self.path = path
        self.generation = generation
        self.salvage = salvage
        self.machine = machine
        self.snapshotRegister = JournalFormat.domainRegister(generation)
    }

    // MARK: Index growth

    /// Grows the index ahead of replay, so it is not rehashed at every doubling: every 8 MiB,
    /// room for what the rest of the file would hold at the density seen so far, but never
    /// more than four times what the index holds now. Memory stays bounded by the live records
    /// (a garbage or sparse file reserves nothing), however large the file.
    private mutating func growIndex(at offset: Int) {
        nextGrowthCheck = offset + Self.growthInterval
        let total = min(reader.size, max(reader.allocatedBytes, offset))
        guard offset > 0, total > offset else { return }
        func target(_ count: Int) -> Int {
            let estimate = Int((Double(count) * Double(total) / Double(offset) * 1.1).rounded(.up))
            return min(estimate, 4 * count)
        }
        machine.reserveCapacity(records: target(machine.records.count), state: target(machine.state.count))
    }

    // MARK: Version 2

    private enum Placement {
        case inPlace
        /// Behind what was expected (a repeat, a record moved back, a record of the wrong
        /// section): salvage drops it.
        case behind(String)
        /// Ahead of what was expected: records are missing before it, or it was moved forward.
        case ahead(String, missing: Range<UInt64>?)
    }

    mutating func scanVersion2(from start: Int) throws -> Outcome {
        var at = start
        var inSnapshot = true
        var expected: UInt64 = JournalFormat.snapshotBit  // the next sequence number
        var contents = RecordContents()
        while at < reader.size {
            if at >= nextGrowthCheck { growIndex(at: at) }
            let (header, next): (JournalFormat.RecordHeader, Int)
            switch try readRecord(at: at, into: &contents) {
            case .success(let read):
                (header, next) = read
            case .failure(let problem):
                if let q = try nextIntactRecord(after: at) {
                    guard salvage else {
                        throw ExactlyOnceError(.corruptData, """
                            journal \(path) is corrupt at byte \(at) (\(problem.reason)) and intact records follow at byte \(q); \
                            nothing was changed. Restore the directory from a backup, or open with salvage to drop bytes \(at)..<\(q) \
                            (operations recorded there may be processed again)
                            """)
                    }
                    drop(at..<q, reason: problem.reason)
                    at = q
                    continue
                }
                report.truncatedTailBytes = reader.size - at
                report.tailProblem = problem.reason
                if inSnapshot {
                    return .incomplete(validEnd: at, reason: "its snapshot breaks off at byte \(at) (\(problem.reason)) before the end record")
                }
                return .complete(validEnd: at)
            }

            switch placement(header, contents, inSnapshot: inSnapshot, expected: expected) {
            case .inPlace:
                break
            case .behind(let why):
                guard salvage else { throw misplaced(at, why) }
                drop(at..<next, reason: why)
                at = next
                continue
            case .ahead(let why, let missing):
                guard salvage else { throw misplaced(at, why) }
                // Moved forward (the expected record comes right after it): drop this one.
                // Otherwise the records in between are lost: report the gap and go on.
                if try intactSequence(at: next) == expected {
                    drop(at..<next, reason: why + " (moved: the expected record follows it)")
                    at = next
                    continue
                }
                report.salvageActions.append(RecoveryReport.SalvageAction(bytes: at..<at, missingSequences: missing, reason: why))
            }

            apply(&contents, snapshot: header.isSnapshot)
            if let end = contents.end {
                inSnapshot = false
                expected = end.nextSequence
                lastSequence = end.nextSequence - 1
            } else if header.isSnapshot && inSnapshot {
                expected = header.sequence &+ 1
            } else {
                // (inSnapshot here: salvage accepted a log record where the end record belonged.)
                inSnapshot = false
                expected = header.sequence + 1
                lastSequence = header.sequence
            }
            at = next
        }
        if inSnapshot {
            return .incomplete(validEnd: at, reason: at == start ? "it holds only a header" : "its snapshot has no end record")
        }
        return .complete(validEnd: at)
    }

    private func misplaced(_ at: Int, _ why: String) -> ExactlyOnceError {
        ExactlyOnceError(.corruptData, """
            journal \(path) has an intact record out of place at byte \(at): \(why); nothing was changed. \
            Restore the directory from a backup, or open with salvage to drop what is out of place \
            (operations recorded there may be processed again)
            """)
    }

    private func placement(_ h: JournalFormat.RecordHeader, _ contents: RecordContents, inSnapshot: Bool, expected: UInt64) -> Placement {
        let bit = JournalFormat.snapshotBit
        if inSnapshot {
            let expectedIndex = expected & ~bit
            guard h.isSnapshot else {
                return .ahead("log record \(h.sequence) where snapshot record \(expectedIndex) or the snapshot's end record was expected", missing: nil)
            }
            let index = h.sequence & ~bit
            if let end = contents.end, end.nextSequence == 0 || end.nextSequence >= bit {
                return .behind("the end record names an impossible next sequence \(end.nextSequence)")
            }
            if index < expectedIndex { return .behind("snapshot record \(index) repeated or moved (snapshot record \(expectedIndex) was expected)") }
            if index > expectedIndex { return .ahead("snapshot records \(expectedIndex)..<\(index) are missing", missing: nil) }
            if let end = contents.end, end.snapshotRecords != index {
                return .behind("the end record counts \(end.snapshotRecords) snapshot records but is record \(index)")
            }
            return .inPlace
        }
        if h.isSnapshot { return .behind("snapshot record \(h.sequence & ~bit) after the snapshot's end record") }
        if contents.end != nil { return .behind("a second end record (sequence \(h.sequence))") }
        if h.sequence < expected { return .behind("record \(h.sequence) repeated or moved back (record \(expected) was expected)") }
        if h.sequence > expected { return .ahead("records \(expected)..<\(h.sequence) are missing", missing: expected..<h.sequence) }
        return .inPlace
    }

    /// Replays a record's changes, moving them out of `contents` (emptied, its storage kept).
    private mutating func apply(_ contents: inout RecordContents, snapshot: Bool = false) {
        report.changes += contents.changes.count
        // In order, each change moved (not copied) into the index: reverse, then pop.
        contents.changes.reverse()
        while let c = contents.changes.popLast() { machine.replay(c) }
        if let t = contents.token { machine.raiseLastToken(to: t) }
        if snapshot { report.snapshotRecords += 1 } else { report.journalRecords += 1 }
    }

    private mutating func drop(_ bytes: Range<Int>, reason: String) {
        report.salvagedRanges.append(bytes)
        report.salvageActions.append(RecoveryReport.SalvageAction(bytes: bytes, missingSequences: nil, reason: reason))
    }

    /// Reads and decodes the version 2 record at `at`; returns its header and where it ends.
    private func readRecord(at: Int, into contents: inout RecordContents) throws -> Result<(JournalFormat.RecordHeader, Int), MalformedPayload> {
        guard let hb = try reader.bytes(at: at, count: JournalFormat.recordHeaderSize) else {
            return .failure(MalformedPayload(reason: "partial record header (\(reader.size - at) bytes)"))
        }
        let header: JournalFormat.RecordHeader
        switch JournalFormat.recordHeader(hb, snapshotRegister: snapshotRegister) {
        case .failure(let p): return .failure(p)
        case .success(let h): header = h
        }
        let start = at + JournalFormat.recordHeaderSize
        guard let body = try reader.bytes(at: start, count: header.length) else {
            return .failure(MalformedPayload(reason: "partial record (\(reader.size - start) of \(header.length) bytes)"))
        }
        guard CRC32C.finish(CRC32C.update(header.register, body)) == header.crc else {
            return .failure(MalformedPayload(reason: "checksum mismatch"))
        }
        contents.reset()
        var r = ByteReader(body, from: 0, to: body.count)
        do throws(MalformedPayload) {
            try r.payload(into: &contents, version: 2)
        } catch {
            return .failure(error)
        }
        return .success((header, start + header.length))
    }

    /// The sequence number of the intact record at `at`, if there is one.
    private func intactSequence(at: Int) throws -> UInt64? {
        var scratch = RecordContents()
        guard at < reader.size, case .success(let (h, _)) = try readRecord(at: at, into: &scratch) else { return nil }
        return h.sequence
    }

    /// The first offset after `at` where an intact record starts, if any. Holes of a sparse file
    /// are skipped without reading them, runs of zeros eight bytes at a time, and a candidate's
    /// payload is read only once its 12-byte header check matched, so the scan is linear in
    /// the bytes that exist.
    func nextIntactRecord(after at: Int) throws -> Int? {
        var scratch = RecordContents()
        let headerSize = JournalFormat.recordHeaderSize
        var q = at + 1
        while q <= reader.size - headerSize {
            if !reader.inWindow(q, headerSize) {
                guard let d = reader.nextData(from: q) else { return nil }
                // A record starting in a hole would have a zero length; one may start in the
                // last 3 bytes before data.
                if d - 3 > q { q = d - 3 }
                if q > reader.size - headerSize { return nil }
            }
            guard let view = try reader.window(at: q, minimum: headerSize) else { return nil }
            let limit = view.count - headerSize
            var i = 0
            var candidate: Int?
            while i <= limit {
                if i + 8 <= view.count && view.loadUnaligned(fromByteOffset: i, as: UInt64.self) == 0 {
                    i += 5  // no record can start in the first five of eight zero bytes
                    continue
                }
                let length = Int(JournalFormat.readU32(view, i))
                if length >= 4, length <= JournalFormat.maximumPayload, length <= reader.size - (q + i) - headerSize,
                   case .success = JournalFormat.recordHeader(UnsafeRawBufferPointer(rebasing: view[i..<(i + headerSize)]), snapshotRegister: snapshotRegister) {
                    candidate = q + i
                    break
                }
                i += 1
            }
            guard let p = candidate else {
                q += i
                continue
            }
            if case .success = try readRecord(at: p, into: &scratch) { return p }
            q = p + 1
        }
        return nil
    }

    // MARK: Version 1

    /// Replays a version 1 segment (no sequence numbers, no end record: complete by definition).
    mutating func scanVersion1(from start: Int) throws -> Outcome {
        var at = start
        var contents = RecordContents()
        while at < reader.size {
            if at >= nextGrowthCheck { growIndex(at: at) }
            switch try readVersion1Record(at: at, into: &contents) {
            case .success(let next):
                apply(&contents)
                at = next
            case .failure(let problem):
                if let q = try nextIntactVersion1Record(after: at) {
                    guard salvage else {
                        throw ExactlyOnceError(.corruptData, """
                            journal \(path) is corrupt at byte \(at) (\(problem.reason)) and intact records follow at byte \(q); \
                            nothing was changed. Restore the directory from a backup, or open with salvage to drop bytes \(at)..<\(q) \
                            (operations recorded there may be processed again)
                            """)
                    }
                    drop(at..<q, reason: problem.reason)
                    at = q
                    continue
                }
                report.truncatedTailBytes = reader.size - at
                report.tailProblem = problem.reason
                return .complete(validEnd: at)
            }
        }
        return .complete(validEnd: at)
    }

    private func readVersion1Record(at: Int, into contents: inout RecordContents) throws -> Result<Int, MalformedPayload> {
        let headerSize = JournalFormat.version1RecordHeaderSize
        guard let hb = try reader.bytes(at: at, count: headerSize) else {
            return .failure(MalformedPayload(reason: "partial record header (\(reader.size - at) bytes)"))
        }
        let length = Int(JournalFormat.readU32(hb, 0))
        let crc = JournalFormat.readU32(hb, 4)
        guard length >= 4 else { return .failure(MalformedPayload(reason: length == 0 ? "zero-filled record" : "record too short")) }
        guard length <= JournalFormat.maximumPayload else { return .failure(MalformedPayload(reason: "record length \(length) exceeds the limit")) }
        guard let body = try reader.bytes(at: at + headerSize, count: length) else {
            return .failure(MalformedPayload(reason: "partial record (\(reader.size - at - headerSize) of \(length) bytes)"))
        }
        guard CRC32C.checksum(body) == crc else { return .failure(MalformedPayload(reason: "checksum mismatch")) }
        contents.reset()
        var r = ByteReader(body, from: 0, to: body.count)
        do throws(MalformedPayload) {
            try r.payload(into: &contents, version: 1)
        } catch {
            return .failure(error)
        }
        return .success(at + headerSize + length)
    }

    private func nextIntactVersion1Record(after at: Int) throws -> Int? {
        var scratch = RecordContents()
        var q = at + 1
        while q + JournalFormat.version1RecordHeaderSize + 4 <= reader.size {
            if !reader.inWindow(q, JournalFormat.version1RecordHeaderSize) {
                guard let d = reader.nextData(from: q) else { return nil }
                if d - 3 > q { q = d - 3 }
            }
            if let hb = try reader.bytes(at: q, count: JournalFormat.version1RecordHeaderSize) {
                let length = Int(JournalFormat.readU32(hb, 0))
                if length >= 4, length <= JournalFormat.maximumPayload, length <= reader.size - q - JournalFormat.version1RecordHeaderSize,
                   case .success = try readVersion1Record(at: q, into: &scratch) {
                    return q
                }
            }
            q += 1
        }
        return nil
    }
}
