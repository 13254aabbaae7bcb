/// A named point in the consumer's processing of a batch where a fault can be injected
/// (failure points F1-F6 of the twelve the tests inject; see Docs/Guarantees.md).
public struct FailurePoint: Hashable, Sendable, CustomStringConvertible {
    /// Stable name, e.g. `F2.afterClaim`.
    public let name: String
    private init(_ name: String) { self.name = name }
    /// F1: before the batch's keys are claimed.
    public static let beforeClaim = FailurePoint("F1.beforeClaim")
    /// F2: after claiming, before any effect.
    public static let afterClaim = FailurePoint("F2.afterClaim")
    /// F3: inside the effect, after the handler ran, before its transaction is handed over.
    public static let insideEffect = FailurePoint("F3.insideEffect")
    /// F4: after the effect, before the dedupe record is completed.
    public static let afterEffect = FailurePoint("F4.afterEffect")
    /// F5: after completion, before the offset commit.
    public static let afterComplete = FailurePoint("F5.afterComplete")
    /// F6: during the offset commit, before the transport applied it.
    public static let beforeCommit = FailurePoint("F6.beforeCommit")
    /// F6: during the offset commit, after the transport applied it but before it was acknowledged.
    public static let afterCommit = FailurePoint("F6.afterCommit")
    /// Every point, in processing order.
    public static let all: [FailurePoint] = [.beforeClaim, .afterClaim, .insideEffect, .afterEffect, .afterComplete, .beforeCommit, .afterCommit]
    public var description: String { name }
}

/// Where a failure point was reached.
public struct FaultContext: Sendable {
    /// The member.
    public var memberID: String
    /// The partition, for per-record points.
    public var partition: PartitionID?
    /// The record offset, for per-record points.
    public var offset: Offset?
    /// The key, for per-record points.
    public var key: IdempotencyKey?
    /// Creates a context.
    public init(memberID: String, partition: PartitionID? = nil, offset: Offset? = nil, key: IdempotencyKey? = nil) {
        self.memberID = memberID
        self.partition = partition
        self.offset = offset
        self.key = key
    }
}

/// Called by the consumer at every ``FailurePoint``. Production code uses ``NoFaults``; the
/// simulator and the demo inject crashes (throw ``InjectedCrash``), pauses (run other members,
/// advance the clock, then return) and rebalances here.
public protocol FaultInjector: Sendable {
    /// Reached `point`. Throwing aborts the member as a crash would.
    func reach(_ point: FailurePoint, _ context: FaultContext) async throws
}

/// Injects nothing.
public struct NoFaults: FaultInjector {
    /// Creates the injector.
    public init() {}
    @inlinable public func reach(_ point: FailurePoint, _ context: FaultContext) async throws {}
}

/// A simulated process crash: the member's in-flight state is gone.
public struct InjectedCrash: Error, Sendable, CustomStringConvertible {
    /// Where it happened.
    public var point: FailurePoint
    /// Creates a crash at `point`.
    public init(at point: FailurePoint) { self.point = point }
    public var description: String { "injected crash at \(point)" }
}
