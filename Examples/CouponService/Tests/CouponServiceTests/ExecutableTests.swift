import CouponKit
import CouponService
import Foundation
import Hummingbird
import HummingbirdTesting
import NIOCore
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The built `coupon-service` executable, started as a person starts it (one command), driven
/// over real HTTP, stopped with SIGTERM.
final class ServiceProcess: Sendable {
    let port: Int
    let process: Process
    let log: String
    let exited: AsyncStream<Int32>

    /// `coupon-service` beside the running test binary (`swift build --build-tests` builds both).
    static func executable() throws -> String {
        let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var dir = URL(fileURLWithPath: me).deletingLastPathComponent()
        // macOS: inside the .xctest bundle's Contents/MacOS.
        while dir.path.contains(".xctest") { dir = dir.deletingLastPathComponent() }
        let exe = dir.appendingPathComponent("coupon-service").path
        guard FileManager.default.isExecutableFile(atPath: exe) else {
            throw ServiceError("coupon-service is not built next to the tests (\(exe)): swift build --build-tests")
        }
        return exe
    }

    /// Starts `coupon-service --port P arguments...` and waits until `GET /health` answers.
    static func start(_ arguments: [String], environment: [String: String] = [:]) async throws -> ServiceProcess {
        let s = try ServiceProcess(arguments, environment: environment)
        do {
            try await s.waitUntilHealthy()
        } catch {
            await s.stop()
            throw error
        }
        return s
    }

    private init(_ arguments: [String], environment: [String: String]) throws {
        port = try freePort()
        log = FileManager.default.temporaryDirectory.appendingPathComponent("coupon-service-\(UUID().uuidString.prefix(8)).log").path
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process = Process()
        process.executableURL = URL(fileURLWithPath: try Self.executable())
        process.arguments = ["--port", "\(port)"] + arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        process.standardOutput = handle
        process.standardError = handle
        let (stream, sink) = AsyncStream.makeStream(of: Int32.self)
        exited = stream
        process.terminationHandler = { p in
            sink.yield(p.terminationStatus)
            sink.finish()
            try? handle.close()
        }
        try process.run()
    }

    /// What the process wrote so far.
    var output: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }

    private func waitUntilHealthy() async throws {
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(60)
        while clock.now < deadline {
            guard process.isRunning else { throw ServiceError("coupon-service exited at start:\n\(output.suffix(3000))") }
            if let r = try? await TestClient.withClient(host: "127.0.0.1", port: port, configuration: .init(timeout: .seconds(2)), operation: { c in
                try await c.get("/health")
            }), r.status == .ok { return }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw ServiceError("coupon-service did not answer /health within 60 s:\n\(output.suffix(3000))")
    }

    /// Runs `body` with an HTTP client connected to the service.
    func http<R: Sendable>(_ body: @escaping @Sendable (TestClient) async throws -> R) async throws -> R {
        try await TestClient.withClient(host: "127.0.0.1", port: port, configuration: .init(timeout: .seconds(60)), operation: body)
    }

    /// SIGTERM, then waits for the exit (SIGKILL after 30 s); returns the exit status.
    @discardableResult
    func stop() async -> Int32 {
        if process.isRunning { kill(process.processIdentifier, SIGTERM) }
        let pid = process.processIdentifier
        let killer = Task {
            try await Task.sleep(for: .seconds(30))
            kill(pid, SIGKILL)
        }
        defer { killer.cancel() }
        var iterator = exited.makeAsyncIterator()
        let status = await iterator.next() ?? -1
        try? FileManager.default.removeItem(atPath: log)
        return status
    }
}

extension TestClient {
    /// Sends a JSON body and returns status and body text.
    func call(_ method: HTTPRequest.Method, _ uri: String, _ body: String? = nil) async throws -> (HTTPResponse.Status, String) {
        let r = try await execute(.init(uri, method: method, headers: body == nil ? [:] : [.contentType: "application/json"],
                                        body: body.map { ByteBuffer(string: $0) }))
        return (r.status, r.body.map { String(buffer: $0) } ?? "")
    }
}

/// The value of the Prometheus sample whose line starts with `name{` and holds every label of `labels`.
func sample(_ metrics: String, _ name: String, _ labels: [String]) -> Double? {
    for line in metrics.split(separator: "\n") where line.hasPrefix(name + "{") && labels.allSatisfy({ line.contains($0) }) {
        return line.split(separator: " ").last.flatMap { Double($0) }
    }
    return nil
}

