import ExactlyOnce
import Foundation

/// The file store's shared state and its writer thread.
///
/// State machine of an operation: apply to the index and append its record to `pending`
/// (under the lock, one step) → the writer takes a batch of pending records, writes and syncs it
/// (outside the lock) → `durableSeq` moves past the operation → its continuation resumes.
/// Sequence numbers are assigned in the same critical section that appends the bytes, so the
/// order of records in the file is the order of sequence numbers, and "durable up to N" means
/// every operation numbered N or less is on disk.
final class JournalCore: @unchecked Sendable {
    // @unchecked: `state` is only touched under `cond`; `fd`, `segmentPath` and `generation`
    // only by the writer thread (and by `open`/`close` when the writer is not running).

    typealias Waiter = (seq: UInt64, cont: CheckedContinuation<Void, any Error>)

    struct State {
        var machine: DedupeStateMachine
        var changes: [DedupeStateMachine.Change] = []
        /// Encoded records not yet written, and where each ends, with its sequence number.
        var pending: [UInt8] = []
        var pendingEnds: [(seq: UInt64, end: Int)] = []
        var appendedSeq: UInt64 = 0
        var durableSeq: UInt64 = 0
        var waiters: [Waiter] = []
        var compactions: [(now: Timestamp, cont: CheckedContinuation<CompactionReport, any Error>)] = []
        var failure: ExactlyOnceError?
        var closed = false
        var stopping = false
        var writerExited = false
        /// The writer is blocked waiting for work (only then does an append need to signal it).
        var writerIdle = false
        var exitWaiters: [CheckedContinuation<Void, Never>] = []
        var filesClosed = false
        /// Bytes of the current segment on disk.
        var segmentBytes: Int
        /// Size of the segment the last compaction (or recovery) produced.
        var compactedBytes: Int
        /// Test hook: stop compaction after this step as if the process died there.
        var crashAfter: CompactionStep?
    }

    /// Steps of a compaction, for crash tests.
    enum CompactionStep: Int, CaseIterable, Sendable {
        case temporaryWritten, temporarySynced, renamed, directorySynced
    }

    struct SimulatedCrash: Error {}

    let cond = NSCondition()
    private var state: State
    let directory: String
    let configuration: FileStoreConfiguration
    private var fd: Int32
    private var segmentPath: String
    private var generation: UInt64
    private let lockFD: Int32

    private init(configuration: FileStoreConfiguration, directory: String, machine: DedupeStateMachine, fd: Int32,
                 segmentPath: String, generation: UInt64, lockFD: Int32, segmentBytes: Int) {
        self.configuration = configuration
        self.directory = directory
        self.fd = fd
        self.segmentPath = segmentPath
        self.generation = generation
        self.lockFD = lockFD
        self.state = State(machine: machine, segmentBytes: segmentBytes, compactedBytes: segmentBytes)
    }

    func withLock<R>(_ body: (inout State) throws -> R) rethrows -> R {
        cond.lock()
        defer { cond.unlock() }
        return try body(&state)
    }

    // MARK: Operations

    /// Applies `body` to the index, journals its changes, and returns once everything the
    /// operation could have observed is durable.
    func perform<R>(_ body: (inout DedupeStateMachine, inout [DedupeStateMachine.Change]) throws -> R) async throws -> R {
        let (result, seq): (Result<R, any Error>, UInt64) = try withLock { s in
            if s.closed { throw ExactlyOnceError(.shutDown, "the file store is closed") }
            if let f = s.failure { throw f }
            s.changes.removeAll(keepingCapacity: true)
            let result = Result { try body(&s.machine, &s.changes) }
            // A throwing operation may still have changed something (a raised fence): journal it.
            if !s.changes.isEmpty {
                JournalFormat.appendRecord(s.changes, token: nil, to: &s.pending)
                s.appendedSeq += 1
                s.pendingEnds.append((s.appendedSeq, s.pending.count))
                if s.writerIdle { cond.signal() }
            }
            return (result, s.appendedSeq)
        }
        try await waitDurable(seq)
        return try result.get()
    }

