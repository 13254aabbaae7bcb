import ExactlyOnce
import Synchronization

/// Wraps a store and makes it unreachable on demand (F8): an operation can fail before it
/// reaches the store, or after it was applied (the caller then does not know it happened, the
/// hardest case for a client).
public final class FaultyStore<Base: DedupeStore>: DedupeStore {
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

    private func run<T>(_ op: Operation, _ body: () async throws -> T) async throws -> T {
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

    public func claim(_ requests: [ClaimRequest]) async throws -> [ClaimResult] { try await run(.claim) { try await base.claim(requests) } }
    public func complete(_ completion: Completion) async throws { try await run(.complete) { try await base.complete(completion) } }
    public var completionBatchLimit: Int { base.completionBatchLimit }
    public func complete(_ completions: [Completion]) async throws -> BatchCompletion {
        try await run(.complete) { try await base.complete(completions) }
    }
    public func release(_ claim: Claim, reason: String) async throws { try await run(.release) { try await base.release(claim, reason: reason) } }
    public func readState(_ keys: [String]) async throws -> [String: VersionedValue] { try await run(.readState) { try await base.readState(keys) } }
    public func records(for keys: [IdempotencyKey]) async throws -> [IdempotencyKey: DedupeRecord] { try await base.records(for: keys) }
}
