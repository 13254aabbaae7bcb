import ExactlyOnce
import ExactlyOnceRedis
import Foundation
import Synchronization

/// The legacy design, as its operators would write it: a Redis lock per coupon taken with
/// `SET key token NX PX lease`, retried with a wait budget (Redisson's `tryLock(wait, lease)`),
/// then — inside the lock — the member and stock checks in one pipelined round trip, the
/// decrement and the record in a second one, and a compare-and-delete release by Lua script.
///
/// It answers synchronously. Its weak points are why the log-based design replaces it: every click of a hot coupon
/// serialises on one lock (contention, lock timeouts), acquisition is not first-come-first-served
/// (whoever retries at the right moment wins), and when the critical section outlives the lease
/// another request enters it too (over-issue). ``stats`` counts timeouts and expired leases.
public final class LegacyIssuer: Sendable {
    /// The outcome of one legacy click.
    public enum Result: Sendable, Equatable {
        /// Issued with this serial.
        case issued(Int64)
        /// No stock left.
        case soldOut
        /// The member already holds the coupon.
        case alreadyIssued
        /// The lock was not acquired within the wait budget.
        case lockTimeout
        /// The coupon was not created.
        case unknownCoupon
    }

    /// Counters of what the lock did.
    public struct Stats: Sendable, Codable, Hashable {
        /// Clicks that got the lock.
        public var acquired = 0
        /// Clicks that waited out the budget without the lock (answered 503).
        public var lockTimeouts = 0
        /// Releases that found another token (or none): the lease expired inside the critical section.
        public var leaseExpiries = 0
        /// `SET NX` attempts that failed because the lock was held.
        public var contendedAttempts = 0
    }

    let redis: RedisCommandClient
    let prefix: String
    let lease: Duration
    let wait: Duration
    let workDelay: Duration
    private let state = Mutex<(stats: Stats, arrivals: [Int64: [Int64]], answeredIssued: [Int64: [Int64: Int64]])>((Stats(), [:], [:]))

    /// Compare-and-delete: releases the lock only if it still holds our token.
    static let releaseScript = """
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end
        """

    /// A legacy issuer on `redis`, keys under `prefix`.
    public init(redis: RedisCommandClient, prefix: String, lease: Duration, wait: Duration, workDelay: Duration) {
        self.redis = redis
        self.prefix = prefix
        self.lease = lease
        self.wait = wait
        self.workDelay = workDelay
    }

    func key(_ c: Int64, _ name: String) -> String { "\(prefix)legacy:coupon:\(c):\(name)" }

    /// Sets up a coupon's stock (called when the coupon is created).
    public func create(couponId: Int64, stock: Int64) async throws {
        let v = try await redis.send(["SET", key(couponId, "stock"), String(stock), "NX"])
        if let e = v.errorMessage { throw ExactlyOnceError(.storeUnavailable, "Redis refused SET: \(e)") }
    }

    /// One legacy click.
    /// - Throws: `storeUnavailable` when Redis cannot be reached.
    public func issue(couponId c: Int64, memberId m: Int64) async throws -> Result {
        state.withLock { $0.arrivals[c, default: []].append(m) }
        let lockKey = key(c, "lock")
        let token = UUID().uuidString
        let leaseMs = String(max(1, lease.milliseconds))
        let clock = ContinuousClock()
        let deadline = clock.now + wait
        var retries = 0
        while true {
            let v = try await redis.send(["SET", lockKey, token, "NX", "PX", leaseMs])
            if let e = v.errorMessage { throw ExactlyOnceError(.storeUnavailable, "Redis refused SET NX: \(e)") }
            if v.string == "OK" { break }
            retries += 1
            guard clock.now < deadline else {
                let n = retries
                state.withLock { $0.stats.lockTimeouts += 1; $0.stats.contendedAttempts += n }
                return .lockTimeout
            }
            // Back off a little, with jitter, as a tryLock loop does between attempts.
            try await Task.sleep(for: .microseconds(Int64.random(in: 200...1_000)))
        }
        let contended = retries
        state.withLock { $0.stats.acquired += 1; $0.stats.contendedAttempts += contended }
        let result: Result
        do {
            result = try await critical(c, m)
        } catch {
            _ = try? await release(lockKey, token)
            throw error
        }
        try await release(lockKey, token)
        if case .issued(let serial) = result { state.withLock { $0.answeredIssued[c, default: [:]][m] = serial } }
        return result
    }

