import Logging
import Metrics

/// What one lane (one partition of one poll) did.
struct LaneResult: Sendable {
    var partition: PartitionID
    /// The offset to commit: the first record not finished (or the end of the batch).
    var commit: Offset?
    /// Where to read again: the first record not finished, when the lane stopped early (the
    /// first record of the batch when it was fenced).
    var seek: Offset?
    var report = StepReport()
    /// Set when the store refused the lane's epoch (the partition moved on): commit nothing.
    var fenced: ExactlyOnceError?
    /// Set when the lane met an error retrying cannot fix: the consumer stops with it.
    var failure: ExactlyOnceError?
}

/// Why a lane (or one of its key sequences) stopped before the end of its records.
enum LaneStop: Sendable {
    /// Re-read from the first unfinished record later (store or transport unreachable, a key
    /// held by another member, a commit conflict).
    case pause
    /// The partition moved to a newer owner: commit nothing more.
    case fenced(ExactlyOnceError)
    /// An error retrying cannot fix: stop the consumer.
    case fail(ExactlyOnceError)

    /// The stop that wins when two sequences (or a stop and its commit) both stop: failing
    /// beats being fenced, which beats pausing; otherwise the later one.
    static func worse(_ a: LaneStop, _ b: LaneStop) -> LaneStop {
        switch (a, b) {
        case (.fail, _), (.fenced, .pause): a
        default: b
        }
    }

    /// How a store or transport error stops a lane.
    static func after(_ e: ExactlyOnceError) -> LaneStop {
        if e.code == .fenced { return .fenced(e) }
        if e.isRetriable || e.code == .staleGeneration { return .pause }
        return .fail(e)
    }
}

/// A record's idempotency key and payload fingerprint. Declared outside the generic lane types
/// so its layout is fixed: values of it are not boxed in unspecialized generic code.
struct RecordIdentity: Sendable {
    var key: IdempotencyKey
    var fingerprint: PayloadFingerprint
}

/// One partition's processing of one poll's records.
///
/// 1. Every record gets its idempotency key and payload fingerprint; the first record of each
///    key is claimed, all in one store call, under the lane's partition fence.
/// 2. The records run in sequences: one sequence of all records (``Ordering/partition``), or
///    one per record key (``Ordering/key(maxConcurrency:)``), several at once. A sequence walks
///    its records in offset order (see ``SequenceRun``).
/// 3. The lane's commit offset is the first record not finished; if any sequence stopped, the
///    lane re-reads from there.
struct Lane<Transport: MessageTransport, Store: DedupeStore>: Sendable {
    typealias Identity = RecordIdentity

    let consumer: ExactlyOnceConsumer<Transport, Store>
    let memberID: String
    let partition: PartitionID
    let fence: PartitionFence

