/// When a member of a cooperative group holds its offset commits back: from the moment it knows
/// the group is rebalancing until the assignment that ends the rebalance.
///
/// Why: a commit sent while the member's JoinGroup is pending is answered after the new
/// generation has formed, with ILLEGAL_GENERATION (it carries the old generation), and
/// librdkafka before 2.8.3 then resets the generation the member has just joined with to -1
/// (confluentinc/librdkafka#4059, "assignment lost on illegal generation during a commit"):
/// the member's SyncGroup or next heartbeat fails, and the whole group rebalances again. A
/// member that commits after every batch almost always has a commit in flight when it rejoins,
/// so with a few such members one rebalance set off the next for tens of seconds. Commits made
/// while a rebalance is in progress are refused anyway (REBALANCE_IN_PROGRESS); held ones stay
/// pending and go out with the assignment that ends the rebalance.
///
/// What tells the member that the group is rebalancing, in librdkafka's cooperative protocol:
/// - a commit refused with REBALANCE_IN_PROGRESS, ILLEGAL_GENERATION or UNKNOWN_MEMBER_ID;
/// - a revocation callback: librdkafka joins the group again right after the assignment
///   callback that follows it (the second round of a cooperative rebalance), or at once when
///   the assignment was lost.
///
/// Eager assignors need no hold: a member revokes everything before it sends its JoinGroup (in
/// the poll that serves the revocation, on the queue that also commits), so no commit of an
/// eager member is in flight across a JoinGroup.
struct CommitHold {
    /// Since when commits are held (nil: they go out).
    private(set) var since: ContinuousClock.Instant?
    /// Whether the next assignment callback is the middle of a cooperative rebalance (a second
    /// round follows it) rather than its end.
    private(set) var secondRoundFollows = false
    /// The longest a hold lasts without an assignment that ends it (the longest a rebalance
    /// waits for its members: `max.poll.interval.ms`).
    let limit: Duration

    init(limit: Duration) {
        self.limit = limit
    }

    /// A commit came back with a broker error that says the group is rebalancing.
    mutating func commitRefusedByRebalance(now: ContinuousClock.Instant = .now) {
        if since == nil { since = now }
    }

    /// The member's partitions (`lost`: its whole assignment) were revoked in a cooperative
    /// rebalance: librdkafka joins again after the next assignment, or at once when `lost`.
    mutating func revoked(lost: Bool, now: ContinuousClock.Instant = .now) {
        if since == nil { since = now }
        secondRoundFollows = !lost
    }

    /// An assignment callback: the end of the rebalance, unless a second round follows it.
    mutating func assigned() {
        if secondRoundFollows {
            secondRoundFollows = false
        } else {
            since = nil
        }
    }

    /// Whether commits are held at `now` (a hold past ``limit`` lapses).
    mutating func isHeld(now: ContinuousClock.Instant = .now) -> Bool {
        guard let since else { return false }
        guard now - since <= limit else {
            self.since = nil
            secondRoundFollows = false
            return false
        }
        return true
    }
}
