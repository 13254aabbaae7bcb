import ExactlyOnce

/// Writes a whole segment (the live state as a snapshot, then its end record) under a temporary
/// name, makes it durable and renames it into place. Used by compaction, by salvage and
/// migration at open, and for a new journal.
///
/// The switch to the new generation counts only once this returns: the end record is written
/// and synced before the rename, so a file that lacks it (a compaction that died, or a rename
/// that reached the disk before the data) is never taken for the journal.
enum SegmentWriter {
    /// The rename happened but the directory could not be synced: which segment the disk holds
    /// is unknown, so the store must stop (a reopen decides).
    struct NotDurable: Error {
        var underlying: any Error
    }

    /// Bytes gathered before each `write`.
    static let writeChunk = 1 << 20
    /// Changes per snapshot record, and its payload size, before a new record starts.
    static let changesPerRecord = 4096
    static let bytesPerRecord = 1 << 20

    /// Writes `machine` as segment `generation` whose log continues at `lastSequence + 1`;
    /// returns the new file's descriptor (positioned at its end), its size and the number of
    /// dedupe records written. `crashAfter` stops after a step as if the process died there.
    static func write(_ machine: DedupeStateMachine, generation: UInt64, lastSequence: UInt64, directory: String,
                      crashAfter: JournalCore.CompactionStep? = nil) throws -> (fd: Int32, bytes: Int, records: Int) {
        let finalPath = JournalCore.segmentPath(directory, generation)
        let temporaryPath = finalPath + ".tmp"
        let fd = try Files.openFile(temporaryPath, create: true)
        var renamed = false
        do {
            try Files.truncateFile(fd, to: 0, path: temporaryPath)
            var total = 0
            var w = ByteWriter(buffer: JournalFormat.header(generation: generation, recordsHint: machine.records.count, stateHint: machine.state.count))
            w.buffer.reserveCapacity(writeChunk + bytesPerRecord)
            let domain = JournalFormat.domainRegister(generation)
            var index: UInt64 = 0
            var recordStart = -1
            var changes = 0

            func flush() throws {
                try Files.writeAll(fd, w.buffer, path: temporaryPath)
                total += w.buffer.count
                w.buffer.removeAll(keepingCapacity: true)
            }
            func begin() {
                recordStart = JournalFormat.beginRecord(&w.buffer)
                w.u32(0)
                changes = 0
            }
            func end() throws {
                w.buffer.withUnsafeMutableBytes { JournalFormat.storeU32($0, recordStart + JournalFormat.recordHeaderSize, UInt32(changes)) }
                JournalFormat.finishRecord(&w.buffer, start: recordStart, sequence: JournalFormat.snapshotBit | index, domain: domain)
                index += 1
                recordStart = -1
                if w.buffer.count >= writeChunk { try flush() }
            }
            func add(_ c: DedupeStateMachine.Change) throws {
                if recordStart < 0 { begin() }
                w.change(c)
                changes += 1
                if changes == changesPerRecord || w.buffer.count - recordStart >= bytesPerRecord { try end() }
            }

            for (scope, epoch) in machine.fences { try add(.fence(scope: scope, epoch: epoch)) }
            for (key, value) in machine.state { try add(.state(key: key, value: value)) }
            for record in machine.records.values { try add(.record(record)) }
            if recordStart >= 0 { try end() }
            if crashAfter == .snapshotWritten {
                try flush()
                throw JournalCore.SimulatedCrash()
            }
            // The end record: the token high-water mark (the record holding the highest token
            // may have expired) and where the log's numbering goes on.
            begin()
            w.token(machine.lastToken)
            w.end(nextSequence: lastSequence + 1, snapshotRecords: index)
            changes = 2
            try end()
            try flush()
            if crashAfter == .endWritten { throw JournalCore.SimulatedCrash() }
            try Files.sync(fd, path: temporaryPath)
            if crashAfter == .temporarySynced { throw JournalCore.SimulatedCrash() }
            try Files.renameFile(temporaryPath, finalPath)
            renamed = true
            if crashAfter == .renamed { throw JournalCore.SimulatedCrash() }
            do {
                try Files.syncDirectory(directory)
            } catch {
                throw NotDurable(underlying: error)
            }
            if crashAfter == .directorySynced { throw JournalCore.SimulatedCrash() }
            try Files.seekToEnd(fd, path: finalPath)
            return (fd, total, machine.records.count)
        } catch let e as JournalCore.SimulatedCrash {
            Files.closeFile(fd)
            throw e
        } catch let e as NotDurable {
            Files.closeFile(fd)
            throw e
        } catch {
            Files.closeFile(fd)
            if renamed { throw NotDurable(underlying: error) }
            Files.unlinkFile(temporaryPath)
            throw error
        }
    }
}