    func process(_ records: [ConsumedRecord]) async throws -> LaneResult {
        let c = consumer
        var result = LaneResult(partition: partition)
        guard !records.isEmpty else { return result }

        // Keys and fingerprints; malformed records (no key) are dead-lettered, never dropped.
        let identities: [Identity?] = records.map { r in
            (try? c.keyFor(r)).map { Identity(key: $0, fingerprint: PayloadFingerprint.of(r.payload)) }
        }
        let sequences = Self.sequences(records, identities, ordering: c.configuration.ordering)

        // One claim per key, for the first record of it. In key mode each sequence's head is a
        // charged claim (it is processed now, concurrently with the other heads); the rest are
        // prefetches, charged only if no earlier request of the batch was granted.
        var firstOfKey: [IdempotencyKey: Int] = [:]
        firstOfKey.reserveCapacity(records.count)
        var requested: [Int] = []  // the first record of each key, in offset order
        requested.reserveCapacity(records.count)
        for (i, id) in identities.enumerated() {
            guard let id else { continue }
            if Self.noteFirst(&firstOfKey[id.key], i) { requested.append(i) }  // one hash lookup
        }
        var heads = Set<Int>()
        if case .key = c.configuration.ordering.mode {
            for s in sequences { if let h = s.first(where: { identities[$0] != nil && firstOfKey[identities[$0]!.key] == $0 }) { heads.insert(h) } }
        }
        if !heads.isEmpty { requested = requested.filter { heads.contains($0) } + requested.filter { !heads.contains($0) } }
        let requests = requested.map { i in
            ClaimRequest(key: identities[i]!.key, fingerprint: identities[i]!.fingerprint, lease: c.configuration.lease, fence: fence, prefetch: !heads.contains(i))
        }

        if c.faultsEnabled { try await c.faults.reach(.beforeClaim, FaultContext(memberID: memberID, partition: partition, offset: records[0].offset)) }
        var claims = [ClaimResult?](repeating: nil, count: records.count)
        if !requests.isEmpty {
            do {
                let answers = try await c.store.claim(requests)
                guard answers.count == requests.count else {
                    throw ExactlyOnceError(.storeUnavailable, "the store answered \(answers.count) claim results for \(requests.count) requests")
                }
                for (i, answer) in zip(requested, answers) { claims[i] = answer }
            } catch let e as ExactlyOnceError {
                return finish(result, records: records, done: [Bool](repeating: false, count: records.count), stop: .after(e))
            }
        }
        if c.faultsEnabled { try await c.faults.reach(.afterClaim, FaultContext(memberID: memberID, partition: partition, offset: records[0].offset)) }

        var done = [Bool](repeating: false, count: records.count)
        var stop: LaneStop?
        func merge(_ r: SequenceRun<Transport, Store>.Result) {
            for i in r.done { done[i] = true }
            result.report.add(r.report)
            if let next = r.stop { stop = stop.map { LaneStop.worse($0, next) } ?? next }
        }
        let claimed = claims
        let run: @Sendable ([Int]) async throws -> SequenceRun<Transport, Store>.Result = { [self] indices in
            var s = SequenceRun(lane: self, records: records, identities: identities, claims: claimed)
            return try await s.run(indices)
        }
        if case .key(let width) = c.configuration.ordering.mode, sequences.count > 1 {
            try await withThrowingTaskGroup(of: SequenceRun<Transport, Store>.Result.self) { group in
                var pending = sequences.makeIterator()
                for _ in 0..<width {
                    guard let s = pending.next() else { break }
                    group.addTask { try await run(s) }
                }
                for try await r in group {
                    merge(r)
                    if let s = pending.next() { group.addTask { try await run(s) } }
                }
            }
        } else {
            for s in sequences { merge(try await run(s)) }
        }
        return finish(result, records: records, done: done, stop: stop)
    }

    /// Records `index` in an empty slot; returns whether it was empty.
    private static func noteFirst(_ slot: inout Int?, _ index: Int) -> Bool {
        guard slot == nil else { return false }
        slot = index
        return true
    }

    /// Commit and seek positions from what finished.
    private func finish(_ partial: LaneResult, records: [ConsumedRecord], done: [Bool], stop: LaneStop?) -> LaneResult {
        var result = partial
        if case .fenced(let e) = stop {
            // Commit nothing. Read the batch again: if the partition really moved, the next poll
            // says so (and the new owner reads it); if the transport still assigns it here, the
            // session sees the fence last and says so (see maxFencedDuration).
            consumer.metrics.fenced.increment()
            result.report.fencedLanes = 1
            result.fenced = e
            result.seek = records[0].offset
            return result
        }
        if let firstOpen = done.firstIndex(of: false) {
            // Stopped early: commit what precedes the first unfinished record, read again from it.
            if firstOpen > 0 { result.commit = records[firstOpen].offset }
            result.seek = records[firstOpen].offset
            if case .fail(let e) = stop {
                result.failure = e
            } else {
                result.report.pausedLanes = 1
                consumer.metrics.pausedLanes.increment()
                consumer.logger.debug("lane paused; re-reading from the first unfinished record", metadata: [
                    "partition": "\(partition)", "offset": "\(records[firstOpen].offset)",
                ])
            }
        } else {
            result.commit = records[records.count - 1].offset.next
        }
        return result
    }

