import ExactlyOnce
import Foundation
import Logging
import Synchronization
import TestSupport
import Testing
@testable import ExactlyOnceRedis

#if canImport(Glibc)
import Glibc
#endif

/// A TCP listener on a free port that plays a hostile "Redis": every connection it accepts is
/// served by `behaviour` on its own thread, until the peer goes away or the server stops.
final class HostileServer: Sendable {
    let port: Int
    private let listener: Int32
    private let stopped = Atomic<Bool>(false)
    /// Bytes the server managed to hand to the kernel, over all connections.
    let bytesSent = Atomic<Int>(0)

    /// What the server does with one accepted connection.
    enum Behaviour: Sendable {
        /// Reads and never answers.
        case silent
        /// Answers with `prefix`, then streams `filler` as fast as the client takes it, forever.
        case stream(prefix: [UInt8], filler: [UInt8])
        /// Answers with `prefix`, then one byte of `filler` every `interval`, forever.
        case trickle(prefix: [UInt8], filler: UInt8, interval: Duration)
    }

    init(_ behaviour: Behaviour) throws {
        (listener, port) = try LocalSockets.tcpSocket(listening: 16)
        start(behaviour)
    }

    private func start(_ behaviour: Behaviour) {
        let lfd = self.listener
        let thread = Thread { [self] in
            while !stopped.load(ordering: .relaxed) {
                var pfd = pollfd(fd: lfd, events: Int16(POLLIN), revents: 0)
                guard poll(&pfd, 1, 50) > 0 else { continue }
                let fd = accept(lfd, nil, nil)
                guard fd >= 0 else { continue }
                let serve = Thread { [self] in
                    self.serve(fd, behaviour)
                    close(fd)
                }
                serve.start()
            }
            close(lfd)
        }
        thread.start()
    }

    func stop() { stopped.store(true, ordering: .relaxed) }

    private func serve(_ fd: Int32, _ behaviour: Behaviour) {
        var scratch = [UInt8](repeating: 0, count: 4096)
        // Wait for the first command (so the client is past its connect step).
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while !stopped.load(ordering: .relaxed) {
            if poll(&pfd, 1, 50) > 0 { break }
        }
        guard read(fd, &scratch, scratch.count) > 0 else { return }
        func send(_ bytes: [UInt8]) -> Bool {
            var off = 0
            while off < bytes.count {
                let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + off, $0.count - off, Int32(MSG_NOSIGNAL)) }
                if n <= 0 { return false }
                off += n
                bytesSent.wrappingAdd(n, ordering: .relaxed)
            }
            return true
        }
        switch behaviour {
        case .silent:
            while !stopped.load(ordering: .relaxed) {
                if poll(&pfd, 1, 50) > 0 && read(fd, &scratch, scratch.count) <= 0 { return }
            }
        case .stream(let prefix, let filler):
            guard send(prefix) else { return }
            var block: [UInt8] = []
            while block.count < 64 * 1024 { block += filler }
            while !stopped.load(ordering: .relaxed) { if !send(block) { return } }
        case .trickle(let prefix, let filler, let interval):
            guard send(prefix) else { return }
            while !stopped.load(ordering: .relaxed) {
                if !send([filler]) { return }
                Thread.sleep(forTimeInterval: Double(interval.components.seconds) + Double(interval.components.attoseconds) / 1e18)
            }
        }
    }
}

@Suite("Redis client against hostile servers")
struct RedisHostileServerTests {
    static func configuration(port: Int, timeout: Duration = .seconds(1)) -> RedisConfiguration {
        var c = RedisConfiguration()
        c.endpoint = .tcp(host: "127.0.0.1", port: port)
        c.commandTimeout = timeout
        c.connectAttempts = 1
        return c
    }

    /// Runs one command against `behaviour` on a bare connection: the error, the time it took
    /// and how many bytes the connection read (its reader never holds more).
    static func run(_ behaviour: HostileServer.Behaviour, configure: (inout RedisConfiguration) -> Void = { _ in })
        throws -> (error: ExactlyOnceError?, elapsed: Duration, bytesRead: Int, serverSent: Int)
    {
        let server = try HostileServer(behaviour)
        defer { server.stop() }
        var c = configuration(port: server.port)
        configure(&c)
        let connection = try RedisConnection.connect(c)
        let clock = ContinuousClock()
        let start = clock.now
        var error: ExactlyOnceError?
        do {
            _ = try connection.command([Array("GET".utf8), Array("k".utf8)])
        } catch let e as ExactlyOnceError {
            error = e
        }
        return (error, clock.now - start, connection.bytesRead, server.bytesSent.load(ordering: .relaxed))
    }

    /// `$999999999999` and then bytes forever: refused at the header, before its body is read.
    @Test func absurdBulkLengthIsRefusedAtTheHeader() throws {
        let r = try Self.run(.stream(prefix: Array("$999999999999\r\n".utf8), filler: Array("x".utf8)))
        #expect(r.error?.code == .storeUnavailable)
        #expect(r.error.map { "\($0)".contains("maxReplyBytes") } == true)
        #expect(r.elapsed < .seconds(5))
        #expect(r.bytesRead < 1 << 20, "read \(r.bytesRead) bytes of an endless stream")
    }

    /// A bulk length within Redis's own range but above the configured limit: refused too.
    @Test func bulkLengthAboveTheConfiguredLimitIsRefused() throws {
        let r = try Self.run(.stream(prefix: Array("$5000000\r\n".utf8), filler: Array("y".utf8))) { $0.maxReplyBytes = 1 << 20 }
        #expect(r.error?.code == .storeUnavailable)
        #expect(r.bytesRead < 2 << 20)
    }

