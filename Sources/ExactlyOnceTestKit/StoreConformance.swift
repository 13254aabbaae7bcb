import ExactlyOnce

/// The dedupe-store conformance suite. Every store (in-memory, file, Redis, or yours) must pass
/// it; it checks the contract written on `DedupeStore`.
///
/// ```swift
/// @Test func conforms() async throws {
///     try await StoreConformance.run { clock in try MyStore(clock: clock) }
/// }
/// ```
///
/// `makeStore` must return an empty store that reads time from the given clock. Each check gets
/// a fresh store. A failed check throws ``ConformanceFailure`` naming it.
public enum StoreConformance {
    /// The names of all checks, in the order they run.
    public static let checks = [
        "new-then-in-progress", "complete-then-replay", "negative-outcome-replay", "conflict",
        "release-keeps-attempts", "lease-expiry-takeover", "zombie-refused", "idempotent-complete",
        "effects-atomic", "transaction-conflict", "partition-fence", "fence-scopes-independent", "batch-order", "records",
        "prefetch-charges-first-grant", "release-charges-a-prefetch", "batch-completion-prefix", "reopen-dead-lettered", "list-records",
    ]

    /// The checks of a store's `CompletionBatch` (run by `run(makeStore:)` when the store's
    /// transaction is `EffectTransaction`, and by `run(makeStore:batchEffects:)` for others).
    public static let batchChecks = ["batch-perform-commit", "batch-discard", "batch-overlay", "batch-prefix"]

    /// Runs every check against fresh stores from `makeStore`.
    public static func run<S: DedupeStore>(makeStore: (ManualClock) async throws -> S) async throws {
        for check in checks {
            let clock = ManualClock()
            let store = try await makeStore(clock)
            try await run(check, store: store, clock: clock)
        }
    }

    /// Runs every check, and the ``batchChecks`` of the store's key-value completion batch.
    public static func run<S: DedupeStore>(makeStore: (ManualClock) async throws -> S) async throws where S.Transaction == EffectTransaction {
        try await run(makeStore: makeStore, batchEffects: .keyValue)
    }

    /// Runs every check, and the ``batchChecks`` of the store's own completion batch, writing
    /// and reading effects through `batchEffects` (for stores whose transaction is not an
    /// `EffectTransaction`, a SQL transaction say).
    public static func run<S: DedupeStore>(makeStore: (ManualClock) async throws -> S, batchEffects: BatchEffects<S>) async throws {
        for check in checks {
            let clock = ManualClock()
            try await run(check, store: try await makeStore(clock), clock: clock)
        }
        for check in batchChecks {
            let clock = ManualClock()
            try await runBatch(check, store: try await makeStore(clock), clock: clock, effects: batchEffects)
        }
    }

