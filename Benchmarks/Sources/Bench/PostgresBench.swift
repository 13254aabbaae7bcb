import ExactlyOnce
import ExactlyOncePostgres
import Foundation
import PostgresNIO

#if canImport(Glibc)
import Glibc
#endif

/// PostgreSQL store throughput against `pgbench` on the same throwaway server (fsync on,
/// synchronous_commit on: the server's defaults), in the same run, over the same unix socket.
///
/// Each of `poolSize` workers owns one coupon (like one partition's lane) and loops: claim keys
/// in one round trip, run the coupon handler's two statements (stock UPDATE ... RETURNING,
/// INSERT of the issued row) per claim in the store's completion batch, commit once.
/// - `postgresBatchedVsPgbench`: 64 keys per claim and per commit, vs pgbench.
/// - `postgresUnbatchedVsPgbench`: one key per claim and per commit, vs pgbench.
/// pgbench runs, per transaction, the dedupe insert, the stock update and the issued insert,
/// with `poolSize` clients, each on its own coupon.
func runPostgresBenchmarks(batchedClicks: Int = 40_960, unbatchedClicks: Int = 4_000, pgbenchTransactionsPerClient: Int = 1_000) async throws -> [String: Double] {
    let server = try BenchPostgresServer()
    try await server.setUp()
    do {
        let r = try await measurePostgres(server, batchedClicks: batchedClicks, unbatchedClicks: unbatchedClicks, pgbenchTransactionsPerClient: pgbenchTransactionsPerClient)
        try? await server.stop()
        return r
    } catch {
        try? await server.stop()
        throw error
    }
}