    /// The sequences of record indices the lane runs, each in offset order.
    static func sequences(_ records: [ConsumedRecord], _ identities: [Identity?], ordering: Ordering) -> [[Int]] {
        guard case .key = ordering.mode else { return [Array(records.indices)] }
        // A sequence per record key, merged where one idempotency key appears under two record
        // keys (its records must not run concurrently).
        var parent: [Int] = []
        func root(_ g: Int) -> Int {
            var g = g
            while parent[g] != g { parent[g] = parent[parent[g]]; g = parent[g] }
            return g
        }
        var groupOfRecordKey: [[UInt8]?: Int] = [:]
        var groupOfKey: [IdempotencyKey: Int] = [:]
        var groupOf: [Int] = []
        groupOf.reserveCapacity(records.count)
        for (i, r) in records.enumerated() {
            let g: Int
            if let existing = groupOfRecordKey[r.key] {
                g = existing
            } else {
                g = parent.count
                parent.append(g)
                groupOfRecordKey[r.key] = g
            }
            if let key = identities[i]?.key {
                if let other = groupOfKey[key] {
                    let (a, b) = (root(other), root(g))
                    if a != b { parent[max(a, b)] = min(a, b) }
                } else {
                    groupOfKey[key] = g
                }
            }
            groupOf.append(g)
        }
        var order: [Int] = []
        var members: [Int: [Int]] = [:]
        for (i, g) in groupOf.enumerated() {
            let r = root(g)
            if members[r] == nil { order.append(r) }
            members[r, default: []].append(i)
        }
        return order.map { members[$0]! }
    }
}

/// One sequence of a lane: its records, one at a time, in offset order. The walk, per record:
///
/// - no key: dead-letter it (malformed);
/// - claim answered `completed`: answer the stored outcome (G4), done;
/// - `conflict`: dead-letter it (G5), done;
/// - `inProgress`: another member holds it: stop, re-read later;
/// - `new` beyond the attempt limit: dead-letter it and stage a dead-lettered outcome;
/// - `new`: run the handler inside the store's ``CompletionBatch`` and stage its completion;
///   if the handler throws: release the claim, back off, claim again, and go round once more.
///
/// Staged completions commit when the batch is full, before a key repeats (its claim must see
/// the completion), and at the end; a record is finished when its completion committed (or it
/// needed none). The first record not finished is where the lane commits and re-reads.
struct SequenceRun<Transport: MessageTransport, Store: DedupeStore> {
    typealias Identity = RecordIdentity

    struct Result: Sendable {
        var done: [Int] = []
        var report = StepReport()
        var stop: LaneStop?
    }

    /// What handling one record came to.
    enum Step {
        case done
        case staged(Outcome, deadLettered: Bool)
        case stop(LaneStop)
    }

    let lane: Lane<Transport, Store>
    let records: [ConsumedRecord]
    let identities: [Identity?]
    let claims: [ClaimResult?]
    var consumer: ExactlyOnceConsumer<Transport, Store> { lane.consumer }
    private var batch: Store.Batch
    private var staged: [(index: Int, outcome: Outcome, deadLettered: Bool)] = []
    private var result = Result()
    private let limit: Int

    init(lane: Lane<Transport, Store>, records: [ConsumedRecord], identities: [Identity?], claims: [ClaimResult?]) {
        self.lane = lane
        self.records = records
        self.identities = identities
        self.claims = claims
        let c = lane.consumer.configuration
        self.limit = max(1, min(c.completionBatchSize, lane.consumer.store.completionBatchLimit))
        self.batch = lane.consumer.store.makeCompletionBatch(CompletionBatchOptions(
            limit: limit, unknownOutcomeRetries: c.completionRetries, backoff: c.unavailableBackoff))
    }

    mutating func run(_ indices: [Int]) async throws -> Result {
        do {
            for i in indices {
                switch try await handle(i) {
                case .done: result.done.append(i)
                case .staged(let outcome, let deadLettered): staged.append((i, outcome, deadLettered))
                case .stop(let s):
                    result.stop = s
                    // Keep what is staged before the stop, unless the partition moved on.
                    if case .fenced = s { await batch.discard() } else if let s2 = try await commit() { result.stop = LaneStop.worse(s, s2) }
                    return result
                }
                if batch.count >= limit, let s = try await commit() {
                    result.stop = s
                    return result
                }
            }
            if let s = try await commit() { result.stop = s }
            return result
        } catch {
            // A crash (injected) or cancellation: nothing staged survives, as in a dead process.
            await batch.discard()
            throw error
        }
    }


