import CouponService
import ExactlyOnce
import Foundation
import Hummingbird
import NIOCore
import Synchronization
import Testing

/// Runs a program off the cooperative pool and returns its exit status and standard output;
/// a program still running after `timeout` is terminated.
func runProgram(_ path: String, _ arguments: [String], timeout: Duration = .seconds(90)) async throws -> (Int32, String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    let out = FileManager.default.temporaryDirectory.appendingPathComponent("coupon-service-out-\(UUID().uuidString.prefix(8))")
    _ = FileManager.default.createFile(atPath: out.path, contents: nil)
    let handle = try FileHandle(forWritingTo: out)
    process.standardOutput = handle
    process.standardError = FileHandle.nullDevice
    let watchdog = Task {
        try await Task.sleep(for: timeout)
        if process.isRunning { process.terminate() }
    }
    defer { watchdog.cancel() }
    let status: Int32 = try await withCheckedThrowingContinuation { c in
        process.terminationHandler = { p in c.resume(returning: p.terminationStatus) }
        do { try process.run() } catch { c.resume(throwing: error) }
    }
    try? handle.close()
    let text = (try? String(contentsOf: out, encoding: .utf8)) ?? ""
    try? FileManager.default.removeItem(at: out)
    return (status, text)
}

/// The text of a cell of the rendered DOM: after `row`, the first `data-field="FIELD">TEXT<`.
func cell(_ dom: String, row: String, field: String) -> String? {
    guard let r = dom.range(of: row) else { return nil }
    let rest = dom[r.upperBound...]
    guard let f = rest.range(of: "data-field=\"\(field)\">") else { return nil }
    let after = rest[f.upperBound...]
    return unescaped(after.prefix(while: { $0 != "<" }).trimmingCharacters(in: .whitespaces))
}

/// The text of the element with `id`.
func text(_ dom: String, id: String) -> String? {
    guard let r = dom.range(of: "id=\"\(id)\"") else { return nil }
    let rest = dom[r.upperBound...]
    guard let gt = rest.firstIndex(of: ">") else { return nil }
    return unescaped(String(rest[rest.index(after: gt)...].prefix(while: { $0 != "<" })))
}

/// The value of attribute `name` of the element with `id`.
func attribute(_ dom: String, id: String, _ name: String) -> String? {
    guard let r = dom.range(of: "id=\"\(id)\"") else { return nil }
    let tag = dom[r.upperBound...].prefix(while: { $0 != ">" })
    guard let a = tag.range(of: " \(name)=\"") else { return nil }
    return String(tag[a.upperBound...].prefix(while: { $0 != "\"" }))
}

func unescaped(_ s: String) -> String {
    s.replacingOccurrences(of: "&lt;", with: "<").replacingOccurrences(of: "&gt;", with: ">")
        .replacingOccurrences(of: "&quot;", with: "\"").replacingOccurrences(of: "&amp;", with: "&")
}

