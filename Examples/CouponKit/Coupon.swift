import ExactlyOnce

/// One "get coupon" click: member `memberId` asks for coupon `couponId`.
///
/// The payload is `couponId,memberId` in ASCII (plus `,variant` when `variant` is not 0, used by
/// tests to make a conflicting payload for the same key). The request id is not part of the
/// payload: two clicks of the same member on the same coupon are the same request in effect.
public struct CouponRequest: Sendable, Hashable, Codable {
    /// Producer-side id of this click (for audits).
    public var requestId: Int64
    /// The coupon.
    public var couponId: Int64
    /// The member.
    public var memberId: Int64
    /// 0 normally; another value makes a different payload for the same key (F10 tests).
    public var variant: Int64

    /// Creates a request.
    public init(requestId: Int64, couponId: Int64, memberId: Int64, variant: Int64 = 0) {
        self.requestId = requestId
        self.couponId = couponId
        self.memberId = memberId
        self.variant = variant
    }

    /// The idempotency key `couponId:memberId`.
    public var key: IdempotencyKey { .coupon(couponId: couponId, memberId: memberId) }

    /// The record key: the coupon id, so ``ModuloPartitioner`` keeps one coupon in one partition.
    public var recordKey: [UInt8] { Self.recordKey(couponId: couponId) }

    /// The record key of every request for `couponId` (which partition holds its clicks).
    public static func recordKey(couponId: Int64) -> [UInt8] { Array(String(couponId).utf8) }

    /// The payload bytes.
    public var payload: [UInt8] {
        Array((variant == 0 ? "\(couponId),\(memberId)" : "\(couponId),\(memberId),\(variant)").utf8)
    }

    /// The record to publish.
    public var outgoing: OutgoingRecord { OutgoingRecord(key: recordKey, payload: payload) }

    /// Decodes a payload.
    /// - Throws: ``ExactlyOnceError/Code/invalidPayload`` for anything but `c,m` or `c,m,v` with
    ///   non-negative decimal ids.
    public static func decode(_ payload: [UInt8]) throws -> (couponId: Int64, memberId: Int64) {
        guard payload.count <= 64 else { throw ExactlyOnceError(.invalidPayload, "coupon payload longer than 64 bytes") }
        // The first two fields, counted without an array (this runs once or twice per click).
        var first: Int64 = 0, second: Int64 = 0
        var fields = 0
        var current: Int64 = 0
        var digits = 0
        for b in payload {
            if b == UInt8(ascii: ",") {
                guard digits > 0 else { throw ExactlyOnceError(.invalidPayload, "empty field in coupon payload") }
                if fields == 0 { first = current } else if fields == 1 { second = current }
                fields += 1; current = 0; digits = 0
            } else if b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9") {
                guard digits < 18 else { throw ExactlyOnceError(.invalidPayload, "id too long in coupon payload") }
                current = current * 10 + Int64(b - UInt8(ascii: "0")); digits += 1
            } else {
                throw ExactlyOnceError(.invalidPayload, "unexpected byte in coupon payload")
            }
        }
        guard digits > 0 else { throw ExactlyOnceError(.invalidPayload, "empty field in coupon payload") }
        if fields == 1 { second = current }
        fields += 1
        guard fields == 2 || fields == 3 else { throw ExactlyOnceError(.invalidPayload, "coupon payload needs 2 or 3 fields") }
        return (first, second)
    }

    /// The key extractor for the consumer: decodes the payload and derives `couponId:memberId`.
    public static let keyExtractor: KeyExtractor = { record in
        let (c, m) = try decode(record.payload)
        return .coupon(couponId: c, memberId: m)
    }
}

/// The flash-sale effect: issue the next serial of a coupon while stock lasts.
///
/// State (in the store, committed atomically with the dedupe record, G3):
/// `coupon:<c>:issued` holds the count issued; `coupon:<c>:serial:<n>` holds the member of serial n.
/// Sold out is a negative outcome (`rejected("sold out")`), stored and replayed to duplicates (G4).
public struct CouponIssuer: Sendable {
    /// Stock per coupon.
    public let stock: [Int64: Int64]

    /// Creates an issuer with a stock table.
    public init(stock: [Int64: Int64]) { self.stock = stock }

    /// State key of a coupon's issued count.
    public static func issuedKey(_ c: Int64) -> String { "coupon:" + String(c) + ":issued" }
    /// State key of a coupon's serial `n`.
    public static func serialKey(_ c: Int64, _ n: Int64) -> String { "coupon:" + String(c) + ":serial:" + String(n) }

    /// The handler.
    public func handle(_ ctx: inout HandlerContext<EffectTransaction>) async throws -> Outcome {
        let (couponId, memberId) = try CouponRequest.decode(ctx.record.payload)
        guard let limit = stock[couponId] else { return .rejected("unknown coupon") }
        let issuedKey = Self.issuedKey(couponId)
        let issued = try await ctx.transaction.getInt(issuedKey) ?? 0
        guard issued < limit else { return .rejected("sold out") }
        let serial = issued + 1
        ctx.transaction.setInt(issuedKey, serial)
        ctx.transaction.setInt(Self.serialKey(couponId, serial), memberId)
        return .applied(String(serial))
    }