    func waitDurable(_ seq: UInt64) async throws {
        let fast: Result<Void, ExactlyOnceError>? = withLock { s in
            if s.durableSeq >= seq { return .success(()) }
            if let f = s.failure { return .failure(f) }
            return nil
        }
        if let fast { return try fast.get() }
        try await withCheckedThrowingContinuation { (cont: CheckedContinuation<Void, any Error>) in
            let now: Result<Void, ExactlyOnceError>? = withLock { s in
                if s.durableSeq >= seq { return .success(()) }
                if let f = s.failure { return .failure(f) }
                s.waiters.append((seq, cont))
                return nil
            }
            if let now { cont.resume(with: now.mapError { $0 as any Error }) }
        }
    }

    func compact(now: Timestamp) async throws -> CompactionReport {
        try await withCheckedThrowingContinuation { (cont: CheckedContinuation<CompactionReport, any Error>) in
            let refused: ExactlyOnceError? = withLock { s in
                if s.closed { return ExactlyOnceError(.shutDown, "the file store is closed") }
                if let f = s.failure { return f }
                s.compactions.append((now, cont))
                cond.signal()
                return nil
            }
            if let refused { cont.resume(throwing: refused) }
        }
    }

    /// Stops accepting operations, lets the writer drain what is pending, and closes the files.
    func close() async {
        withLock { s in
            s.closed = true
            s.stopping = true
        }
        cond.broadcast()
        await withCheckedContinuation { (cont: CheckedContinuation<Void, Never>) in
            let exited = withLock { s in
                if !s.writerExited { s.exitWaiters.append(cont) }
                return s.writerExited
            }
            if exited { cont.resume() }
        }
        let closeFiles = withLock { s in
            defer { s.filesClosed = true }
            return !s.filesClosed
        }
        if closeFiles {
            Files.closeFile(fd)
            Files.closeFile(lockFD)  // releases the flock
        }
    }

    /// Test hook: the process "dies" now. Nothing pending is written; waiters fail.
    func crash() async {
        fail(ExactlyOnceError(.storeUnavailable, "simulated crash"))
        await close()
    }

    // MARK: The writer thread

    func startWriter() {
        let thread = Thread { [self] in writerLoop() }
        thread.name = "exactly-once.file-store.writer"
        thread.start()
    }

    private func writerLoop() {
        let batchLimit = configuration.syncMode.batches ? configuration.maximumBatch : 1
        let wait = configuration.maximumBatchWait
        let waitSeconds = Double(wait.components.seconds) + Double(wait.components.attoseconds) / 1e18
        while true {
            cond.lock()
            while state.pendingEnds.isEmpty && state.compactions.isEmpty && !state.stopping && state.failure == nil {
                state.writerIdle = true
                cond.wait()
                state.writerIdle = false
            }
            if state.failure != nil || (state.pendingEnds.isEmpty && state.compactions.isEmpty) {
                cond.unlock()
                break
            }
            if !state.compactions.isEmpty {
                cond.unlock()
                runCompaction()
                continue
            }
            if waitSeconds > 0 && state.pendingEnds.count < batchLimit && !state.stopping {
                _ = cond.wait(until: Date(timeIntervalSinceNow: waitSeconds))
            }
            let n = min(batchLimit, state.pendingEnds.count)
            let (lastSeq, end) = state.pendingEnds[n - 1]
            let batch: [UInt8]
            if n == state.pendingEnds.count {
                batch = state.pending
                state.pending.removeAll(keepingCapacity: true)
                state.pendingEnds.removeAll(keepingCapacity: true)
            } else {
                batch = Array(state.pending[0..<end])
                dropPending(upTo: n)
            }
            cond.unlock()

            do {
                try Files.writeAll(fd, batch, path: segmentPath)
                try Files.sync(fd, path: segmentPath)
            } catch {
                fail(ExactlyOnceError(.storeUnavailable, "the file store stopped after a failed journal write (\(error)); close it and open the directory again"))
                break
            }
            let ready: [Waiter] = withLock { s in
                s.segmentBytes += batch.count
                s.durableSeq = lastSeq
                return takeReadyWaiters(&s)
            }
            for w in ready { w.cont.resume() }
        }
        let exitWaiters = withLock { s in
            s.writerExited = true
            defer { s.exitWaiters = [] }
            return s.exitWaiters
        }
        for w in exitWaiters { w.resume() }
    }

