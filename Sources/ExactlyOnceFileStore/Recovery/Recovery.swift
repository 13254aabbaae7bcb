import ExactlyOnce
import Foundation

/// Opening a store directory: the lock, the choice of segment, replay, repairs.
///
/// The segment used is the newest *complete* one (its snapshot reached its end record). A newer
/// segment that is incomplete (a compaction that died before its end record was durable, or a
/// rename that reached the disk before the data) holds nothing acknowledged: it is removed and
/// the older one used. An incomplete segment with no older one to fall back to is refused, so a
/// header-only file can never make recovery drop the real journal or start the sale over.
enum Recovery {
    /// The most index entries a journal header's hint reserves before replay (about 10 MiB of
    /// index); a larger snapshot grows the index as its records are replayed.
    static let maximumUpFrontReservation: UInt64 = 1 << 16

    static func open(_ configuration: FileStoreConfiguration) throws -> (JournalCore, RecoveryReport) {
        var directory = configuration.directory
        if !directory.hasPrefix("/") { directory = FileManager.default.currentDirectoryPath + "/" + directory }
        while directory.count > 1 && directory.hasSuffix("/") { directory.removeLast() }
        switch Files.kind(directory) {
        case .missing:
            do { try Files.makeDirectory(directory) } catch let e as ExactlyOnceError {
                throw ExactlyOnceError(.invalidConfiguration, "cannot use \(directory) as the store directory: \(e.message)")
            }
        case .other:
            throw ExactlyOnceError(.invalidConfiguration, "\(directory) exists and is not a directory")
        case .directory:
            break
        }
        let lockFD = try Files.lock(directory + "/LOCK", directory: directory)
        do {
            return try recover(configuration, directory: directory, lockFD: lockFD)
        } catch {
            Files.closeFile(lockFD)
            throw error
        }
    }

    private static func recover(_ configuration: FileStoreConfiguration, directory: String, lockFD: Int32) throws -> (JournalCore, RecoveryReport) {
        let names = try Files.list(directory)
        let segments = names.compactMap { n in JournalCore.parseSegmentName(n).map { ($0, n) } }.sorted { $0.0 > $1.0 }
        let leftovers = names.filter { $0.hasPrefix("journal-") && $0.hasSuffix(".tmp") }
        guard !segments.isEmpty else {
            return try createNew(configuration, directory: directory, lockFD: lockFD, leftovers: leftovers)
        }

        var incomplete: [String] = []
        for (i, (generation, name)) in segments.enumerated() {
            let path = directory + "/" + name
            let fd = try Files.openFile(path, create: false)
            var handedOver = false
            defer { if !handedOver { Files.closeFile(fd) } }
            let scanned = try scan(fd: fd, path: path, generation: generation, configuration: configuration)
            var scanner = scanned.scanner
            let version = scanned.version
            let validEnd: Int
            switch scanned.outcome {
            case .complete(let end):
                validEnd = end
                if end < scanner.reader.size {
                    try Files.truncateFile(fd, to: end, path: path)
                    try Files.sync(fd, path: path)
                }
            case .incomplete(let end, let reason):
                if i < segments.count - 1 {
                    incomplete.append(name)
                    continue
                }
                guard configuration.salvage else {
                    throw ExactlyOnceError(.corruptData, """
                        journal \(path) is incomplete: \(reason). That is a compaction that never finished, and no older \
                        journal exists to fall back to; nothing was changed. Restore the directory from a backup, or open \
                        with salvage to start from what this file holds (operations recorded elsewhere may be processed again)
                        """)
                }
                scanner.report.salvageActions.append(RecoveryReport.SalvageAction(
                    bytes: end..<scanner.reader.size, missingSequences: nil,
                    reason: "journal \(name) is incomplete (\(reason)) and no older journal exists: salvage keeps what it holds"))
                if end < scanner.reader.size { scanner.report.salvagedRanges.append(end..<scanner.reader.size) }
                scanner.report.truncatedTailBytes = 0
                validEnd = end
            }
            try Files.seekToEnd(fd, path: path)

            var report = scanner.report
            report.generation = generation
            report.formatVersion = version
            report.lastSequence = scanner.lastSequence
            report.liveRecords = scanner.machine.records.count
            report.incompleteSegments = incomplete
            var removed = segments.map(\.1).filter { $0 != name }
            removed += leftovers
            for n in removed { Files.unlinkFile(directory + "/" + n) }
            if !removed.isEmpty { try Files.syncDirectory(directory) }
            report.removedFiles = removed.sorted()

            let core = JournalCore(configuration: configuration, directory: directory, machine: scanner.machine, fd: fd, segmentPath: path,
                                   generation: generation, lockFD: lockFD, segmentBytes: validEnd, lastSequence: scanner.lastSequence)
            handedOver = true
            if version < JournalFormat.version || !report.salvageActions.isEmpty {
                // Migrate an older format, or rewrite without what salvage dropped, before any
                // new record is appended, so the next open is clean and in the current format.
                do {
                    try core.replaceSegmentBeforeWriterStarts()
                } catch {
                    core.closeSegmentBeforeWriterStarts()
                    if let e = error as? SegmentWriter.NotDurable {
                        throw ExactlyOnceError(.ioFailure, "could not make the rewritten journal in \(directory) durable (\(e.underlying)); open the directory again")
                    }
                    throw error
                }
                if version < JournalFormat.version { report.migratedFromVersion = version }
                report.generation = core.currentGeneration
            }
            return (core, report)
        }
        // Every segment was incomplete but the oldest: unreachable (the oldest returns or throws).
        throw ExactlyOnceError(.corruptData, "no complete journal in \(directory); nothing was changed")
    }

