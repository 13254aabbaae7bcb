import Logging
import Metrics
import ServiceLifecycle

/// The exactly-once-effect consumer: turns the transport's at-least-once delivery into one effect
/// per idempotency key, in partition order, committing offsets only past finished records.
///
/// For every poll: records are grouped by partition; each partition is one sequential lane and
/// lanes run in parallel. In a lane the batch's keys are claimed in one store call; new records
/// run the handler, whose transactional writes commit with the completion; duplicates get the
/// stored outcome; conflicts and records that exhaust their attempts go to the dead-letter topic.
/// Then the contiguous finished prefix of each lane is committed. A lane that cannot finish a
/// record (store unreachable, key held elsewhere) stops there, commits what precedes it and
/// re-reads the rest. A lane whose partition moved on is fenced by the store and commits nothing.
///
/// Run it as a `Service` in a `ServiceGroup`; on graceful shutdown it finishes and commits the
/// batch in hand, then leaves the group.
public final class ExactlyOnceConsumer<Transport: MessageTransport, Store: DedupeStore>: Service {
    let transport: Transport
    let store: Store
    let configuration: ConsumerConfiguration
    let keyFor: KeyExtractor
    let handler: RecordHandler
    let observer: OutcomeObserver?
    let faults: any FaultInjector
    /// False when no injector was given: the hot path then skips the hook calls entirely.
    let faultsEnabled: Bool
    let logger: Logger
    let metrics: ConsumerMetrics

    /// Creates a consumer.
    /// - Parameters:
    ///   - key: derives each record's idempotency key.
    ///   - handler: the effect for new records.
    ///   - observer: receives every outcome, replayed or not (to answer clients).
    ///   - faults: fault injection (tests and demos only).
    /// - Throws: ``ExactlyOnceError/Code/invalidConfiguration`` for an invalid configuration.
    public init(transport: Transport, store: Store, configuration: ConsumerConfiguration, logger: Logger,
                key: @escaping KeyExtractor, observer: OutcomeObserver? = nil, faults: any FaultInjector = NoFaults(),
                handler: @escaping RecordHandler) throws {
        try configuration.validate()
        self.transport = transport
        self.store = store
        self.configuration = configuration
        self.keyFor = key
        self.handler = handler
        self.observer = observer
        self.faults = faults
        self.faultsEnabled = !(faults is NoFaults)
        self.logger = logger
        self.metrics = ConsumerMetrics(group: configuration.group, topic: configuration.topic)
    }

    /// Joins the group and processes until cancelled or gracefully shut down; then commits the
    /// batch in hand and leaves.
    public func run() async throws {
        let session = try await makeSession()
        let stop = StopFlag()
        try await withGracefulShutdownHandler {
            var failures = 0
            while !stop.isSet && !Task.isCancelled {
                do {
                    let step = try await session.step()
                    failures = 0
                    if step.records == 0 && !stop.isSet {
                        try? await Task.sleep(for: configuration.idleWait)
                    }
                } catch let e as ExactlyOnceError where e.isRetriable {
                    // The transport (or a store it shares) is unreachable: nothing was processed
                    // that is not already recorded in the store, so wait and poll again.
                    failures += 1
                    logger.warning("poll failed; retrying", metadata: [
                        "member": "\(configuration.memberID)", "error": "\(e)", "retry": "\(failures)",
                    ])
                    try? await Task.sleep(for: configuration.unavailableBackoff.delay(forRetry: failures))
                }
            }
        } onGracefulShutdown: {
            stop.set()
        }
        try await session.close()
    }

    /// Joins the group and returns a session that processes one poll per ``ConsumerSession/step()``.
    /// The service's ``run()`` loops over this; the simulator drives it step by step.
    public func makeSession() async throws -> ConsumerSession<Transport, Store> {
        let sub = try await transport.subscribe(topic: configuration.topic, group: configuration.group, memberID: configuration.memberID)
        return ConsumerSession(consumer: self, subscription: sub)
    }
}

final class StopFlag: Sendable {
    private let flag = Atomicish()
    func set() { flag.store(true) }
    var isSet: Bool { flag.load() }
}

import Synchronization
final class Atomicish: Sendable {
    private let value = Atomic<Bool>(false)
    func store(_ v: Bool) { value.store(v, ordering: .releasing) }
    func load() -> Bool { value.load(ordering: .acquiring) }
}