    /// Removes the first `n` pending records (under the lock).
    private func dropPending(upTo n: Int) {
        let end = state.pendingEnds[n - 1].end
        state.pending.removeSubrange(0..<end)
        state.pendingEnds.removeFirst(n)
        for i in state.pendingEnds.indices { state.pendingEnds[i].end -= end }
    }

    private func takeReadyWaiters(_ s: inout State) -> [Waiter] {
        var ready: [Waiter] = []
        let durable = s.durableSeq
        s.waiters.removeAll { w in
            if w.seq <= durable {
                ready.append(w)
                return true
            }
            return false
        }
        return ready
    }

    /// Stops the store: every waiter and later operation gets `error`.
    private func fail(_ error: ExactlyOnceError) {
        let (waiters, compactions) = withLock { s in
            if s.failure == nil { s.failure = error }
            defer {
                s.waiters = []
                s.compactions = []
            }
            return (s.waiters, s.compactions)
        }
        cond.broadcast()
        for w in waiters { w.cont.resume(throwing: error) }
        for c in compactions { c.cont.resume(throwing: error) }
    }

    // MARK: Compaction (on the writer thread)

    private func runCompaction() {
        let (requests, snapshot, seqAtSnapshot, bytesBefore, crashAfter) = withLock { s in
            defer { s.compactions = [] }
            return (s.compactions, s.machine, s.appendedSeq, s.segmentBytes + s.pending.count, s.crashAfter)
        }
        let now = requests.map(\.now).max() ?? Timestamp(milliseconds: 0)
        let newGeneration = generation + 1
        let finalPath = Self.segmentPath(directory, newGeneration)
        let temporaryPath = finalPath + ".tmp"
        var newFD: Int32 = -1
        do {
            var live = snapshot
            var dropped: [DedupeStateMachine.Change] = []
            _ = live.purgeExpired(now: now, changes: &dropped)
            let (bytes, records) = Self.snapshotBytes(live, generation: newGeneration)
            newFD = try Files.openFile(temporaryPath, create: true)
            try Files.truncateFile(newFD, to: 0, path: temporaryPath)
            try Files.writeAll(newFD, bytes, path: temporaryPath)
            if crashAfter == .temporaryWritten { throw SimulatedCrash() }
            try Files.sync(newFD, path: temporaryPath)
            if crashAfter == .temporarySynced { throw SimulatedCrash() }
            try Files.renameFile(temporaryPath, finalPath)
            if crashAfter == .renamed { throw SimulatedCrash() }
            try Files.syncDirectory(directory)
            if crashAfter == .directorySynced { throw SimulatedCrash() }

            let oldFD = fd
            let oldPath = segmentPath
            let ready: [Waiter] = withLock { s in
                // Records appended before the snapshot are in it: they need not be written again.
                if let k = s.pendingEnds.lastIndex(where: { $0.seq <= seqAtSnapshot }) {
                    let end = s.pendingEnds[k].end
                    s.pending.removeSubrange(0..<end)
                    s.pendingEnds.removeFirst(k + 1)
                    for i in s.pendingEnds.indices { s.pendingEnds[i].end -= end }
                }
                s.durableSeq = max(s.durableSeq, seqAtSnapshot)
                s.segmentBytes = bytes.count
                s.compactedBytes = bytes.count
                return takeReadyWaiters(&s)
            }
            fd = newFD
            segmentPath = finalPath
            generation = newGeneration
            Files.closeFile(oldFD)
            Files.unlinkFile(oldPath)
            try? Files.syncDirectory(directory)
            for w in ready { w.cont.resume() }
            let report = CompactionReport(bytesBefore: bytesBefore, bytesAfter: bytes.count, records: records, generation: newGeneration)
            for r in requests { r.cont.resume(returning: report) }
        } catch is SimulatedCrash {
            if newFD >= 0 { Files.closeFile(newFD) }
            fail(ExactlyOnceError(.storeUnavailable, "simulated crash during compaction"))
            for r in requests { r.cont.resume(throwing: ExactlyOnceError(.storeUnavailable, "simulated crash during compaction")) }
        } catch {
            // The old segment is untouched and still current: report and go on with it.
            if newFD >= 0 { Files.closeFile(newFD) }
            Files.unlinkFile(temporaryPath)
            let e = (error as? ExactlyOnceError) ?? ExactlyOnceError(.ioFailure, "\(error)")
            for r in requests { r.cont.resume(throwing: e) }
        }
    }

