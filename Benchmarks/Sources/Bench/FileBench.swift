import ExactlyOnce
import ExactlyOnceFileStore
import Foundation

/// File store figures, each ratio's baseline measured in the same run, on a temporary
/// directory of the machine's disk.
///
/// - `fileGroupCommitVsFsyncEach`: 64 concurrent claimers, one key per claim, on the default
///   group-commit store vs the same store with `syncMode = .syncEach` (one `write` +
///   `fdatasync` per claim).
/// - `fileRecoveryRecordsPerSecond`: dedupe records rebuilt per second when opening a journal
///   written the way the consumer writes it (claim batches of 64, completion batches of 64, each
///   completion with an outcome and one state write): 3 changes per key.
///
/// `BENCH_FILE_KEEP=<directory>` copies the recovery journal there (to profile an open of it
/// again, for example with `FileStoreCrashChild open <directory>`).
func runFileBenchmarks(claimers: Int = 64, groupClaims: Int = 200, eachClaims: Int = 40, recoveryKeys: Int = 2_000_000) async throws -> [String: Double] {
    let base = FileManager.default.temporaryDirectory.appendingPathComponent("eo-file-bench-\(getpid())").path
    try? FileManager.default.removeItem(atPath: base)
    try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: base) }
    let fingerprint = PayloadFingerprint.of(Array("payload".utf8))

    func claimRate(_ mode: FileStoreConfiguration.SyncMode, perClaimer: Int) async throws -> Double {
        var config = FileStoreConfiguration(directory: base + "/\(mode)")
        config.syncMode = mode
        let store = try await FileDedupeStore.open(config)
        let start = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { group in
            for c in 0..<claimers {
                group.addTask {
                    for i in 0..<perClaimer {
                        let r = try await store.claim([ClaimRequest(key: .coupon(couponId: Int64(c), memberId: Int64(i)), fingerprint: fingerprint, lease: .seconds(60))])
                        guard case .new = r[0] else { throw ExactlyOnceError(.storeUnavailable, "benchmark claim did not claim") }
                    }
                }
            }
            try await group.waitForAll()
        }
        let rate = Double(claimers * perClaimer) / seconds(ContinuousClock.now - start)
        await store.close()
        return rate
    }
    let each = try await claimRate(.syncEach, perClaimer: eachClaims)
    let grouped = try await claimRate(.groupCommit, perClaimer: groupClaims)

    // A journal of `recoveryKeys` claimed and completed keys.
    let dir = base + "/recovery"
    let writer = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir))
    let workers = 16
    let batch = 64
    let batchesPerWorker = recoveryKeys / batch / workers
    try await withThrowingTaskGroup(of: Void.self) { group in
        for w in 0..<workers {
            group.addTask {
                for b in 0..<batchesPerWorker {
                    let requests = (0..<batch).map { i in
                        ClaimRequest(key: .coupon(couponId: Int64(w), memberId: Int64(b * batch + i)), fingerprint: fingerprint, lease: .seconds(600), prefetch: true)
                    }
                    var completions: [Completion] = []
                    for (i, r) in try await writer.claim(requests).enumerated() {
                        guard case .new(let claim) = r else { throw ExactlyOnceError(.storeUnavailable, "benchmark claim did not claim") }
                        completions.append(Completion(claim: claim, outcome: .applied("\(b * batch + i)"),
                                                      effects: EffectWrites(reads: [:], writes: ["issued:\(w):\(b * batch + i)": Array("1".utf8)])))
                    }
                    let done = try await writer.complete(completions)
                    guard done.applied == batch else { throw ExactlyOnceError(.storeUnavailable, "benchmark completion failed") }
                }
            }
        }
        try await group.waitForAll()
    }
    let journalBytes = writer.journalBytes
    await writer.close()
    let openStart = ContinuousClock.now
    let reopened = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir))
    let openSeconds = seconds(ContinuousClock.now - openStart)
    let recovered = reopened.count
    let changes = reopened.recovery.changes
    await reopened.close()
    if let keep = ProcessInfo.processInfo.environment["BENCH_FILE_KEEP"] {
        try? FileManager.default.removeItem(atPath: keep)
        try FileManager.default.copyItem(atPath: dir, toPath: keep)
    }
    guard recovered == workers * batchesPerWorker * batch else {
        throw ExactlyOnceError(.corruptData, "recovery found \(recovered) records, expected \(workers * batchesPerWorker * batch)")
    }

    return [
        "fileSyncEachClaimsPerSecond": each,
        "fileGroupCommitClaimsPerSecond": grouped,
        "fileGroupCommitVsFsyncEach": grouped / each,
        "fileRecoveryRecords": Double(recovered),
        "fileRecoveryJournalBytes": Double(journalBytes),
        "fileRecoverySeconds": openSeconds,
        "fileRecoveryRecordsPerSecond": Double(recovered) / openSeconds,
        "fileRecoveryChangesPerSecond": Double(changes) / openSeconds,
    ]
}