struct ConsumerMetrics: Sendable {
    let processed: Counter
    let duplicates: Counter
    let conflicts: Counter
    let retries: Counter
    let deadLettered: Counter
    let leaseExpiries: Counter
    let fenced: Counter
    let commitLag: Gauge

    init(group: String, topic: String) {
        let d = [("group", group), ("topic", topic)]
        processed = Counter(label: "exactly_once_processed_total", dimensions: d)
        duplicates = Counter(label: "exactly_once_duplicates_total", dimensions: d)
        conflicts = Counter(label: "exactly_once_conflicts_total", dimensions: d)
        retries = Counter(label: "exactly_once_retries_total", dimensions: d)
        deadLettered = Counter(label: "exactly_once_dead_lettered_total", dimensions: d)
        leaseExpiries = Counter(label: "exactly_once_lease_expiries_total", dimensions: d)
        fenced = Counter(label: "exactly_once_fenced_total", dimensions: d)
        commitLag = Gauge(label: "exactly_once_commit_lag", dimensions: d)
    }
}

/// What one ``ConsumerSession/step()`` did.
public struct StepReport: Sendable, Hashable {
    /// Records polled.
    public var records = 0
    /// New records whose effect was applied or rejected by the handler.
    public var processed = 0
    /// Records answered with a stored outcome.
    public var duplicates = 0
    /// Records whose key was known with another payload.
    public var conflicts = 0
    /// Handler attempts that failed and were retried.
    public var retries = 0
    /// Records sent to the dead-letter topic.
    public var deadLettered = 0
    /// Lanes that stopped early and will re-read.
    public var pausedLanes = 0
    /// Lanes refused because their partition moved on.
    public var fencedLanes = 0
    /// Whether the offset commit was accepted.
    public var committed = false
    /// Creates an empty report.
    public init() {}

    mutating func add(_ o: StepReport) {
        processed += o.processed; duplicates += o.duplicates; conflicts += o.conflicts; retries += o.retries
        deadLettered += o.deadLettered; pausedLanes += o.pausedLanes; fencedLanes += o.fencedLanes
    }
}

/// One member's processing loop, one poll at a time. Not thread-safe: drive it from one task.
public final class ConsumerSession<Transport: MessageTransport, Store: DedupeStore> {
    let consumer: ExactlyOnceConsumer<Transport, Store>
    let subscription: Transport.Subscription
    private var assignment: [PartitionID: UInt64] = [:]
    private var unavailableStreak = 0

    init(consumer: ExactlyOnceConsumer<Transport, Store>, subscription: Transport.Subscription) {
        self.consumer = consumer
        self.subscription = subscription
    }

    /// The member id.
    public var memberID: String { subscription.memberID }

    /// The partitions this member owned at its last poll, with their epochs.
    public var currentAssignment: [PartitionID: UInt64] { assignment }

