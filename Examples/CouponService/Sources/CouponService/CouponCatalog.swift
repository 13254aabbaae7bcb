import Dispatch
import ExactlyOnce
import ExactlyOnceRedis
import Foundation
import Synchronization

/// Where created coupons and their stock are kept. A coupon's stock never changes once created,
/// so readers may cache it.
public protocol CouponCatalog: Sendable {
    /// Creates a coupon; false if it exists already.
    func create(couponId: Int64, stock: Int64) async throws -> Bool
    /// The stock of a coupon, nil if it does not exist.
    func stock(of couponId: Int64) async throws -> Int64?
    /// Every coupon and its stock.
    func all() async throws -> [Int64: Int64]
}

/// A catalog in this process's memory.
public final class MemoryCatalog: CouponCatalog {
    private let coupons = Mutex<[Int64: Int64]>([:])
    /// An empty catalog.
    public init() {}
    /// Creates a coupon; false if it exists already.
    public func create(couponId: Int64, stock: Int64) async throws -> Bool {
        coupons.withLock { c in
            guard c[couponId] == nil else { return false }
            c[couponId] = stock
            return true
        }
    }
    /// The stock of a coupon.
    public func stock(of couponId: Int64) async throws -> Int64? { coupons.withLock { $0[couponId] } }
    /// Every coupon.
    public func all() async throws -> [Int64: Int64] { coupons.withLock { $0 } }
}

/// A catalog kept as a JSON file (beside the file store), rewritten atomically on each creation.
public final class FileCatalog: CouponCatalog {
    private let path: String
    private let coupons: Mutex<[Int64: Int64]>
    private let writes = DispatchQueue(label: "coupon-service.catalog")

    /// Opens (or starts) the catalog at `path`.
    /// - Throws: ``ServiceError`` when the file exists but cannot be read as a catalog.
    public init(path: String) throws {
        self.path = path
        var initial: [Int64: Int64] = [:]
        if FileManager.default.fileExists(atPath: path) {
            guard let data = FileManager.default.contents(atPath: path),
                  let decoded = try? JSONDecoder().decode([String: Int64].self, from: data) else {
                throw ServiceError("the coupon catalog \(path) is not a JSON object of coupon id to stock")
            }
            for (k, v) in decoded {
                guard let id = Int64(k) else { throw ServiceError("the coupon catalog \(path) holds a non-numeric coupon id \(k)") }
                initial[id] = v
            }
        }
        coupons = Mutex(initial)
    }

    /// Creates a coupon and writes the catalog before answering.
    public func create(couponId: Int64, stock: Int64) async throws -> Bool {
        let snapshot: [String: Int64]? = coupons.withLock { c in
            guard c[couponId] == nil else { return nil }
            c[couponId] = stock
            return Dictionary(uniqueKeysWithValues: c.map { (String($0.key), $0.value) })
        }
        guard let snapshot else { return false }
        let path = self.path
        // File I/O blocks: do it on a queue of our own, not on the cooperative pool.
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
            writes.async {
                do {
                    let data = try JSONEncoder().encode(snapshot)
                    try data.write(to: URL(fileURLWithPath: path), options: .atomic)
                    c.resume()
                } catch {
                    c.resume(throwing: ExactlyOnceError(.storeUnavailable, "cannot write the coupon catalog \(path): \(error)"))
                }
            }
        }
        return true
    }

    /// The stock of a coupon.
    public func stock(of couponId: Int64) async throws -> Int64? { coupons.withLock { $0[couponId] } }
    /// Every coupon.
    public func all() async throws -> [Int64: Int64] { coupons.withLock { $0 } }
}

/// A catalog in a Redis hash (`HSETNX`), shared by every process of the service.
public final class RedisCatalog: CouponCatalog {
    private let redis: RedisCommandClient
    private let key: String
    private let cache = Mutex<[Int64: Int64]>([:])

    /// A catalog in the hash `key`.
    public init(redis: RedisCommandClient, key: String) {
        self.redis = redis
        self.key = key
    }

    /// Creates a coupon with `HSETNX`.
    public func create(couponId: Int64, stock: Int64) async throws -> Bool {
        let v = try await redis.send(["HSETNX", key, String(couponId), String(stock)])
        if let e = v.errorMessage { throw ExactlyOnceError(.storeUnavailable, "Redis refused HSETNX: \(e)") }
        if v.int == 1 { cache.withLock { $0[couponId] = stock } }
        return v.int == 1
    }

    /// The stock of a coupon (cached once read: stock never changes).
    public func stock(of couponId: Int64) async throws -> Int64? {
        if let s = cache.withLock({ $0[couponId] }) { return s }
        let v = try await redis.send(["HGET", key, String(couponId)])
        if let e = v.errorMessage { throw ExactlyOnceError(.storeUnavailable, "Redis refused HGET: \(e)") }
        guard let s = v.string.flatMap({ Int64($0) }) else { return nil }
        cache.withLock { $0[couponId] = s }
        return s
    }

    /// Every coupon.
    public func all() async throws -> [Int64: Int64] {
        let v = try await redis.send(["HGETALL", key])
        if let e = v.errorMessage { throw ExactlyOnceError(.storeUnavailable, "Redis refused HGETALL: \(e)") }
        var out: [Int64: Int64] = [:]
        let items = v.array ?? []
        var i = 0
        while i + 1 < items.count {
            if let k = items[i].string.flatMap({ Int64($0) }), let s = items[i + 1].string.flatMap({ Int64($0) }) { out[k] = s }
            i += 2
        }
        return out
    }
}