    /// The whole live state as a segment: header, then records of at most 4096 changes, then the
    /// token high-water mark (the record holding the highest token may have expired).
    static func snapshotBytes(_ machine: DedupeStateMachine, generation: UInt64) -> ([UInt8], Int) {
        var out = JournalFormat.header(generation: generation)
        var chunk: [DedupeStateMachine.Change] = []
        chunk.reserveCapacity(4096)
        func flush() {
            if !chunk.isEmpty { JournalFormat.appendRecord(chunk, token: nil, to: &out) }
            chunk.removeAll(keepingCapacity: true)
        }
        for (scope, epoch) in machine.fences {
            chunk.append(.fence(scope: scope, epoch: epoch))
            if chunk.count == 4096 { flush() }
        }
        for (key, value) in machine.state {
            chunk.append(.state(key: key, value: value))
            if chunk.count == 4096 { flush() }
        }
        for record in machine.records.values {
            chunk.append(.record(record))
            if chunk.count == 4096 { flush() }
        }
        flush()
        JournalFormat.appendRecord([], token: machine.lastToken, to: &out)
        return (out, machine.records.count)
    }

    // MARK: Opening and recovery

    static func segmentName(_ generation: UInt64) -> String {
        let digits = String(generation)
        return "journal-" + String(repeating: "0", count: max(0, 20 - digits.count)) + digits + ".eoj"
    }

    static func segmentPath(_ directory: String, _ generation: UInt64) -> String {
        directory + "/" + segmentName(generation)
    }

    static func parseSegmentName(_ name: String) -> UInt64? {
        guard name.hasPrefix("journal-"), name.hasSuffix(".eoj") else { return nil }
        let digits = name.dropFirst(8).dropLast(4)
        guard digits.count == 20, digits.allSatisfy(\.isASCII), let g = UInt64(digits) else { return nil }
        return g
    }

