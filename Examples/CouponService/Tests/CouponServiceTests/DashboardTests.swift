import CouponService
import ExactlyOnce
import Foundation
import Hummingbird
import NIOCore
import Testing

/// Runs a program off the cooperative pool and returns its exit status and standard output.
func runProgram(_ path: String, _ arguments: [String]) async throws -> (Int32, String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    let out = FileManager.default.temporaryDirectory.appendingPathComponent("coupon-service-out-\(UUID().uuidString.prefix(8))")
    _ = FileManager.default.createFile(atPath: out.path, contents: nil)
    let handle = try FileHandle(forWritingTo: out)
    process.standardOutput = handle
    process.standardError = FileHandle.nullDevice
    let status: Int32 = try await withCheckedThrowingContinuation { c in
        process.terminationHandler = { p in c.resume(returning: p.terminationStatus) }
        do { try process.run() } catch { c.resume(throwing: error) }
    }
    try? handle.close()
    let text = (try? String(contentsOf: out, encoding: .utf8)) ?? ""
    try? FileManager.default.removeItem(at: out)
    return (status, text)
}

/// The numbers of an element of the rendered DOM: `<tag data-NAME="VALUE" ...>TEXT<`.
func cell(_ dom: String, row: String, field: String) -> String? {
    guard let r = dom.range(of: row) else { return nil }
    let rest = dom[r.upperBound...]
    guard let f = rest.range(of: "data-field=\"\(field)\">") else { return nil }
    let after = rest[f.upperBound...]
    return after.prefix(while: { $0 != "<" }).trimmingCharacters(in: .whitespaces)
}

func text(_ dom: String, id: String) -> String? {
    guard let r = dom.range(of: "id=\"\(id)\"") else { return nil }
    let rest = dom[r.upperBound...]
    guard let gt = rest.firstIndex(of: ">") else { return nil }
    return String(rest[rest.index(after: gt)...].prefix(while: { $0 != "<" }))
}

@Suite struct DashboardTests {
    static let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/local/bin/chromium"].first { FileManager.default.isExecutableFile(atPath: $0) }

    @Test(.enabled(if: chromium != nil, "chromium is not installed (apt-get install -y chromium; make test installs it): the dashboard's browser test is skipped"))
    func dashboardShowsTheSaleInHeadlessChromium() async throws {
        let chromium = try #require(Self.chromium)
        let core = try makeCore()
        let (ports, portSink) = AsyncStream.makeStream(of: Int.self)
        let app = Application(router: CouponRoutes.router(core, registry: nil),
                              configuration: .init(address: .hostname("127.0.0.1", port: 0)),
                              services: try core.services(),
                              onServerRunning: { channel in
                                  portSink.yield(channel.localAddress?.port ?? 0)
                                  portSink.finish()
                              }, logger: quiet)
        try await running([app]) {
            var iterator = ports.makeAsyncIterator()
            let port = try #require(await iterator.next())
            // A small sale: two coupons, repeats, one sold out; and one poison record.
            #expect(try await core.createCoupon(1, stock: 25))
            #expect(try await core.createCoupon(2, stock: 100))
            for m in clickSequence(count: 120, members: 60, seed: 3) { _ = try await core.click(couponId: 1, memberId: m) }
            for m in 1...40 { _ = try await core.click(couponId: 2, memberId: Int64(m)) }
            _ = try await core.backend.transport.publish(OutgoingRecord(key: Array("2".utf8), payload: Array("not a click".utf8)),
                                                         to: ServiceTopics.clicks, partitioning: .modulo)
            let clock = ContinuousClock()
            let deadline = clock.now + .seconds(30)
            while !core.backend.transport.isFullyCommitted(group: ServiceTopics.group, topic: ServiceTopics.clicks) && clock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            let url = "http://127.0.0.1:\(port)/dashboard?request=1:\(clickSequence(count: 1, members: 60, seed: 3)[0])"
            let (status, dom) = try await runProgram(chromium, [
                "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom", url,
            ])
            #expect(status == 0)
            #expect(dom.contains("data-loaded=\"true\""), "the page's script ran and loaded /dashboard/state")

            // The numbers the page shows, against the API's.
            for c: Int64 in [1, 2] {
                let api = try #require(try await core.counts(c))
                #expect(cell(dom, row: "data-coupon=\"\(c)\"", field: "stock") == String(api.stock))
                #expect(cell(dom, row: "data-coupon=\"\(c)\"", field: "issued") == String(api.issued))
                #expect(cell(dom, row: "data-coupon=\"\(c)\"", field: "remaining") == String(api.remaining))
            }
            #expect(try await core.counts(1)?.issued == 25)
            #expect(try await core.counts(2)?.issued == 40)
            for s in try await core.backend.transport.partitionStatus(group: ServiceTopics.group, topic: ServiceTopics.clicks) {
                let row = "data-topic=\"\(ServiceTopics.clicks)\" data-partition=\"\(s.partition.rawValue)\""
                #expect(cell(dom, row: row, field: "end") == String(s.end.rawValue))
                #expect(cell(dom, row: row, field: "lag") == "0")
            }
            #expect(text(dom, id: "dead") == "1", "the poison record is the one dead letter")
            #expect(dom.contains("not a click"))
            #expect(text(dom, id: "outcome")?.contains("issued, serial 1") == true, "the looked-up request's outcome")

            // The screenshot, a CI artifact.
            let shot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
                .appendingPathComponent(".build/dashboard.png")
            try? FileManager.default.removeItem(at: shot)
            let (shotStatus, _) = try await runProgram(chromium, [
                "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000",
                "--window-size=1200,1100", "--screenshot=\(shot.path)", url,
            ])
            #expect(shotStatus == 0)
            #expect(FileManager.default.fileExists(atPath: shot.path), "screenshot at \(shot.path)")
        }
    }
}