    static func runBatch<S: DedupeStore>(_ check: String, store: S, clock: ManualClock, effects fx: BatchEffects<S>) async throws {
        let options = CompletionBatchOptions(limit: 8, unknownOutcomeRetries: 0, backoff: .none)
        switch check {
        case "batch-perform-commit":
            var batch = store.makeCompletionBatch(options)
            let a = try await claimNew(store, key("a"), check: check)
            let b = try await claimNew(store, key("b"), check: check)
            let o = try await batch.perform(a) { tx in
                try await fx.set(&tx, "n", 1)
                return .applied("one")
            }
            try require(o == .applied("one"), check, "perform returns the handler's outcome")
            try await batch.stage(b, outcome: Outcome(status: .deadLettered))
            try require(batch.count == 2, check, "two completions staged, got \(batch.count)")
            let before = try await fx.read(store, "n")
            try require(before == nil, check, "nothing is written before commit")
            let r = try await batch.commit()
            try require(r.applied == 2 && r.failure == nil, check, "commit applies both, got \(r.applied) \(String(describing: r.failure))")
            try require(batch.count == 0, check, "a committed batch is empty")
            let n = try await fx.read(store, "n")
            try require(n == 1, check, "the effect is written with the completion")
            let again = try await store.claim([ClaimRequest(key: key("a"), fingerprint: fp1, lease: lease), ClaimRequest(key: key("b"), fingerprint: fp1, lease: lease)])
            try require(again == [.completed(.applied("one")), .completed(Outcome(status: .deadLettered))], check, "both completed, got \(again)")

        case "batch-discard":
            var batch = store.makeCompletionBatch(options)
            let a = try await claimNew(store, key("a"), check: check)
            _ = try await batch.perform(a) { tx in
                try await fx.set(&tx, "n", 1)
                return .applied()
            }
            await batch.discard()
            let r = try await batch.commit()
            try require(r.applied == 0, check, "a discarded batch commits nothing")
            try require(try await fx.read(store, "n") == nil, check, "a discarded effect is not written")
            do {
                _ = try await batch.perform(a) { tx in
                    try await fx.set(&tx, "n", 2)
                    throw ConformanceBoom()
                }
                throw ConformanceFailure(check: check, detail: "perform must rethrow the handler's error")
            } catch is ConformanceBoom {}
            try require(batch.count == 0, check, "a failed handler stages nothing")
            // A failed handler's effect is gone; a later one in the same batch still commits.
            _ = try await batch.perform(a) { tx in
                try await fx.set(&tx, "m", 3)
                return .applied()
            }
            let r2 = try await batch.commit()
            try require(r2.applied == 1, check, "the handler after a failed one commits, got \(r2.applied) \(String(describing: r2.failure))")
            try require(try await fx.read(store, "n") == nil, check, "the failed handler's effect is not written")
            try require(try await fx.read(store, "m") == 3, check, "the later handler's effect is written")

        case "batch-overlay":
            // A later handler in the batch sees the staged writes of earlier ones.
            var batch = store.makeCompletionBatch(options)
            let a = try await claimNew(store, key("a"), check: check)
            let b = try await claimNew(store, key("b"), check: check)
            _ = try await batch.perform(a) { tx in
                let n = try await fx.get(&tx, "n") ?? 0
                try await fx.set(&tx, "n", n + 1)
                return .applied()
            }
            _ = try await batch.perform(b) { tx in
                let n = try await fx.get(&tx, "n") ?? 0
                try await fx.set(&tx, "n", n + 1)
                return .applied()
            }
            let r = try await batch.commit()
            try require(r.applied == 2, check, "both applied, got \(r.applied) \(String(describing: r.failure))")
            try require(try await fx.read(store, "n") == 2, check, "the second handler saw the first one's write")

        case "batch-prefix":
            // A batch whose second completion is refused commits the first, not the third.
            var batch = store.makeCompletionBatch(options)
            func claim(_ k: String, lease: Duration) async throws -> Claim {
                let r = try await store.claim(ClaimRequest(key: key(k), fingerprint: fp1, lease: lease))
                guard case .new(let c) = r else { throw ConformanceFailure(check: check, detail: "expected .new for \(k), got \(r)") }
                return c
            }
            let first = try await claim("a", lease: .seconds(60))
            let stale = try await claim("b", lease: .seconds(1))
            let third = try await claim("c", lease: .seconds(60))
            for (c, name) in [(first, "p1"), (stale, "p2"), (third, "p3")] {
                _ = try await batch.perform(c) { tx in
                    try await fx.set(&tx, name, 1)
                    return .applied()
                }
            }
            clock.advance(by: .seconds(2))
            _ = try await claim("b", lease: .seconds(60))  // another claimant takes b over
            let r = try await batch.commit()
            try require(r.applied == 1, check, "a refused completion stops the batch: applied \(r.applied), expected 1")
            try require(r.failure?.code == .fenced, check, "the stale completion is fenced, got \(String(describing: r.failure))")
            try require(try await fx.read(store, "p1") == 1, check, "the prefix's effect is written")
            let p2 = try await fx.read(store, "p2"), p3 = try await fx.read(store, "p3")
            try require(p2 == nil && p3 == nil, check, "nothing from the refused one on is written")
            let recs = try await store.records(for: [key("a"), key("c")])
            try require(recs[key("a")]?.phase == .completed && recs[key("c")]?.phase == .inProgress, check, "a completed, c still in progress")

        default:
            throw ConformanceFailure(check: check, detail: "unknown check")
        }
    }

