import Metrics

/// The consumer's metrics, through swift-metrics (dimensions `group` and `topic`).
///
/// | label | kind | meaning |
/// |---|---|---|
/// | `exactly_once_processed_total` | counter | new records whose effect was applied or rejected |
/// | `exactly_once_duplicates_total` | counter | records answered with a stored outcome (G4) |
/// | `exactly_once_conflicts_total` | counter | keys reused with another payload (G5) |
/// | `exactly_once_retries_total` | counter | handler attempts that failed, and commit conflicts |
/// | `exactly_once_dead_lettered_total` | counter | records sent to the dead-letter topic |
/// | `exactly_once_lease_expiries_total` | counter | claims that took over a lapsed earlier attempt |
/// | `exactly_once_fenced_total` | counter | lanes refused because their partition moved on |
/// | `exactly_once_paused_lanes_total` | counter | lanes that stopped early and re-read (store or key busy) |
/// | `exactly_once_poll_failures_total` | counter | polls that failed and were retried |
/// | `exactly_once_commit_lag` | gauge | records of the member's partitions not committed yet |
/// | `exactly_once_fenced_partitions` | gauge | assigned partitions the store currently refuses |
struct ConsumerMetrics: Sendable {
    let processed: Counter
    let duplicates: Counter
    let conflicts: Counter
    let retries: Counter
    let deadLettered: Counter
    let leaseExpiries: Counter
    let fenced: Counter
    let pausedLanes: Counter
    let pollFailures: Counter
    let commitLag: Gauge
    let fencedPartitions: Gauge

    init(group: String, topic: String) {
        let d = [("group", group), ("topic", topic)]
        processed = Counter(label: "exactly_once_processed_total", dimensions: d)
        duplicates = Counter(label: "exactly_once_duplicates_total", dimensions: d)
        conflicts = Counter(label: "exactly_once_conflicts_total", dimensions: d)
        retries = Counter(label: "exactly_once_retries_total", dimensions: d)
        deadLettered = Counter(label: "exactly_once_dead_lettered_total", dimensions: d)
        leaseExpiries = Counter(label: "exactly_once_lease_expiries_total", dimensions: d)
        fenced = Counter(label: "exactly_once_fenced_total", dimensions: d)
        pausedLanes = Counter(label: "exactly_once_paused_lanes_total", dimensions: d)
        pollFailures = Counter(label: "exactly_once_poll_failures_total", dimensions: d)
        commitLag = Gauge(label: "exactly_once_commit_lag", dimensions: d)
        fencedPartitions = Gauge(label: "exactly_once_fenced_partitions", dimensions: d)
    }
}