    static func open(_ configuration: FileStoreConfiguration, now: Timestamp) throws -> (JournalCore, RecoveryReport) {
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
            return try recover(configuration, directory: directory, lockFD: lockFD, now: now)
        } catch {
            Files.closeFile(lockFD)
            throw error
        }
    }

    private static func recover(_ configuration: FileStoreConfiguration, directory: String, lockFD: Int32,
                                now: Timestamp) throws -> (JournalCore, RecoveryReport) {
        let names = try Files.list(directory)
        let segments = names.compactMap { n in parseSegmentName(n).map { ($0, n) } }.sorted { $0.0 < $1.0 }
        let leftovers = names.filter { $0.hasPrefix("journal-") && $0.hasSuffix(".tmp") }
        var report = RecoveryReport()
        var machine = DedupeStateMachine(retention: configuration.retention, recordsChanges: true)

        guard let (generation, name) = segments.last else {
            // A new journal, created under a temporary name and renamed, so a segment always
            // has a complete header.
            let path = segmentPath(directory, 1)
            let fd = try Files.openFile(path + ".tmp", create: true)
            do {
                try Files.truncateFile(fd, to: 0, path: path + ".tmp")
                try Files.writeAll(fd, JournalFormat.header(generation: 1), path: path + ".tmp")
                try Files.sync(fd, path: path + ".tmp")
                try Files.renameFile(path + ".tmp", path)
                for l in leftovers where l != segmentName(1) + ".tmp" { Files.unlinkFile(directory + "/" + l) }
                try Files.syncDirectory(directory)
                try Files.seekToEnd(fd, path: path)
            } catch {
                Files.closeFile(fd)
                throw error
            }
            report.createdNew = true
            let core = JournalCore(configuration: configuration, directory: directory, machine: machine, fd: fd, segmentPath: path,
                                   generation: 1, lockFD: lockFD, segmentBytes: JournalFormat.headerSize)
            return (core, report)
        }

        let path = directory + "/" + name
        let fd = try Files.openFile(path, create: false)
        do {
            let bytes = try Files.readAll(fd, path: path)
            // Most keys cost well over 128 journal bytes (a claim and a completion record):
            // reserving up front spares the index repeated rehashing while replaying.
            machine.reserveCapacity(bytes.count / 128)
            let validEnd: Int = try bytes.withUnsafeBytes { b in
                do {
                    let g = try JournalFormat.parseHeader(b)
                    guard g == generation else {
                        throw ExactlyOnceError(.corruptData, "journal \(path) says generation \(g) but is named for \(generation); nothing was changed")
                    }
                } catch let problem as JournalFormat.HeaderProblem {
                    let why: String
                    switch problem {
                    case .tooShort: why = "is shorter than a journal header (\(b.count) bytes)"
                    case .foreign: why = "does not start with this library's journal header (a foreign file)"
                    case .badChecksum: why = "has a damaged header (checksum mismatch)"
                    case .unsupportedVersion(let v): why = "has format version \(v); this build reads version \(JournalFormat.version)"
                    }
                    throw ExactlyOnceError(.corruptData, "journal \(path) \(why); nothing was changed")
                }
                return try scan(b, machine: &machine, salvage: configuration.salvage, path: path, report: &report)
            }
            report.generation = generation
            if validEnd < bytes.count {
                try Files.truncateFile(fd, to: validEnd, path: path)
                try Files.sync(fd, path: path)
            }
            try Files.seekToEnd(fd, path: path)
            var removed: [String] = []
            for (g, n) in segments where g != generation { removed.append(n) }
            removed += leftovers
            for n in removed { Files.unlinkFile(directory + "/" + n) }
            if !removed.isEmpty { try Files.syncDirectory(directory) }
            report.removedFiles = removed.sorted()
            report.liveRecords = machine.records.count
            let core = JournalCore(configuration: configuration, directory: directory, machine: machine, fd: fd, segmentPath: path,
                                   generation: generation, lockFD: lockFD, segmentBytes: validEnd)
            if !report.salvagedRanges.isEmpty {
                // Rewrite without the dropped bytes, so the next open is clean.
                core.withLock { $0.compactions = [] }
                core.compactSynchronously(now: now)
            }
            return (core, report)
        } catch {
            Files.closeFile(fd)
            throw error
        }
    }

    /// Compaction before the writer runs (after a salvage).
    private func compactSynchronously(now: Timestamp) {
        let (bytes, _) = Self.snapshotBytes(withLock { $0.machine }, generation: generation + 1)
        let finalPath = Self.segmentPath(directory, generation + 1)
        guard let newFD = try? Files.openFile(finalPath + ".tmp", create: true) else { return }
        do {
            try Files.truncateFile(newFD, to: 0, path: finalPath)
            try Files.writeAll(newFD, bytes, path: finalPath)
            try Files.sync(newFD, path: finalPath)
            try Files.renameFile(finalPath + ".tmp", finalPath)
            try Files.syncDirectory(directory)
            Files.closeFile(fd)
            Files.unlinkFile(segmentPath)
            fd = newFD
            segmentPath = finalPath
            generation += 1
            withLock { s in
                s.segmentBytes = bytes.count
                s.compactedBytes = bytes.count
            }
        } catch {
            Files.closeFile(newFD)
            Files.unlinkFile(finalPath + ".tmp")
        }
    }

    /// Replays records from after the header; returns where the valid journal ends.
    static func scan(_ b: UnsafeRawBufferPointer, machine: inout DedupeStateMachine, salvage: Bool, path: String,
                     report: inout RecoveryReport) throws -> Int {
        var at = JournalFormat.headerSize
        let n = b.count
        var entries: [JournalEntry] = []
        entries.reserveCapacity(16)
        while at < n {
            entries.removeAll(keepingCapacity: true)
            switch decodeRecord(b, at: at, into: &entries) {
            case .success(let next):
                for e in entries {
                    switch e {
                    case .change(let c): machine.replay(c)
                    case .token(let t): machine.raiseLastToken(to: t)
                    }
                }
                report.journalRecords += 1
                report.changes += entries.count
                at = next
            case .failure(let problem):
                if let q = nextValidRecord(b, after: at) {
                    if salvage {
                        report.salvagedRanges.append(at..<q)
                        at = q
                        continue
                    }
                    throw ExactlyOnceError(.corruptData, """
                        journal \(path) is corrupt at byte \(at) (\(problem.reason)) and valid records follow at byte \(q); \
                        nothing was changed. Restore the directory from a backup, or open with salvage to drop bytes \(at)..<\(q) \
                        (operations recorded there may be processed again)
                        """)
                }
                report.truncatedTailBytes = n - at
                report.tailProblem = problem.reason
                return at
            }
        }
        return n
    }

    /// Decodes the record at `at`; returns the offset after it.
    static func decodeRecord(_ b: UnsafeRawBufferPointer, at: Int, into entries: inout [JournalEntry]) -> Result<Int, MalformedPayload> {
        let n = b.count
        guard n - at >= JournalFormat.recordHeaderSize else {
            return .failure(MalformedPayload(reason: "partial record header (\(n - at) bytes)"))
        }
        let length = Int(JournalFormat.readU32(b, at))
        let crc = JournalFormat.readU32(b, at + 4)
        let start = at + JournalFormat.recordHeaderSize
        guard length >= 4 else { return .failure(MalformedPayload(reason: length == 0 ? "zero-filled record" : "record too short")) }
        guard length <= JournalFormat.maximumPayload else { return .failure(MalformedPayload(reason: "record length \(length) exceeds the limit")) }
        guard n - start >= length else { return .failure(MalformedPayload(reason: "partial record (\(n - start) of \(length) bytes)")) }
        guard CRC32C.checksum(UnsafeRawBufferPointer(rebasing: b[start..<(start + length)])) == crc else {
            return .failure(MalformedPayload(reason: "checksum mismatch"))
        }
        var r = ByteReader(b, from: start, to: start + length)
        do throws(MalformedPayload) {
            let count = Int(try r.u32())
            guard count <= length else { throw MalformedPayload(reason: "change count \(count) exceeds the record") }
            for _ in 0..<count { entries.append(try r.entry()) }
            guard r.at == r.end else { throw MalformedPayload(reason: "trailing bytes in record") }
        } catch {
            return .failure(error)
        }
        return .success(start + length)
    }

    /// The first offset after `at` where a complete, valid record starts, if any.
    static func nextValidRecord(_ b: UnsafeRawBufferPointer, after at: Int) -> Int? {
        var scratch: [JournalEntry] = []
        var q = at + 1
        while q + JournalFormat.recordHeaderSize + 4 <= b.count {
            let length = Int(JournalFormat.readU32(b, q))
            if length >= 4, length <= b.count - q - JournalFormat.recordHeaderSize {
                scratch.removeAll(keepingCapacity: true)
                if case .success = decodeRecord(b, at: q, into: &scratch) { return q }
            }
            q += 1
        }
        return nil
    }

    // MARK: Test hooks

    func setCrashAfter(_ step: CompactionStep?) { withLock { $0.crashAfter = step } }
}