    /// Polls once, processes the batch lane by lane, and commits each lane's finished prefix.
    /// Throws what the fault injector throws and poll errors (retriable ones when the transport
    /// is unreachable; ``run()`` waits and polls again); store trouble pauses the affected lanes,
    /// and a commit that fails with a retriable error is left to the next commit.
    @discardableResult
    public func step() async throws -> StepReport {
        let c = consumer
        let poll: PollResult
        do {
            poll = try await subscription.poll(maxRecords: c.configuration.maxPollRecords)
        } catch let e as ExactlyOnceError where e.code == .staleGeneration {
            throw e
        }
        if poll.assignment != assignment {
            let revoked = Set(assignment.keys).subtracting(poll.assignment.keys)
            let added = Set(poll.assignment.keys).subtracting(assignment.keys)
            if !revoked.isEmpty || !added.isEmpty {
                c.logger.info("assignment changed", metadata: [
                    "member": "\(memberID)", "revoked": "\(revoked.sorted())", "assigned": "\(added.sorted())",
                ])
            }
            assignment = poll.assignment
        }
        var report = StepReport()
        report.records = poll.records.count
        guard !poll.records.isEmpty else { return report }

        // Group by partition, keeping offset order.
        var lanes: [PartitionID: [ConsumedRecord]] = [:]
        for r in poll.records { lanes[r.partition, default: []].append(r) }
        let work = lanes.keys.sorted().compactMap { p -> (PartitionID, UInt64, [ConsumedRecord])? in
            guard let epoch = poll.assignment[p] else { return nil }
            return (p, epoch, lanes[p]!)
        }
        let memberID = self.memberID
        var results: [LaneResult] = []
        if c.configuration.concurrentLanes && work.count > 1 {
            results = try await withThrowingTaskGroup(of: LaneResult.self) { group in
                for (p, epoch, records) in work {
                    group.addTask { try await Lane(consumer: c, memberID: memberID, partition: p, epoch: epoch).process(records) }
                }
                var out: [LaneResult] = []
                for try await r in group { out.append(r) }
                return out
            }
        } else {
            for (p, epoch, records) in work {
                results.append(try await Lane(consumer: c, memberID: memberID, partition: p, epoch: epoch).process(records))
            }
        }

        var offsets: [PartitionID: Offset] = [:]
        for r in results {
            report.add(r.report)
            if let o = r.commit { offsets[r.partition] = o }
            if let s = r.seek { try await subscription.seek(r.partition, to: s) }
        }
        if !offsets.isEmpty {
            let ctx = FaultContext(memberID: memberID)
            if c.faultsEnabled { try await c.faults.reach(.beforeCommit, ctx) }
            do {
                try await subscription.commit(offsets, generation: poll.generation)
                report.committed = true
            } catch let e as ExactlyOnceError where e.code == .staleGeneration {
                c.logger.info("commit refused after rebalance; records will be redelivered to the new owner", metadata: ["member": "\(memberID)"])
            } catch let e as ExactlyOnceError where e.isRetriable {
                // Unknown outcome. The records are complete in the store; the next successful
                // commit covers them, or the next owner reads them again and gets replays.
                c.logger.warning("commit failed; the next commit covers these records", metadata: ["member": "\(memberID)", "error": "\(e)"])
            }
            if c.faultsEnabled { try await c.faults.reach(.afterCommit, ctx) }
        }
        var lag: Int64 = 0
        for (p, end) in poll.endOffsets {
            var done = offsets[p]?.rawValue ?? 0
            if offsets[p] == nil, let committed = try? await subscription.committedOffset(p) { done = committed.rawValue }
            lag += max(0, end.rawValue - done)
        }
        c.metrics.commitLag.record(lag)
        if report.pausedLanes > 0 {
            unavailableStreak += 1
            let d = c.configuration.unavailableBackoff.delay(forRetry: unavailableStreak)
            if d > .zero { try? await Task.sleep(for: d) }
        } else {
            unavailableStreak = 0
        }
        return report
    }

    /// Leaves the group. Call after the last ``step()`` (its commit is already done).
    public func close() async throws {
        try await subscription.close()
    }
}

struct LaneResult: Sendable {
    var partition: PartitionID
    var commit: Offset?
    var seek: Offset?
    var report = StepReport()
}

/// One partition's sequential processing of one batch.
///
/// Completions are buffered and sent to the store in one call at the end of the lane (or before
/// any single-key claim, which must see them); handlers of later records read the buffered writes
/// through ``PendingEffects``, so the lane still sees its own effects in order.
struct Lane<Transport: MessageTransport, Store: DedupeStore>: Sendable {
    let consumer: ExactlyOnceConsumer<Transport, Store>
    let memberID: String
    let partition: PartitionID
    let epoch: UInt64

    enum Stop: Error {
        case pause   // re-read from this record later
        case fenced  // partition moved on; commit nothing more
    }

    struct Buffered {
        var record: ConsumedRecord
        var completion: Completion
        var deadLettered: Bool
    }

    /// The lane's mutable state while it runs.
    final class Progress: @unchecked Sendable {  // used by the lane's own task only
        var result: LaneResult
        var finished: Offset?
        var buffered: [Buffered] = []
        let pending = PendingEffects()
        let batchLimit: Int
        init(partition: PartitionID, batchLimit: Int) {
            result = LaneResult(partition: partition)
            self.batchLimit = max(1, batchLimit)
        }
    }

    var fence: PartitionFence {
        PartitionFence(scope: "\(consumer.configuration.group)/\(consumer.configuration.topic)/\(partition.rawValue)", epoch: epoch)
    }

    func claimRequest(_ identity: (key: IdempotencyKey, fingerprint: PayloadFingerprint), prefetch: Bool = false) -> ClaimRequest {
        ClaimRequest(key: identity.key, fingerprint: identity.fingerprint, lease: consumer.configuration.lease, fence: fence, prefetch: prefetch)
    }