    static func key(_ s: String) -> IdempotencyKey { try! IdempotencyKey(parts: ["conformance", s]) }
    static let fp1 = PayloadFingerprint.of(Array("payload-1".utf8))
    static let fp2 = PayloadFingerprint.of(Array("payload-2".utf8))
    static let lease = Duration.seconds(10)

    static func claimNew(_ store: some DedupeStore, _ k: IdempotencyKey, fp: PayloadFingerprint = fp1,
                         fence: PartitionFence? = nil, check: String) async throws -> Claim {
        let r = try await store.claim(ClaimRequest(key: k, fingerprint: fp, lease: lease, fence: fence))
        guard case .new(let c) = r else { throw ConformanceFailure(check: check, detail: "expected .new for \(k), got \(r)") }
        return c
    }

    // swiftlint:disable:next cyclomatic_complexity function_body_length
    static func run<S: DedupeStore>(_ check: String, store: S, clock: ManualClock) async throws {
        switch check {
        case "new-then-in-progress":
            let c = try await claimNew(store, key("a"), check: check)
            try require(c.attempt == 1, check, "first attempt should be 1, got \(c.attempt)")
            let again = try await store.claim(ClaimRequest(key: key("a"), fingerprint: fp1, lease: lease))
            guard case .inProgress = again else { throw ConformanceFailure(check: check, detail: "second claim under a live lease gave \(again)") }

        case "complete-then-replay":
            let c = try await claimNew(store, key("a"), check: check)
            try await store.complete(Completion(claim: c, outcome: .applied("serial-7")))
            let again = try await store.claim(ClaimRequest(key: key("a"), fingerprint: fp1, lease: lease))
            try require(again == .completed(.applied("serial-7")), check, "duplicate should get the stored outcome, got \(again)")

        case "negative-outcome-replay":
            let c = try await claimNew(store, key("a"), check: check)
            try await store.complete(Completion(claim: c, outcome: .rejected("sold out")))
            let again = try await store.claim(ClaimRequest(key: key("a"), fingerprint: fp1, lease: lease))
            try require(again == .completed(.rejected("sold out")), check, "negative outcome must be replayed, got \(again)")

        case "conflict":
            _ = try await claimNew(store, key("a"), check: check)
            let whileInProgress = try await store.claim(ClaimRequest(key: key("a"), fingerprint: fp2, lease: lease))
            try require(whileInProgress == .conflict(stored: fp1, outcome: nil), check, "other payload while in progress gave \(whileInProgress)")
            let c = try await claimNew(store, key("b"), check: check)
            try await store.complete(Completion(claim: c, outcome: .applied("x")))
            let afterDone = try await store.claim(ClaimRequest(key: key("b"), fingerprint: fp2, lease: lease))
            try require(afterDone == .conflict(stored: fp1, outcome: .applied("x")), check, "other payload after completion gave \(afterDone)")

        case "release-keeps-attempts":
            let c1 = try await claimNew(store, key("a"), check: check)
            try await store.release(c1, reason: "boom")
            let c2 = try await claimNew(store, key("a"), check: check)
            try require(c2.attempt == 2, check, "attempt after release should be 2, got \(c2.attempt)")
            try require(c2.token > c1.token, check, "token must grow: \(c1.token) then \(c2.token)")
            let rec = try await store.records(for: [key("a")])[key("a")]
            try require(rec?.attempts == 2 && rec?.phase == .inProgress, check, "record should show 2 attempts in progress, got \(String(describing: rec))")

        case "lease-expiry-takeover":
            let c1 = try await claimNew(store, key("a"), check: check)
            clock.advance(by: .seconds(11))
            let c2 = try await claimNew(store, key("a"), check: check)
            try require(c2.token > c1.token && c2.attempt == 2, check, "takeover after lease expiry should give a newer token and attempt 2")

        case "zombie-refused":
            let c1 = try await claimNew(store, key("a"), check: check)
            clock.advance(by: .seconds(11))
            try await requireThrows("fenced", check) { try await store.complete(Completion(claim: c1, outcome: .applied())) }
            let c2 = try await claimNew(store, key("a"), check: check)
            try await requireThrows("fenced", check) {
                try await store.complete(Completion(claim: c1, outcome: .applied(), effects: EffectWrites(reads: [:], writes: ["zombie": [1]])))
            }
            let z = try await store.readState(["zombie"])["zombie"]
            try require(z?.value == nil, check, "a refused completion must write nothing")
            try await store.complete(Completion(claim: c2, outcome: .applied("owner")))
            try await requireThrows("fenced", check) { try await store.release(c1, reason: "late") }

        case "idempotent-complete":
            let c = try await claimNew(store, key("a"), check: check)
            let fx = EffectWrites(reads: ["n": 0], writes: ["n": Array("1".utf8)])
            try await store.complete(Completion(claim: c, outcome: .applied(), effects: fx))
            try await store.complete(Completion(claim: c, outcome: .applied(), effects: fx))
            let n = try await store.readState(["n"])["n"]
            try require(n?.version == 1, check, "a repeated completion must not apply its effect twice (version \(String(describing: n?.version)))")

        case "effects-atomic":
            let c = try await claimNew(store, key("a"), check: check)
            let before = try await store.readState(["stock", "ledger"])
            try require(before["stock"]?.version == 0 && before["stock"]?.value == nil, check, "absent key should read nil at version 0")
            let fx = EffectWrites(reads: ["stock": 0], writes: ["stock": Array("9".utf8), "ledger": Array("m1".utf8)])
            try await store.complete(Completion(claim: c, outcome: .applied(), effects: fx))
            let after = try await store.readState(["stock", "ledger"])
            try require(after["stock"]?.value == Array("9".utf8) && after["stock"]?.version == 1, check, "stock write not visible")
            try require(after["ledger"]?.value == Array("m1".utf8), check, "ledger write not visible")

        case "transaction-conflict":
            let c1 = try await claimNew(store, key("a"), check: check)
            let c2 = try await claimNew(store, key("b"), check: check)
            try await store.complete(Completion(claim: c1, outcome: .applied(), effects: EffectWrites(reads: ["s": 0], writes: ["s": [1]])))
            try await requireThrows("transactionConflict", check) {
                try await store.complete(Completion(claim: c2, outcome: .applied(), effects: EffectWrites(reads: ["s": 0], writes: ["s": [2]])))
            }
            let s = try await store.readState(["s"])["s"]
            try require(s?.value == [1], check, "conflicting transaction must not write")
            let r = try await store.claim(ClaimRequest(key: key("b"), fingerprint: fp1, lease: lease))
            guard case .inProgress = r else { throw ConformanceFailure(check: check, detail: "claim stays held after a conflict, got \(r)") }

        case "partition-fence":
            let f1 = PartitionFence(scope: "g/t/0", epoch: 1)
            let f2 = PartitionFence(scope: "g/t/0", epoch: 2)
            let old = try await claimNew(store, key("a"), fence: f1, check: check)
            // A newer owner takes over an in-progress key at once, without waiting for the lease.
            let new = try await claimNew(store, key("a"), fence: f2, check: check)
            try require(new.token > old.token, check, "takeover must give a newer token")
            try await requireThrows("fenced", check) { try await store.complete(Completion(claim: old, outcome: .applied())) }
            // Once epoch 2 was seen, epoch 1 may not claim even untouched keys.
            try await requireThrows("fenced", check) {
                _ = try await store.claim([ClaimRequest(key: key("b"), fingerprint: fp1, lease: lease, fence: f1)])
            }
            // Other scopes are independent.
            _ = try await claimNew(store, key("c"), fence: PartitionFence(scope: "g/t/1", epoch: 1), check: check)
            try await store.complete(Completion(claim: new, outcome: .applied()))

        case "fence-scopes-independent":
            // A high epoch seen in one scope (another transport, topic or group) never fences
            // another scope, even with low epochs.
            let high = PartitionFence(scope: "redis:a/g/t/0", epoch: 1_000_000)
            let low = PartitionFence(scope: "kafka:b/g/t/0", epoch: 1)
            let c1 = try await claimNew(store, key("a"), fence: high, check: check)
            try await store.complete(Completion(claim: c1, outcome: .applied()))
            let c2 = try await claimNew(store, key("b"), fence: low, check: check)
            try await store.complete(Completion(claim: c2, outcome: .applied()))
            // A key held under another scope is not taken over by a fence of this one.
            let c3 = try await claimNew(store, key("c"), fence: high, check: check)
            let r = try await store.claim(ClaimRequest(key: key("c"), fingerprint: fp1, lease: lease, fence: low))
            guard case .inProgress = r else { throw ConformanceFailure(check: check, detail: "another scope's in-progress key must stay held, got \(r)") }
            try await store.complete(Completion(claim: c3, outcome: .applied()))

        case "batch-completion-prefix":
            // All or a prefix: completions after a refused one are not applied.
            let stale = try await claimNew(store, key("b"), check: check)
            clock.advance(by: .seconds(11))
            _ = try await claimNew(store, key("b"), check: check)  // supersedes the stale claim
            let first = try await claimNew(store, key("a"), check: check)
            let third = try await claimNew(store, key("c"), check: check)
            let r = try await store.complete([
                Completion(claim: first, outcome: .applied("1"), effects: EffectWrites(reads: [:], writes: ["p1": [1]])),
                Completion(claim: stale, outcome: .applied("2"), effects: EffectWrites(reads: [:], writes: ["p2": [2]])),
                Completion(claim: third, outcome: .applied("3"), effects: EffectWrites(reads: [:], writes: ["p3": [3]])),
            ])
            try require(r.applied == 1, check, "a refused completion stops the batch: applied \(r.applied), expected 1")
            try require(r.failure?.code == .fenced, check, "the stale completion is fenced, got \(String(describing: r.failure))")
            let st = try await store.readState(["p1", "p2", "p3"])
            try require(st["p1"]?.value == [1] && st["p2"]?.value == nil && st["p3"]?.value == nil, check, "only the prefix is written")
            let recs = try await store.records(for: [key("c")])
            try require(recs[key("c")]?.phase == .inProgress, check, "completions after the refused one stay in progress")

        case "reopen-dead-lettered":
            let a = try await claimNew(store, key("a"), check: check)
            try await store.complete(Completion(claim: a, outcome: Outcome(status: .deadLettered, detail: Array("gave up".utf8))))
            try require(try await store.reopenDeadLettered(key("a")), check, "a dead-lettered key reopens")
            let again = try await claimNew(store, key("a"), check: check)
            try require(again.attempt == 1, check, "a reopened key starts its attempts again, got \(again.attempt)")
            try await store.complete(Completion(claim: again, outcome: .applied("fixed")))
            try require(try await store.reopenDeadLettered(key("a")) == false, check, "an applied key does not reopen")
            let replay = try await store.claim(ClaimRequest(key: key("a"), fingerprint: fp1, lease: lease))
            try require(replay == .completed(.applied("fixed")), check, "after replay the key answers its new outcome, got \(replay)")
            try require(try await store.reopenDeadLettered(key("absent")) == false, check, "an absent key does not reopen")
            let b = try await claimNew(store, key("b"), check: check)
            try require(try await store.reopenDeadLettered(key("b")) == false, check, "an in-progress key does not reopen")
            try await store.complete(Completion(claim: b, outcome: .rejected("sold out")))
            try require(try await store.reopenDeadLettered(key("b")) == false, check, "a rejected key does not reopen")

        case "list-records":
            for i in 0..<5 {
                let c = try await claimNew(store, key("done\(i)"), check: check)
                try await store.complete(Completion(claim: c, outcome: .applied()))
            }
            let busy = try await claimNew(store, key("busy"), check: check)
            let failed = try await claimNew(store, key("failed"), check: check)
            try await store.release(failed, reason: "handler threw: out of paper")
            _ = busy
            var q = RecordQuery(phase: .completed, limit: 2)
            var seen: [IdempotencyKey] = []
            var pages = 0
            while true {
                let page = try await store.listRecords(q)
                pages += 1
                try require(page.records.count <= 2, check, "a page holds at most its limit")
                seen += page.records.map(\.key)
                guard let next = page.nextCursor, pages < 10 else { break }
                q.cursor = next
            }
            try require(Set(seen) == Set((0..<5).map { key("done\($0)") }) && seen.count == 5, check, "paging returns each completed record once, got \(seen)")
            let inProgress = try await store.listRecords(RecordQuery(phase: .inProgress)).records.map(\.key)
            try require(inProgress == [key("busy")], check, "by phase inProgress: \(inProgress)")
            var byFailure = RecordQuery()
            byFailure.failureContains = "paper"
            let failures = try await store.listRecords(byFailure).records
            try require(failures.map(\.key) == [key("failed")] && failures.first?.lastFailure?.contains("out of paper") == true, check, "by last failure: \(failures.map(\.key))")
            var bad = RecordQuery()
            bad.limit = 0
            try await requireThrows("invalidConfiguration", check) { _ = try await store.listRecords(bad) }

        case "batch-order":
            let done = try await claimNew(store, key("done"), check: check)
            try await store.complete(Completion(claim: done, outcome: .applied("d")))
            _ = try await claimNew(store, key("busy"), check: check)
            let results = try await store.claim([
                ClaimRequest(key: key("fresh"), fingerprint: fp1, lease: lease),
                ClaimRequest(key: key("done"), fingerprint: fp1, lease: lease),
                ClaimRequest(key: key("busy"), fingerprint: fp1, lease: lease),
                ClaimRequest(key: key("done"), fingerprint: fp2, lease: lease),
            ])
            try require(results.count == 4, check, "one result per request, got \(results.count)")
            guard case .new = results[0], case .completed(.applied("d")) = results[1], case .inProgress = results[2],
                  case .conflict = results[3]
            else { throw ConformanceFailure(check: check, detail: "batch answers out of order: \(results)") }

        case "records":
            let c = try await claimNew(store, key("a"), check: check)
            try await store.complete(Completion(claim: c, outcome: .rejected("no")))
            let recs = try await store.records(for: [key("a"), key("absent")])
            try require(recs.count == 1, check, "absent keys are left out")
            try require(recs[key("a")]?.phase == .completed && recs[key("a")]?.outcome == .rejected("no") && recs[key("a")]?.fingerprint == fp1,
                        check, "record should be completed with its outcome and fingerprint")

        case "prefetch-charges-first-grant":
            // A batch claimed ahead: only the first record granted `.new` is charged an attempt.
            let done = try await claimNew(store, key("done"), check: check)
            try await store.complete(Completion(claim: done, outcome: .applied()))
            let batch = ["done", "p1", "p2", "p3"].map { ClaimRequest(key: key($0), fingerprint: fp1, lease: lease, prefetch: true) }
            let first = try await store.claim(batch)
            guard case .completed = first[0], case .new(let c1) = first[1], case .new(let c2) = first[2] else {
                throw ConformanceFailure(check: check, detail: "unexpected answers \(first)")
            }
            try require(c1.attempt == 1 && c2.attempt == 1, check, "both are first attempts from the caller's view")
            // The holder crashes; its lease lapses; the batch is claimed again, twice.
            for round in 2...3 {
                clock.advance(by: .seconds(11))
                let again = try await store.claim(batch)
                guard case .new(let h) = again[1], case .new(let b) = again[2] else { throw ConformanceFailure(check: check, detail: "round \(round): \(again)") }
                try require(h.attempt == round, check, "the head of the batch is charged each time (attempt \(h.attempt), expected \(round))")
                try require(b.attempt == 1, check, "records behind the head are not charged for crashes they did not cause (attempt \(b.attempt))")
            }
            let recs = try await store.records(for: [key("p1"), key("p2"), key("p3")])
            try require(recs[key("p1")]?.attempts == 3 && recs[key("p2")]?.attempts == 0 && recs[key("p3")]?.attempts == 0, check,
                        "stored attempts: \(recs.mapValues(\.attempts))")

        case "release-charges-a-prefetch":
            // A prefetch granted behind another grant is not charged; once its handler ran and
            // failed, the release charges it, so the next claim is its second attempt (a poison
            // record gets maxAttempts handler runs, not one more).
            let batch = ["head", "poison"].map { ClaimRequest(key: key($0), fingerprint: fp1, lease: lease, prefetch: true) }
            let first = try await store.claim(batch)
            guard case .new(let head) = first[0], case .new(let poison) = first[1] else {
                throw ConformanceFailure(check: check, detail: "unexpected answers \(first)")
            }
            try require(head.attempt == 1 && poison.attempt == 1, check, "both are first attempts from the caller's view")
            try require(try await store.records(for: [key("poison")])[key("poison")]?.attempts == 0, check, "the prefetch is not charged when granted")
            try await store.complete(Completion(claim: head, outcome: .applied()))
            try await store.release(poison, reason: "boom")
            try require(try await store.records(for: [key("poison")])[key("poison")]?.attempts == 1, check, "the release charges the attempt that ran")
            let again = try await claimNew(store, key("poison"), check: check)
            try require(again.attempt == 2, check, "the claim after the release is attempt 2, got \(again.attempt)")
            try await store.release(again, reason: "boom")
            let third = try await claimNew(store, key("poison"), check: check)
            try require(third.attempt == 3, check, "then attempt 3, got \(third.attempt)")

        default:
            throw ConformanceFailure(check: check, detail: "unknown check")
        }
    }
}