private func measurePostgres(_ server: BenchPostgresServer, batchedClicks: Int, unbatchedClicks: Int, pgbenchTransactionsPerClient: Int) async throws -> [String: Double] {
    var config = PostgresStoreConfiguration()
    config.endpoint = .unix(path: server.socketPath)
    config.username = "postgres"
    config.database = server.database
    config.schema = "bench_eo"
    let store = try await PostgresDedupeStore.connect(config)
    let workers = config.poolSize
    let syncCommit = try await store.query("SHOW synchronous_commit").first?.decode(String.self) ?? "?"
    let fsync = try await store.query("SHOW fsync").first?.decode(String.self) ?? "?"
    print("postgres: server synchronous_commit=\(syncCommit) fsync=\(fsync), \(workers) connections/clients")

    try await store.query("CREATE SCHEMA IF NOT EXISTS coupons")
    try await store.query("""
        CREATE TABLE coupons.coupon_stock (
            coupon_id bigint PRIMARY KEY, stock bigint NOT NULL CHECK (stock >= 0),
            issued bigint NOT NULL DEFAULT 0 CHECK (issued >= 0 AND issued <= stock))
        """)
    try await store.query("""
        CREATE TABLE coupons.issued_coupons (
            coupon_id bigint NOT NULL, serial bigint NOT NULL, member_id bigint NOT NULL, request_key text NOT NULL,
            issued_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (coupon_id, serial), UNIQUE (coupon_id, member_id))
        """)
    try await store.query("CREATE TABLE coupons.pgbench_dedupe (key text PRIMARY KEY)")
    // Coupons 1...workers for the store runs, 1001... for the unbatched run, 2001... for pgbench.
    try await store.query("""
        INSERT INTO coupons.coupon_stock (coupon_id, stock)
        SELECT c, 1000000000 FROM (SELECT generate_series(1, 64) AS c UNION ALL SELECT generate_series(1001, 1064)
                                   UNION ALL SELECT generate_series(2001, 2064)) s
        """)

    let fingerprint = PayloadFingerprint.of(Array("payload".utf8))

    // One worker's loop: claim `size` keys in one round trip, run the handler's statements for
    // each in the store's completion batch, commit once.
    @Sendable func run(couponBase: Int64, clicksPerWorker: Int, size: Int) async throws -> Double {
        let start = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { group in
            for w in 0..<workers {
                group.addTask {
                    let coupon = couponBase + Int64(w)
                    var member: Int64 = 0
                    while member < Int64(clicksPerWorker) {
                        let requests = (0..<size).map { i in
                            ClaimRequest(key: .coupon(couponId: coupon, memberId: member + Int64(i)), fingerprint: fingerprint, lease: .seconds(60))
                        }
                        let results = try await store.claim(requests)
                        var batch = store.makeCompletionBatch(CompletionBatchOptions(limit: size))
                        for (i, result) in results.enumerated() {
                            guard case .new(let claim) = result else { throw ExactlyOnceError(.storeUnavailable, "benchmark claim did not claim") }
                            let memberId = member + Int64(i)
                            let key = claim.key.rawValue
                            _ = try await batch.perform(claim) { tx in
                                let rows = try await tx.query("""
                                    UPDATE coupons.coupon_stock SET issued = issued + 1
                                    WHERE coupon_id = \(coupon) AND issued < stock RETURNING issued
                                    """)
                                guard let row = rows.first else { return .rejected("sold out") }
                                let serial = try row.decode(Int64.self)
                                try await tx.query("""
                                    INSERT INTO coupons.issued_coupons (coupon_id, serial, member_id, request_key)
                                    VALUES (\(coupon), \(serial), \(memberId), \(key))
                                    """)
                                return .applied(String(serial))
                            }
                        }
                        let done = try await batch.commit()
                        guard done.applied == size else { throw ExactlyOnceError(.storeUnavailable, "benchmark commit applied \(done.applied) of \(size)") }
                        member += Int64(size)
                    }
                }
            }
            try await group.waitForAll()
        }
        return Double(workers * clicksPerWorker) / seconds(ContinuousClock.now - start)
    }

    // Baseline first, on the same server.
    let script = server.directory.appendingPathComponent("click.sql")
    try """
        \\set m random(1, 1000000000000)
        BEGIN;
        INSERT INTO coupons.pgbench_dedupe (key) VALUES ('c:' || (2001 + :client_id) || ':' || :m) ON CONFLICT DO NOTHING;
        UPDATE coupons.coupon_stock SET issued = issued + 1 WHERE coupon_id = 2001 + :client_id AND issued < stock RETURNING issued \\gset
        INSERT INTO coupons.issued_coupons (coupon_id, serial, member_id, request_key) VALUES (2001 + :client_id, :issued, :issued, 'c:' || :m);
        END;

        """.write(to: script, atomically: true, encoding: .utf8)
    chmod(script.path, 0o644)
    let pgbenchTPS = try await server.pgbench(script: script.path, clients: workers, transactions: pgbenchTransactionsPerClient)

    let batchSize = 64
    let batchedRate = try await run(couponBase: 1, clicksPerWorker: batchedClicks / workers / batchSize * batchSize, size: batchSize)
    let unbatchedRate = try await run(couponBase: 1001, clicksPerWorker: unbatchedClicks / workers, size: 1)

    // The effects are there: every click of the store runs issued one coupon.
    let issued = try await store.query("SELECT count(*) FROM coupons.issued_coupons WHERE coupon_id < 2000").first?.decode(Int64.self) ?? 0
    let expected = Int64(workers * (batchedClicks / workers / batchSize * batchSize) + workers * (unbatchedClicks / workers))
    guard issued == expected else { throw ExactlyOnceError(.storeUnavailable, "issued \(issued) coupons, expected \(expected)") }
    await store.shutdown()

    return [
        "postgresBatchedClicksPerSecond": batchedRate,
        "postgresUnbatchedClicksPerSecond": unbatchedRate,
        "pgbenchClickTPS": pgbenchTPS,
        "postgresBatchedVsPgbench": batchedRate / pgbenchTPS,
        "postgresUnbatchedVsPgbench": unbatchedRate / pgbenchTPS,
    ]
}

/// A throwaway PostgreSQL cluster (server defaults: fsync and synchronous_commit on) on a unix
/// socket in a temporary directory; `initdb` runs as the `postgres` user when we are root.
/// The minimal part of Tests/TestSupport/PostgresTestServer.swift.
final class BenchPostgresServer {
    let directory: URL
    let port: Int
    let database = "eo_bench"
    private let bin: URL
    private let asRoot: Bool
    private var running = false

