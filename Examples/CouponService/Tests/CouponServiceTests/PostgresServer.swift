import CouponService
import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Finds an executable on PATH, then in the usual directories.
func which(_ name: String) -> String? {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
    let dirs = path.split(separator: ":").map(String.init) + ["/usr/bin", "/usr/local/bin", "/usr/sbin", "/opt/homebrew/bin"]
    return dirs.map { $0 + "/" + name }.first { FileManager.default.isExecutableFile(atPath: $0) }
}

/// A throwaway PostgreSQL cluster for the tests, adapted from the root package's
/// Tests/TestSupport/PostgresTestServer.swift (which this nested package cannot depend on):
/// `initdb` in a temporary directory (as the `postgres` user when the tests run as root, since
/// initdb refuses root), a server listening only on a unix socket in that directory, trusted
/// local logins, `fsync` off (nothing here crashes the machine). One server per test process,
/// stopped when the process exits; each test takes a database of its own (``database()``).
/// Fails, not skips, when PostgreSQL is missing: `make test` installs it.
final class ThrowawayPostgres: Sendable {
    let directory: String
    let port: Int
    private let bin: String
    private let asRoot: Bool

    struct Failed: Error, CustomStringConvertible {
        var description: String
    }

    private static let shared = Shared()

    /// The process's server, started on first use.
    static func server() async throws -> ThrowawayPostgres { try await shared.get() }

    /// A new, empty database on the process's server; returns its unix-socket URL.
    static func database() async throws -> (server: ThrowawayPostgres, name: String, url: String) {
        let s = try await server()
        let name = "svc_" + UUID().uuidString.prefix(8).lowercased()
        _ = try await s.psql("CREATE DATABASE \(name)", database: "postgres")
        return (s, name, s.url(database: name))
    }

    private actor Shared {
        var starting: Task<ThrowawayPostgres, any Error>?
        func get() async throws -> ThrowawayPostgres {
            // One start, however many tests ask at once (the actor is reentrant across the await).
            if let starting { return try await starting.value }
            let t = Task {
                let s = try ThrowawayPostgres()
                try await s.setUp()
                return s
            }
            starting = t
            return try await t.value
        }
    }

    private init() throws {
        let root = "/usr/lib/postgresql"
        let versions = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).compactMap { Int($0) }.sorted(by: >)
        if let v = versions.first(where: { FileManager.default.isExecutableFile(atPath: "\(root)/\($0)/bin/initdb") }) {
            bin = "\(root)/\(v)/bin"
        } else if let initdb = which("initdb") {
            bin = (initdb as NSString).deletingLastPathComponent
        } else {
            throw Failed(description: "PostgreSQL is not installed (looked for /usr/lib/postgresql/*/bin/initdb and initdb on PATH): apt-get install -y postgresql (make test installs it)")
        }
        asRoot = getuid() == 0
        directory = "/tmp/svc-pg-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        chmod(directory, 0o755)
        port = Int.random(in: 20_000...60_000)  // only names the socket file: no TCP listener
    }

    /// The unix-socket URL of `database`.
    func url(database: String) -> String { "postgres://postgres@/\(database)?host=\(directory)&port=\(port)" }

    private func setUp() async throws {
        if asRoot { try await check("chown", Self.spawn(["/bin/chown", "-R", "postgres:postgres", directory])) }
        try await check("initdb", tool("initdb", ["-D", directory + "/data", "-U", "postgres", "-E", "UTF8", "--locale=C",
                                                  "--auth-local=trust", "--no-sync"]))
        let options = "-p \(port) -k \(directory) -c listen_addresses= -c fsync=off -c full_page_writes=off -c max_connections=200"
        try await check("pg_ctl start", tool("pg_ctl", ["-D", directory + "/data", "-l", directory + "/server.log", "-o", options, "-w", "-t", "60", "start"]))
        Self.stopAtExit(pgCtl: bin + "/pg_ctl", data: directory + "/data", directory: directory, asRoot: asRoot)
    }

    /// Runs SQL with psql and returns its unaligned, tuples-only output.
    func psql(_ sql: String, database: String) async throws -> String {
        let r = try await Self.spawn([bin + "/psql", "-h", directory, "-p", "\(port)", "-U", "postgres", "-d", database,
                                      "-v", "ON_ERROR_STOP=1", "-X", "-A", "-t", "-q", "-c", sql])
        try check("psql", r)
        return r.output.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    private func tool(_ name: String, _ args: [String]) async throws -> (status: Int32, output: String) {
        try await Self.spawn(asRoot ? ["/usr/sbin/runuser", "-u", "postgres", "--", bin + "/" + name] + args : [bin + "/" + name] + args)
    }

    private func check(_ step: String, _ r: (status: Int32, output: String)) throws {
        guard r.status == 0 else {
            let log = (try? String(contentsOfFile: directory + "/server.log", encoding: .utf8)) ?? ""
            throw Failed(description: "PostgreSQL test server: \(step) failed (status \(r.status)):\n\(r.output.suffix(3000))\n--- server log ---\n\(log.suffix(2000))")
        }
    }

    /// Runs `argv` to its end with posix_spawn (every inherited descriptor beyond stdio closed:
    /// the server `pg_ctl start` leaves behind must not hold the test's pipes) and waits for it
    /// on a thread of its own, off the cooperative pool.
    static func spawn(_ argv: [String]) async throws -> (status: Int32, output: String) {
        let out = "/tmp/svc-pg-spawn-\(UUID().uuidString.prefix(8)).out"
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, out, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        for fd in Int32(3)..<Int32(1024) where fcntl(fd, F_GETFD) >= 0 { posix_spawn_file_actions_addclose(&actions, fd) }
        var pid: pid_t = 0
        var cargs = argv.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        let rc = posix_spawn(&pid, argv[0], &actions, nil, &cargs, environ)
        guard rc == 0 else { throw Failed(description: "cannot start \(argv[0]): errno \(rc)") }
        let child = pid
        let status: Int32 = await withCheckedContinuation { c in
            Thread {
                var st: Int32 = 0
                while waitpid(child, &st, 0) < 0 && errno == EINTR {}
                c.resume(returning: st)
            }.start()
        }
        let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        unlink(out)
        return ((status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f), text)
    }

    private static let atExit = Mutex<[(pgCtl: String, data: String, directory: String, asRoot: Bool)]>([])

    /// Stops the server when the test process exits (`pg_ctl stop -m immediate` from the exit
    /// handler, where nothing else runs any more) and removes its directory.
    private static func stopAtExit(pgCtl: String, data: String, directory: String, asRoot: Bool) {
        let first = atExit.withLock { list in
            list.append((pgCtl, data, directory, asRoot))
            return list.count == 1
        }
        guard first else { return }
        atexit {
            for s in ThrowawayPostgres.atExit.withLock({ $0 }) {
                let args = (s.asRoot ? ["/usr/sbin/runuser", "-u", "postgres", "--"] : []) + [s.pgCtl, "-D", s.data, "-m", "immediate", "-w", "stop"]
                var pid: pid_t = 0
                var cargs = args.map { strdup($0) } + [nil]
                if posix_spawn(&pid, args[0], nil, nil, &cargs, environ) == 0 {
                    var status: Int32 = 0
                    waitpid(pid, &status, 0)
                }
                for p in cargs { free(p) }
                try? FileManager.default.removeItem(atPath: s.directory)
            }
        }
    }
}
