import ExactlyOnce
import ExactlyOnceRedis
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A throwaway `redis-server` in a temporary directory, listening on a unix socket (and on a
/// free TCP port when asked). Tests fail, not skip, when `redis-server` is missing: `make test`
/// installs it.
public final class RedisTestServer: @unchecked Sendable {
    // @unchecked: `process` is only replaced by start()/stop(), which tests call sequentially.
    /// The server's directory.
    public let directory: URL
    /// Its unix socket.
    public let socketPath: String
    /// Its TCP port, when started with `tcp: true`.
    public let tcpPort: Int?
    private let extraArguments: [String]
    private let username: String?
    private let password: String?
    private var process: ChildProcess?

    struct Missing: Error, CustomStringConvertible {
        var description: String {
            "redis-server is not installed (looked in PATH, /usr/bin, /usr/local/bin, /opt/homebrew/bin). "
                + "Install it: apt-get install -y redis-server libhiredis-dev (or brew install redis hiredis)."
        }
    }

    struct NotReady: Error, CustomStringConvertible {
        var log: String
        var description: String { "redis-server did not answer PING within 10 s. Log:\n\(log)" }
    }

    private init(tcp: Bool, extraArguments: [String], username: String?, password: String?) throws {
        self.username = username
        self.password = password
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("eo-redis-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        socketPath = directory.appendingPathComponent("redis.sock").path
        tcpPort = tcp ? try LocalSockets.freePort() : nil
        self.extraArguments = extraArguments
    }

    /// Runs `body` against a fresh server and always stops it afterwards.
    /// `username`/`password` are the credentials ``unixConfiguration`` carries (for servers
    /// started with `--requirepass` or `--user` in `arguments`).
    public static func with<R>(tcp: Bool = false, arguments: [String] = [], username: String? = nil, password: String? = nil,
                               _ body: (RedisTestServer) async throws -> R) async throws -> R {
        let server = try RedisTestServer(tcp: tcp, extraArguments: arguments, username: username, password: password)
        do {
            try await server.start()
            let result = try await body(server)
            await server.stop()
            try? FileManager.default.removeItem(at: server.directory)
            return result
        } catch {
            await server.stop()
            try? FileManager.default.removeItem(at: server.directory)
            throw error
        }
    }

    /// The `redis-server` executable.
    public static func executable() throws -> URL {
        guard let url = ChildProcess.which("redis-server") else { throw Missing() }
        return url
    }

    /// Starts (or restarts) the server on the same socket, port and directory.
    public func start() async throws {
        let p = try ChildProcess(try Self.executable(), [
            "--port", "\(tcpPort ?? 0)", "--bind", "127.0.0.1",
            "--unixsocket", socketPath, "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", directory.path,
            "--logfile", directory.appendingPathComponent("redis.log").path,
        ] + extraArguments, outputIn: directory, name: "redis-server")
        process = p
        var probeConfig = unixConfiguration
        probeConfig.connectAttempts = 1
        let probe = try RedisDedupeStore(configuration: RedisDedupeStore.Configuration(redis: probeConfig))
        for _ in 0..<200 {
            if (try? await probe.ping()) != nil { return }
            if !p.isRunning { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        let log = (try? String(contentsOf: directory.appendingPathComponent("redis.log"), encoding: .utf8)) ?? ""
        await stop()
        throw NotReady(log: log)
    }

    /// Stops the server (SIGKILL: nothing is saved, like a crash) and waits for it to exit.
    public func stop() async {
        guard let p = process else { return }
        process = nil
        p.kill()
        await p.wait()
        unlink(socketPath)
    }

    /// The server's unix socket, with the server's credentials.
    public var unixConfiguration: RedisConfiguration {
        var c = RedisConfiguration.testing(socketPath)
        c.username = username
        c.password = password
        return c
    }

}

extension RedisConfiguration {
    /// A unix-socket configuration with short timeouts and backoffs for tests.
    public static func testing(_ socketPath: String) -> RedisConfiguration {
        var c = RedisConfiguration()
        c.endpoint = .unix(path: socketPath)
        c.connectTimeout = .seconds(1)
        c.commandTimeout = .seconds(5)
        c.connectAttempts = 2
        c.reconnectBackoff = .milliseconds(20)
        return c
    }
}

extension RedisDedupeStore {
    /// A store on `server` with a unique prefix.
    public static func testing(_ server: RedisTestServer, clock: any WallClock, retention: Duration? = nil) throws -> RedisDedupeStore {
        var c = RedisDedupeStore.Configuration(redis: server.unixConfiguration)
        c.keyPrefix = "test-\(UInt32.random(in: 0...UInt32.max)):"
        c.retention = retention
        return try RedisDedupeStore(configuration: c, clock: clock)
    }
}
