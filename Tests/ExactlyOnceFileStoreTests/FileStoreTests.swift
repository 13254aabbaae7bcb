import ExactlyOnce
@testable import ExactlyOnceFileStore
import ExactlyOnceTestKit
import Foundation
import Testing

/// A fresh directory under the temporary directory, removed by `cleanup()`.
struct TempDirectory {
    let path: String
    init() throws {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("eo-file-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func cleanup() { try? FileManager.default.removeItem(atPath: path) }
    var journal: String {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
        return path + "/" + (names.filter { $0.hasPrefix("journal-") && $0.hasSuffix(".eoj") }.sorted().last ?? "missing")
    }
}

let fingerprintA = PayloadFingerprint.of(Array("payload-a".utf8))

func key(_ i: Int64) -> IdempotencyKey { .coupon(couponId: 1, memberId: i) }

/// Claims and completes `keys` with a counter effect; returns the acknowledged keys.
@discardableResult
func issue(_ store: FileDedupeStore, _ keys: Range<Int64>, counter: String = "count") async throws -> [Int64] {
    var done: [Int64] = []
    for i in keys {
        guard case .new(let claim) = try await store.claim([ClaimRequest(key: key(i), fingerprint: fingerprintA, lease: .seconds(60))])[0] else {
            continue
        }
        let current = try await store.readState(counter)
        let n = current.value.flatMap { Int(String(decoding: $0, as: UTF8.self)) } ?? 0
        try await store.complete(Completion(claim: claim, outcome: .applied("\(n + 1)"),
                                            effects: EffectWrites(reads: [counter: current.version], writes: [counter: Array(String(n + 1).utf8)])))
        done.append(i)
    }
    return done
}

func counterValue(_ store: FileDedupeStore, _ counter: String = "count") async throws -> Int {
    try await store.readState(counter).value.flatMap { Int(String(decoding: $0, as: UTF8.self)) } ?? 0
}

@Suite("File store", .serialized, .timeLimit(.minutes(2)))
struct FileStoreTests {
    @Test func passesTheStoreConformanceSuite() async throws {
        var dirs: [TempDirectory] = []
        defer { dirs.forEach { $0.cleanup() } }
        try await StoreConformance.run { clock in
            let dir = try TempDirectory()
            dirs.append(dir)
            return try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path), clock: clock)
        }
    }

    /// Everything acknowledged survives close and reopen, with outcomes, effects, fences and
    /// tokens; tokens keep growing after the reopen.
    @Test func acknowledgedOperationsSurviveReopen() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let store = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
        #expect(store.recovery.createdNew)
        try await issue(store, 0..<50)
        let fence = PartitionFence(scope: "g/t/0", epoch: 9)
        guard case .new(let held) = try await store.claim([ClaimRequest(key: key(1000), fingerprint: fingerprintA, lease: .seconds(60), fence: fence)])[0] else {
            Issue.record("expected new")
            return
        }
        await store.close()
        await #expect(throws: ExactlyOnceError.self) { try await store.readState("count") }