/// How the batch checks write and read an integer effect with a store's own transaction.
public struct BatchEffects<Store: DedupeStore>: Sendable {
    /// Writes `value` under `key` in the handler's transaction.
    public var set: @Sendable (inout Store.Transaction, String, Int64) async throws -> Void
    /// Reads `key` in the handler's transaction (seeing the batch's earlier writes), nil when absent.
    public var get: @Sendable (inout Store.Transaction, String) async throws -> Int64?
    /// Reads `key` from the store, outside any batch (what is committed), nil when absent.
    public var read: @Sendable (Store, String) async throws -> Int64?
    /// Creates the accessors.
    public init(set: @escaping @Sendable (inout Store.Transaction, String, Int64) async throws -> Void,
                get: @escaping @Sendable (inout Store.Transaction, String) async throws -> Int64?,
                read: @escaping @Sendable (Store, String) async throws -> Int64?) {
        self.set = set
        self.get = get
        self.read = read
    }
}

extension BatchEffects where Store.Transaction == EffectTransaction {
    /// The key-value accessors (`EffectTransaction.setInt`/`getInt`, `readState`).
    public static var keyValue: BatchEffects {
        BatchEffects(
            set: { tx, k, v in tx.setInt(k, v) },
            get: { tx, k in try await tx.getInt(k) },
            read: { store, k in
                let v = try await store.readState(k)
                guard let bytes = v.value else { return nil }
                return Int64(String(decoding: bytes, as: UTF8.self))
            })
    }
}

/// The error a conformance check's handler throws on purpose.
struct ConformanceBoom: Error {}