    init() throws {
        let root = URL(fileURLWithPath: "/usr/lib/postgresql")
        let versions = ((try? FileManager.default.contentsOfDirectory(atPath: root.path)) ?? []).compactMap { Int($0) }.sorted(by: >)
        guard let v = versions.first(where: { FileManager.default.isExecutableFile(atPath: "/usr/lib/postgresql/\($0)/bin/initdb") }) else {
            throw ExactlyOnceError(.invalidConfiguration, "PostgreSQL is not installed: scripts/install-deps.sh bench")
        }
        bin = root.appendingPathComponent("\(v)/bin")
        asRoot = getuid() == 0
        directory = URL(fileURLWithPath: "/tmp").appendingPathComponent("eo-pgbench-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        chmod(directory.path, 0o755)
        port = 50_000 + Int(getpid() % 10_000)
    }

    var socketPath: String { directory.appendingPathComponent(".s.PGSQL.\(port)").path }
    private var dataPath: String { directory.appendingPathComponent("data").path }

    private func tool(_ name: String, _ args: [String]) async throws -> String {
        let exe = bin.appendingPathComponent(name).path
        let argv = asRoot ? ["/usr/sbin/runuser", "-u", "postgres", "--", exe] + args : [exe] + args
        let (status, out) = try await Self.spawn(argv, outputIn: directory)
        guard status == 0 else { throw ExactlyOnceError(.storeUnavailable, "\(name) failed (\(status)):\n\(out.suffix(3000))") }
        return out
    }

    func setUp() async throws {
        if asRoot {
            let (st, out) = try await Self.spawn(["/bin/chown", "-R", "postgres:postgres", directory.path], outputIn: URL(fileURLWithPath: "/tmp"))
            guard st == 0 else { throw ExactlyOnceError(.storeUnavailable, "chown: \(out)") }
        }
        _ = try await tool("initdb", ["-D", dataPath, "-U", "postgres", "-E", "UTF8", "--locale=C", "--auth-local=trust", "--no-sync"])
        let options = "-p \(port) -k \(directory.path) -c listen_addresses= -c max_connections=100 -c shared_buffers=64MB"
        _ = try await tool("pg_ctl", ["-D", dataPath, "-l", directory.appendingPathComponent("server.log").path, "-o", options, "-w", "-t", "60", "start"])
        running = true
        _ = try await tool("createdb", ["-h", directory.path, "-p", "\(port)", "-U", "postgres", database])
    }

    /// Runs pgbench with `script` and returns its tps (without initial connection time).
    func pgbench(script: String, clients: Int, transactions: Int) async throws -> Double {
        let out = try await tool("pgbench", ["-h", directory.path, "-p", "\(port)", "-U", "postgres", "-n", "-f", script,
                                             "-c", "\(clients)", "-j", "\(min(clients, 2))", "-t", "\(transactions)", database])
        guard out.contains("number of failed transactions: 0") || !out.contains("failed transactions") else {
            throw ExactlyOnceError(.storeUnavailable, "pgbench had failed transactions:\n\(out)")
        }
        guard let line = out.split(separator: "\n").first(where: { $0.hasPrefix("tps = ") }),
              let tps = Double(line.dropFirst(6).prefix { $0 == "." || $0.isNumber }) else {
            throw ExactlyOnceError(.storeUnavailable, "no tps in pgbench output:\n\(out)")
        }
        print("postgres: pgbench \(line)")
        return tps
    }

    func stop() async throws {
        if running { _ = try await tool("pg_ctl", ["-D", dataPath, "-m", "fast", "-w", "-t", "60", "stop"]); running = false }
        try? FileManager.default.removeItem(at: directory)
    }

    /// posix_spawn with every inherited descriptor beyond stdio closed (the server `pg_ctl`
    /// leaves behind must not hold ours), waited for on a thread of its own.
    static func spawn(_ argv: [String], outputIn directory: URL) async throws -> (Int32, String) {
        let out = directory.appendingPathComponent("spawn-\(UUID().uuidString.prefix(8)).out").path
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
        guard rc == 0 else { throw ExactlyOnceError(.storeUnavailable, "posix_spawn \(argv[0]): errno \(rc)") }
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
}
