import ExactlyOnce
import Foundation
import Logging
import ServiceLifecycle

/// Configuration of a ``FileDedupeStore``.
public struct FileStoreConfiguration: Sendable {
    /// How acknowledgements wait for the disk.
    public struct SyncMode: Sendable, Hashable, CustomStringConvertible {
        let batches: Bool
        /// Operations that arrive while the journal is syncing share the next `fdatasync`
        /// (group commit). The default.
        public static let groupCommit = SyncMode(batches: true)
        /// One `write` + `fdatasync` per operation: the disk's sync rate caps throughput. For
        /// comparison (the benchmark's baseline) and for nothing else.
        public static let syncEach = SyncMode(batches: false)
        public var description: String { batches ? "groupCommit" : "syncEach" }
    }

    /// The store's directory (created, mode 0700, when missing; its parent must exist).
    public var directory: String
    /// How long completed records are kept (nil: forever). Expired records are answered as
    /// unknown and dropped from the journal at the next compaction.
    public var retention: Duration?
    /// Group commit (default) or one sync per operation.
    public var syncMode: SyncMode = .groupCommit
    /// Most operations written with one `fdatasync`. Default: 1024.
    public var maximumBatch: Int = 1024
    /// How long the writer waits for more operations before syncing a batch smaller than
    /// ``maximumBatch``. Default: zero: operations that arrive during a sync form the next batch,
    /// which is enough for concurrent callers and adds no latency to a lone one.
    public var maximumBatchWait: Duration = .zero
    /// How often ``FileDedupeStore/run()`` checks whether to compact. Default: 10 seconds.
    public var compactionInterval: Duration = .seconds(10)
    /// ``FileDedupeStore/run()`` compacts when the journal has grown by at least this many bytes
    /// and by at least the size of the last compacted journal. Default: 64 MiB.
    public var compactionThreshold: Int = 64 << 20
    /// Opens a damaged journal — a corrupt record in the middle, a record repeated, missing or
    /// out of place, an incomplete journal with nothing older to fall back to — by dropping
    /// what is damaged or misplaced (each reported in ``RecoveryReport/salvageActions``) and
    /// rewriting the journal clean, instead of refusing to open. Default: false. Dropped records
    /// held acknowledged operations: their keys may be processed again.
    public var salvage: Bool = false

    /// Defaults, in `directory`.
    public init(directory: String) {
        self.directory = directory
    }
}

/// What opening a ``FileDedupeStore`` found and did.
public struct RecoveryReport: Sendable, Hashable, CustomStringConvertible {
    /// Something salvage (``FileStoreConfiguration/salvage``) dropped or found missing.
    public struct SalvageAction: Sendable, Hashable, CustomStringConvertible {
        /// The journal bytes dropped (empty when nothing was dropped but records were found
        /// missing before this offset).
        public var bytes: Range<Int>
        /// Sequence numbers of log records that were missing (a gap), when known.
        public var missingSequences: Range<UInt64>?
        /// What was wrong.
        public var reason: String

        /// Describes one salvage action.
        public init(bytes: Range<Int>, missingSequences: Range<UInt64>?, reason: String) {
            self.bytes = bytes
            self.missingSequences = missingSequences
            self.reason = reason
        }

        /// The action in one line, for logs.
        public var description: String {
            var s = bytes.isEmpty ? "at byte \(bytes.lowerBound)" : "dropped bytes \(bytes.lowerBound)..<\(bytes.upperBound)"
            if let m = missingSequences { s += ", records \(m.lowerBound)..<\(m.upperBound) missing" }
            return s + ": " + reason
        }
    }

