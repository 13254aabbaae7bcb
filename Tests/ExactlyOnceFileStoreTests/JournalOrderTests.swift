import ExactlyOnce
@testable import ExactlyOnceFileStore
import Foundation
import Testing

/// A journal is only valid in order: an intact record (its checksums match) in the wrong place
/// — an old one repeated, one missing, two swapped — is corruption, refused without touching
/// the file, or with salvage dropped and reported. And a generation switch counts only once the
/// new segment is complete: a newer segment that holds only a header (or a snapshot without its
/// end record) never replaces the real journal.
@Suite("File store journal order", .serialized, .timeLimit(.minutes(3)))
struct JournalOrderTests {
    static func read(_ path: String) throws -> [UInt8] { try [UInt8](Data(contentsOf: URL(fileURLWithPath: path))) }

    static func names(_ dir: TempDirectory) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0 != "LOCK" }.sorted()
    }

    /// `damaged` as the journal must be refused as corruption naming `phrase`, leaving the file as it was.
    static func expectRefused(_ dir: TempDirectory, _ damaged: [UInt8], _ phrase: String, _ note: String) async throws {
        try CorruptionTests.write(damaged, to: dir.journal)
        let error = await #expect(throws: ExactlyOnceError.self, "\(note)") { try await CorruptionTests.open(dir) }
        #expect(error?.code == .corruptData, "\(note)")
        #expect(error?.message.contains(phrase) == true, "\(note): \(String(describing: error))")
        #expect(try read(dir.journal) == damaged, "\(note): nothing was changed")
    }

    /// Opens with salvage, checks the report, closes, and checks the next open is clean.
    static func salvage(_ dir: TempDirectory, _ damaged: [UInt8]) async throws -> (RecoveryReport, counter: Int, records: Int) {
        try CorruptionTests.write(damaged, to: dir.journal)
        let store = try await CorruptionTests.open(dir, salvage: true)
        let report = store.recovery
        let counter = try await counterValue(store)
        let records = store.count
        #expect(!report.salvageActions.isEmpty)
        #expect(report.description.contains("salvage"))
        await store.close()
        let again = try await CorruptionTests.open(dir)
        #expect(again.recovery.salvageActions.isEmpty && again.recovery.truncatedTailBytes == 0, "salvage rewrote a clean journal")
        #expect(try await counterValue(again) == counter)
        await again.close()
        return (report, counter, records)
    }

    // MARK: Repeats, gaps, swaps

    /// Any old record repeated at the end (the adversarial case: a completion replayed last
    /// rolls its counter back) is refused; salvage drops exactly the repeat.
    @Test func anOldRecordRepeatedAtTheEndIsRefused() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let (bytes, _) = try await CorruptionTests.journal(dir, keys: 10)
        let layout = JournalLayout(bytes)
        #expect(layout.logRecords.count == 20)
        for (k, range) in layout.logRecords.enumerated().dropLast() {
            try await Self.expectRefused(dir, bytes + bytes[range], "repeated", "record \(k) repeated at the end")
        }
        // The completion of key 4 (the 10th log record) set the counter to 5: replayed last it
        // would roll the counter back from 10 to 5.
        let repeated = layout.logRecords[9]
        let (report, counter, records) = try await Self.salvage(dir, bytes + bytes[repeated])
        #expect(counter == 10, "the counter is not rolled back")
        #expect(records == 10)
        #expect(report.salvagedRanges == [bytes.count..<(bytes.count + repeated.count)])
        #expect(report.salvageActions.count == 1)
        #expect(report.salvageActions.first?.reason.contains("repeated") == true)
        #expect(report.journalRecords == 20)
    }

    /// Any record missing from the middle is refused; salvage reports which sequence numbers
    /// are missing.
    @Test func aRecordMissingFromTheMiddleIsRefused() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let (bytes, _) = try await CorruptionTests.journal(dir, keys: 10)
        let layout = JournalLayout(bytes)
        for (k, range) in layout.logRecords.enumerated().dropLast() {
            var damaged = bytes
            damaged.removeSubrange(range)
            try await Self.expectRefused(dir, damaged, "missing", "record \(k) removed")
        }
        var damaged = bytes
        let victim = layout.logRecords[7]  // the completion of key 3
        damaged.removeSubrange(victim)
        let (report, counter, _) = try await Self.salvage(dir, damaged)
        let seq = layout.logSequences[7]
        #expect(report.salvageActions.map(\.missingSequences) == [seq..<(seq + 1)])
        #expect(report.salvageActions.first?.bytes == victim.lowerBound..<victim.lowerBound)
        #expect(report.journalRecords == 19)
        #expect(counter == 10, "later completions carry the counter's absolute value")
    }

    /// Any two neighbouring records swapped are refused; salvage keeps one of them and reports
    /// the other.
    @Test func twoSwappedRecordsAreRefused() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let (bytes, _) = try await CorruptionTests.journal(dir, keys: 10)
        let layout = JournalLayout(bytes)
        func swapped(_ k: Int) -> [UInt8] {
            let a = layout.logRecords[k], b = layout.logRecords[k + 1]
            var out = Array(bytes[..<a.lowerBound])
            out += bytes[b]
            out += bytes[a]
            out += bytes[b.upperBound...]
            return out
        }
        for k in 0..<(layout.logRecords.count - 1) {
            try await Self.expectRefused(dir, swapped(k), "out of place", "records \(k) and \(k + 1) swapped")
        }
        // Two records far apart swapped.
        let r = layout.logRecords
        var far = Array(bytes[..<r[2].lowerBound])
        far += bytes[r[15]]
        far += bytes[r[3].lowerBound..<r[15].lowerBound]
        far += bytes[r[2]]
        far += bytes[r[16].lowerBound...]
        try await Self.expectRefused(dir, far, "out of place", "records 2 and 15 swapped")

        let (report, _, records) = try await Self.salvage(dir, swapped(8))
        #expect(report.journalRecords == 19, "one of the two is dropped")
        #expect(report.salvagedRanges.count == 1)
        #expect(report.salvageActions.contains { $0.reason.contains("moved") })
        #expect(records == 10)
    }

    /// Salvage of several kinds of damage at once reports each, in file order.
    @Test func salvageReportsEveryDropAndGapInOrder() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let (bytes, _) = try await CorruptionTests.journal(dir, keys: 10)
        let layout = JournalLayout(bytes)
        var damaged = Array(bytes[..<layout.logRecords[12].lowerBound])
        damaged += bytes[layout.logRecords[13].lowerBound...]  // 12 missing
        damaged[layout.logRecords[3].lowerBound + 25] ^= 0x40  // 3 damaged
        damaged += bytes[layout.logRecords[1]]  // 1 repeated at the end
        let (report, _, _) = try await Self.salvage(dir, damaged)
        #expect(report.salvageActions.count == 4, "\(report.salvageActions)")
        guard report.salvageActions.count == 4 else { return }
        #expect(report.salvageActions[0].bytes == layout.logRecords[3], "the damaged record")
        #expect(report.salvageActions[1].missingSequences == layout.logSequences[3]..<(layout.logSequences[3] + 1), "the gap it left")
        #expect(report.salvageActions[2].missingSequences == layout.logSequences[12]..<(layout.logSequences[12] + 1), "the removed record")
        #expect(report.salvageActions[3].reason.contains("repeated"), "the repeat")
        #expect(report.salvagedRanges.count == 2)
    }

    /// Log sequence numbers go on across compactions and reopens (the end record says where),
    /// so a log record of an older generation put into a newer one is a repeat.
    @Test func sequenceNumbersContinueAcrossCompactionAndReopen() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let store = try await CorruptionTests.open(dir)
        try await issue(store, 0..<5)
        let oldBytes = try Self.read(dir.journal)
        try await store.compact()
        try await issue(store, 5..<8)
        await store.close()
        let reopened = try await CorruptionTests.open(dir)
        #expect(reopened.recovery.lastSequence == 16)
        try await issue(reopened, 8..<10)
        await reopened.close()
        let bytes = try Self.read(dir.journal)
        let layout = JournalLayout(bytes)
        #expect(layout.logSequences == Array(11...20), "the log of generation 2 goes on from 11")
        // An old-generation log record appended to the new generation is refused.
        let old = JournalLayout(oldBytes)
        try await Self.expectRefused(dir, bytes + oldBytes[old.logRecords[9]], "repeated", "a generation 1 record in generation 2")
    }

    // MARK: Generation switch

    /// Files of a newer generation whose compaction never finished: a header only, nothing,
    /// zeros, a snapshot cut before its end record.
    static func incompleteSegments(_ dir: TempDirectory, machine: DedupeStateMachine, lastSequence: UInt64, generation: UInt64) throws -> [(String, [UInt8])] {
        let scratch = try TempDirectory()
        defer { scratch.cleanup() }
        let (fd, _, _) = try SegmentWriter.write(machine, generation: generation, lastSequence: lastSequence, directory: scratch.path)
        Files.closeFile(fd)
        let complete = try read(JournalCore.segmentPath(scratch.path, generation))
        let endRecord = JournalLayout(complete).snapshotRecords.last!
        var cases: [(String, [UInt8])] = [
            ("header only", JournalFormat.header(generation: generation, recordsHint: 10, stateHint: 1)),
            ("empty", []),
            ("zeros", Array(repeating: 0, count: 4096)),
            ("snapshot without end record", Array(complete[..<endRecord.lowerBound])),
        ]
        for cut in stride(from: JournalFormat.headerSize + 1, to: endRecord.upperBound, by: 97) {
            cases.append(("cut at \(cut)", Array(complete[..<cut])))
        }
        cases.append(("cut 1 byte short", Array(complete[..<(endRecord.upperBound - 1)])))
        return cases
    }

    /// With the older journal present, an incomplete newer generation is ignored (and removed):
    /// the store opens with everything acknowledged, on the older generation.
    @Test func anIncompleteNewerGenerationFallsBackToTheOlderJournal() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let (bytes, _) = try await CorruptionTests.journal(dir, keys: 10)
        let olderName = JournalCore.segmentName(1)
        let newerName = JournalCore.segmentName(2)
        let store = try await CorruptionTests.open(dir)
        let machine = store.core.withLock { $0.machine }
        await store.close()
        for (name, content) in try Self.incompleteSegments(dir, machine: machine, lastSequence: 20, generation: 2) {
            try CorruptionTests.write(bytes, to: dir.path + "/" + olderName)
            try CorruptionTests.write(content, to: dir.path + "/" + newerName)
            let again = try await CorruptionTests.open(dir)
            #expect(try await counterValue(again) == 10, "\(name)")
            #expect(again.count == 10, "\(name)")
            #expect(again.recovery.generation == 1, "\(name)")
            #expect(again.recovery.incompleteSegments == [newerName], "\(name)")
            #expect(again.recovery.removedFiles == [newerName], "\(name)")
            #expect(try Self.names(dir) == [olderName], "\(name): the real journal stays, the incomplete one goes")
            try await issue(again, 10..<11)
            await again.close()
            let third = try await CorruptionTests.open(dir)
            #expect(try await counterValue(third) == 11, "\(name)")
            await third.close()
        }
    }

    /// Without an older journal, an incomplete segment is refused (a lost journal is never
    /// silently a new sale); salvage opens with what it holds and reports it.
    @Test func anIncompleteGenerationWithoutTheOlderJournalIsRefused() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        _ = try await CorruptionTests.journal(dir, keys: 10)
        let store = try await CorruptionTests.open(dir)
        let machine = store.core.withLock { $0.machine }
        await store.close()
        let newerName = JournalCore.segmentName(2)
        for (name, content) in try Self.incompleteSegments(dir, machine: machine, lastSequence: 20, generation: 2) {
            for n in try Self.names(dir) { try FileManager.default.removeItem(atPath: dir.path + "/" + n) }
            try CorruptionTests.write(content, to: dir.path + "/" + newerName)
            let error = await #expect(throws: ExactlyOnceError.self, "\(name)") { try await CorruptionTests.open(dir) }
            #expect(error?.code == .corruptData, "\(name)")
            #expect(error?.message.contains("incomplete") == true, "\(name): \(String(describing: error))")
            #expect(try Self.names(dir) == [newerName], "\(name): nothing created or removed")
            #expect(try Self.read(dir.path + "/" + newerName) == content, "\(name): nothing changed")

            var config = FileStoreConfiguration(directory: dir.path)
            config.salvage = true
            let salvaged = try await FileDedupeStore.open(config)
            #expect(salvaged.recovery.salvageActions.contains { $0.reason.contains("incomplete") }, "\(name)")
            #expect(salvaged.count <= 10, "\(name)")
            await salvaged.close()
            let clean = try await CorruptionTests.open(dir)
            #expect(clean.recovery.salvageActions.isEmpty && clean.recovery.generation == 3, "\(name): salvage wrote a complete generation")
            await clean.close()
        }
    }

    /// A newer generation that is complete but damaged is not "incomplete": it may hold
    /// acknowledged records, so it is refused, and neither file is touched.
    @Test func aDamagedNewerGenerationIsRefusedAndNothingIsRemoved() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let store = try await CorruptionTests.open(dir)
        try await issue(store, 0..<10)
        let older = try Self.read(dir.journal)
        try await store.compact()
        try await issue(store, 10..<12)
        await store.close()
        var newer = try Self.read(dir.journal)
        let snapshot = JournalLayout(newer).snapshotRecords
        newer[snapshot[0].lowerBound + 30] ^= 1
        try CorruptionTests.write(older, to: JournalCore.segmentPath(dir.path, 1))
        try CorruptionTests.write(newer, to: JournalCore.segmentPath(dir.path, 2))
        let error = await #expect(throws: ExactlyOnceError.self) { try await CorruptionTests.open(dir) }
        #expect(error?.code == .corruptData)
        #expect(try Self.names(dir) == [JournalCore.segmentName(1), JournalCore.segmentName(2)])
        #expect(try Self.read(JournalCore.segmentPath(dir.path, 1)) == older)
        #expect(try Self.read(JournalCore.segmentPath(dir.path, 2)) == newer)
    }

    /// A directory holding an unfinished compaction of a later generation but no journal: the
    /// journal is gone, so this is refused rather than started over.
    @Test func aLeftoverCompactionWithoutAJournalIsRefused() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        try CorruptionTests.write(JournalFormat.header(generation: 4, recordsHint: 0, stateHint: 0), to: dir.path + "/" + JournalCore.segmentName(4) + ".tmp")
        let error = await #expect(throws: ExactlyOnceError.self) { try await CorruptionTests.open(dir) }
        #expect(error?.code == .corruptData)
        #expect(try Self.names(dir) == [JournalCore.segmentName(4) + ".tmp"])
    }

    /// A compaction stopped before its segment was synced, where the rename still reached the
    /// disk first (a file system that orders metadata before data): the new name holds a
    /// partial file. Recovery must keep the older journal, whatever the partial file holds.
    @Test(arguments: [JournalCore.CompactionStep.snapshotWritten, .endWritten])
    func aCompactionWhoseRenameOutranItsDataKeepsTheOldJournal(step: JournalCore.CompactionStep) async throws {
        for keep in [nil, 0, JournalFormat.headerSize, JournalFormat.headerSize + 30] as [Int?] {
            let dir = try TempDirectory()
            defer { dir.cleanup() }
            let store = try await CorruptionTests.open(dir)
            try await issue(store, 0..<25)
            store.core.setCrashAfter(step)
            await #expect(throws: ExactlyOnceError.self) { try await store.compact() }
            await store.close()
            let temporary = JournalCore.segmentPath(dir.path, 2) + ".tmp"
            var content = try Self.read(temporary)
            if let keep { content = Array(content.prefix(keep)) }
            try FileManager.default.removeItem(atPath: temporary)
            try CorruptionTests.write(content, to: JournalCore.segmentPath(dir.path, 2))
            let again = try await CorruptionTests.open(dir)
            #expect(try await counterValue(again) == 25, "\(step) keep \(String(describing: keep))")
            #expect(again.count == 25)
            // Only a whole segment with its end record (the end record written, data complete)
            // counts as the new generation.
            let complete = step == .endWritten && keep == nil
            #expect(again.recovery.generation == (complete ? 2 : 1), "\(step) keep \(String(describing: keep))")
            #expect(try Self.names(dir).count == 1)
            try await issue(again, 25..<30)
            await again.close()
        }
    }

    // MARK: Format version 1

    /// A version 1 journal written by the previous release (generation 2: six keys compacted,
    /// four more keys, one claim in flight with fence `g/t/0` epoch 9).
    static let version1Journal: [UInt8] = Array(Data(base64Encoded: """
        RVhPTkNFSgABAAAAAAAAAAIAAAAAAAAAMBv58wAAAAA2AQAAhXtO8gcAAAADBQAAAGNvdW50BgAAAAAAAAABAQAAADYBAwAAADE6
        MQoJcGF5bG9hZC1hAwEAAAACAAAAAAAAABHA+zOiAQAAAQABAAAAMgEDAAAAMTowCglwYXlsb2FkLWEDAQAAAAEAAAAAAAAAEMD7
        M6IBAAABAAEAAAAxAQMAAAAxOjIKCXBheWxvYWQtYQMBAAAAAwAAAAAAAAASwPszogEAAAEAAQAAADMBAwAAADE6MwoJcGF5bG9h
        ZC1hAwEAAAAEAAAAAAAAABLA+zOiAQAAAQABAAAANAEDAAAAMTo0CglwYXlsb2FkLWEDAQAAAAUAAAAAAAAAEsD7M6IBAAABAAEA
        AAA1AQMAAAAxOjUKCXBheWxvYWQtYQMBAAAABgAAAAAAAAATwPszogEAAAEAAQAAADYNAAAA2fEdFQEAAAAFBgAAAAAAAAAtAAAA
        dCZWWQEAAAABAwAAADE6NgoJcGF5bG9hZC1hAQEAAAAHAAAAAAAAABTA+zOiAQAAAEsAAABdM+dHAgAAAAMFAAAAY291bnQHAAAA
        AAAAAAEBAAAANwEDAAAAMTo2CglwYXlsb2FkLWEDAQAAAAcAAAAAAAAAFMD7M6IBAAABAAEAAAA3LQAAAJsXML0BAAAAAQMAAAAx
        OjcKCXBheWxvYWQtYQEBAAAACAAAAAAAAAAVwPszogEAAABLAAAApR4j0QIAAAADBQAAAGNvdW50CAAAAAAAAAABAQAAADgBAwAA
        ADE6NwoJcGF5bG9hZC1hAwEAAAAIAAAAAAAAABXA+zOiAQAAAQABAAAAOC0AAACZy2dmAQAAAAEDAAAAMTo4CglwYXlsb2FkLWEB
        AQAAAAkAAAAAAAAAFcD7M6IBAAAASwAAAJujmmoCAAAAAwUAAABjb3VudAkAAAAAAAAAAQEAAAA5AQMAAAAxOjgKCXBheWxvYWQt
        YQMBAAAACQAAAAAAAAAVwPszogEAAAEAAQAAADktAAAAgCgR4QEAAAABAwAAADE6OQoJcGF5bG9hZC1hAQEAAAAKAAAAAAAAABbA
        +zOiAQAAAE0AAABKmoohAgAAAAMFAAAAY291bnQKAAAAAAAAAAECAAAAMTABAwAAADE6OQoJcGF5bG9hZC1hAwEAAAAKAAAAAAAA
        ABbA+zOiAQAAAQACAAAAMTBTAAAAJirgDQIAAAAEBQAAAGcvdC8wCQAAAAAAAAABBgAAADE6MTAwMAoJcGF5bG9hZC1hAQEAAAAL
        AAAAAAAAADbEMTSiAQAACAUAAABnL3QvMAkAAAAAAAAA
        """, options: .ignoreUnknownCharacters)!)

    static func expectVersion1State(_ store: FileDedupeStore, _ note: String) async throws {
        #expect(try await counterValue(store) == 10, "\(note)")
        #expect(store.count == 11, "\(note)")
        let records = try await store.records(for: (0..<10).map(key))
        #expect(records.values.allSatisfy { $0.phase == .completed } && records.count == 10, "\(note)")
        guard case .completed(let outcome) = try await store.claim([ClaimRequest(key: key(7), fingerprint: fingerprintA, lease: .seconds(60))])[0] else {
            Issue.record("\(note): key 7 must be answered from the migrated journal")
            return
        }
        #expect(outcome == .applied("8"), "\(note)")
        await #expect(throws: ExactlyOnceError.self, "\(note): the fence survived") {
            try await store.claim([ClaimRequest(key: key(2000), fingerprint: fingerprintA, lease: .seconds(60), fence: PartitionFence(scope: "g/t/0", epoch: 8))])
        }
        guard case .new(let fresh) = try await store.claim([ClaimRequest(key: key(3000), fingerprint: fingerprintA, lease: .seconds(60))])[0] else {
            Issue.record("\(note): expected a new claim")
            return
        }
        #expect(fresh.token.rawValue > 11, "\(note): tokens go on above the version 1 journal's")
    }

    /// Version 1 journals are read and migrated at once (a compaction at open, before any new
    /// record is appended): the state is kept, the file is rewritten in version 2.
    @Test func aVersion1JournalIsReadAndMigrated() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        try CorruptionTests.write(Self.version1Journal, to: JournalCore.segmentPath(dir.path, 2))
        let store = try await CorruptionTests.open(dir)
        #expect(store.recovery.formatVersion == 1)
        #expect(store.recovery.migratedFromVersion == 1)
        #expect(store.recovery.generation == 3)
        try await Self.expectVersion1State(store, "migrated")
        await store.close()
        #expect(try Self.names(dir) == [JournalCore.segmentName(3)], "the version 1 file is gone")
        let bytes = try Self.read(dir.journal)
        #expect(bytes[8] == 2, "rewritten in format version 2")
        let again = try await CorruptionTests.open(dir)
        #expect(again.recovery.formatVersion == 2 && again.recovery.migratedFromVersion == nil)
        #expect(try await counterValue(again) == 10)
        await again.close()
    }

    /// A version 1 journal with a torn tail, and one whose migration died before the new
    /// segment was complete: both open to the same state.
    @Test func aVersion1JournalWithATornTailOrAnUnfinishedMigration() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        try CorruptionTests.write(Self.version1Journal + [0x33, 0, 0, 0, 1, 2], to: JournalCore.segmentPath(dir.path, 2))
        try CorruptionTests.write(JournalFormat.header(generation: 3, recordsHint: 11, stateHint: 1), to: JournalCore.segmentPath(dir.path, 3))
        let store = try await CorruptionTests.open(dir)
        #expect(store.recovery.truncatedTailBytes == 6)
        #expect(store.recovery.incompleteSegments == [JournalCore.segmentName(3)])
        #expect(store.recovery.migratedFromVersion == 1)
        try await Self.expectVersion1State(store, "torn and unfinished")
        await store.close()
        #expect(try Self.names(dir) == [JournalCore.segmentName(3)])
    }
}
