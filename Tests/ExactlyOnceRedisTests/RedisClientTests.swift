import ExactlyOnce
import Logging
import TestSupport
import Testing
@testable import ExactlyOnceRedis

@Suite("Redis configuration")
struct RedisConfigurationTests {
    @Test func parsesTCPURLs() throws {
        let plain = try RedisConfiguration(url: "redis://cache.internal:6380/4")
        #expect(plain.endpoint == .tcp(host: "cache.internal", port: 6380))
        #expect(plain.database == 4)
        #expect(plain.username == nil && plain.password == nil)

        let acl = try RedisConfiguration(url: "redis://alice:p%40ss%3Aw0rd@10.0.0.1")
        #expect(acl.endpoint == .tcp(host: "10.0.0.1", port: 6379))
        #expect(acl.username == "alice")
        #expect(acl.password == "p@ss:w0rd")
        #expect(acl.database == 0)

        let passwordOnly = try RedisConfiguration(url: "redis://:secret@localhost:7000/")
        #expect(passwordOnly.username == nil)
        #expect(passwordOnly.password == "secret")
        #expect(passwordOnly.endpoint == .tcp(host: "localhost", port: 7000))

        let v6 = try RedisConfiguration(url: "redis://[::1]:6390/2")
        #expect(v6.endpoint == .tcp(host: "::1", port: 6390))
        #expect(v6.database == 2)
    }

    @Test func parsesUnixURLs() throws {
        let c = try RedisConfiguration(url: "unix:///var/run/redis/redis.sock?db=3")
        #expect(c.endpoint == .unix(path: "/var/run/redis/redis.sock"))
        #expect(c.database == 3)
        let bare = try RedisConfiguration(url: "unix:///tmp/r.sock")
        #expect(bare.endpoint == .unix(path: "/tmp/r.sock"))
        #expect(bare.database == 0)
    }

    @Test(arguments: [
        "http://localhost", "redis://", "redis://host:notaport", "redis://host:70000", "redis://host/-1",
        "redis://host/x", "unix://relative.sock", "unix:///tmp/s.sock?db=x", "unix:///tmp/s.sock?nope=1",
        "redis://u:%ZZ@host",
    ])
    func rejectsMalformedURLs(_ url: String) {
        #expect(throws: ExactlyOnceError.self) { try RedisConfiguration(url: url) }
    }

    @Test func passwordNeverShows() throws {
        let secret = "hunter2-SECRET"
        let c = try RedisConfiguration(url: "redis://bob:\(secret)@h:1/2")
        #expect(!c.description.contains(secret))
        #expect(c.description.contains("***"))
        #expect(!String(describing: c).contains(secret))
        #expect(!String(reflecting: c).contains(secret))
        var dumped = ""
        dump(c, to: &dumped)
        #expect(!dumped.contains(secret))
        let storeConfiguration = RedisDedupeStore.Configuration(redis: c)
        #expect(!String(describing: storeConfiguration).contains(secret))
        #expect(!String(reflecting: storeConfiguration).contains(secret))
        var dumpedStore = ""
        dump(storeConfiguration, to: &dumpedStore)
        #expect(!dumpedStore.contains(secret))
        do {
            _ = try RedisConfiguration(url: "redis://bob:\(secret)@h:99999")
            Issue.record("expected an error")
        } catch {
            #expect(!String(describing: error).contains(secret))
        }
    }
}

@Suite("Redis connection", .serialized, .timeLimit(.minutes(1)))
struct RedisConnectionTests {
    @Test func binarySafeArgumentsAndReplies() async throws {
        try await RedisTestServer.with { server in
            let client = try RedisClient(configuration: server.unixConfiguration, logger: Logger(label: "test"))
            let key: [UInt8] = [0, 13, 10, 0xFF, 0x20, 0x25, 0x73]  // NUL, CR LF, 0xFF, " %s"
            let value = (0...255).map(UInt8.init) + [0, 0]
            #expect(try await client.command([Array("SET".utf8), key, value]) == .status("OK"))
            #expect(try await client.command([Array("GET".utf8), key]) == .string(value))
            #expect(try await client.command([Array("SET".utf8), Array("empty".utf8), []]) == .status("OK"))
            #expect(try await client.command([Array("GET".utf8), Array("empty".utf8)]) == .string([]))
            #expect(try await client.command("GET", "absent") == .null)
            #expect(try await client.command("RPUSH", "list", "a", "b") == .integer(2))
            #expect(try await client.command("LRANGE", "list", "0", "-1") == .array([.string(Array("a".utf8)), .string(Array("b".utf8))]))
            guard case .error(let text) = try await client.command("NOSUCHCOMMAND") else {
                Issue.record("an unknown command must answer an error reply")
                return
            }
            #expect(text.hasPrefix("ERR"))
        }
    }