    /// The journal segment's generation (raised by every compaction).
    public var generation: UInt64 = 1
    /// The format version of the journal as found on disk (``FileDedupeStore`` writes version
    /// 2; a version 1 journal is migrated when opened, see ``migratedFromVersion``).
    public var formatVersion: UInt32 = 2
    /// Set when the journal was in an older format and was rewritten in the current one
    /// (a compaction at open, before any new record was appended).
    public var migratedFromVersion: UInt32?
    /// Whether the directory held no journal and a new one was created.
    public var createdNew = false
    /// Log records replayed: one per acknowledged or in-flight operation since the segment's
    /// snapshot (for a version 1 journal, every record).
    public var journalRecords = 0
    /// Snapshot records replayed, the end record included (a compaction's output).
    public var snapshotRecords = 0
    /// Changes replayed.
    public var changes = 0
    /// Dedupe records in the index after replay.
    public var liveRecords = 0
    /// The sequence number of the last log record (0 when none was ever written); the next
    /// operation is journaled as this plus one.
    public var lastSequence: UInt64 = 0
    /// Bytes cut from the end of the journal: a torn last write from a crash.
    public var truncatedTailBytes = 0
    /// Why the tail was cut, when it was.
    public var tailProblem: String?
    /// Byte ranges dropped by salvage (``FileStoreConfiguration/salvage``).
    public var salvagedRanges: [Range<Int>] = []
    /// Everything salvage dropped or found missing, in file order, with the reason.
    public var salvageActions: [SalvageAction] = []
    /// Newer segments that were incomplete (a compaction that never wrote its end record) and
    /// were removed in favour of the newest complete one.
    public var incompleteSegments: [String] = []
    /// Leftover files removed (older generations, incomplete newer ones, unfinished compactions).
    public var removedFiles: [String] = []

    /// An empty report.
    public init() {}

    /// The report in one line, for logs.
    public var description: String {
        var s = "generation \(generation), \(snapshotRecords) snapshot and \(journalRecords) log records, \(changes) changes, \(liveRecords) live records, last sequence \(lastSequence)"
        if createdNew { s += ", new journal" }
        if let v = migratedFromVersion { s += ", migrated from format version \(v)" }
        if truncatedTailBytes > 0 { s += ", truncated \(truncatedTailBytes) tail bytes (\(tailProblem ?? "torn write"))" }
        if !incompleteSegments.isEmpty { s += ", ignored incomplete \(incompleteSegments)" }
        if !salvageActions.isEmpty { s += ", salvage: \(salvageActions.map(\.description).joined(separator: "; "))" }
        return s
    }
}

/// What a compaction did.
public struct CompactionReport: Sendable, Hashable {
    /// Journal bytes before.
    public var bytesBefore: Int
    /// Journal bytes after.
    public var bytesAfter: Int
    /// Dedupe records written to the new segment.
    public var records: Int
    /// The new generation.
    public var generation: UInt64
}

/// The embedded durable dedupe store: an append-only, checksummed, sequence-numbered journal
/// in one directory, with group commit, recovery on open and compaction.
///
/// Every operation (a claim batch, a batch of completions with their effect writes, a release)
/// is applied to an in-memory index (`DedupeStateMachine`, the same rules as every store) and
/// appended to the journal as **one** checksummed record, and is acknowledged only after that
/// record is on disk (`fdatasync`). A completion's effect writes are in the same record as the
/// completion, so they are durable together or not at all (G3 across `kill -9` and power loss,
/// given a disk that honours `fdatasync`).
///
/// Acknowledgements also wait for every earlier record, so no caller acts on state that a
/// crash could still take back (a claim answered "completed" is answered from a durable
/// completion).
///
/// ## Threads
/// A dedicated writer thread does the blocking `write` and `fdatasync` calls; callers suspend
/// on a continuation until their record is durable and never block the cooperative pool. The
/// thread starts in ``open(_:clock:logger:)`` and stops in ``close()``.
///
/// ## Failure
/// If a write or sync fails the store stops (fail-stop): every waiting and later operation
/// throws `ExactlyOnceError/Code/storeUnavailable`; nothing whose sync failed is acknowledged.
/// Close it and open the directory again: recovery replays what reached the disk.
///
/// ## Use
/// ```swift
/// let store = try await FileDedupeStore.open(FileStoreConfiguration(directory: "/var/lib/coupons"))
/// // Run it as a Service (compaction; closes on graceful shutdown; list it before the consumers),
/// // or call compact() and close() yourself.
/// ```
public final class FileDedupeStore: DedupeStore, Service, @unchecked Sendable {
    // @unchecked: all mutable state is in `core`, guarded by its condition lock.

    /// The configuration the store was opened with.
    public let configuration: FileStoreConfiguration
    /// What recovery found when the store was opened.
    public let recovery: RecoveryReport
    let core: JournalCore
    private let clock: any WallClock
    private let logger: Logger

    private init(configuration: FileStoreConfiguration, core: JournalCore, recovery: RecoveryReport, clock: any WallClock, logger: Logger) {
        self.configuration = configuration
        self.core = core
        self.recovery = recovery
        self.clock = clock
        self.logger = logger
    }