        let again = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
        #expect(!again.recovery.createdNew)
        #expect(again.recovery.truncatedTailBytes == 0)
        #expect(try await counterValue(again) == 50)
        let records = try await again.records(for: (0..<50).map(key))
        #expect(records.count == 50)
        #expect(records.values.allSatisfy { $0.phase == .completed })
        guard case .completed(let outcome) = try await again.claim([ClaimRequest(key: key(7), fingerprint: fingerprintA, lease: .seconds(60))])[0] else {
            Issue.record("a completed key must be answered from the journal")
            return
        }
        #expect(outcome == .applied("8"))
        // The in-flight claim came back; an older epoch is fenced, the same epoch takes over at once.
        await #expect(throws: ExactlyOnceError.self) {
            try await again.claim([ClaimRequest(key: key(2000), fingerprint: fingerprintA, lease: .seconds(60), fence: PartitionFence(scope: "g/t/0", epoch: 8))])
        }
        guard case .new(let takeover) = try await again.claim([ClaimRequest(key: key(1000), fingerprint: fingerprintA, lease: .seconds(60), fence: fence)])[0] else {
            Issue.record("the restarted owner must take its in-flight claim over at once")
            return
        }
        #expect(takeover.token > held.token)
        await again.close()
    }

    /// A crash (nothing pending written, no clean close) loses nothing acknowledged.
    @Test func simulatedCrashLosesNothingAcknowledged() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let store = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
        let acked = try await issue(store, 0..<40)
        await store.core.crash()
        let again = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
        #expect(try await counterValue(again) == acked.count)
        #expect(try await again.records(for: acked.map(key)).count == acked.count)
        await again.close()
    }

    /// Group commit: concurrent operations share syncs, and all of them are durable.
    @Test func concurrentClaimersAreAllDurable() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let store = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
        try await withThrowingTaskGroup(of: Void.self) { group in
            for t in 0..<32 as Range<Int64> {
                group.addTask { try await issue(store, (t * 100)..<(t * 100 + 20), counter: "count:\(t)") }
            }
            try await group.waitForAll()
        }
        await store.core.crash()
        let again = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
        #expect(again.count == 32 * 20)
        for t in 0..<32 { #expect(try await counterValue(again, "count:\(t)") == 20) }
        await again.close()
    }

    @Test func secondOpenOfTheSameDirectoryIsRefused() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let store = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
        let error = await #expect(throws: ExactlyOnceError.self) { try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path)) }
        #expect(error?.code == .storeLocked)
        #expect(error?.message.contains(dir.path) == true)
        await store.close()
        let again = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
        await again.close()
    }

    @Test func filesAreCreatedOwnerOnly() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let sub = dir.path + "/store"
        let store = try await FileDedupeStore.open(FileStoreConfiguration(directory: sub))
        try await issue(store, 0..<3)
        await store.close()
        for name in try FileManager.default.contentsOfDirectory(atPath: sub) {
            let mode = try FileManager.default.attributesOfItem(atPath: sub + "/" + name)[.posixPermissions] as? Int
            #expect(mode == 0o600, "\(name) has mode \(String(mode ?? 0, radix: 8))")
        }
        let dirMode = try FileManager.default.attributesOfItem(atPath: sub)[.posixPermissions] as? Int
        #expect(dirMode == 0o700)
    }

    @Test func badConfigurationIsAClearError() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let file = dir.path + "/plain-file"
        _ = FileManager.default.createFile(atPath: file, contents: Data("x".utf8))
        var zeroBatch = FileStoreConfiguration(directory: dir.path)
        zeroBatch.maximumBatch = 0
        var negativeRetention = FileStoreConfiguration(directory: dir.path)
        negativeRetention.retention = .seconds(-1)
        for config in [FileStoreConfiguration(directory: ""), FileStoreConfiguration(directory: file),
                       FileStoreConfiguration(directory: dir.path + "/missing-parent/store"), zeroBatch, negativeRetention] {
            let error = await #expect(throws: ExactlyOnceError.self) { try await FileDedupeStore.open(config) }
            #expect(error?.code == .invalidConfiguration, "\(config.directory): \(String(describing: error))")
        }
    }

    /// Compaction keeps the live state, drops expired records, keeps tokens growing, and the
    /// result reopens to the same state.
    @Test func compactionKeepsLiveStateAndDropsExpired() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let clock = ManualClock()
        var config = FileStoreConfiguration(directory: dir.path)
        config.retention = .seconds(100)
        let store = try await FileDedupeStore.open(config, clock: clock)
        try await issue(store, 0..<30)
        clock.advance(by: .seconds(150))  // the first 30 expire
        try await issue(store, 100..<120)
        let before = store.journalBytes
        let report = try await store.compact()
        #expect(report.records == 20)
        #expect(report.bytesAfter < before)
        guard case .new(let fresh) = try await store.claim([ClaimRequest(key: key(500), fingerprint: fingerprintA, lease: .seconds(60))])[0] else {
            Issue.record("expected new")
            return
        }
        await store.close()
        let again = try await FileDedupeStore.open(config, clock: clock)
        #expect(again.recovery.generation == 2)
        #expect(again.count == 21)
        #expect(try await counterValue(again) == 50)
        guard case .new(let later) = try await again.claim([ClaimRequest(key: key(501), fingerprint: fingerprintA, lease: .seconds(60))])[0] else {
            Issue.record("expected new")
            return
        }
        #expect(later.token > fresh.token, "tokens never repeat across compaction and reopen")
        await again.close()
    }

    /// A crash at every step of a compaction leaves the old or the new segment, never a mix:
    /// the reopened store has exactly the acknowledged state either way.
    @Test(arguments: JournalCore.CompactionStep.allCases)
    func compactionCrashLeavesOldOrNew(step: JournalCore.CompactionStep) async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let store = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
        try await issue(store, 0..<25)
        store.core.setCrashAfter(step)
        await #expect(throws: ExactlyOnceError.self) { try await store.compact() }
        await store.close()
        let again = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
        #expect(try await counterValue(again) == 25)
        #expect(again.count == 25)
        #expect(again.recovery.generation == (step.rawValue >= JournalCore.CompactionStep.renamed.rawValue ? 2 : 1))
        let names = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0 != "LOCK" }
        #expect(names.count == 1, "leftovers removed: \(names)")
        try await issue(again, 25..<30)
        #expect(try await counterValue(again) == 30)
        await again.close()
    }

    /// Operations keep being accepted while a compaction runs, and all of them survive.
    @Test func operationsDuringCompactionSurvive() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        let store = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
        try await issue(store, 0..<200)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await issue(store, 1000..<1100, counter: "other") }
            group.addTask { for _ in 0..<5 { try await store.compact() } }
            try await group.waitForAll()
        }
        await store.core.crash()
        let again = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
        #expect(try await counterValue(again) == 200)
        #expect(try await counterValue(again, "other") == 100)
        #expect(again.count == 300)
        await again.close()
    }

    @Test func runCompactsAndClosesOnShutdown() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        var config = FileStoreConfiguration(directory: dir.path)
        config.compactionInterval = .milliseconds(5)
        config.compactionThreshold = 1
        let store = try await FileDedupeStore.open(config)
        try await issue(store, 0..<20)
        let initial = store.core.withLock { $0.compactedBytes }
        let runner = Task { try await store.run() }
        for _ in 0..<400 where store.core.withLock({ $0.compactedBytes }) == initial {
            try await Task.sleep(for: .milliseconds(5))
        }
        runner.cancel()
        try await runner.value
        await #expect(throws: ExactlyOnceError.self) { try await store.readState("count") }
        let again = try await FileDedupeStore.open(config)
        #expect(again.recovery.generation >= 2, "run() compacted")
        #expect(try await counterValue(again) == 20)
        await again.close()
    }
}

/// I/O errors keep their errno as the cause (its symbolic name, for diagnostics), and the
/// message names the path.
@Suite struct FileStoreErrorCauseTests {
    @Test func anIOFailureKeepsItsErrnoAsTheCause() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        // A directory where the journal file should be: opening it for writing fails with EISDIR.
        try FileManager.default.createDirectory(atPath: JournalCore.segmentPath(dir.path, 1), withIntermediateDirectories: false)
        do {
            _ = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
            Issue.record("opening a store whose journal is a directory must fail")
        } catch let e as ExactlyOnceError {
            #expect(e.code == .ioFailure || e.code == .corruptData, "\(e)")
            #expect(e.cause == ExactlyOnceError.Cause(type: "POSIXErrorCode", code: "EISDIR"), "\(e)")
            #expect(e.message.contains(dir.path), "\(e)")
        }
    }
}