    func process(_ records: [ConsumedRecord]) async throws -> LaneResult {
        let c = consumer
        let progress = Progress(partition: partition, batchLimit: min(c.configuration.completionBatchSize, c.store.completionBatchLimit))

        // Keys and fingerprints; malformed records are dead-lettered, never dropped.
        var identities: [(key: IdempotencyKey, fingerprint: PayloadFingerprint)?] = []
        identities.reserveCapacity(records.count)
        var firstIndexOfKey: [IdempotencyKey: Int] = [:]
        var requests: [ClaimRequest] = []
        var requestIndex: [Int: Int] = [:]
        for (i, r) in records.enumerated() {
            if let key = try? c.keyFor(r) {
                let identity = (key: key, fingerprint: PayloadFingerprint.of(r.payload))
                identities.append(identity)
                if firstIndexOfKey[key] == nil {
                    firstIndexOfKey[key] = i
                    requestIndex[i] = requests.count
                    requests.append(claimRequest(identity, prefetch: true))
                }
            } else {
                identities.append(nil)
            }
        }

        if c.faultsEnabled { try await c.faults.reach(.beforeClaim, FaultContext(memberID: memberID, partition: partition, offset: records.first?.offset)) }
        var claims: [ClaimResult] = []
        do {
            claims = requests.isEmpty ? [] : try await c.store.claim(requests)
        } catch let e as ExactlyOnceError {
            return stopped(e, at: records[0].offset, progress: progress)
        }
        guard claims.count == requests.count else {
            c.logger.error("store answered a wrong number of claim results; pausing lane", metadata: ["partition": "\(partition)"])
            return stopped(ExactlyOnceError(.storeUnavailable, "wrong number of claim results"), at: records[0].offset, progress: progress)
        }
        if c.faultsEnabled { try await c.faults.reach(.afterClaim, FaultContext(memberID: memberID, partition: partition, offset: records.first?.offset)) }

        for (i, record) in records.enumerated() {
            do {
                if let identity = identities[i] {
                    var claimResult: ClaimResult
                    if let ri = requestIndex[i] {
                        claimResult = claims[ri]
                    } else {
                        // A repeat of a key earlier in this batch: its completion must be in the store first.
                        try await flush(progress)
                        claimResult = try await c.store.claim(claimRequest(identity))
                    }
                    try await finish(record, identity: identity, claimResult: claimResult, progress: progress)
                } else {
                    try await deadLetter(record, key: nil, reason: "malformed record: no valid idempotency key")
                    progress.result.report.deadLettered += 1
                }
                if progress.buffered.count >= progress.batchLimit { try await flush(progress) }
                if progress.buffered.isEmpty { progress.finished = record.offset.next }
            } catch let stop as Stop {
                if stop == .fenced { return fenced(progress) }
                // Keep what is done, then re-read from the first record not known to be finished.
                do {
                    try await flush(progress)
                } catch Stop.fenced {
                    return fenced(progress)
                } catch {}
                let at = progress.buffered.first?.record.offset ?? record.offset
                return paused(at: at, progress: progress)
            } catch let e as ExactlyOnceError {
                let at = progress.buffered.first?.record.offset ?? record.offset
                return stopped(e, at: at, progress: progress)
            }
        }
        do {
            try await flush(progress)
        } catch let stop as Stop {
            if stop == .fenced { return fenced(progress) }
            return paused(at: progress.buffered.first?.record.offset ?? records[records.count - 1].offset.next, progress: progress)
        } catch let e as ExactlyOnceError {
            return stopped(e, at: progress.buffered.first?.record.offset ?? records[records.count - 1].offset.next, progress: progress)
        }
        progress.finished = records[records.count - 1].offset.next
        progress.result.commit = progress.finished
        return progress.result
    }

    private func fenced(_ progress: Progress) -> LaneResult {
        consumer.metrics.fenced.increment()
        consumer.logger.info("lane fenced: partition moved to a newer owner", metadata: ["partition": "\(partition)", "member": "\(memberID)"])
        var r = progress.result
        r.report.fencedLanes = 1
        r.commit = nil
        r.seek = nil
        return r
    }

