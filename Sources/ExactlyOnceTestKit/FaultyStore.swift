import ExactlyOnce
import Synchronization

/// Wraps a store and makes it unreachable on demand (F8): an operation can fail before it
/// reaches the store, or after it was applied (the caller then does not know it happened, the
/// hardest case for a client).
///
/// The wrapped store's own `DedupeStore/Transaction` and `CompletionBatch` are kept: the
/// batch is wrapped in a ``FaultyBatch`` whose commits (and handlers' reads, before the handler
/// runs) fail the same way.
public final class FaultyStore<Base: DedupeStore>: DedupeStore {
    /// The wrapped store's transaction.
    public typealias Transaction = Base.Transaction

    /// What to do with one operation.
    public enum Fault: Sendable {
        /// Pass through.
        case none
        /// Throw `storeUnavailable` without touching the store.
        case failBefore
        /// Apply the operation, then throw `storeUnavailable` (unknown outcome).
        case failAfter
    }
    /// The store operations a fault can hit.
    public enum Operation: String, Sendable { case claim, complete, release, readState, records }

    /// The wrapped store.
    public let base: Base
    private let decide: @Sendable (Operation) -> Fault
    private let injected = Mutex(0)

    /// Wraps `base`; `decide` is asked before every operation.
    public init(_ base: Base, decide: @escaping @Sendable (Operation) -> Fault) {
        self.base = base
        self.decide = decide
    }

    /// How many faults were injected.
    public var faultsInjected: Int { injected.withLock { $0 } }

    func run<T>(_ op: Operation, _ body: () async throws -> T) async throws -> T {
        switch decide(op) {
        case .none:
            return try await body()
        case .failBefore:
            injected.withLock { $0 += 1 }
            throw ExactlyOnceError(.storeUnavailable, "injected: store unreachable before \(op.rawValue)")
        case .failAfter:
            injected.withLock { $0 += 1 }
            _ = try await body()
            throw ExactlyOnceError(.storeUnavailable, "injected: store unreachable after \(op.rawValue)")
        }
    }

    /// The base store's batch, wrapped so its commits can fail.
    public func makeCompletionBatch(_ options: CompletionBatchOptions) -> FaultyBatch<Base> {
        FaultyBatch(inner: base.makeCompletionBatch(options), store: self)
    }

    public func claim(_ requests: [ClaimRequest]) async throws -> [ClaimResult] { try await run(.claim) { try await base.claim(requests) } }
    public func complete(_ completion: Completion) async throws { try await run(.complete) { try await base.complete(completion) } }
    public var completionBatchLimit: Int { base.completionBatchLimit }
    public func complete(_ completions: [Completion]) async throws -> BatchCompletion {
        try await run(.complete) { try await base.complete(completions) }
    }
    public func release(_ claim: Claim, reason: String) async throws { try await run(.release) { try await base.release(claim, reason: reason) } }
    public func readState(_ keys: [String]) async throws -> [String: VersionedValue] { try await run(.readState) { try await base.readState(keys) } }
    public func records(for keys: [IdempotencyKey]) async throws -> [IdempotencyKey: DedupeRecord] { try await base.records(for: keys) }
    public func listRecords(_ query: RecordQuery) async throws -> RecordPage { try await base.listRecords(query) }
    public func reopenDeadLettered(_ key: IdempotencyKey) async throws -> Bool { try await base.reopenDeadLettered(key) }
}

/// The completion batch of a ``FaultyStore``: the base store's batch, with injected faults on
/// commit (before or after it applied) and before a handler runs (its reads would fail).
public struct FaultyBatch<Base: DedupeStore>: CompletionBatch {
    /// The base store's transaction.
    public typealias Transaction = Base.Transaction
    var inner: Base.Batch
    let store: FaultyStore<Base>

    /// Completions staged.
    public var count: Int { inner.count }

    /// Runs the handler in the base batch, unless an injected read fault comes first.
    public mutating func perform(_ claim: Claim, _ body: (inout Base.Transaction) async throws -> Outcome) async throws -> Outcome {
        try await store.run(.readState) {}
        return try await inner.perform(claim, body)
    }

    /// Stages in the base batch.
    public mutating func stage(_ claim: Claim, outcome: Outcome) async throws {
        try await inner.stage(claim, outcome: outcome)
    }

    /// Commits the base batch, with an injected fault before or after.
    public mutating func commit() async throws -> BatchCompletion {
        guard inner.count > 0 else { return BatchCompletion(applied: 0, failure: nil) }
        var batch = inner
        defer { inner = batch }
        do {
            return try await store.run(.complete) { try await batch.commit() }
        } catch {
            await batch.discard()
            throw error
        }
    }

    /// Discards the base batch.
    public mutating func discard() async { await inner.discard() }
}