/// The dashboard in a real browser. `make test` installs chromium, so a missing chromium fails
/// the test; `COUPON_SERVICE_SKIP_BROWSER=1` skips it explicitly.
@Suite(.timeLimit(.minutes(5))) struct DashboardTests {
    static let skipBrowser = ProcessInfo.processInfo.environment["COUPON_SERVICE_SKIP_BROWSER"] == "1"

    /// chromium on PATH (chromium, chromium-browser, google-chrome), then the usual places.
    static func chromium() -> String? {
        for name in ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"] {
            if let p = which(name) { return p }
        }
        return ["/snap/bin/chromium", "/Applications/Chromium.app/Contents/MacOS/Chromium",
                "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"].first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Where the screenshots go: the repository's `.build/artifacts/` (CI keeps `.build/`).
    static let artifacts = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent(".build/artifacts")

    @Test(.enabled(if: !skipBrowser, "COUPON_SERVICE_SKIP_BROWSER=1: the dashboard's browser test is skipped on request"))
    func dashboardFollowsALiveSaleInHeadlessChromium() async throws {
        guard let chromium = Self.chromium() else {
            Issue.record("""
                chromium was not found (on PATH as chromium, chromium-browser or google-chrome, nor in /snap/bin): \
                install it (apt-get install -y chromium; make test does), or set COUPON_SERVICE_SKIP_BROWSER=1 to skip this test on purpose
                """)
            return
        }
        let core = try makeCore()
        let (ports, portSink) = AsyncStream.makeStream(of: Int.self)
        let app = Application(router: CouponRoutes.router(core, registry: nil),
                              configuration: .init(address: .hostname("127.0.0.1", port: 0)),
                              services: try core.services(),
                              onServerRunning: { channel in
                                  portSink.yield(channel.localAddress?.port ?? 0)
                                  portSink.finish()
                              }, logger: quiet)
        try FileManager.default.createDirectory(at: Self.artifacts, withIntermediateDirectories: true)
        try await running([app]) {
            var iterator = ports.makeAsyncIterator()
            let port = try #require(await iterator.next())
            let page = "http://127.0.0.1:\(port)/dashboard"
            func load(_ url: String) async throws -> String {
                let (status, dom) = try await runProgram(chromium, [
                    "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000", "--dump-dom", url,
                ])
                #expect(status == 0, "chromium --dump-dom exited with \(status)")
                #expect(dom.contains("data-loaded=\"true\""), "the page's script ran and loaded /dashboard/state")
                return dom
            }
            func screenshot(_ name: String, _ url: String) async throws {
                let shot = Self.artifacts.appendingPathComponent(name)
                try? FileManager.default.removeItem(at: shot)
                let (status, _) = try await runProgram(chromium, [
                    "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=3000",
                    "--window-size=1200,1150", "--screenshot=\(shot.path)", url,
                ])
                #expect(status == 0, "chromium --screenshot exited with \(status)")
                #expect(FileManager.default.fileExists(atPath: shot.path), "screenshot at \(shot.path)")
                print("dashboard screenshot: \(shot.path)")
            }

            // The sale: coupon 1 (stock 300) clicked by up to 1,000 members with repeats, coupon 2
            // (stock 100) by 40; a poison record first. The clicks are paced (about 30/s) until
            // the browser has looked at the page mid-sale, then the rest goes at once.
            #expect(try await core.createCoupon(1, stock: 300))
            #expect(try await core.createCoupon(2, stock: 100))
            _ = try await core.backend.transport.publish(OutgoingRecord(key: Array("2".utf8), payload: Array("not a click".utf8)),
                                                         to: ServiceTopics.clicks, partitioning: .modulo)
            let clicks = clickSequence(count: 1_500, members: 1_000, seed: 3)
            let sent = Atomic<Int>(0)
            let paced = Atomic<Bool>(true)
            let sender = Task {
                for (i, m) in clicks.enumerated() {
                    _ = try await core.click(couponId: 1, memberId: m)
                    if i % 3 == 0 && i / 3 < 40 { _ = try await core.click(couponId: 2, memberId: Int64(i / 3 + 1)) }
                    sent.add(1, ordering: .relaxed)
                    if paced.load(ordering: .relaxed) { try await Task.sleep(for: .milliseconds(33)) }
                }
            }
            let clock = ContinuousClock()
            let start = clock.now
            // Two full seconds of clicks, so the rate has something to show.
            while (clock.now - start < .seconds(2.5) || sent.load(ordering: .relaxed) < 40) && clock.now - start < .seconds(30) {
                try await Task.sleep(for: .milliseconds(50))
            }

            // Mid-sale: the page's numbers lie between the API's just before and just after.
            let before = try #require(try await core.counts(1))
            let endsBefore = try await core.backend.transport.partitionStatus(group: ServiceTopics.group, topic: ServiceTopics.clicks)
            let live = try await load(page)
            let after = try #require(try await core.counts(1))
            let endsAfter = try await core.backend.transport.partitionStatus(group: ServiceTopics.group, topic: ServiceTopics.clicks)
            let sentAfter = sent.load(ordering: .relaxed)
            #expect(after.issued < after.stock, "the sale was still running after the mid-sale load (issued \(after.issued) of \(after.stock))")
            #expect(sentAfter < clicks.count, "clicks were still flowing")
            let shown = try #require(cell(live, row: "data-coupon=\"1\"", field: "issued").flatMap { Int64($0) }, "coupon 1's issued cell")
            #expect(shown > 0 && shown <= 300)
            #expect(before.issued <= shown && shown <= after.issued, "page shows \(shown) issued; the API said \(before.issued) before and \(after.issued) after")
            #expect(cell(live, row: "data-coupon=\"1\"", field: "stock") == "300")
            #expect(cell(live, row: "data-coupon=\"1\"", field: "remaining") == String(300 - shown))
            for s in endsAfter {
                let row = "data-topic=\"\(ServiceTopics.clicks)\" data-partition=\"\(s.partition.rawValue)\""
                let end = try #require(cell(live, row: row, field: "end").flatMap { Int64($0) })
                let low = endsBefore.first { $0.partition == s.partition }?.end.rawValue ?? 0
                #expect(low <= end && end <= s.end.rawValue, "partition \(s.partition.rawValue): page end \(end), API \(low)...\(s.end.rawValue)")
            }
            let rps = try #require(attribute(live, id: "rps", "data-rps").flatMap { Double($0) }, "requests/s on the page")
            #expect(rps > 0, "requests/s while clicks flow")
            #expect(rps <= Double(sentAfter + 40), "requests/s \(rps) is at most the clicks sent so far (\(sentAfter) on coupon 1, at most 40 on coupon 2)")
            #expect(text(live, id: "dead") == "1", "the poison record is the one dead letter")
            try await screenshot("dashboard-live.png", page)

            // The rest of the clicks at once; then the final numbers.
            paced.store(false, ordering: .relaxed)
            try await sender.value
            let deadline = clock.now + .seconds(60)
            while !core.backend.transport.isFullyCommitted(group: ServiceTopics.group, topic: ServiceTopics.clicks) && clock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            #expect(core.backend.transport.isFullyCommitted(group: ServiceTopics.group, topic: ServiceTopics.clicks))
            let url = "\(page)?request=1:\(clicks[0])"
            let final = try await load(url)
            for c: Int64 in [1, 2] {
                let api = try #require(try await core.counts(c))
                #expect(cell(final, row: "data-coupon=\"\(c)\"", field: "stock") == String(api.stock))
                #expect(cell(final, row: "data-coupon=\"\(c)\"", field: "issued") == String(api.issued))
                #expect(cell(final, row: "data-coupon=\"\(c)\"", field: "remaining") == String(api.remaining))
            }
            #expect(try await core.counts(1)?.issued == 300, "coupon 1 sold out")
            #expect(try await core.counts(2)?.issued == 40)
            for s in try await core.backend.transport.partitionStatus(group: ServiceTopics.group, topic: ServiceTopics.clicks) {
                let row = "data-topic=\"\(ServiceTopics.clicks)\" data-partition=\"\(s.partition.rawValue)\""
                #expect(cell(final, row: row, field: "end") == String(s.end.rawValue))
                #expect(cell(final, row: row, field: "lag") == "0")
            }
            #expect(text(final, id: "dead") == "1")
            #expect(final.contains("not a click"))
            // The dead letter's reason, as the consumer wrote it in its header.
            let dlq = try await core.backend.transport.read(topic: ServiceTopics.deadLetters(ServiceTopics.clicks), partition: PartitionID(0),
                                                            from: Offset(0), maxRecords: 10)
            let reason = try #require(dlq.first?.headers[DeadLetterHeaders.reason])
            #expect(reason == "malformed record: no valid idempotency key")
            #expect(cell(final, row: "id=\"deadletters\"", field: "reason") == reason)
            #expect(text(final, id: "outcome")?.contains("issued, serial 1") == true, "the looked-up request's outcome")

            // The screenshot, a CI artifact.
            try await screenshot("dashboard.png", url)
        }
    }
}