    @Test func pipelineKeepsOrder() async throws {
        try await RedisTestServer.with { server in
            let client = try RedisClient(configuration: server.unixConfiguration, logger: Logger(label: "test"))
            let replies = try await client.pipeline((0..<1000).map { _ in [Array("INCR".utf8), Array("counter".utf8)] })
            #expect(replies == (1...1000).map { RedisReply.integer(Int64($0)) })
        }
    }

    @Test func concurrentCallersShareThePool() async throws {
        try await RedisTestServer.with { server in
            var c = server.unixConfiguration
            c.poolSize = 3
            let client = try RedisClient(configuration: c, logger: Logger(label: "test"))
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<20 {
                    group.addTask { for _ in 0..<50 { _ = try await client.command("INCR", "n") } }
                }
                try await group.waitForAll()
            }
            #expect(try await client.command("GET", "n") == .string(Array("1000".utf8)))
        }
    }

    @Test func selectsTheDatabase() async throws {
        try await RedisTestServer.with { server in
            var three = server.unixConfiguration
            three.database = 3
            let db3 = try RedisClient(configuration: three, logger: Logger(label: "test"))
            let db0 = try RedisClient(configuration: server.unixConfiguration, logger: Logger(label: "test"))
            _ = try await db3.command("SET", "where", "three")
            #expect(try await db0.command("GET", "where") == .null)
            #expect(try await db3.command("GET", "where") == .string(Array("three".utf8)))
            let viaURL = try RedisClient(configuration: try RedisConfiguration(url: "unix://\(server.socketPath)?db=3"), logger: Logger(label: "test"))
            #expect(try await viaURL.command("GET", "where") == .string(Array("three".utf8)))
        }
    }

    @Test func tcpAndPasswordAuthentication() async throws {
        let secret = "s3cret-PASSWORD"
        try await RedisTestServer.with(tcp: true, arguments: ["--requirepass", secret], password: secret) { server in
            let port = try #require(server.tcpPort)
            let good = try RedisClient(configuration: try RedisConfiguration(url: "redis://:\(secret)@127.0.0.1:\(port)/1"), logger: Logger(label: "test"))
            #expect(try await good.command("PING") == .status("PONG"))

            var wrong = try RedisConfiguration(url: "redis://:wrong-\(secret)@127.0.0.1:\(port)")
            wrong.connectAttempts = 1
            let bad = try RedisClient(configuration: wrong, logger: Logger(label: "test"))
            let error = await #expect(throws: ExactlyOnceError.self) { try await bad.command("PING") }
            #expect(error?.code == .storeFailure, "a wrong password is not retriable")
            #expect(error?.isRetriable == false)
            #expect(error?.cause?.code == "WRONGPASS" || error?.cause?.code == "ERR", "the server's error class is kept: \(String(describing: error?.cause))")
            #expect(error.map { !String(describing: $0).contains(secret) } == true)

            var none = try RedisConfiguration(url: "redis://127.0.0.1:\(port)")
            none.connectAttempts = 1
            let anonymous = try RedisClient(configuration: none, logger: Logger(label: "test"))
            guard case .error(let text) = try await anonymous.command("GET", "x") else {
                Issue.record("an unauthenticated command must be refused")
                return
            }
            #expect(text.hasPrefix("NOAUTH"))
        }
    }

    @Test func aclUserAuthentication() async throws {
        let secret = "acl-PASSWORD-xyz"
        try await RedisTestServer.with(arguments: ["--user", "alice", "on", ">\(secret)", "~*", "&*", "+@all", "--user", "default", "off"],
                                       username: "alice", password: secret) { server in
            let client = try RedisClient(configuration: server.unixConfiguration, logger: Logger(label: "test"))
            #expect(try await client.command("ACL", "WHOAMI") == .string(Array("alice".utf8)))

            var wrongUser = server.unixConfiguration
            wrongUser.username = "mallory"
            wrongUser.connectAttempts = 1
            let bad = try RedisClient(configuration: wrongUser, logger: Logger(label: "test"))
            let error = await #expect(throws: ExactlyOnceError.self) { try await bad.command("PING") }
            #expect(error?.code == .storeFailure, "an unknown user is not retriable")
            #expect(error.map { !String(describing: $0).contains(secret) } == true)
        }
    }

    @Test func unreachableServerIsStoreUnavailable() async throws {
        var c = RedisConfiguration.testing("/nonexistent/eo-redis.sock")
        c.connectAttempts = 3
        let client = try RedisClient(configuration: c, logger: Logger(label: "test"))
        let error = await #expect(throws: ExactlyOnceError.self) { try await client.command("PING") }
        #expect(error?.code == .storeUnavailable)
        #expect(error?.isRetriable == true)
    }

    @Test func invalidConfigurationIsRefused() {
        var c = RedisConfiguration()
        c.poolSize = 0
        #expect(throws: ExactlyOnceError.self) { try RedisClient(configuration: c, logger: Logger(label: "test")) }
    }

    /// The public command client: commands, pipelines, scripts, and error replies as values.
    @Test func publicCommandClient() async throws {
        try await RedisTestServer.with { server in
            let c = try RedisCommandClient(configuration: server.unixConfiguration)
            #expect(try await c.send(["SET", "k", "v", "NX"]).string == "OK")
            #expect(try await c.send(["SET", "k", "w", "NX"]).isNull)
            let replies = try await c.pipeline([["INCR", "n"], ["INCR", "n"], ["GET", "k"]])
            #expect(replies.map(\.int) == [1, 2, nil] && replies[2].string == "v")
            let cas = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"
            #expect(try await c.evaluate(script: cas, keys: ["k"], arguments: ["other"]).int == 0)
            #expect(try await c.evaluate(script: cas, keys: ["k"], arguments: ["v"]).int == 1)
            let wrong = try await c.send(["INCR", "k2", "extra"])
            #expect(wrong.errorMessage?.hasPrefix("ERR") == true)
            #expect(try await c.send(["RPUSH", "l", "a", "b"]).int == 2)
            #expect(try await c.send(["LRANGE", "l", "0", "-1"]).array?.compactMap(\.string) == ["a", "b"])
        }
    }

    /// Scripts run under the SHA-1 Redis answered to SCRIPT LOAD, and are loaded again after
    /// the server's script cache is flushed (a restart): NOSCRIPT never reaches the caller.
    @Test func scriptsAreLoadedByTheServerAndReloadedAfterAFlush() async throws {
        try await RedisTestServer.with { server in
            let client = try RedisClient(configuration: server.unixConfiguration, logger: Logger(label: "test"))
            let script = RedisScript("test.echo", "return ARGV[1]")
            let first = try await client.evaluate(script, [([], [Array("a".utf8)]), ([], [Array("b".utf8)])])
            #expect(first == [.string(Array("a".utf8)), .string(Array("b".utf8))])
            let loaded = try await client.command([Array("SCRIPT".utf8), Array("LOAD".utf8), script.body])
            let exists = try await client.command([Array("SCRIPT".utf8), Array("EXISTS".utf8)] + [loaded.bytes ?? []])
            #expect(exists == .array([.integer(1)]), "the script is in the server's cache under the SHA-1 it answered")
            #expect(try await client.command("SCRIPT", "FLUSH") == .status("OK"))
            let again = try await client.evaluate(script, [([], [Array("c".utf8)])])
            #expect(again == [.string(Array("c".utf8))], "after a flush the script is loaded again")
        }
    }
}
