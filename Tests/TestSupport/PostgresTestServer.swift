import ExactlyOnce
import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A throwaway PostgreSQL cluster: `initdb` in a temporary directory (as the `postgres` user
/// when the tests run as root, since initdb refuses root), a server on a free TCP port and a
/// unix socket in that directory, and a database. Tests fail, not skip, when PostgreSQL is
/// missing: `make test` installs it.
///
/// Local (unix socket) logins are trusted; TCP logins need ``password`` (scram-sha-256), so a
/// wrong password can be tested over TCP.
public final class PostgresTestServer: @unchecked Sendable {
    // @unchecked: the mutable `running` flag is only changed by start()/stop(), which tests
    // call sequentially, and read behind the same discipline.
    /// The cluster's directory (data, socket, log).
    public let directory: URL
    /// The TCP port.
    public let port: Int
    /// The superuser.
    public let username = "postgres"
    /// The superuser's password (TCP logins).
    public let password = "pw-\(UInt32.random(in: 100_000...999_999))-secret"
    /// The database the tests use.
    public let database = "eo_test"
    private let bin: URL
    private let asRoot: Bool
    private let settings: [String]
    private let running = Mutex(false)

    struct Missing: Error, CustomStringConvertible {
        var description: String {
            "PostgreSQL is not installed (looked for /usr/lib/postgresql/*/bin/initdb and initdb in PATH). "
                + "Install it: apt-get install -y postgresql (make test does)."
        }
    }

    struct Failed: Error, CustomStringConvertible {
        var step: String
        var output: String
        var description: String { "PostgreSQL test server: \(step) failed:\n\(output.suffix(4000))" }
    }

    /// The directory of initdb, pg_ctl, postgres and pgbench.
    public static func binDirectory() throws -> URL {
        let root = URL(fileURLWithPath: "/usr/lib/postgresql")
        let versions = ((try? FileManager.default.contentsOfDirectory(atPath: root.path)) ?? [])
            .compactMap { Int($0) }.sorted(by: >)
        for v in versions {
            let dir = root.appendingPathComponent("\(v)/bin")
            if FileManager.default.isExecutableFile(atPath: dir.appendingPathComponent("initdb").path) { return dir }
        }
        if let initdb = ChildProcess.which("initdb") { return initdb.deletingLastPathComponent() }
        throw Missing()
    }

    /// `durable: false` turns `fsync` off (tests that do not crash the machine need no fsync);
    /// benchmarks use `durable: true`, the server's defaults.
    private init(durable: Bool, settings: [String]) throws {
        bin = try Self.binDirectory()
        asRoot = getuid() == 0
        directory = URL(fileURLWithPath: "/tmp").appendingPathComponent("eo-pg-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        chmod(directory.path, 0o755)
        port = try LocalSockets.freePort()
        var s = ["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200", "-c", "shared_buffers=64MB"]
        if !durable { s += ["-c", "fsync=off", "-c", "full_page_writes=off"] }
        self.settings = s + settings
    }

    private func tool(_ name: String, _ args: [String]) async throws -> (status: Int32, out: String, err: String) {
        let exe = bin.appendingPathComponent(name)
        let argv = asRoot ? ["/usr/sbin/runuser", "-u", "postgres", "--", exe.path] + args : [exe.path] + args
        return try await Self.spawn(argv, outputIn: directory)
    }

    /// Runs `argv` to its end with posix_spawn, every inherited descriptor beyond stdio closed,
    /// and waits for it on a thread of its own. (`Process` cannot run `pg_ctl start`: the server
    /// it leaves behind inherits the descriptor Foundation watches for the child's exit.)
    static func spawn(_ argv: [String], outputIn directory: URL) async throws -> (status: Int32, out: String, err: String) {
        let out = directory.appendingPathComponent("spawn-\(UUID().uuidString.prefix(8)).out").path
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, out, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
        if let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") {
            _ = unsafeBitCast(sym, to: CloseFrom.self)(&actions, 3)
        } else {
            for fd in Int32(3)..<Int32(1024) where fcntl(fd, F_GETFD) >= 0 { posix_spawn_file_actions_addclose(&actions, fd) }
        }
        var pid: pid_t = 0
        var cargs = argv.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        let rc = posix_spawn(&pid, argv[0], &actions, nil, &cargs, environ)
        let child = pid
        guard rc == 0 else { throw Failed(step: "spawn \(argv[0])", output: "posix_spawn: errno \(rc)") }
        let status: Int32 = await withCheckedContinuation { c in
            let t = Thread {
                var st: Int32 = 0
                while waitpid(child, &st, 0) < 0 && errno == EINTR {}
                c.resume(returning: st)
            }
            t.start()
        }
        let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        unlink(out)
        let exited = (status & 0x7f) == 0
        return (exited ? (status >> 8) & 0xff : 128 + (status & 0x7f), text, "")
    }

    private func checked(_ step: String, _ name: String, _ args: [String]) async throws {
        let r = try await tool(name, args)
        guard r.status == 0 else { throw Failed(step: step, output: r.out + r.err + logTail()) }
    }

    private var dataPath: String { directory.appendingPathComponent("data").path }
    private var logPath: String { directory.appendingPathComponent("server.log").path }

    /// Creates the cluster and its database and starts the server.
    private func setUp() async throws {
        let pwfile = directory.appendingPathComponent("pwfile")
        try Data(password.utf8).write(to: pwfile)
        if asRoot {
            let chown = try await Self.spawn(["/bin/chown", "-R", "postgres:postgres", directory.path], outputIn: URL(fileURLWithPath: "/tmp"))
            guard chown.status == 0 else { throw Failed(step: "chown", output: chown.err) }
        }
        try await checked("initdb", "initdb", ["-D", dataPath, "-U", username, "--pwfile", pwfile.path, "-E", "UTF8", "--locale=C",
                                              "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"])
        try await start()
        try await checked("createdb", "createdb", ["-h", directory.path, "-p", "\(port)", "-U", username, database])
    }

    /// Starts (or restarts) the server on the same directory, port and socket; waits until it
    /// takes connections.
    public func start() async throws {
        let options = (["-p", "\(port)", "-k", directory.path] + settings).joined(separator: " ")
        try await checked("pg_ctl start", "pg_ctl", ["-D", dataPath, "-l", logPath, "-o", options, "-w", "-t", "60", "start"])
        running.withLock { $0 = true }
    }

    /// Stops the server: mode `fast` (clean) or `immediate` (no checkpoint: like a crash).
    public func stop(mode: String = "fast") async throws {
        guard running.withLock({ $0 }) else { return }
        try await checked("pg_ctl stop", "pg_ctl", ["-D", dataPath, "-m", mode, "-w", "-t", "60", "stop"])
        running.withLock { $0 = false }
    }

    /// The server's log so far (the last lines).
    public func logTail() -> String {
        let log = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
        return "\n--- server log ---\n" + String(log.suffix(3000))
    }

    /// The unix-socket URL of the test database (no password needed).
    public var socketURL: String { "postgres://\(username)@/\(database)?host=\(directory.path)&port=\(port)" }
    /// The TCP URL of the test database with the right password.
    public var tcpURL: String { "postgres://\(username):\(password)@127.0.0.1:\(port)/\(database)" }

    /// Runs SQL with `psql` on the test database (unix socket) and returns its unaligned output.
    public func psql(_ sql: String, database: String? = nil) async throws -> String {
        let psql = bin.appendingPathComponent("psql")
        let r = try await Self.spawn([psql.path, "-h", directory.path, "-p", "\(port)", "-U", username, "-d", database ?? self.database,
                                                 "-v", "ON_ERROR_STOP=1", "-X", "-A", "-t", "-q", "-c", sql], outputIn: URL(fileURLWithPath: "/tmp"))
        guard r.status == 0 else { throw Failed(step: "psql", output: r.out + r.err) }
        return r.out.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The path of a tool next to initdb (`pgbench`, `psql`).
    public func toolPath(_ name: String) -> URL { bin.appendingPathComponent(name) }

    /// Runs `body` against a server of its own and always stops and removes it afterwards.
    public static func with<R>(durable: Bool = false, settings: [String] = [], _ body: (PostgresTestServer) async throws -> R) async throws -> R {
        let server = try PostgresTestServer(durable: durable, settings: settings)
        do {
            try await server.setUp()
            let result = try await body(server)
            try? await server.stop(mode: "immediate")
            server.remove()
            return result
        } catch {
            try? await server.stop(mode: "immediate")
            server.remove()
            throw error
        }
    }

    private func remove() { try? FileManager.default.removeItem(at: directory) }

    private static let sharedServer = SharedServer()

    /// One server for the whole test process, started on first use and stopped when the
    /// process exits. Tests share it by using schemas (or databases) of their own.
    public static func shared() async throws -> PostgresTestServer {
        try await sharedServer.get()
    }

    private actor SharedServer {
        var server: PostgresTestServer?
        func get() async throws -> PostgresTestServer {
            if let server { return server }
            let s = try PostgresTestServer(durable: false, settings: [])
            do {
                try await s.setUp()
            } catch {
                try? await s.stop(mode: "immediate")
                s.remove()
                throw error
            }
            server = s
            PostgresTestServer.stopAtExit(s)
            return s
        }
    }

    nonisolated(unsafe) private static var atExitServers: [(pgCtl: String, data: String, dir: String, asRoot: Bool)] = []

    /// Stops the shared server when the process exits (a synchronous `pg_ctl stop -m immediate`
    /// from the exit handler, where nothing else runs any more).
    private static func stopAtExit(_ s: PostgresTestServer) {
        atExitServers.append((s.bin.appendingPathComponent("pg_ctl").path, s.dataPath, s.directory.path, s.asRoot))
        if atExitServers.count == 1 {
            atexit {
                for s in PostgresTestServer.atExitServers {
                    let args = s.asRoot ? ["/usr/sbin/runuser", "-u", "postgres", "--", s.pgCtl, "-D", s.data, "-m", "immediate", "-w", "stop"]
                        : [s.pgCtl, "-D", s.data, "-m", "immediate", "-w", "stop"]
                    var pid: pid_t = 0
                    var cargs = args.map { strdup($0) } + [nil]
                    if posix_spawn(&pid, args[0], nil, nil, &cargs, environ) == 0 {
                        var status: Int32 = 0
                        waitpid(pid, &status, 0)
                    }
                    for p in cargs { free(p) }
                    try? FileManager.default.removeItem(atPath: s.dir)
                }
            }
        }
    }

}