    /// A directory with no segment. An unfinished compaction's leftover of a later generation
    /// means the journal it was compacting is gone: refused rather than started over.
    private static func createNew(_ configuration: FileStoreConfiguration, directory: String, lockFD: Int32,
                                  leftovers: [String]) throws -> (JournalCore, RecoveryReport) {
        let firstTemporary = JournalCore.segmentName(1) + ".tmp"
        if let later = leftovers.first(where: { $0 != firstTemporary }) {
            throw ExactlyOnceError(.corruptData, """
                store directory \(directory) holds \(later), an unfinished compaction, but no journal; nothing was changed. \
                Restore the directory from a backup, or remove \(later) to start an empty store
                """)
        }
        let fd: Int32
        let bytes: Int
        do {
            (fd, bytes, _) = try SegmentWriter.write(DedupeStateMachine(retention: configuration.retention, recordsChanges: true),
                                                     generation: 1, lastSequence: 0, directory: directory)
        } catch let e as SegmentWriter.NotDurable {
            throw ExactlyOnceError(.ioFailure, "could not make the new journal in \(directory) durable (\(e.underlying)); open the directory again")
        }
        var report = RecoveryReport()
        report.createdNew = true
        let core = JournalCore(configuration: configuration, directory: directory,
                               machine: DedupeStateMachine(retention: configuration.retention, recordsChanges: true), fd: fd,
                               segmentPath: JournalCore.segmentPath(directory, 1), generation: 1, lockFD: lockFD,
                               segmentBytes: bytes, lastSequence: 0)
        return (core, report)
    }

    /// Replays one segment file.
    private static func scan(fd: Int32, path: String, generation: UInt64,
                             configuration: FileStoreConfiguration) throws -> (scanner: SegmentScanner, outcome: SegmentScanner.Outcome, version: UInt32) {
        let reader = try JournalReader(fd: fd, path: path)
        var scanner = SegmentScanner(reader: reader, path: path, generation: generation, salvage: configuration.salvage,
                                     machine: DedupeStateMachine(retention: configuration.retention, recordsChanges: true))
        let head = try reader.bytes(at: 0, count: min(reader.size, JournalFormat.headerSize)) ?? UnsafeRawBufferPointer(start: nil, count: 0)
        let header: JournalFormat.Header
        do {
            header = try JournalFormat.parseHeader(head)
        } catch let problem {
            // No header at all (empty, a prefix of one, or zeros) and no intact record after it:
            // a file whose data never reached the disk.
            let blank = head.allSatisfy { $0 == 0 }
                || (problem == .tooShort && head.prefix(8).elementsEqual(JournalFormat.magic.prefix(min(8, head.count))))
            if blank, try scanner.nextIntactRecord(after: -1) == nil {
                let reason = reader.size < JournalFormat.headerSize
                    ? "it is shorter than a journal header (\(reader.size) bytes)" : "its header is all zeros"
                return (scanner, .incomplete(validEnd: 0, reason: reason), JournalFormat.version)
            }
            let why: String
            switch problem {
            case .tooShort: why = "is shorter than a journal header (\(reader.size) bytes)"
            case .foreign: why = "does not start with this library's journal header (a foreign file)"
            case .badChecksum: why = "has a damaged header (checksum mismatch)"
            case .unsupportedVersion(let v): why = "has format version \(v); this build reads versions \(JournalFormat.readableVersions.lowerBound) to \(JournalFormat.readableVersions.upperBound)"
            }
            throw ExactlyOnceError(.corruptData, "journal \(path) \(why); nothing was changed")
        }
        guard header.generation == generation else {
            throw ExactlyOnceError(.corruptData, "journal \(path) says generation \(header.generation) but is named for \(generation); nothing was changed")
        }
        // Room for the snapshot's records up front, bounded by what the file's allocated bytes
        // could hold and by a constant: a hint, never a size taken on trust (a header's checksum
        // is not a signature, and a dense file of gibibytes could justify gigabytes of index).
        // Beyond the constant the index grows with the live records it replays (`growIndex`).
        let hint = max(header.recordsHint, header.stateHint)
        let plausible = UInt64(reader.allocatedBytes / JournalFormat.minimumStateChange)
        scanner.machine.reserveCapacity(Int(min(hint, plausible, Self.maximumUpFrontReservation)))
        let outcome = header.version == 1 ? try scanner.scanVersion1(from: header.size) : try scanner.scanVersion2(from: header.size)
        return (scanner, outcome, header.version)
    }
}