    private func paused(at offset: Offset, progress: Progress) -> LaneResult {
        var r = progress.result
        r.report.pausedLanes = 1
        r.seek = offset
        r.commit = progress.finished
        return r
    }

    private func stopped(_ e: ExactlyOnceError, at offset: Offset, progress: Progress) -> LaneResult {
        if e.code == .fenced { return fenced(progress) }
        consumer.logger.warning("lane paused", metadata: ["partition": "\(partition)", "error": "\(e)"])
        return paused(at: offset, progress: progress)
    }

    /// Sends the buffered completions to the store in one call. Applied ones are finished; on a
    /// failure the lane stops at the first one not applied (it is re-read and claimed again).
    private func flush(_ progress: Progress) async throws {
        guard !progress.buffered.isEmpty else { return }
        let c = consumer
        let batch = progress.buffered
        let completions = batch.map(\.completion)
        let outcome = try await retryingUnknownOutcome { try await c.store.complete(completions) }
        let applied = min(max(outcome.applied, 0), batch.count)
        for b in batch[..<applied] { await confirmed(b.record, b.completion.outcome, deadLettered: b.deadLettered, progress: progress) }
        progress.buffered.removeFirst(applied)
        if applied > 0 {
            progress.finished = batch[applied - 1].record.offset.next
            let last = batch[applied - 1]
            if c.faultsEnabled { try await c.faults.reach(.afterComplete, FaultContext(memberID: memberID, partition: partition, offset: last.record.offset, key: last.completion.claim.key)) }
        }
        if let failure = outcome.failure, applied < batch.count {
            if failure.code == .fenced { throw Stop.fenced }
            c.logger.info("completion refused; re-reading", metadata: ["partition": "\(partition)", "error": "\(failure)"])
            if failure.code == .transactionConflict {
                progress.result.report.retries += 1
                c.metrics.retries.increment()
            }
            throw Stop.pause
        }
        progress.pending.clear()
    }

    /// Runs a completion, retrying it with the same claims while the store is unreachable
    /// (completions are idempotent per token, so a repeat after an unknown outcome is safe).
    private func retryingUnknownOutcome<T>(_ body: () async throws -> T) async throws -> T {
        var attempt = 0
        while true {
            do {
                return try await body()
            } catch let e as ExactlyOnceError where e.code == .storeUnavailable && attempt < consumer.configuration.completionRetries {
                attempt += 1
                let d = consumer.configuration.unavailableBackoff.delay(forRetry: attempt)
                if d > .zero { try await Task.sleep(for: d) }
            }
        }
    }

    /// Accounts for a completion the store accepted.
    private func confirmed(_ record: ConsumedRecord, _ outcome: Outcome, deadLettered: Bool, progress: Progress) async {
        if !deadLettered {
            progress.result.report.processed += 1
            consumer.metrics.processed.increment()
        }
        await consumer.observer?(record, outcome, false)
    }

    /// Completes at once (stores that do not batch), retrying an unknown outcome with the same
    /// claim. Throws ``Stop`` when the lane must stop; a transaction conflict is rethrown for the
    /// caller to retry the record.
    private func completeNow(_ record: ConsumedRecord, _ completion: Completion, deadLettered: Bool, progress: Progress) async throws {
        let c = consumer
        do {
            try await retryingUnknownOutcome { try await c.store.complete(completion) }
        } catch let e as ExactlyOnceError where e.code == .fenced {
            throw Stop.fenced
        }
        if c.faultsEnabled { try await c.faults.reach(.afterComplete, FaultContext(memberID: memberID, partition: partition, offset: record.offset, key: completion.claim.key)) }
        await confirmed(record, completion.outcome, deadLettered: deadLettered, progress: progress)
    }

    /// Either completes now or buffers the completion for the lane's next batched call.
    private func completeOrBuffer(_ record: ConsumedRecord, _ completion: Completion, deadLettered: Bool, progress: Progress) async throws {
        if progress.batchLimit > 1 {
            progress.pending.add(completion.effects)
            progress.buffered.append(Buffered(record: record, completion: completion, deadLettered: deadLettered))
        } else {
            try await completeNow(record, completion, deadLettered: deadLettered, progress: progress)
        }
    }