    private func request(_ id: Identity, prefetch: Bool = false) -> ClaimRequest {
        ClaimRequest(key: id.key, fingerprint: id.fingerprint, lease: consumer.configuration.lease, fence: lane.fence, prefetch: prefetch)
    }

    private mutating func handle(_ i: Int) async throws -> Step {
        let record = records[i]
        guard let identity = identities[i] else {
            if let stop = try await deadLetter(record, key: nil, reason: "malformed record: no valid idempotency key") { return .stop(stop) }
            result.report.deadLettered += 1
            return .done
        }
        let claimResult: ClaimResult
        if let answered = claims[i] {
            claimResult = answered
        } else {
            // A repeat of a key earlier in this sequence: its completion must be in the store first.
            if let stop = try await commit() { return .stop(stop) }
            do {
                claimResult = try await consumer.store.claim(request(identity))
            } catch let e as ExactlyOnceError {
                return .stop(.after(e))
            }
        }
        return try await finish(record, identity, claimResult)
    }

    private mutating func finish(_ record: ConsumedRecord, _ identity: Identity, _ first: ClaimResult) async throws -> Step {
        let c = consumer
        var claimResult = first
        var retry = 0
        while true {
            switch claimResult {
            case .completed(let outcome):
                result.report.duplicates += 1
                c.metrics.duplicates.increment()
                await c.observer?(record, outcome, true)
                return .done
            case .conflict:
                result.report.conflicts += 1
                c.metrics.conflicts.increment()
                c.logger.info("idempotency key reused with a different payload; dead-lettering", metadata: [
                    "key": "\(identity.key)", "partition": "\(record.partition)", "offset": "\(record.offset)",
                ])
                if let stop = try await deadLetter(record, key: identity.key, reason: "conflict: key reused with a different payload") { return .stop(stop) }
                result.report.deadLettered += 1
                return .done
            case .inProgress:
                return .stop(.pause)
            case .new(let claim):
                if claim.attempt > 1 && retry == 0 { c.metrics.leaseExpiries.increment() }
                if claim.attempt > c.configuration.maxAttempts {
                    let reason = "gave up after \(claim.attempt - 1) attempts"
                    if let stop = try await deadLetter(record, key: identity.key, reason: reason) { return .stop(stop) }
                    result.report.deadLettered += 1
                    let outcome = Outcome(status: .deadLettered, detail: Array(reason.utf8))
                    do {
                        try await batch.stage(claim, outcome: outcome)
                    } catch let e as ExactlyOnceError {
                        return .stop(.after(e))
                    }
                    return .staged(outcome, deadLettered: true)
                }
                let handlerError: any Error
                switch try await attempt(record, identity, claim) {
                case .staged(let outcome): return .staged(outcome, deadLettered: false)
                case .stopped(let stop): return .stop(stop)
                case .handlerFailed(let error): handlerError = error
                }
                // A failed attempt: release (attempt count kept), back off, claim again.
                result.report.retries += 1
                retry += 1
                c.metrics.retries.increment()
                c.logger.debug("handler failed; retrying", metadata: [
                    "key": "\(identity.key)", "attempt": "\(claim.attempt)", "error": "\(String(describing: handlerError).prefix(200))",
                ])
                do {
                    try await c.store.release(claim, reason: String(String(describing: handlerError).prefix(512)))
                    let d = c.configuration.retryBackoff.delay(forRetry: retry)
                    if d > .zero { try await Task.sleep(for: d) }
                    claimResult = try await c.store.claim(request(identity))
                } catch let e as ExactlyOnceError {
                    return .stop(.after(e))
                }
            }
        }
    }

    private enum Attempt {
        case staged(Outcome)
        case stopped(LaneStop)
        case handlerFailed(any Error)
    }

    /// Marks an error thrown by the handler (as opposed to one of the batch's own).
    private struct HandlerFailed: Error {}

