import ExactlyOnce
import Synchronization

/// A wall clock that moves only when told: inject it into stores and transports to test leases,
/// retention and session timeouts without sleeping.
public final class ManualClock: WallClock {
    private let current: Mutex<Timestamp>
    /// Creates a clock at `start` (default: 1,000,000 ms).
    public init(start: Timestamp = Timestamp(milliseconds: 1_000_000)) { current = Mutex(start) }
    /// The current time.
    public func now() -> Timestamp { current.withLock { $0 } }
    /// Moves the clock forward.
    public func advance(by duration: Duration) { current.withLock { $0 = $0.advanced(by: duration) } }
}
