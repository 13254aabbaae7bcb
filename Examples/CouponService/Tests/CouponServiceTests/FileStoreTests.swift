import CouponService
import ExactlyOnce
import Foundation
import Hummingbird
import HummingbirdTesting
import Testing

/// `--store file`: outcomes, the ledger and the catalog survive a restart of the service.
@Suite struct FileStoreTests {
    @Test func outcomesAndCatalogSurviveARestart() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("coupon-service-file-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var options = ServiceOptions()
        options.store = .file
        options.dataDir = dir
        try await serveOnce(try await Backends.open(options), options) { (client: any TestClientProtocol) async throws in
            #expect(try await client.call(.post, "/coupons", #"{"couponId": 9, "stock": 1}"#).0 == .created)
            #expect(try await client.call(.post, "/coupons/9/requests", #"{"memberId": 1}"#).0 == .accepted)
            #expect(try await client.call(.post, "/coupons/9/requests", #"{"memberId": 2}"#).0 == .accepted)
            #expect(object(try await client.call(.get, "/requests/9:2?waitMs=5000").1)["status"] as? String == "soldOut")
        }
        // The same data directory again: a new process in effect (the in-memory log starts empty).
        try await serveOnce(try await Backends.open(options), options) { (client: any TestClientProtocol) async throws in
            #expect(try await client.call(.post, "/coupons", #"{"couponId": 9, "stock": 5}"#).0 == .conflict)
            let r = object(try await client.call(.get, "/requests/9:1").1)
            #expect(r["status"] as? String == "issued")
            #expect(r["serial"] as? Int == 1)
            // A repeat click after the restart answers the stored outcome: no second serial.
            #expect(try await client.call(.post, "/coupons/9/requests", #"{"memberId": 1}"#).0 == .accepted)
            #expect(try await client.call(.post, "/coupons/9/requests", #"{"memberId": 3}"#).0 == .accepted)
            #expect(object(try await client.call(.get, "/requests/9:3?waitMs=5000").1)["status"] as? String == "soldOut")
            #expect(try await client.call(.get, "/coupons/9/issued").1.split(separator: "\n").count == 1)
        }
    }

    func serveOnce(_ backend: any CouponBackend, _ options: ServiceOptions,
                   _ body: @escaping @Sendable (any TestClientProtocol) async throws -> Void) async throws {
        try await open(backend, options, body)
    }

    func open<B: CouponBackend>(_ backend: B, _ options: ServiceOptions,
                                _ body: @escaping @Sendable (any TestClientProtocol) async throws -> Void) async throws {
        let core = try CouponServiceCore(backend: backend, options: options, logger: quiet)
        try await running(try core.services()) {
            try await app(core).test(.router) { client in try await body(client) }
        }
    }
}