    /// Opens (or creates) the store in `configuration.directory`: takes the directory's lock,
    /// replays the newest complete journal segment in bounded memory (checking every record's
    /// checksums and sequence number), cuts a torn tail, removes an incomplete newer segment,
    /// migrates an older format, and starts the writer thread. The blocking work runs on a
    /// dedicated thread. ``recovery`` says what was found and done.
    /// - Throws: `ExactlyOnceError/Code/invalidConfiguration` for a bad path or setting,
    ///   `ExactlyOnceError/Code/storeLocked` when another open store holds the directory,
    ///   `ExactlyOnceError/Code/corruptData` for a foreign, damaged or out-of-order journal, or
    ///   an incomplete one with nothing older to fall back to (the files are left untouched;
    ///   see ``FileStoreConfiguration/salvage``), `ExactlyOnceError/Code/ioFailure` for I/O
    ///   errors.
    public static func open(_ configuration: FileStoreConfiguration, clock: any WallClock = SystemWallClock(),
                            logger: Logger = Logger(label: "exactly-once.file-store", factory: { _ in SwiftLogNoOpLogHandler() })) async throws -> FileDedupeStore {
        try validate(configuration)
        let (core, report) = try await onDedicatedThread { () throws -> (JournalCore, RecoveryReport) in
            try Recovery.open(configuration)
        }
        core.startWriter()
        if report.truncatedTailBytes > 0 || !report.salvageActions.isEmpty || !report.incompleteSegments.isEmpty {
            // The one warning this library logs: once per open, never per operation (swift-log's
            // guide for libraries allows a one-time startup warning). The report is also
            // ``recovery`` for the caller to act on.
            logger.warning("file store recovered with repairs", metadata: ["directory": "\(configuration.directory)", "report": "\(report)"])
        } else {
            logger.debug("file store opened", metadata: ["directory": "\(configuration.directory)", "report": "\(report)"])
        }
        return FileDedupeStore(configuration: configuration, core: core, recovery: report, clock: clock, logger: logger)
    }

    static func validate(_ c: FileStoreConfiguration) throws {
        func bad(_ m: String) -> ExactlyOnceError { ExactlyOnceError(.invalidConfiguration, m) }
        if c.directory.isEmpty { throw bad("directory must not be empty") }
        if c.directory.utf8.contains(0) { throw bad("directory must not contain NUL") }
        if c.directory.utf8.count > 3000 { throw bad("directory path is too long") }
        if let r = c.retention, r <= .zero { throw bad("retention must be positive") }
        if c.maximumBatch < 1 || c.maximumBatch > 1_000_000 { throw bad("maximumBatch must be in 1...1000000, got \(c.maximumBatch)") }
        if c.maximumBatchWait < .zero || c.maximumBatchWait > .seconds(1) { throw bad("maximumBatchWait must be in 0...1 s") }
        if c.compactionInterval <= .zero { throw bad("compactionInterval must be positive") }
        if c.compactionThreshold < 0 { throw bad("compactionThreshold must not be negative") }
    }

    // MARK: DedupeStore

    public func claim(_ requests: [ClaimRequest]) async throws -> [ClaimResult] {
        let now = clock.now()
        return try await core.perform { machine, changes in
            try machine.claim(requests, now: now, changes: &changes)
        }
    }

    public func complete(_ completion: Completion) async throws {
        try Self.checkSize([completion])
        let now = clock.now()
        try await core.perform { machine, changes in
            _ = try machine.complete(completion, now: now, changes: &changes)
        }
    }

    /// 64: a batch of completions is one journal record and one sync.
    public var completionBatchLimit: Int { 64 }

    public func complete(_ completions: [Completion]) async throws -> BatchCompletion {
        try Self.checkSize(completions)
        let now = clock.now()
        return try await core.perform { machine, changes in
            for (i, c) in completions.enumerated() {
                do {
                    _ = try machine.complete(c, now: now, changes: &changes)
                } catch let e as ExactlyOnceError {
                    return BatchCompletion(applied: i, failure: e)
                }
            }
            return BatchCompletion(applied: completions.count, failure: nil)
        }
    }

    public func release(_ claim: Claim, reason: String) async throws {
        let now = clock.now()
        try await core.perform { machine, changes in
            try machine.release(claim, reason: reason, now: now, changes: &changes)
        }
    }

    public func readState(_ keys: [String]) async throws -> [String: VersionedValue] {
        try await core.perform { machine, _ in machine.readState(keys) }
    }

