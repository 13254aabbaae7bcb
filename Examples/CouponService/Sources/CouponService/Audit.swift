import CouponKit
import ExactlyOnce

extension CouponServiceCore {
    /// The clicks of a coupon in log order, read back from the transport (its partition, from
    /// offset 0). Only meaningful while the log is not trimmed.
    public func clicksInLogOrder(_ couponId: Int64) async throws -> [CouponRequest] {
        let partitions = try await backend.transport.partitionCount(of: ServiceTopics.clicks)
        let partition = try Self.clickPartitioning(options).resolve(key: CouponRequest.recordKey(couponId: couponId), partitionCount: partitions)
        var out: [CouponRequest] = []
        var offset = Offset(0)
        while true {
            let page = try await backend.transport.read(topic: ServiceTopics.clicks, partition: partition, from: offset, maxRecords: 5_000)
            guard let last = page.last else { break }
            for r in page {
                guard let (c, m) = try? CouponRequest.decode(r.payload), c == couponId else { continue }
                out.append(CouponRequest(requestId: r.offset.rawValue, couponId: c, memberId: m))
            }
            offset = last.offset.next
        }
        return out
    }

    /// The independent audit of the log design for one coupon: the clicks in log order against
    /// the ledger and the dedupe records read back from the store (CouponKit's `CouponAudit`:
    /// winners must be exactly the first `stock` distinct members by log position).
    public func audit(_ couponId: Int64) async throws -> CouponAudit? {
        guard let stock = try await backend.catalog.stock(of: couponId) else { return nil }
        let requests = try await clicksInLogOrder(couponId)
        let ledger = try await self.ledger(couponId)
        var keys: [IdempotencyKey] = []
        var seen = Set<IdempotencyKey>()
        for r in requests where seen.insert(r.key).inserted { keys.append(r.key) }
        var records: [IdempotencyKey: DedupeRecord] = [:]
        var i = 0
        while i < keys.count {
            let chunk = Array(keys[i..<min(keys.count, i + 1_000)])
            records.merge(try await backend.store.records(for: chunk)) { a, _ in a }
            i += 1_000
        }
        return CouponAudit.audit(requests: requests, ledger: ledger, stock: [couponId: stock], records: records)
    }
}
