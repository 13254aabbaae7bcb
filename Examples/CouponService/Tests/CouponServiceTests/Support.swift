import CouponKit
import CouponService
import ExactlyOnce
import ExactlyOnceRedis
import Foundation
import Hummingbird
import HummingbirdTesting
import Logging
import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

typealias MemoryBackend = OpenedBackend<InMemoryTransport, InMemoryDedupeStore, KeyValueCouponEffects<InMemoryDedupeStore>>
typealias MemoryCore = CouponServiceCore<MemoryBackend>

let quiet = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

/// A service on the embedded default (in-memory transport and store), optionally with Redis.
func makeCore(role: Role = .all, redis: RedisCommandClient? = nil, partitions: Int = 4,
              configure: (inout ServiceOptions) -> Void = { _ in }) throws -> MemoryCore {
    var options = ServiceOptions()
    options.role = role
    options.partitions = partitions
    options.keyPrefix = "t\(UInt32.random(in: 0...UInt32.max)):"
    configure(&options)
    var topics: [String: Int] = [:]
    for t in [ServiceTopics.clicks, ServiceTopics.orderEvents] {
        topics[t] = partitions
        topics[ServiceTopics.deadLetters(t)] = 1
    }
    let backend = OpenedBackend(transport: try InMemoryTransport(topics: topics), store: try InMemoryDedupeStore(),
                                catalog: MemoryCatalog(), redis: redis, summary: "test")
    return try CouponServiceCore(backend: backend, options: options, logger: quiet)
}

/// What the sale checks read from a running service, whatever its backends.
protocol SaleCore: Sendable {
    func clicksInLogOrder(_ couponId: Int64) async throws -> [CouponRequest]
    func audit(_ couponId: Int64) async throws -> CouponAudit?
}

extension CouponServiceCore: SaleCore {}

/// Runs a service on `backend` (opened by `Backends.open`) around `body`, with the router test client.
func serve(_ backend: any CouponBackend, _ options: ServiceOptions,
           _ body: @escaping @Sendable (any SaleCore, any TestClientProtocol) async throws -> Void) async throws {
    try await serveOpened(backend, options, body)
}

private func serveOpened<B: CouponBackend>(_ backend: B, _ options: ServiceOptions,
                                           _ body: @escaping @Sendable (any SaleCore, any TestClientProtocol) async throws -> Void) async throws {
    let core = try CouponServiceCore(backend: backend, options: options, logger: quiet)
    try await running(try core.services()) {
        try await app(core).test(.router) { client in try await body(core, client) }
    }
}

/// Runs `services` in a ServiceGroup around `body`, then shuts them down gracefully.
func running<R: Sendable>(_ services: [any Service], _ body: @Sendable () async throws -> R) async throws -> R {
    let group = ServiceGroup(configuration: .init(services: services, gracefulShutdownSignals: [], logger: quiet))
    return try await withThrowingTaskGroup(of: Void.self) { tasks in
        tasks.addTask { try await group.run() }
        do {
            let r = try await body()
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
            return r
        } catch {
            tasks.cancelAll()
            throw error
        }
    }
}

/// The router app of `core` (HummingbirdTesting's `.router` client answers concurrent requests).
func app<B: CouponBackend>(_ core: CouponServiceCore<B>) -> some ApplicationProtocol {
    Application(router: CouponRoutes.router(core, registry: nil))
}

extension TestClientProtocol {
    /// Sends a JSON body and returns status and body text.
    func call(_ method: HTTPRequest.Method, _ uri: String, _ body: String? = nil) async throws -> (HTTPResponse.Status, String) {
        try await execute(uri: uri, method: method, headers: body == nil ? [:] : [.contentType: "application/json"],
                          body: body.map { ByteBuffer(string: $0) }) { r in
            (r.status, String(buffer: r.body))
        }
    }
}

/// Decodes a JSON object.
func object(_ text: String) -> [String: Any] {
    (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? [:]
}

/// A throwaway redis-server on a free TCP port (the pattern of the root package's
/// Tests/TestSupport/RedisTestServer.swift). Fails, not skips, when redis-server is missing:
/// `make test` installs it.
final class ThrowawayRedis: @unchecked Sendable {
    let port: Int
    let directory: URL
    let process: Process

    var url: String { "redis://127.0.0.1:\(port)" }

    struct Missing: Error, CustomStringConvertible {
        var description: String { "redis-server is not installed: apt-get install -y redis-server (make test installs it)" }
    }

    static func with<R>(_ body: (ThrowawayRedis) async throws -> R) async throws -> R {
        let server = try ThrowawayRedis()
        do {
            try await server.waitUntilReady()
            let r = try await body(server)
            server.stop()
            return r
        } catch {
            server.stop()
            throw error
        }
    }

    private init() throws {
        guard let exe = ["/usr/bin/redis-server", "/usr/local/bin/redis-server", "/opt/homebrew/bin/redis-server"]
            .first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else { throw Missing() }
        port = try freePort()
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("coupon-service-redis-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        process = Process()
        process.executableURL = URL(fileURLWithPath: exe)
        process.arguments = ["--port", "\(port)", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", directory.path, "--logfile", directory.appendingPathComponent("redis.log").path]
        try process.run()
    }

    func client(poolSize: Int = 4) throws -> RedisCommandClient {
        var c = try RedisConfiguration(url: url)
        c.poolSize = poolSize
        return try RedisCommandClient(configuration: c)
    }

    private func waitUntilReady() async throws {
        var c = try RedisConfiguration(url: url)
        c.connectAttempts = 1
        let probe = try RedisCommandClient(configuration: c)
        for _ in 0..<200 {
            if let v = try? await probe.send(["PING"]), v.string == "PONG" { return }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw ServiceError("redis-server on port \(port) did not answer PING within 10 s")
    }

    func stop() {
        if process.isRunning {
            // SIGKILL, as a crash: nothing to save.
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(at: directory)
    }
}

/// A free TCP port on 127.0.0.1 (bound to port 0, then released).
func freePort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
    }
    guard ok else { throw ServiceError("no free port") }
    return Int(UInt16(bigEndian: addr.sin_port))
}
