import Logging
import Metrics

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
    /// Handler attempts that failed and were retried (and commit conflicts).
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
///
/// ``ExactlyOnceConsumer/run()`` loops over ``step()``; the simulator and the demo drive it step
/// by step to inject faults between steps.
public final class ConsumerSession<Transport: MessageTransport, Store: DedupeStore> {
    let consumer: ExactlyOnceConsumer<Transport, Store>
    let subscription: Transport.Subscription
    private var assignment: [PartitionID: UInt64] = [:]
    private var unavailableStreak = 0
    /// The committed offset of each owned partition, as far as this member knows (for lag).
    private var committed: [PartitionID: Offset] = [:]
    /// Since when the store refuses each assigned partition's epoch.
    private var fencedSince: [PartitionID: ContinuousClock.Instant] = [:]
    /// Where each partition must be read again from before the next poll: the first record of
    /// the step's batch that is not finished, kept until the seek back to it has succeeded. A
    /// step that ends early (a lane's error) leaves its batch's start, and every step seeks
    /// before it polls, so records handed out and not finished are never skipped.
    private var rereadFrom: [PartitionID: Offset] = [:]

    init(consumer: ExactlyOnceConsumer<Transport, Store>, subscription: Transport.Subscription) {
        self.consumer = consumer
        self.subscription = subscription
    }

    /// The member id.
    public var memberID: String { subscription.memberID }

    /// The partitions this member owned at its last poll, with their epochs.
    public var currentAssignment: [PartitionID: UInt64] { assignment }

    /// Polls once (waiting up to ``ConsumerConfiguration/pollWait`` for records), processes the
    /// batch lane by lane, and commits each lane's finished prefix.
    ///
    /// Throws poll errors (``ExactlyOnceError/Code/staleGeneration`` when this member was
    /// rebalanced out: join again; retriable ones when the transport is unreachable: wait and
    /// step again), what the fault injector throws, and errors no retry can fix (an unknown
    /// topic, a full store, damaged data, a partition fenced for longer than
    /// ``ConsumerConfiguration/maxFencedDuration``), after committing what finished. Store
    /// trouble pauses the affected lanes (they re-read), and a commit that fails with a
    /// retriable error is left to the next commit.
    ///
    /// A lane that stops early reads its unfinished records again through a seek, which the
    /// next step makes before it polls. When that seek fails with a retriable error, the
    /// partition's records are not processed (the member still polls, so the transport's
    /// rebalances reach it) until a later step's seek succeeds: records handed out and not
    /// finished are never skipped.
    @discardableResult
    public func step() async throws -> StepReport {
        let c = consumer
        let unsought = try await seekBack()
        let poll = try await subscription.poll(maxRecords: c.configuration.maxPollRecords, maxWait: c.configuration.pollWait)
        takeAssignment(poll.assignment)
        var report = StepReport()
        report.records = poll.records.count
        // A partition still waiting for its seek back is read again after it, from there.
        let waiting = unsought.filter { rereadFrom[$0] != nil }
        let records = waiting.isEmpty ? poll.records : poll.records.filter { !waiting.contains($0.partition) }
        report.pausedLanes = waiting.count
        guard !records.isEmpty else {
            recordLag(poll.endOffsets)
            await pauseAfterOutage(report)
            return report
        }

        // One lane per partition, records in offset order.
        var byPartition: [PartitionID: [ConsumedRecord]] = [:]
        for r in records { byPartition[r.partition, default: []].append(r) }
        let lanes = byPartition.keys.sorted().compactMap { p -> (Lane<Transport, Store>, [ConsumedRecord])? in
            guard let epoch = poll.assignment[p] else { return nil }
            let fence = PartitionFence(scope: "\(subscription.fencingScope)/\(p.rawValue)", epoch: epoch)
            return (Lane(consumer: c, memberID: memberID, partition: p, fence: fence), byPartition[p]!)
        }
        // Until its lane says how far it got, a partition is read again from its batch's start.
        for (lane, records) in lanes { rereadFrom[lane.partition] = records[0].offset }
        var results: [LaneResult] = []
        if c.configuration.concurrentLanes && lanes.count > 1 {
            results = try await withThrowingTaskGroup(of: LaneResult.self) { group in
                for (lane, records) in lanes { group.addTask { try await lane.process(records) } }
                var out: [LaneResult] = []
                for try await r in group { out.append(r) }
                return out
            }
        } else {
            for (lane, records) in lanes { results.append(try await lane.process(records)) }
        }

        var offsets: [PartitionID: Offset] = [:]
        var failure: ExactlyOnceError?
        for r in results {
            report.add(r.report)
            if let o = r.commit { offsets[r.partition] = o }
            // From its first unfinished record, if any: the next step seeks there before it polls.
            rereadFrom[r.partition] = r.seek
            if failure == nil { failure = r.failure }
        }
        if !offsets.isEmpty {
            let ctx = FaultContext(memberID: memberID)
            if c.faultsEnabled { try await c.faults.reach(.beforeCommit, ctx) }
            do {
                try await subscription.commit(offsets, generation: poll.generation)
                report.committed = true
                for (p, o) in offsets { committed[p] = o }
            } catch let e as ExactlyOnceError where e.code == .staleGeneration {
                c.logger.info("commit refused after a rebalance; the new owner reads these records again and gets their stored outcomes", metadata: ["member": "\(memberID)"])
            } catch let e as ExactlyOnceError where e.isRetriable {
                // Unknown outcome. The records are complete in the store; the next successful
                // commit covers them, or the next owner reads them again and gets replays.
                c.logger.info("commit failed; the next commit covers these records", metadata: ["member": "\(memberID)", "error": "\(e)"])
            }
            if c.faultsEnabled { try await c.faults.reach(.afterCommit, ctx) }
        }
        recordLag(poll.endOffsets)
        try trackFences(results)
        if let failure { throw failure }
        await pauseAfterOutage(report)
        return report
    }