    /// Drives one record to a finished or buffered state (effect buffered for completion,
    /// duplicate answered, or dead-lettered).
    private func finish(_ record: ConsumedRecord, identity: (key: IdempotencyKey, fingerprint: PayloadFingerprint),
                        claimResult first: ClaimResult, progress: Progress) async throws {
        let c = consumer
        var claimResult = first
        var retry = 0
        while true {
            switch claimResult {
            case .completed(let outcome):
                progress.result.report.duplicates += 1
                c.metrics.duplicates.increment()
                await c.observer?(record, outcome, true)
                return
            case .conflict:
                progress.result.report.conflicts += 1
                c.metrics.conflicts.increment()
                c.logger.warning("idempotency key reused with a different payload", metadata: ["key": "\(identity.key)", "partition": "\(partition)", "offset": "\(record.offset)"])
                try await deadLetter(record, key: identity.key, reason: "conflict: key reused with a different payload")
                progress.result.report.deadLettered += 1
                return
            case .inProgress:
                throw Stop.pause
            case .new(let claim):
                if claim.attempt > 1 && retry == 0 { c.metrics.leaseExpiries.increment() }
                if claim.attempt > c.configuration.maxAttempts {
                    let reason = "gave up after \(claim.attempt - 1) attempts"
                    try await deadLetter(record, key: identity.key, reason: reason)
                    progress.result.report.deadLettered += 1
                    let completion = Completion(claim: claim, outcome: Outcome(status: .deadLettered, detail: Array(reason.utf8)))
                    try await completeOrBuffer(record, completion, deadLettered: true, progress: progress)
                    return
                }
                let ctx = FaultContext(memberID: memberID, partition: partition, offset: record.offset, key: identity.key)
                var hc = HandlerContext(record: record, key: identity.key, claim: claim, transaction: progress.batchLimit > 1 ? EffectTransaction(store: c.store, pending: progress.pending) : EffectTransaction(store: c.store))
                let outcome: Outcome
                do {
                    outcome = try await c.handler(&hc)
                } catch let crash as InjectedCrash {
                    throw crash
                } catch {
                    // A failed attempt: release (attempt count kept) and retry after backoff.
                    progress.result.report.retries += 1
                    retry += 1
                    c.metrics.retries.increment()
                    c.logger.info("handler failed; retrying", metadata: ["key": "\(identity.key)", "attempt": "\(claim.attempt)", "error": "\(String(describing: error).prefix(200))"])
                    try await c.store.release(claim, reason: String(describing: error))
                    let d = c.configuration.retryBackoff.delay(forRetry: retry)
                    if d > .zero { try await Task.sleep(for: d) }
                    claimResult = try await c.store.claim(claimRequest(identity))
                    continue
                }
                if c.faultsEnabled { try await c.faults.reach(.insideEffect, ctx) }
                let effects = hc.transaction.effects
                if c.faultsEnabled { try await c.faults.reach(.afterEffect, ctx) }
                do {
                    try await completeOrBuffer(record, Completion(claim: claim, outcome: outcome, effects: effects), deadLettered: false, progress: progress)
                } catch let e as ExactlyOnceError where e.code == .transactionConflict {
                    // Another writer changed what the effect read: try the record again.
                    progress.result.report.retries += 1
                    retry += 1
                    c.metrics.retries.increment()
                    try await c.store.release(claim, reason: "transaction conflict")
                    claimResult = try await c.store.claim(claimRequest(identity))
                    continue
                }
                return
            }
        }
    }

    /// Publishes the record to the dead-letter topic. The caller completes its claim (if any)
    /// with a dead-lettered outcome, so a redelivery is answered, not dead-lettered again.
    private func deadLetter(_ record: ConsumedRecord, key: IdempotencyKey?, reason: String) async throws {
        let c = consumer
        var headers = record.headers
        headers["x-dead-letter-reason"] = reason
        headers["x-original-topic"] = record.topic
        headers["x-original-partition"] = "\(record.partition.rawValue)"
        headers["x-original-offset"] = "\(record.offset.rawValue)"
        if let key { headers["x-idempotency-key"] = key.rawValue }
        let out = OutgoingRecord(key: record.key, payload: record.payload, headers: headers)
        do {
            _ = try await c.transport.publish(out, to: c.configuration.deadLetterTopic, partitioning: .explicit(PartitionID(0)))
        } catch let e as ExactlyOnceError {
            c.logger.error("dead-letter publish failed; pausing lane", metadata: ["error": "\(e)"])
            throw Stop.pause
        }
        c.metrics.deadLettered.increment()
    }
}