    /// A huge array header, and an endless stream of small elements inside allowed headers:
    /// bounded by the size limit.
    @Test func arraysAreBoundedBySizeAndCount() throws {
        let huge = try Self.run(.stream(prefix: Array("*9223372036854775807\r\n".utf8), filler: Array(":1\r\n".utf8)))
        #expect(huge.error?.code == .storeUnavailable)
        #expect(huge.bytesRead < 1 << 20)
        // An array header within the limit whose elements then outgrow it.
        let element = Array("$1000\r\n".utf8) + Array(repeating: UInt8(ascii: "z"), count: 1000) + Array("\r\n".utf8)
        let wide = try Self.run(.stream(prefix: Array("*100000\r\n".utf8), filler: element)) {
            $0.maxReplyBytes = 4 << 20
            // Long enough that the size limit, not the deadline, ends it on a loaded machine.
            $0.commandTimeout = .seconds(30)
        }
        #expect(wide.error?.code == .storeUnavailable)
        #expect(wide.error.map { "\($0)".contains("maxReplyBytes") } == true)
        #expect(wide.bytesRead < 8 << 20, "read \(wide.bytesRead) bytes")
    }

    /// `*1\r\n*1\r\n...` forever: refused at the depth limit.
    @Test func absurdNestingIsRefused() throws {
        let r = try Self.run(.stream(prefix: [], filler: Array("*1\r\n".utf8)))
        #expect(r.error?.code == .storeUnavailable)
        #expect(r.error.map { "\($0)".contains("maxReplyDepth") } == true)
        #expect(r.elapsed < .seconds(5))
        #expect(r.bytesRead < 1 << 20)
    }

    /// A status line that never ends: refused at the line limit.
    @Test func endlessLineIsRefused() throws {
        let r = try Self.run(.stream(prefix: Array("+".utf8), filler: Array("a".utf8)))
        #expect(r.error?.code == .storeUnavailable)
        #expect(r.bytesRead < 2 << 20 + 128 * 1024)
    }

    /// Accepts and never answers: an error once the command timeout passed, not later.
    @Test func silentServerTimesOutWithinTheCommandTimeout() throws {
        let r = try Self.run(.silent)
        #expect(r.error?.code == .storeUnavailable)
        #expect(r.error.map { "\($0)".contains("commandTimeout") } == true)
        #expect(r.elapsed >= .milliseconds(900))
        // Generous for a loaded machine; the point is that it ends near the timeout.
        #expect(r.elapsed < .seconds(8))
    }

    /// One byte every 100 ms keeps the connection busy forever, but the deadline counts from
    /// the request, not from the last byte.
    @Test func tricklingServerTimesOutWithinTheCommandTimeout() throws {
        for prefix in ["$1000\r\n", "+", "*3\r\n:1\r\n"] {
            let r = try Self.run(.trickle(prefix: Array(prefix.utf8), filler: UInt8(ascii: "1"), interval: .milliseconds(100)))
            #expect(r.error?.code == .storeUnavailable, "\(prefix)")
            // Without a deadline from the request this never ends (a byte every 100 ms).
            #expect(r.elapsed < .seconds(8), "\(prefix): \(r.elapsed)")
            #expect(r.bytesRead < 64)
        }
    }

    /// The store and the transport, not only the connection: a silent server is
    /// `storeUnavailable` / `transportUnavailable` within the configured timeout.
    @Test func storeAndTransportGiveUpInBoundedTime() async throws {
        let server = try HostileServer(.silent)
        defer { server.stop() }
        let c = Self.configuration(port: server.port)
        let clock = ContinuousClock()
        var start = clock.now
        let store = try RedisDedupeStore(configuration: .init(redis: c))
        let key = try IdempotencyKey(parts: ["c", "1"])
        let storeError = await #expect(throws: ExactlyOnceError.self) {
            _ = try await store.claim([ClaimRequest(key: key, fingerprint: .of([1]), lease: .seconds(5))])
        }
        #expect(storeError?.code == .storeUnavailable)
        // A 1 s timeout; generous bounds for a loaded machine (the demo took 103 s before).
        #expect(clock.now - start < .seconds(15))
        start = clock.now
        let transport = try RedisStreamsTransport(configuration: .init(redis: c))
        let transportError = await #expect(throws: ExactlyOnceError.self) { _ = try await transport.partitionCount(of: "t") }
        #expect(transportError?.code == .transportUnavailable)
        #expect(clock.now - start < .seconds(15))
    }

    /// The demo against a server that accepts and never answers (the adversarial run saw 103 s
    /// before an error): a clear error naming the endpoint, exit status 1, in a few seconds.
    @Test func theDemoAgainstASilentServerFailsClearlyInBoundedTime() async throws {
        let server = try HostileServer(.silent)
        defer { server.stop() }
        let start = ContinuousClock.now
        let r = try await ChildProcess.run(ChildProcess.builtProduct("coupon-demo"), [
            "--store", "redis", "--transport", "redis-streams", "--redis-url", "redis://127.0.0.1:\(server.port)",
            "--requests", "100", "--json",
        ])
        let elapsed = ContinuousClock.now - start
        #expect(r.status == 1, "\(r.out) \(r.err)")
        #expect(r.err.contains("127.0.0.1:\(server.port)"), "the error names the endpoint: \(r.err)")
        #expect(elapsed < .seconds(30), "gave up after \(elapsed) (a few seconds expected on an idle machine)")
    }

    @Test func replyLimitsAreValidated() {
        var c = RedisConfiguration()
        c.maxReplyBytes = 10
        #expect(throws: ExactlyOnceError.self) { try c.validate() }
        c = RedisConfiguration()
        c.maxReplyDepth = 0
        #expect(throws: ExactlyOnceError.self) { try c.validate() }
    }
}