    /// Waits out an outage when lanes paused or were fenced in this step (longer each step in a
    /// row), and resets the streak otherwise.
    private func pauseAfterOutage(_ report: StepReport) async {
        if report.pausedLanes > 0 || report.fencedLanes > 0 {
            unavailableStreak += 1
            await consumer.wait(consumer.configuration.unavailableBackoff.delay(forRetry: unavailableStreak))
        } else {
            unavailableStreak = 0
        }
    }

    private func takeAssignment(_ next: [PartitionID: UInt64]) {
        guard next != assignment else { return }
        let revoked = Set(assignment.keys).subtracting(next.keys)
        let added = Set(next.keys).subtracting(assignment.keys)
        if !revoked.isEmpty || !added.isEmpty {
            consumer.logger.info("assignment changed", metadata: [
                "member": "\(memberID)", "revoked": "\(revoked.sorted())", "assigned": "\(added.sorted())",
            ])
        }
        for p in assignment.keys where next[p] != assignment[p] {
            committed[p] = nil
            fencedSince[p] = nil
            // Revoked, or handed out again at another epoch: read from the committed offset.
            rereadFrom[p] = nil
        }
        assignment = next
        consumer.metrics.fencedPartitions.record(fencedSince.count)
    }

    /// Seeks back to what earlier steps left unfinished (see ``rereadFrom``), for the partitions
    /// this member still owns; returns the partitions whose seek failed with a retriable error
    /// (their records wait for a later step). Other errors are thrown.
    private func seekBack() async throws -> Set<PartitionID> {
        var failed = Set<PartitionID>()
        for (p, offset) in rereadFrom.sorted(by: { $0.key < $1.key }) {
            guard assignment[p] != nil else {
                rereadFrom[p] = nil
                continue
            }
            do {
                try await subscription.seek(p, to: offset)
                rereadFrom[p] = nil
            } catch let e as ExactlyOnceError where e.code == .staleGeneration {
                // Moved on: the new owner reads it from the committed offset.
                rereadFrom[p] = nil
            } catch let e as ExactlyOnceError where e.isRetriable {
                failed.insert(p)
                consumer.logger.info("seek back to unfinished records failed; their partition waits for the next step's seek", metadata: [
                    "member": "\(memberID)", "partition": "\(p)", "offset": "\(offset)", "error": "\(e)",
                ])
            }
        }
        return failed
    }

    private func recordLag(_ ends: [PartitionID: Offset]) {
        var lag: Int64 = 0
        for (p, end) in ends { lag += max(0, end.rawValue - (committed[p]?.rawValue ?? 0)) }
        consumer.metrics.commitLag.record(lag)
    }

    /// Notices partitions the store keeps refusing while the transport still assigns them.
    private func trackFences(_ results: [LaneResult]) throws {
        let c = consumer
        let now = ContinuousClock.now
        for r in results {
            if let e = r.fenced {
                if fencedSince[r.partition] == nil {
                    fencedSince[r.partition] = now
                    c.logger.info("partition refused by the store's fence; waiting for the rebalance to reach this member", metadata: [
                        "member": "\(memberID)", "partition": "\(r.partition)", "error": "\(e)",
                    ])
                } else if let since = fencedSince[r.partition], now - since > c.configuration.maxFencedDuration {
                    c.metrics.fencedPartitions.record(fencedSince.count)
                    throw ExactlyOnceError(.fenced, """
                        partition \(r.partition) of \(c.configuration.topic) has been refused by the dedupe store's fence for \
                        longer than \(c.configuration.maxFencedDuration) while the transport still assigns it to \(memberID): \
                        the store has seen a higher epoch for scope \(subscription.fencingScope)/\(r.partition.rawValue) than \
                        this transport hands out (a recreated group or topic, or another transport sharing the scope); \
                        \(e.message)
                        """, cause: ExactlyOnceError.Cause(of: e))
                }
            } else if r.commit != nil {
                fencedSince[r.partition] = nil
            }
        }
        c.metrics.fencedPartitions.record(fencedSince.count)
    }

    /// Leaves the group. Call after the last ``step()`` (its commit is already done).
    public func close() async throws {
        try await subscription.close()
    }
}