    /// Runs the handler for `claim` inside the batch.
    private mutating func attempt(_ record: ConsumedRecord, _ identity: Identity, _ claim: Claim) async throws -> Attempt {
        let c = consumer
        let ctx = FaultContext(memberID: lane.memberID, partition: record.partition, offset: record.offset, key: identity.key)
        var handlerError: (any Error)?
        let outcome: Outcome
        do {
            outcome = try await batch.perform(claim) { transaction in
                var hc = HandlerContext(record: record, key: identity.key, claim: claim, transaction: transaction)
                let outcome: Outcome
                do {
                    outcome = try await withHandlerSpan(record, key: identity.key, attempt: claim.attempt, enabled: c.tracing) {
                        try await c.handler(&hc)
                    }
                } catch let crash as InjectedCrash {
                    throw crash
                } catch {
                    handlerError = error
                    throw HandlerFailed()
                }
                if c.faultsEnabled { try await c.faults.reach(.insideEffect, ctx) }
                transaction = hc.transaction
                return outcome
            }
        } catch is HandlerFailed {
            return .handlerFailed(handlerError ?? HandlerFailed())
        } catch let e as ExactlyOnceError {
            return .stopped(.after(e))
        }
        if c.faultsEnabled { try await c.faults.reach(.afterEffect, ctx) }
        return .staged(outcome)
    }

    /// Commits the staged completions. Returns why the sequence must stop, if it must.
    private mutating func commit() async throws -> LaneStop? {
        guard !staged.isEmpty else { return nil }
        let c = consumer
        // Moved out and back after, so the buffer is reused (no copy-on-write of a shared array).
        var entries: [(index: Int, outcome: Outcome, deadLettered: Bool)] = []
        swap(&entries, &staged)
        defer {
            entries.removeAll(keepingCapacity: true)
            staged = entries
        }
        let outcome: BatchCompletion
        do {
            outcome = try await batch.commit()
        } catch let e as ExactlyOnceError {
            // Unknown outcome: re-read and claim again (answers tell what happened).
            return .after(e)
        }
        let applied = min(max(outcome.applied, 0), entries.count)
        for entry in entries[..<applied] {
            result.done.append(entry.index)
            if !entry.deadLettered {
                result.report.processed += 1
                c.metrics.processed.increment()
            }
            await c.observer?(records[entry.index], entry.outcome, false)
        }
        if applied > 0, c.faultsEnabled {
            let last = entries[applied - 1].index
            try await c.faults.reach(.afterComplete, FaultContext(memberID: lane.memberID, partition: records[last].partition, offset: records[last].offset, key: identities[last]?.key))
        }
        guard let failure = outcome.failure, applied < entries.count else { return nil }
        c.logger.debug("completion refused; re-reading", metadata: ["partition": "\(lane.partition)", "error": "\(failure)"])
        if failure.code == .transactionConflict {
            result.report.retries += 1
            c.metrics.retries.increment()
            return .pause
        }
        return .after(failure)
    }

    /// Publishes the record to the dead-letter topic. The caller completes its claim (if any)
    /// with a dead-lettered outcome, so a redelivery is answered, not dead-lettered again.
    /// Returns why the sequence must stop when the publish failed.
    /// Cancellation is thrown (the sequence ends as a crash would), never taken for an outage.
    private func deadLetter(_ record: ConsumedRecord, key: IdempotencyKey?, reason: String) async throws -> LaneStop? {
        let c = consumer
        var headers = record.headers
        headers[DeadLetterHeaders.reason] = reason
        headers[DeadLetterHeaders.originalTopic] = record.topic
        headers[DeadLetterHeaders.originalPartition] = "\(record.partition.rawValue)"
        headers[DeadLetterHeaders.originalOffset] = "\(record.offset.rawValue)"
        if let key { headers[DeadLetterHeaders.idempotencyKey] = key.rawValue }
        let out = OutgoingRecord(key: record.key, payload: record.payload, headers: headers)
        do {
            _ = try await c.transport.publish(out, to: c.configuration.deadLetterTopic, partitioning: .explicit(PartitionID(0)))
        } catch let e as ExactlyOnceError {
            c.logger.info("dead-letter publish failed; pausing the lane", metadata: ["partition": "\(record.partition)", "error": "\(e)"])
            return .after(e)
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            return .pause
        }
        c.metrics.deadLettered.increment()
        c.logger.info("record dead-lettered", metadata: [
            "partition": "\(record.partition)", "offset": "\(record.offset)", "reason": "\(reason)",
        ])
        return nil
    }
}
