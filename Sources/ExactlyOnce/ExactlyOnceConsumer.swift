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
        self.logger = logger
        self.metrics = ConsumerMetrics(group: configuration.group, topic: configuration.topic)
    }

    /// Joins the group and processes until cancelled or gracefully shut down; then commits the
    /// batch in hand and leaves.
    public func run() async throws {
        let session = try await makeSession()
        let stop = StopFlag()
        try await withGracefulShutdownHandler {
            while !stop.isSet && !Task.isCancelled {
                let step = try await session.step()
                if step.records == 0 && !stop.isSet {
                    try? await Task.sleep(for: configuration.idleWait)
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
    /// Throws only what the fault injector throws and unexpected transport errors; store
    /// trouble pauses the affected lanes instead.
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
            try await c.faults.reach(.beforeCommit, ctx)
            do {
                try await subscription.commit(offsets, generation: poll.generation)
                report.committed = true
            } catch let e as ExactlyOnceError where e.code == .staleGeneration {
                c.logger.info("commit refused after rebalance; records will be redelivered to the new owner", metadata: ["member": "\(memberID)"])
            }
            try await c.faults.reach(.afterCommit, ctx)
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
struct Lane<Transport: MessageTransport, Store: DedupeStore>: Sendable {
    let consumer: ExactlyOnceConsumer<Transport, Store>
    let memberID: String
    let partition: PartitionID
    let epoch: UInt64

    enum Stop: Error {
        case pause   // re-read from this record later
        case fenced  // partition moved on; commit nothing more
    }

    var fence: PartitionFence {
        PartitionFence(scope: "\(consumer.configuration.group)/\(consumer.configuration.topic)/\(partition.rawValue)", epoch: epoch)
    }

    func process(_ records: [ConsumedRecord]) async throws -> LaneResult {
        let c = consumer
        var result = LaneResult(partition: partition)
        var finished: Offset? = nil

        // Keys and fingerprints; malformed records are dead-lettered, never dropped.
        var identities: [(key: IdempotencyKey, fingerprint: PayloadFingerprint)?] = []
        identities.reserveCapacity(records.count)
        var firstIndexOfKey: [IdempotencyKey: Int] = [:]
        var requests: [ClaimRequest] = []
        var requestIndex: [Int: Int] = [:]
        for (i, r) in records.enumerated() {
            if let key = try? c.keyFor(r) {
                let fp = PayloadFingerprint.of(r.payload)
                identities.append((key, fp))
                if firstIndexOfKey[key] == nil {
                    firstIndexOfKey[key] = i
                    requestIndex[i] = requests.count
                    requests.append(ClaimRequest(key: key, fingerprint: fp, lease: c.configuration.lease, fence: fence, prefetch: true))
                }
            } else {
                identities.append(nil)
            }
        }

        try await c.faults.reach(.beforeClaim, FaultContext(memberID: memberID, partition: partition, offset: records.first?.offset))
        var claims: [ClaimResult] = []
        do {
            claims = requests.isEmpty ? [] : try await c.store.claim(requests)
        } catch let e as ExactlyOnceError {
            return stopped(e, at: records[0].offset, result: result)
        }
        guard claims.count == requests.count else {
            c.logger.error("store answered a wrong number of claim results; pausing lane", metadata: ["partition": "\(partition)"])
            result.report.pausedLanes = 1
            result.seek = records[0].offset
            return result
        }
        try await c.faults.reach(.afterClaim, FaultContext(memberID: memberID, partition: partition, offset: records.first?.offset))

        for (i, record) in records.enumerated() {
            do {
                guard let identity = identities[i] else {
                    try await deadLetter(record, key: nil, claim: nil, reason: "malformed record: no valid idempotency key")
                    result.report.deadLettered += 1
                    finished = record.offset.next
                    continue
                }
                var claimResult: ClaimResult
                if let ri = requestIndex[i] {
                    claimResult = claims[ri]
                } else {
                    claimResult = try await c.store.claim(ClaimRequest(key: identity.key, fingerprint: identity.fingerprint, lease: c.configuration.lease, fence: fence))
                }
                try await finish(record, identity: identity, first: &claimResult, report: &result.report)
                finished = record.offset.next
            } catch let stop as Stop {
                switch stop {
                case .pause:
                    result.report.pausedLanes = 1
                    result.seek = record.offset
                case .fenced:
                    result.report.fencedLanes = 1
                    c.metrics.fenced.increment()
                    return result  // nothing of this lane may be committed
                }
                break
            } catch let e as ExactlyOnceError {
                let r = stopped(e, at: record.offset, result: result)
                if r.report.fencedLanes > 0 { return r }
                result = r
                break
            }
            if result.seek != nil { break }
        }
        result.commit = finished
        return result
    }

    private func stopped(_ e: ExactlyOnceError, at offset: Offset, result: LaneResult) -> LaneResult {
        var result = result
        if e.code == .fenced {
            consumer.metrics.fenced.increment()
            consumer.logger.info("lane fenced: partition moved to a newer owner", metadata: ["partition": "\(partition)", "member": "\(memberID)"])
            result.report.fencedLanes = 1
            result.commit = nil
            return result
        }
        consumer.logger.warning("lane paused", metadata: ["partition": "\(partition)", "error": "\(e)"])
        result.report.pausedLanes = 1
        result.seek = offset
        return result
    }

    /// Drives one record to a finished state (effect completed, duplicate answered, or dead-lettered).
    private func finish(_ record: ConsumedRecord, identity: (key: IdempotencyKey, fingerprint: PayloadFingerprint),
                        first: inout ClaimResult, report: inout StepReport) async throws {
        let c = consumer
        var claimResult = first
        var retry = 0
        while true {
            switch claimResult {
            case .completed(let outcome):
                report.duplicates += 1
                c.metrics.duplicates.increment()
                await c.observer?(record, outcome, true)
                return
            case .conflict:
                report.conflicts += 1
                c.metrics.conflicts.increment()
                c.logger.warning("idempotency key reused with a different payload", metadata: ["key": "\(identity.key)", "partition": "\(partition)", "offset": "\(record.offset)"])
                try await deadLetter(record, key: identity.key, claim: nil, reason: "conflict: key reused with a different payload")
                report.deadLettered += 1
                return
            case .inProgress:
                throw Stop.pause
            case .new(let claim):
                if claim.attempt > 1 && retry == 0 { c.metrics.leaseExpiries.increment() }
                if claim.attempt > c.configuration.maxAttempts {
                    let reason = "gave up after \(claim.attempt - 1) attempts"
                    try await deadLetter(record, key: identity.key, claim: claim, reason: reason)
                    report.deadLettered += 1
                    return
                }
                let ctx = FaultContext(memberID: memberID, partition: partition, offset: record.offset, key: identity.key)
                var hc = HandlerContext(record: record, key: identity.key, claim: claim, transaction: EffectTransaction(store: c.store))
                let outcome: Outcome
                do {
                    outcome = try await c.handler(&hc)
                } catch let crash as InjectedCrash {
                    throw crash
                } catch {
                    // A failed attempt: release (attempt count kept) and retry after backoff.
                    report.retries += 1
                    retry += 1
                    c.metrics.retries.increment()
                    c.logger.info("handler failed; retrying", metadata: ["key": "\(identity.key)", "attempt": "\(claim.attempt)", "error": "\(String(describing: error).prefix(200))"])
                    try await c.store.release(claim, reason: String(describing: error))
                    let d = c.configuration.retryBackoff.delay(forRetry: retry)
                    if d > .zero { try await Task.sleep(for: d) }
                    claimResult = try await c.store.claim(ClaimRequest(key: identity.key, fingerprint: identity.fingerprint, lease: c.configuration.lease, fence: fence))
                    continue
                }
                try await c.faults.reach(.insideEffect, ctx)
                let completion = Completion(claim: claim, outcome: outcome, effects: hc.transaction.effects)
                try await c.faults.reach(.afterEffect, ctx)
                do {
                    try await completeWithRetries(completion)
                } catch let e as ExactlyOnceError where e.code == .transactionConflict {
                    report.retries += 1
                    retry += 1
                    try await c.store.release(claim, reason: "transaction conflict")
                    claimResult = try await c.store.claim(ClaimRequest(key: identity.key, fingerprint: identity.fingerprint, lease: c.configuration.lease, fence: fence))
                    continue
                }
                try await c.faults.reach(.afterComplete, ctx)
                report.processed += 1
                c.metrics.processed.increment()
                await c.observer?(record, outcome, false)
                return
            }
        }
    }

    private func completeWithRetries(_ completion: Completion) async throws {
        var attempt = 0
        while true {
            do {
                try await consumer.store.complete(completion)
                return
            } catch let e as ExactlyOnceError where e.code == .storeUnavailable && attempt < consumer.configuration.completionRetries {
                attempt += 1
                let d = consumer.configuration.unavailableBackoff.delay(forRetry: attempt)
                if d > .zero { try await Task.sleep(for: d) }
            }
        }
    }

    /// Publishes the record to the dead-letter topic, then completes its claim (if any) with a
    /// dead-lettered outcome so a redelivery is answered, not dead-lettered again.
    private func deadLetter(_ record: ConsumedRecord, key: IdempotencyKey?, claim: Claim?, reason: String) async throws {
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
        if let claim {
            let outcome = Outcome(status: .deadLettered, detail: Array(reason.utf8))
            try await completeWithRetries(Completion(claim: claim, outcome: outcome))
            await c.observer?(record, outcome, false)
        }
    }
}
