#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A wall-clock instant in milliseconds since 1970-01-01 UTC. Leases and retention deadlines
/// are persisted as timestamps, so they survive restarts (unlike monotonic clock instants).
public struct Timestamp: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// Milliseconds since the Unix epoch.
    public var milliseconds: Int64
    /// Wraps a millisecond count.
    public init(milliseconds: Int64) { self.milliseconds = milliseconds }
    /// This instant moved by `duration` (saturating).
    public func advanced(by duration: Duration) -> Timestamp {
        let (s, atto) = duration.components
        let ms = s.multipliedReportingOverflow(by: 1000)
        let delta = ms.overflow ? (s < 0 ? Int64.min : Int64.max) : ms.partialValue.addingReportingOverflow(atto / 1_000_000_000_000_000).partialValue
        let r = milliseconds.addingReportingOverflow(delta)
        return Timestamp(milliseconds: r.overflow ? (delta < 0 ? .min : .max) : r.partialValue)
    }
    public static func < (l: Timestamp, r: Timestamp) -> Bool { l.milliseconds < r.milliseconds }
    public var description: String { "\(milliseconds)ms" }
}

/// A source of wall-clock time. Inject a manual clock (the test kit's `ManualClock`) in tests.
public protocol WallClock: Sendable {
    /// The current time.
    func now() -> Timestamp
}

/// The system's real-time clock (`CLOCK_REALTIME`).
public struct SystemWallClock: WallClock {
    /// Creates the clock.
    public init() {}
    /// The current time.
    public func now() -> Timestamp {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Timestamp(milliseconds: Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000)
    }
}