    private func critical(_ c: Int64, _ m: Int64) async throws -> Result {
        let reads = try await redis.pipeline([
            ["GET", key(c, "stock")], ["SISMEMBER", key(c, "members"), String(m)], ["GET", key(c, "issued")],
        ])
        if let e = reads.compactMap(\.errorMessage).first { throw ExactlyOnceError(.storeUnavailable, "Redis refused a read: \(e)") }
        guard let stock = reads[0].string.flatMap({ Int64($0) }) else { return .unknownCoupon }
        if reads[1].int == 1 { return .alreadyIssued }
        let issued = reads[2].string.flatMap { Int64($0) } ?? 0
        if issued >= stock { return .soldOut }
        if workDelay > .zero { try await Task.sleep(for: workDelay) }
        let writes = try await redis.pipeline([
            ["INCR", key(c, "issued")], ["SADD", key(c, "members"), String(m)],
        ])
        if let e = writes.compactMap(\.errorMessage).first { throw ExactlyOnceError(.storeUnavailable, "Redis refused a write: \(e)") }
        guard let serial = writes[0].int else { throw ExactlyOnceError(.corruptData, "INCR answered no integer") }
        let logged = try await redis.send(["RPUSH", key(c, "ledger"), "\(m):\(serial)"])
        if let e = logged.errorMessage { throw ExactlyOnceError(.storeUnavailable, "Redis refused RPUSH: \(e)") }
        return .issued(serial)
    }

    private func release(_ lockKey: String, _ token: String) async throws {
        let v = try await redis.evaluate(script: Self.releaseScript, keys: [lockKey], arguments: [token])
        if let e = v.errorMessage { throw ExactlyOnceError(.storeUnavailable, "Redis refused the release script: \(e)") }
        if v.int != 1 { state.withLock { $0.stats.leaseExpiries += 1 } }
    }

    /// What the lock did so far.
    public var stats: Stats { state.withLock { $0.stats } }

    /// An independent audit of the legacy design for one coupon: the ledger read back from Redis
    /// against the order in which clicks reached this process.
    public func audit(couponId c: Int64) async throws -> LegacyAudit {
        let v = try await redis.pipeline([["LRANGE", key(c, "ledger"), "0", "-1"], ["GET", key(c, "stock")]])
        if let e = v.compactMap(\.errorMessage).first { throw ExactlyOnceError(.storeUnavailable, "Redis refused LRANGE: \(e)") }
        let stock = v[1].string.flatMap { Int64($0) } ?? 0
        var members: [Int64] = []
        var serials: [Int64] = []
        for item in v[0].array ?? [] {
            let parts = (item.string ?? "").split(separator: ":")
            guard parts.count == 2, let m = Int64(parts[0]), let s = Int64(parts[1]) else { continue }
            members.append(m)
            serials.append(s)
        }
        let (arrivals, answered, stats) = state.withLock { ($0.arrivals[c] ?? [], $0.answeredIssued[c] ?? [:], $0.stats) }
        var a = LegacyAudit()
        a.stock = stock
        a.issued = members.count
        a.overIssued = max(0, members.count - Int(stock))
        a.doubleIssued = members.count - Set(members).count
        a.duplicateSerials = serials.count - Set(serials).count
        let ledgerMembers = Set(members)
        a.lost = answered.keys.filter { !ledgerMembers.contains($0) }.count
        var seen = Set<Int64>()
        var expected = Set<Int64>()
        for m in arrivals where seen.insert(m).inserted {
            if expected.count < Int(stock) { expected.insert(m) }
        }
        a.fcfsViolations = expected.symmetricDifference(ledgerMembers).count
        a.clicks = arrivals.count
        a.distinctMembers = seen.count
        a.lockTimeouts = stats.lockTimeouts
        a.leaseExpiries = stats.leaseExpiries
        a.contendedAttempts = stats.contendedAttempts
        return a
    }
}

/// The audit of the legacy design for one coupon.
public struct LegacyAudit: Sendable, Codable, Hashable {
    /// The coupon's stock.
    public var stock: Int64 = 0
    /// Ledger entries.
    public var issued = 0
    /// Issued beyond stock.
    public var overIssued = 0
    /// Ledger entries beyond the first for a member.
    public var doubleIssued = 0
    /// Serials handed out more than once.
    public var duplicateSerials = 0
    /// Clicks answered "issued" with no ledger entry.
    public var lost = 0
    /// Winners that differ from the first `stock` distinct members in arrival order (both directions).
    public var fcfsViolations = 0
    /// Clicks that reached the endpoint.
    public var clicks = 0
    /// Distinct members among them.
    public var distinctMembers = 0
    /// Clicks answered 503 because the lock was not acquired in time (all coupons).
    public var lockTimeouts = 0
    /// Releases after the lease had expired (all coupons).
    public var leaseExpiries = 0
    /// Failed `SET NX` attempts (all coupons).
    public var contendedAttempts = 0
}

extension Duration {
    /// Whole milliseconds.
    var milliseconds: Int64 { components.seconds * 1_000 + components.attoseconds / 1_000_000_000_000_000 }
}
