import CouponKit
import ExactlyOnce
import ExactlyOnceTestKit
import Foundation
import Logging
import Synchronization
import TestSupport
import Testing
@testable import ExactlyOnceRedis

#if canImport(Glibc)
import Glibc
#endif

/// A TCP proxy in front of a Redis server that damages replies in place: in a seeded share of
/// the chunks it forwards from the server, one ASCII digit becomes another digit (an ID, an
/// offset, a count, a length header: whatever the digit belonged to). Requests pass untouched.
final class CorruptingProxy: Sendable {
    let port: Int
    private let listener: Int32
    private let stopped = Atomic<Bool>(false)
    /// Chunks damaged so far.
    let corrupted = Atomic<Int>(0)
    /// Chunks forwarded from the server so far.
    let forwarded = Atomic<Int>(0)

    init(upstreamPort: Int, rate: Double, seed: UInt64) throws {
        (listener, port) = try LocalSockets.tcpSocket(listening: 64)
        start(upstreamPort: upstreamPort, rate: rate, seed: seed)
    }

    func stop() { stopped.store(true, ordering: .relaxed) }

    private func start(upstreamPort: Int, rate: Double, seed: UInt64) {
        let lfd = listener
        Thread { [self] in
            var connection: UInt64 = 0
            while !stopped.load(ordering: .relaxed) {
                var pfd = pollfd(fd: lfd, events: Int16(POLLIN), revents: 0)
                guard poll(&pfd, 1, 50) > 0 else { continue }
                let client = accept(lfd, nil, nil)
                guard client >= 0 else { continue }
                let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
                var up = sockaddr_in()
                up.sin_family = sa_family_t(AF_INET)
                up.sin_addr.s_addr = inet_addr("127.0.0.1")
                up.sin_port = UInt16(upstreamPort).bigEndian
                let connected = withUnsafeMutablePointer(to: &up) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(server, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
                }
                guard connected else {
                    close(client)
                    close(server)
                    continue
                }
                connection += 1
                let s = seed &+ connection &* 0x9E37_79B9
                Thread { [self] in self.pump(client, server, damage: 0, seed: s) }.start()
                Thread { [self] in
                    self.pump(server, client, damage: rate, seed: s)
                    shutdown(client, Int32(SHUT_RDWR))
                    shutdown(server, Int32(SHUT_RDWR))
                    close(client)
                    close(server)
                }.start()
            }
            close(lfd)
        }.start()
    }

    private func pump(_ from: Int32, _ to: Int32, damage rate: Double, seed: UInt64) {
        var rng = SeededRandom(seed: seed)
        var buffer = [UInt8](repeating: 0, count: 16 * 1024)
        while !stopped.load(ordering: .relaxed) {
            var pfd = pollfd(fd: from, events: Int16(POLLIN), revents: 0)
            guard poll(&pfd, 1, 50) > 0 else { continue }
            let n = read(from, &buffer, buffer.count)
            if n <= 0 { break }
            if rate > 0 {
                forwarded.wrappingAdd(1, ordering: .relaxed)
                if Double.random(in: 0..<1, using: &rng) < rate {
                    let digits = (0..<n).filter { buffer[$0] >= 48 && buffer[$0] <= 57 }
                    if let i = digits.randomElement(using: &rng) {
                        buffer[i] = 48 + (buffer[i] - 48 + UInt8.random(in: 1...9, using: &rng)) % 10
                        corrupted.wrappingAdd(1, ordering: .relaxed)
                    }
                }
            }
            var off = 0
            while off < n {
                let w = buffer.withUnsafeBytes { send(to, $0.baseAddress! + off, n - off, Int32(MSG_NOSIGNAL)) }
                if w <= 0 { return }
                off += w
            }
        }
    }
}