    public func readState(_ key: String) async throws -> VersionedValue {
        try await core.perform { machine, _ in machine.readState(key) }
    }

    public func records(for keys: [IdempotencyKey]) async throws -> [IdempotencyKey: DedupeRecord] {
        try await core.perform { machine, _ in
            var out: [IdempotencyKey: DedupeRecord] = [:]
            for k in keys { if let r = machine.records[k] { out[k] = r } }
            return out
        }
    }

    public func listRecords(_ query: RecordQuery) async throws -> RecordPage {
        let now = clock.now()
        return try await core.perform { machine, _ in try machine.list(query, now: now) }
    }

    public func reopenDeadLettered(_ key: IdempotencyKey) async throws -> Bool {
        let now = clock.now()
        return try await core.perform { machine, changes in machine.reopenDeadLettered(key, now: now, changes: &changes) }
    }

    /// A journal record must fit ``JournalFormat/maximumPayload``; refuse before touching state.
    static func checkSize(_ completions: [Completion]) throws {
        var total = 0
        for c in completions {
            total += 256 + c.claim.key.rawValue.utf8.count + c.outcome.detail.count
            for (k, v) in c.effects.writes { total += 32 + k.utf8.count + (v?.count ?? 0) }
        }
        if total > JournalFormat.maximumPayload / 2 {
            throw ExactlyOnceError(.invalidPayload, "completion batch of about \(total) bytes exceeds the journal's record limit")
        }
    }

    // MARK: Maintenance

    /// The number of dedupe records held (completed, in progress and released).
    public var count: Int { core.withLock { $0.machine.records.count } }

    /// Bytes in the current journal segment (written and pending).
    public var journalBytes: Int { core.withLock { $0.segmentBytes + $0.pending.count } }

    /// Removes completed records past their retention (journaled like any operation); returns
    /// how many.
    @discardableResult
    public func purgeExpired() async throws -> Int {
        let now = clock.now()
        return try await core.perform { machine, changes in machine.purgeExpired(now: now, changes: &changes) }
    }

    /// Rewrites the live state (records not expired, state, fences, the token high-water mark)
    /// into a new segment closed by an end record, syncs it, renames it into place, syncs the
    /// directory (only then does the new generation count) and deletes the old segment. A crash at any moment leaves the old or the new segment, never a mix.
    /// Operations keep being accepted; their acknowledgements wait while the new segment is
    /// written.
    @discardableResult
    public func compact() async throws -> CompactionReport {
        try await core.compact(now: clock.now())
    }

    /// Compacts when the journal grew past ``FileStoreConfiguration/compactionThreshold`` and
    /// doubled since the last compaction, after purging expired records. Returns the
    /// compaction's report, or nil when none was due.
    @discardableResult
    public func maintain() async throws -> CompactionReport? {
        let (size, base) = core.withLock { ($0.segmentBytes + $0.pending.count, $0.compactedBytes) }
        guard size - base >= max(configuration.compactionThreshold, base) else { return nil }
        if configuration.retention != nil { try await purgeExpired() }
        let report = try await compact()
        logger.info("file store compacted", metadata: [
            "before": "\(report.bytesBefore)", "after": "\(report.bytesAfter)", "records": "\(report.records)",
        ])
        return report
    }

    /// Runs maintenance every ``FileStoreConfiguration/compactionInterval`` until cancelled or
    /// gracefully shut down, then closes the store. In a `ServiceGroup`, list the store before
    /// the consumers that use it: services shut down in reverse order.
    public func run() async throws {
        let interval = configuration.compactionInterval
        try? await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                try await Task.sleep(for: interval)
                do {
                    try await self.maintain()
                } catch let e as ExactlyOnceError where e.code != .shutDown {
                    // Recoverable here (the next interval tries again); what fails for good fails
                    // the store's operations, which throw to their callers.
                    self.logger.info("file store maintenance failed; trying again at the next interval", metadata: ["error": "\(e)"])
                }
            }
        }
        await close()
    }

    /// Writes what is pending, stops the writer thread, and releases the directory's lock.
    /// Later operations throw `ExactlyOnceError/Code/shutDown`. Idempotent.
    public func close() async {
        await core.close()
    }
}

/// Runs blocking work on a new thread and resumes with its result.
func onDedicatedThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (cont: CheckedContinuation<T, any Error>) in
        let thread = Thread {
            cont.resume(with: Result { try body() })
        }
        thread.name = "exactly-once.file-store.open"
        thread.start()
    }
}
