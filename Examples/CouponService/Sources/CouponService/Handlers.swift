import CouponKit
import ExactlyOnce
import Foundation

/// The click handler: issues the next serial of a coupon while its stock lasts. State keys are
/// CouponKit's (`coupon:<c>:issued`, `coupon:<c>:serial:<n>`, so `CouponLedger` reads them back)
/// plus `coupon:<c>:member:<m>` (the member's serial, which payment events check).
public struct ClickIssuer: Sendable {
    /// Where the stock comes from.
    public let catalog: any CouponCatalog

    /// A handler reading stock from `catalog`.
    public init(catalog: any CouponCatalog) { self.catalog = catalog }

    /// State key of the serial member `m` holds of coupon `c`.
    public static func memberKey(_ c: Int64, _ m: Int64) -> String { "coupon:\(c):member:\(m)" }

    /// The handler.
    public func handle(_ ctx: inout HandlerContext<EffectTransaction>) async throws -> Outcome {
        let (couponId, memberId) = try CouponRequest.decode(ctx.record.payload)
        guard let limit = try await catalog.stock(of: couponId) else { return .rejected("unknown coupon") }
        let issued = try await ctx.transaction.getInt(CouponIssuer.issuedKey(couponId)) ?? 0
        guard issued < limit else { return .rejected("sold out") }
        let serial = issued + 1
        ctx.transaction.setInt(CouponIssuer.issuedKey(couponId), serial)
        ctx.transaction.setInt(CouponIssuer.serialKey(couponId, serial), memberId)
        ctx.transaction.setInt(Self.memberKey(couponId, memberId), serial)
        return .applied(String(serial))
    }
}

/// A payment event of an order: the use of a coupon or its restore (refund).
public struct OrderEvent: Codable, Sendable, Hashable {
    /// The order (the record key: one order, one partition, in order).
    public var orderId: String
    /// The event's id within the order.
    public var eventId: String
    /// `use` or `restore`.
    public var type: Kind
    /// The coupon used or restored.
    public var couponId: Int64
    /// The member who holds it.
    public var memberId: Int64

    /// The kinds of payment event.
    public enum Kind: String, Codable, Sendable {
        /// The member pays with the coupon.
        case use
        /// The order is refunded: the coupon is usable again.
        case restore
    }

    /// Creates an event.
    public init(orderId: String, eventId: String, type: Kind, couponId: Int64, memberId: Int64) {
        self.orderId = orderId
        self.eventId = eventId
        self.type = type
        self.couponId = couponId
        self.memberId = memberId
    }

    /// The idempotency key `order:<orderId>:<eventId>`.
    public func key() throws -> IdempotencyKey { try .orderEvent(orderId: orderId, eventId: eventId) }

    /// Checks an id from a path or body: 1 to 64 characters of `A-Z a-z 0-9 - _ .`.
    public static func isValidID(_ s: String) -> Bool {
        !s.isEmpty && s.utf8.count <= 64 && s.utf8.allSatisfy { b in
            (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x2D || b == 0x5F || b == 0x2E
        }
    }

    /// Decodes a record payload.
    /// - Throws: `invalidPayload`.
    public static func decode(_ payload: [UInt8]) throws -> OrderEvent {
        do {
            let e = try JSONDecoder().decode(OrderEvent.self, from: Data(payload))
            guard isValidID(e.orderId), isValidID(e.eventId) else { throw ExactlyOnceError(.invalidPayload, "bad order or event id") }
            return e
        } catch let e as ExactlyOnceError {
            throw e
        } catch {
            throw ExactlyOnceError(.invalidPayload, "an order event payload is not the expected JSON")
        }
    }

    /// The key extractor of the order-events consumer.
    public static let keyExtractor: KeyExtractor = { record in try decode(record.payload).key() }
}

/// The payment-event handler: a coupon use and its restore, once each and in order per order.
/// Negative outcomes (a use of a coupon the member does not hold, a restore before its use)
/// are stored outcomes, not errors.
public struct PaymentHandler: Sendable {
    /// A handler.
    public init() {}

    static func useKey(_ order: String) -> String { "order:\(order):use" }
    static func restoredKey(_ order: String) -> String { "order:\(order):restored" }
    static func usedByKey(_ c: Int64, _ m: Int64) -> String { "coupon:\(c):member:\(m):usedBy" }

    /// The handler.
    public func handle(_ ctx: inout HandlerContext<EffectTransaction>) async throws -> Outcome {
        let e = try OrderEvent.decode(ctx.record.payload)
        let coupon = "\(e.couponId):\(e.memberId)"
        switch e.type {
        case .use:
            guard try await ctx.transaction.getInt(ClickIssuer.memberKey(e.couponId, e.memberId)) != nil else {
                return .rejected("coupon not held")
            }
            if try await ctx.transaction.get(Self.useKey(e.orderId)) != nil { return .rejected("order already used a coupon") }
            if try await ctx.transaction.get(Self.usedByKey(e.couponId, e.memberId)) != nil { return .rejected("coupon already used") }
            ctx.transaction.set(Self.useKey(e.orderId), Array(coupon.utf8))
            ctx.transaction.set(Self.usedByKey(e.couponId, e.memberId), Array(e.orderId.utf8))
            return .applied("used")
        case .restore:
            guard let used = try await ctx.transaction.get(Self.useKey(e.orderId)) else { return .rejected("restore before use") }
            guard String(decoding: used, as: UTF8.self) == coupon else { return .rejected("restore of another coupon than the one used") }
            if try await ctx.transaction.get(Self.restoredKey(e.orderId)) != nil { return .rejected("already restored") }
            ctx.transaction.set(Self.restoredKey(e.orderId), Array("1".utf8))
            ctx.transaction.remove(Self.usedByKey(e.couponId, e.memberId))
            return .applied("restored")
        }
    }
}
