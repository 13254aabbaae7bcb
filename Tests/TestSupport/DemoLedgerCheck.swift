import ExactlyOnce
import Foundation

/// The independent check of a coupon-demo run's files (`--requests-out`, `--ledger`), apart from
/// the demo's own audit: the winners of each coupon in serial order must be the first `stock`
/// distinct members of that coupon in publish order.
public struct DemoLedgerCheck: Sendable {
    /// One line of `--ledger`.
    public struct Issued: Decodable, Sendable {
        /// The coupon.
        public var couponId: Int64
        /// The member who got it.
        public var memberId: Int64
        /// Its serial (1...stock per coupon).
        public var serial: Int64
    }
    private struct Request: Decodable { var couponId: Int64; var memberId: Int64 }

    /// How many requests `--requests-out` holds.
    public let requestCount: Int
    /// Every issued coupon of the ledger.
    public let issued: [Issued]
    /// Per coupon, the first `stock` distinct members in publish order.
    public let expectedWinners: [Int64: [Int64]]
    /// Per coupon, the ledger's members in serial order.
    public let actualWinners: [Int64: [Int64]]

    /// Reads both files and computes the expected and actual winners.
    public init(requestsPath: String, ledgerPath: String, stock: Int64) throws {
        let requests = try String(contentsOfFile: requestsPath, encoding: .utf8).split(separator: "\n")
            .map { try JSONDecoder().decode(Request.self, from: Data($0.utf8)) }
        issued = try String(contentsOfFile: ledgerPath, encoding: .utf8).split(separator: "\n")
            .map { try JSONDecoder().decode(Issued.self, from: Data($0.utf8)) }
        requestCount = requests.count
        var expected: [Int64: [Int64]] = [:]
        for q in requests where !(expected[q.couponId] ?? []).contains(q.memberId) && Int64(expected[q.couponId]?.count ?? 0) < stock {
            expected[q.couponId, default: []].append(q.memberId)
        }
        expectedWinners = expected
        var actual: [Int64: [Int64]] = [:]
        for i in issued.sorted(by: { ($0.couponId, $0.serial) < ($1.couponId, $1.serial) }) { actual[i.couponId, default: []].append(i.memberId) }
        actualWinners = actual
    }
}

extension DemoLedgerCheck.Issued {
    /// The first line of the `--ledger` file at `path` (a coupon's first winner).
    public static func first(inLedger path: String) throws -> Self {
        guard let line = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").first else {
            throw ExactlyOnceError(.corruptData, "the ledger \(path) is empty")
        }
        return try JSONDecoder().decode(Self.self, from: Data(line.utf8))
    }

    /// The idempotency key of the request that won it, `couponId:memberId`.
    public var key: String { "\(couponId):\(memberId)" }
}