    /// The handler as a closure for ``ExactlyOnceConsumer``.
    public var handler: RecordHandler<EffectTransaction> {
        let issuer = self
        return { ctx in try await issuer.handle(&ctx) }
    }
}

/// One issued coupon, as read back from the store.
public struct LedgerEntry: Sendable, Hashable, Codable {
    /// The coupon.
    public var couponId: Int64
    /// The member.
    public var memberId: Int64
    /// Its serial (1-based).
    public var serial: Int64
    /// Creates an entry.
    public init(couponId: Int64, memberId: Int64, serial: Int64) {
        self.couponId = couponId
        self.memberId = memberId
        self.serial = serial
    }
}

/// Reads the issued coupons back from a store.
public enum CouponLedger {
    /// Every issued coupon of `coupons`, by coupon then serial.
    /// - Throws: ``ExactlyOnceError/Code/corruptData`` when the state is inconsistent (a serial missing).
    public static func read(from store: some DedupeStore, coupons: [Int64]) async throws -> [LedgerEntry] {
        var out: [LedgerEntry] = []
        let counts = try await store.readState(coupons.map(CouponIssuer.issuedKey))
        for c in coupons.sorted() {
            guard let raw = counts[CouponIssuer.issuedKey(c)]?.value else { continue }
            guard let n = Int64(String(decoding: raw, as: UTF8.self)), n >= 0 else {
                throw ExactlyOnceError(.corruptData, "issued count of coupon \(c) is not a number")
            }
            guard n > 0 else { continue }
            let keys = (1...n).map { CouponIssuer.serialKey(c, $0) }
            let serials = try await store.readState(keys)
            for s in 1...n {
                guard let v = serials[CouponIssuer.serialKey(c, s)]?.value, let m = Int64(String(decoding: v, as: UTF8.self)) else {
                    throw ExactlyOnceError(.corruptData, "serial \(s) of coupon \(c) is missing")
                }
                out.append(LedgerEntry(couponId: c, memberId: m, serial: s))
            }
        }
        return out
    }
}

/// An independent audit of a sale: computed from the published requests and the ledger read
/// back from the store, never from the consumer's counters.
public struct CouponAudit: Sendable, Hashable, Codable {
    /// Coupons issued (ledger entries).
    public var issued = 0
    /// Issued beyond stock, summed over coupons.
    public var overIssued = 0
    /// Ledger entries beyond the first for the same member and coupon.
    public var doubleIssued = 0
    /// Distinct requests (keys) with no finished record in the store.
    public var lost = 0
    /// Winners that differ from the first `stock` distinct members in publish order (both directions).
    public var fcfsViolations = 0
    /// Distinct requests answered "sold out".
    public var soldOut = 0
    /// Published requests minus distinct keys: the repeats the store had to suppress.
    public var duplicateRequests = 0

    /// Audits a sale.
    /// - Parameters:
    ///   - requests: the published requests, each coupon's in publish order.
    ///   - ledger: issued coupons read back from the store.
    ///   - stock: stock per coupon.
    ///   - records: the store's records of the requests' keys.
    ///   - excluded: keys that were legitimately not issued (dead-lettered poison), left out of the FCFS expectation.
    public static func audit(requests: [CouponRequest], ledger: [LedgerEntry], stock: [Int64: Int64],
                             records: [IdempotencyKey: DedupeRecord], excluded: Set<IdempotencyKey> = []) -> CouponAudit {
        var a = CouponAudit()
        a.issued = ledger.count
        var perCoupon: [Int64: Int] = [:]
        var pairs: [IdempotencyKey: Int] = [:]
        for e in ledger {
            perCoupon[e.couponId, default: 0] += 1
            pairs[.coupon(couponId: e.couponId, memberId: e.memberId), default: 0] += 1
        }
        for (c, n) in perCoupon { a.overIssued += max(0, n - Int(stock[c] ?? 0)) }
        for (_, n) in pairs where n > 1 { a.doubleIssued += n - 1 }

        var seen = Set<IdempotencyKey>()
        var expectedWinners = Set<IdempotencyKey>()
        var winnersPerCoupon: [Int64: Int64] = [:]
        for r in requests {
            let k = r.key
            guard seen.insert(k).inserted else { continue }
            if excluded.contains(k) { continue }
            let limit = stock[r.couponId] ?? 0
            if winnersPerCoupon[r.couponId, default: 0] < limit {
                winnersPerCoupon[r.couponId, default: 0] += 1
                expectedWinners.insert(k)
            }
        }
        a.duplicateRequests = requests.count - seen.count
        for k in seen {
            guard let rec = records[k], rec.phase == .completed else { a.lost += 1; continue }
            if rec.outcome?.status == .rejected && rec.outcome?.detailText == "sold out" { a.soldOut += 1 }
        }
        let actualWinners = Set(pairs.keys)
        a.fcfsViolations = expectedWinners.symmetricDifference(actualWinners).count
        return a
    }
}
