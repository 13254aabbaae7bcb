import ExactlyOnce
import Foundation

/// The file store's shared state and its writer thread.
///
/// State machine of an operation: apply to the index and append its record to `pending`
/// (under the lock, one step) → the writer takes a batch of pending records, writes and syncs it
/// (outside the lock) → `durableSeq` moves past the operation → its continuation resumes.
/// Sequence numbers are assigned in the same critical section that appends the bytes, so the
/// order of records in the file is the order of sequence numbers, and "durable up to N" means
/// every operation numbered N or less is on disk. They are the log records' sequence numbers on
/// disk too: recovery starts them at the last replayed record, and compaction's end record
/// says where they go on, so they never restart.
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
        /// The snapshot records are written, the end record is not.
        case snapshotWritten
        /// The end record is written, not yet synced.
        case endWritten
        case temporarySynced, renamed, directorySynced
        /// The old segment is deleted (the compaction is over).
        case oldRemoved
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

    /// A core over the open segment `fd` (positioned at its end), whose last log record is
    /// `lastSequence`.
    init(configuration: FileStoreConfiguration, directory: String, machine: DedupeStateMachine, fd: Int32,
         segmentPath: String, generation: UInt64, lockFD: Int32, segmentBytes: Int, lastSequence: UInt64) {
        self.configuration = configuration
        self.directory = directory
        self.fd = fd
        self.segmentPath = segmentPath
        self.generation = generation
        self.lockFD = lockFD
        self.state = State(machine: machine, appendedSeq: lastSequence, durableSeq: lastSequence,
                           segmentBytes: segmentBytes, compactedBytes: segmentBytes)
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
        let (result, seq, durable): (Result<R, any Error>, UInt64, Bool) = try withLock { s in
            if s.closed { throw ExactlyOnceError(.shutDown, "the file store is closed") }
            if let f = s.failure { throw f }
            s.changes.removeAll(keepingCapacity: true)
            let result = Result { try body(&s.machine, &s.changes) }
            // A throwing operation may still have changed something (a raised fence): journal it.
            if !s.changes.isEmpty {
                s.appendedSeq += 1
                JournalFormat.appendLogRecord(s.changes, sequence: s.appendedSeq, to: &s.pending)
                s.pendingEnds.append((s.appendedSeq, s.pending.count))
                if s.writerIdle { cond.signal() }
            }
            return (result, s.appendedSeq, s.durableSeq >= s.appendedSeq)
        }
        // A read of durable state answers at once; anything else waits for its record (and
        // every earlier one) without taking the lock a second time first.
        if !durable { try await waitForWriter(seq) }
        return try result.get()
    }

    /// Suspends until every record numbered `seq` or less is durable.
    private func waitForWriter(_ seq: UInt64) async throws {
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
        do {
            var live = snapshot
            var dropped: [DedupeStateMachine.Change] = []
            _ = live.purgeExpired(now: now, changes: &dropped)
            // The snapshot holds every record numbered up to `seqAtSnapshot`; the log of the
            // new segment goes on from the next one (records appended meanwhile are pending).
            let (newFD, bytes, records) = try SegmentWriter.write(live, generation: newGeneration, lastSequence: seqAtSnapshot,
                                                                  directory: directory, crashAfter: crashAfter)
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
                s.segmentBytes = bytes
                s.compactedBytes = bytes
                return takeReadyWaiters(&s)
            }
            fd = newFD
            segmentPath = Self.segmentPath(directory, newGeneration)
            generation = newGeneration
            Files.closeFile(oldFD)
            Files.unlinkFile(oldPath)
            try? Files.syncDirectory(directory)
            for w in ready { w.cont.resume() }
            if crashAfter == .oldRemoved {
                fail(ExactlyOnceError(.storeUnavailable, "simulated crash after compaction"))
                for r in requests { r.cont.resume(throwing: ExactlyOnceError(.storeUnavailable, "simulated crash after compaction")) }
                return
            }
            let report = CompactionReport(bytesBefore: bytesBefore, bytesAfter: bytes, records: records, generation: newGeneration)
            for r in requests { r.cont.resume(returning: report) }
        } catch is SimulatedCrash {
            fail(ExactlyOnceError(.storeUnavailable, "simulated crash during compaction"))
            for r in requests { r.cont.resume(throwing: ExactlyOnceError(.storeUnavailable, "simulated crash during compaction")) }
        } catch let e as SegmentWriter.NotDurable {
            // The new segment was renamed into place but its directory entry may not be
            // durable: which generation the disk holds is unknown, so stop (a reopen decides;
            // nothing after the snapshot was acknowledged).
            let error = ExactlyOnceError(.storeUnavailable, "the file store stopped: a compacted journal could not be made durable (\(e.underlying)); close it and open the directory again")
            fail(error)
            for r in requests { r.cont.resume(throwing: error) }
        } catch {
            // Nothing was renamed: the old segment is untouched and still current. Report and go on with it.
            let e = (error as? ExactlyOnceError) ?? ExactlyOnceError(.ioFailure, "\(error)")
            for r in requests { r.cont.resume(throwing: e) }
        }
    }

    // MARK: Segment names

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

    /// Replaces the segment with a compacted one before the writer runs (after a salvage, or
    /// to migrate an older format). Throws, leaving the old segment current, when the new one
    /// could not be written; fails the open when its durability is unknown.
    func replaceSegmentBeforeWriterStarts() throws {
        let (machine, lastSequence) = withLock { ($0.machine, $0.appendedSeq) }
        let (newFD, bytes, _) = try SegmentWriter.write(machine, generation: generation + 1, lastSequence: lastSequence, directory: directory)
        Files.closeFile(fd)
        Files.unlinkFile(segmentPath)
        fd = newFD
        segmentPath = Self.segmentPath(directory, generation + 1)
        generation += 1
        try Files.syncDirectory(directory)
        withLock { s in
            s.segmentBytes = bytes
            s.compactedBytes = bytes
        }
    }

    /// Closes the segment of a core whose writer never started (an open that failed late; the
    /// caller releases the lock).
    func closeSegmentBeforeWriterStarts() {
        Files.closeFile(fd)
        withLock { $0.filesClosed = true }
    }

    /// The current generation (for the open path, before the writer runs).
    var currentGeneration: UInt64 { generation }

    // MARK: Test hooks

    func setCrashAfter(_ step: CompactionStep?) { withLock { $0.crashAfter = step } }
}