/// Issue 9.8: whatever the transport reads back is validated before it moves a read position.
/// A seeded flash sale whose transport talks to Redis through ``CorruptingProxy`` (5% of the
/// chunks from the server damaged) loses nothing and issues nothing twice; damaged answers cost
/// retries. The dedupe store talks to Redis directly (its replies are the store's own
/// concern), and so does the audit.
@Suite("Redis Streams through a corrupting proxy", .serialized, .timeLimit(.minutes(3)))
struct RedisCorruptingProxyTests {
    @Test func flashSaleThroughACorruptingProxyLosesAndDoublesNothing() async throws {
        try await RedisTestServer.with(tcp: true) { server in
            let proxy = try CorruptingProxy(upstreamPort: server.tcpPort!, rate: 0.05, seed: 0x9_8)
            defer { proxy.stop() }
            var redis = RedisConfiguration()
            redis.endpoint = .tcp(host: "127.0.0.1", port: proxy.port)
            redis.commandTimeout = .milliseconds(500)
            redis.connectAttempts = 5
            var tc = RedisStreamsTransport.Configuration(redis: redis)
            tc.keyPrefix = "proxy-streams:"
            tc.sessionTimeout = .seconds(2)
            let transport = try RedisStreamsTransport(configuration: tc)
            func retry<T>(_ body: () async throws -> T) async throws -> T {
                for _ in 0..<200 {
                    do { return try await body() } catch let e as ExactlyOnceError where e.isRetriable { continue }
                }
                return try await body()
            }
            try await retry { try await transport.createTopic("coupons", partitions: 3) }
            try await retry { try await transport.createTopic("coupons.dlq", partitions: 1) }
            var sc = RedisDedupeStore.Configuration(redis: server.unixConfiguration)
            sc.keyPrefix = "proxy-store:"
            let store = try RedisDedupeStore(configuration: sc)

            let stock: [Int64: Int64] = [1: 20, 2: 40, 3: 80]
            var requests: [CouponRequest] = []
            var rng = SeededRandom(seed: 98)
            for i in 0..<2000 {
                if i > 10, Int.random(in: 0..<10, using: &rng) < 3 {
                    requests.append(requests[Int.random(in: 0..<requests.count, using: &rng)])  // 30% repeats
                } else {
                    requests.append(CouponRequest(requestId: Int64(i), couponId: Int64.random(in: 1...3, using: &rng), memberId: Int64.random(in: 1...200, using: &rng)))
                }
            }
            // Publish in batches; what is not confirmed is published again, in order (a
            // repeat of a record that did land is harmless: the dedupe store answers it).
            var publishRetries = 0
            for start in stride(from: 0, to: requests.count, by: 20) {
                var pending = requests[start..<min(requests.count, start + 20)].map(\.outgoing)
                while !pending.isEmpty {
                    do {
                        let report = try await transport.publish(pending, to: "coupons", partitioning: .modulo)
                        pending = zip(pending, report.positions).filter { $0.1 == nil }.map(\.0)
                        if !pending.isEmpty { publishRetries += 1 }
                    } catch let e as ExactlyOnceError where e.isRetriable {
                        publishRetries += 1
                    }
                }
            }

            func consumer(_ member: String) throws -> ExactlyOnceConsumer<RedisStreamsTransport, RedisDedupeStore> {
                var c = ConsumerConfiguration(topic: "coupons", group: "g", memberID: member)
                c.retryBackoff = .none
                c.unavailableBackoff = .none
                c.pollWait = .milliseconds(20)
                // Small polls: many round trips, so many damaged replies.
                c.maxPollRecords = 8
                return try ExactlyOnceConsumer(transport: transport, store: store, configuration: c,
                                               logger: Logger(label: "proxy", factory: { _ in SwiftLogNoOpLogHandler() }),
                                               key: CouponRequest.keyExtractor, handler: CouponIssuer(stock: stock).handler)
            }
            var sessions: [ConsumerSession<RedisStreamsTransport, RedisDedupeStore>] = []
            for m in ["a", "b"] { sessions.append(try await retry { try await consumer(m).makeSession() }) }
            var failedSteps = 0
            let clock = ContinuousClock()
            let deadline = clock.now.advanced(by: .seconds(120))
            // Finished is decided on the server directly, not through the proxy.
            var directConfig = RedisStreamsTransport.Configuration(redis: server.unixConfiguration)
            directConfig.keyPrefix = tc.keyPrefix
            let direct = try RedisStreamsTransport(configuration: directConfig)
            while try await !direct.isFullyCommitted(group: "g", topic: "coupons"), clock.now < deadline {
                for s in sessions {
                    do {
                        _ = try await s.step()
                    } catch let e as ExactlyOnceError where e.isRetriable || e.code == .staleGeneration {
                        failedSteps += 1
                    }
                }
            }
            #expect(try await direct.isFullyCommitted(group: "g", topic: "coupons"))
            #expect(proxy.corrupted.load(ordering: .relaxed) > 10, "the proxy damaged \(proxy.corrupted.load(ordering: .relaxed)) of \(proxy.forwarded.load(ordering: .relaxed)) chunks")

            // The audit, from the ledger read back from Redis directly and the requests.
            let ledger = try await CouponLedger.read(from: store, coupons: Array(stock.keys))
            var firstOccurrence: [Int64] = []
            var seen = Set<Int64>()
            for r in requests where seen.insert(r.requestId).inserted { firstOccurrence.append(r.requestId) }
            let unique = firstOccurrence.map { id in requests.first { $0.requestId == id }! }
            for (coupon, limit) in stock {
                let issued = ledger.filter { $0.couponId == coupon }
                let firstMembers = unique.filter { $0.couponId == coupon }.map(\.memberId).reduce(into: [Int64]()) { if !$0.contains($1) { $0.append($1) } }
                #expect(issued.count == min(Int(limit), firstMembers.count), "coupon \(coupon): over- or under-issued (lost or doubled)")
                #expect(Set(issued.map(\.memberId)).count == issued.count, "coupon \(coupon) issued twice to one member")
                #expect(Set(issued.map(\.memberId)) == Set(firstMembers.prefix(Int(limit))), "coupon \(coupon): not first come, first served")
            }
            // No record lost anywhere in the sale (not only among the winners): every distinct
            // key published has a completed record in the store, with an outcome.
            let keys = Array(Set(requests.map(\.key)))
            var finished = 0
            for start in stride(from: 0, to: keys.count, by: 256) {
                let chunk = Array(keys[start..<min(keys.count, start + 256)])
                let records = try await store.records(for: chunk)
                for key in chunk {
                    let record = records[key]
                    #expect(record?.phase == .completed && record?.outcome != nil, "\(key) was published but never finished: \(String(describing: record))")
                    if record?.phase == .completed { finished += 1 }
                }
            }
            #expect(finished == keys.count)
            print("corrupting proxy: \(proxy.corrupted.load(ordering: .relaxed)) of \(proxy.forwarded.load(ordering: .relaxed)) chunks damaged, \(publishRetries) publish retries, \(failedSteps) failed steps")
        }
    }
}