@Suite(.timeLimit(.minutes(5))) struct ExecutableTests {
    /// `GET /metrics` of the running executable: the library's consumer counters match the sale
    /// (each distinct click processed once, each repeat answered as a duplicate), and the HTTP
    /// latency histogram has series for the routes the sale used.
    @Test func metricsCountTheSale() async throws {
        let service = try await ServiceProcess.start([])
        let clicks = clickSequence(count: 120, members: 50, seed: 5)
        let distinct = Set(clicks).count
        let repeats = clicks.count - distinct
        try await service.http { client in
            #expect(try await client.call(.post, "/coupons", #"{"couponId": 3, "stock": 20}"#).0 == .created)
            for m in clicks { #expect(try await client.call(.post, "/coupons/3/requests", #"{"memberId": \#(m)}"#).0 == .accepted) }
            var issued = 0
            var soldOut = 0
            for m in Set(clicks) {
                let status = object(try await client.call(.get, "/requests/3:\(m)?waitMs=10000").1)["status"] as? String
                if status == "issued" { issued += 1 } else if status == "soldOut" { soldOut += 1 }
            }
            #expect(issued == 20)
            #expect(soldOut == distinct - 20)
            #expect(try await client.call(.get, "/coupons/3").0 == .ok)

            // Every outcome is final; the consumer counts a record once its batch committed,
            // and the last repeats may still be in flight: poll until the counts add up.
            let clicksTopic = #"topic="coupon-requests""#
            let clock = ContinuousClock()
            let deadline = clock.now + .seconds(10)
            var metrics = ""
            repeat {
                let r = try await client.call(.get, "/metrics")
                #expect(r.0 == .ok)
                metrics = r.1
                let seen = (sample(metrics, "exactly_once_processed_total", [clicksTopic]) ?? 0) + (sample(metrics, "exactly_once_duplicates_total", [clicksTopic]) ?? 0)
                if seen >= Double(clicks.count) { break }
                try await Task.sleep(for: .milliseconds(50))
            } while clock.now < deadline
            #expect(sample(metrics, "exactly_once_processed_total", [clicksTopic, #"group="coupon-service""#]) == Double(distinct),
                    "one processed record per distinct click (\(distinct))")
            #expect(sample(metrics, "exactly_once_duplicates_total", [clicksTopic]) == Double(repeats), "one duplicate per repeated click (\(repeats))")
            #expect(sample(metrics, "exactly_once_dead_lettered_total", [clicksTopic]) == 0)
            #expect(sample(metrics, "exactly_once_conflicts_total", [clicksTopic]) == 0)
            #expect(sample(metrics, "exactly_once_processed_total", [#"topic="order-events""#]) == 0)

            // The latency histogram of each route the sale used, with one observation per request.
            let routes: [(String, String, String, Int)] = [
                ("/coupons", "POST", "201", 1),
                ("/coupons/{couponId}/requests", "POST", "202", clicks.count),
                ("/requests/{requestId}", "GET", "200", distinct),
                ("/coupons/{couponId}", "GET", "200", 1),
            ]
            for (route, method, status, count) in routes {
                let labels = [#"http_route="\#(route)""#, #"http_request_method="\#(method)""#, #"http_response_status_code="\#(status)""#]
                #expect(sample(metrics, "http_server_request_duration_count", labels) == Double(count), "\(method) \(route) \(status): \(count) requests")
                #expect(sample(metrics, "http_server_request_duration_bucket", labels + [#"le="+Inf""#]) == Double(count))
                #expect((sample(metrics, "http_server_request_duration_sum", labels) ?? -1) > 0, "\(route): a duration sum")
            }
            #expect(metrics.contains("# TYPE http_server_request_duration histogram"))
        }
        #expect(await service.stop() == 0, "SIGTERM shuts the service down gracefully")
    }

    #if Postgres
    /// One command starts the service on Kafka (the in-process mock cluster) + PostgreSQL +
    /// Redis: the PostgreSQL URL from the environment, a short sale through real HTTP.
    @Test func startsWithOneCommandOnKafkaPostgresAndRedis() async throws {
        let (server, db, url) = try await ThrowawayPostgres.database()
        try await ThrowawayRedis.with { redis in
            let service = try await ServiceProcess.start(["--transport", "kafka", "--store", "postgres", "--redis-url", redis.url],
                                                         environment: ["COUPON_SERVICE_POSTGRES_URL": url])
            let started = service.output
            #expect(started.contains("transport kafka on an in-process mock cluster, store postgres"), "\(started.suffix(2000))")
            #expect(started.contains("Redis 127.0.0.1:\(redis.port) db 0"), "\(started.suffix(2000))")
            try await service.http { client in
                #expect(try await client.call(.post, "/coupons", #"{"couponId": 4, "stock": 3}"#).0 == .created)
                for m in [11, 12, 11, 13, 14] { #expect(try await client.call(.post, "/coupons/4/requests", #"{"memberId": \#(m)}"#).0 == .accepted) }
                var statuses: [String] = []
                for m in [11, 12, 13, 14] {
                    statuses.append(object(try await client.call(.get, "/requests/4:\(m)?waitMs=20000").1)["status"] as? String ?? "?")
                }
                #expect(statuses == ["issued", "issued", "issued", "soldOut"])
                let lines = try await client.call(.get, "/coupons/4/issued").1.split(separator: "\n").map { object(String($0)) }
                #expect(lines.map { $0["memberId"] as? Int } == [11, 12, 13])
            }
            #expect(try await server.psql("SELECT string_agg(member_id::text, ',' ORDER BY serial) FROM coupon_service.issued_coupons WHERE coupon_id = 4", database: db) == "11,12,13")
            #expect(await service.stop() == 0, "SIGTERM shuts the service down gracefully")
        }
    }
    #endif
}
