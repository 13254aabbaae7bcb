import ExactlyOnce
import ExactlyOnceTestKit
import Testing
@testable import ExactlyOnceRedis

/// Random reply trees, biased towards the tags and shapes the scripts really answer, so the
/// decoders' deeper branches are reached, not only their first shape check.
struct ReplyGenerator {
    var rng: SeededRandom
    static let words = ["N", "D", "P", "C", "FENCED", "OK", "REPEAT", "CONFLICT", "epoch", "missing", "superseded",
                        "released", "expired", "completed", "1", "0", "", "-1", "3", "2", "256", "18446744073709551615",
                        "18446744073709551616", "9223372036854775807", "-9223372036854775808", "x", "1e3", " 1"]

    mutating func leaf() -> RedisReply {
        switch Int.random(in: 0..<7, using: &rng) {
        case 0, 1: return .string(Array(Self.words.randomElement(using: &rng)!.utf8))
        case 2: return .string((0..<Int.random(in: 0..<80, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) })
        case 3: return .integer([0, 1, 2, 3, -1, .max, .min, Int64.random(in: -1000...1000, using: &rng)].randomElement(using: &rng)!)
        case 4: return .null
        case 5: return .status(Self.words.randomElement(using: &rng)!)
        default: return .error(["NOSCRIPT No matching script", "ERR x", "OOM command not allowed", ""].randomElement(using: &rng)!)
        }
    }

    mutating func tree(depth: Int) -> RedisReply {
        if depth == 0 || Int.random(in: 0..<3, using: &rng) == 0 { return leaf() }
        let n = [0, 1, 2, 3, 3, 5, 11, Int.random(in: 0..<14, using: &rng)].randomElement(using: &rng)!
        return .array((0..<n).map { _ in tree(depth: depth - 1) })
    }
}

@Suite("Redis reply decoding fuzz")
struct RedisReplyFuzzTests {
    static func request(_ i: Int, fenced: Bool) throws -> ClaimRequest {
        ClaimRequest(key: try IdempotencyKey(parts: ["c", "\(i)"]), fingerprint: .of([UInt8(i)]), lease: .seconds(5),
                     fence: fenced ? PartitionFence(scope: "g/t/0", epoch: 3) : nil)
    }

    /// Every decoder either returns a well-formed value or throws `ExactlyOnceError`; none traps.
    @Test func randomReplyTreesNeverCrashTheDecoders() throws {
        var gen = ReplyGenerator(rng: SeededRandom(seed: 0xE0_0001))
        let key = try IdempotencyKey(parts: ["c", "m"])
        let claim = Claim(key: key, token: FencingToken(7), attempt: 1, leaseExpiresAt: Timestamp(milliseconds: 10),
                          fingerprint: .of([1]), fence: PartitionFence(scope: "s", epoch: 2))
        var decoded = 0
        var refused = 0
        func check(_ body: () throws -> Void) {
            do {
                try body()
                decoded += 1
            } catch is ExactlyOnceError {
                refused += 1
            } catch {
                Issue.record("a decoder threw a foreign error: \(error)")
            }
        }
        for iteration in 0..<6000 {
            let reply = gen.tree(depth: 4)
            let count = iteration % 4
            let requests = try (0..<count).map { try Self.request($0, fenced: iteration % 2 == 0) }
            check {
                let results = try RedisDedupeStore.decodeClaims(reply, requests: requests, now: Timestamp(milliseconds: 0))
                #expect(results.count == requests.count)
                for case .new(let c) in results { #expect(c.attempt >= 1) }
            }
            check {
                let n = 1 + iteration % 3
                let batch = try RedisDedupeStore.decodeCompletions(reply, Array(repeating: claim, count: n),
                                                                   readKeys: Array(repeating: ["a", "b"], count: n))
                #expect(batch.applied <= n)
                #expect((batch.failure == nil) == (batch.applied == n))
            }
            check { _ = try RedisDedupeStore.decodeStep(reply, claim: claim, readKeys: ["a"]) }
            check { _ = try RedisDedupeStore.decodeState(reply) }
            check {
                if let r = try RedisDedupeStore.decodeRecord(reply, key: key) {
                    #expect((1...64).contains(r.fingerprint.bytes.count))
                    #expect(r.attempts >= 0)
                }
            }
        }
        // The generator must reach both outcomes, or the fuzz exercises nothing.
        #expect(decoded > 100)
        #expect(refused > 1000)
    }

    /// Replies shaped like the scripts' real answers decode to exactly the right values.
    @Test func wellFormedRepliesDecode() throws {
        let requests = try (0..<4).map { try Self.request($0, fenced: true) }
        let s = { (t: String) in RedisReply.string(Array(t.utf8)) }
        let reply = RedisReply.array([
            .array([s("N"), .integer(42), .integer(2)]),
            .array([s("D"), s("1"), s("sold out")]),
            .array([s("P"), s("123456")]),
            .array([s("C"), .string([9, 9]), s("1"), s("0"), s("serial-7")]),
        ])
        let results = try RedisDedupeStore.decodeClaims(reply, requests: requests, now: Timestamp(milliseconds: 1000))
        #expect(results[0] == .new(Claim(key: requests[0].key, token: FencingToken(42), attempt: 2,
                                         leaseExpiresAt: Timestamp(milliseconds: 6000), fingerprint: requests[0].fingerprint,
                                         fence: requests[0].fence)))
        #expect(results[1] == .completed(.rejected("sold out")))
        #expect(results[2] == .inProgress(leaseExpiresAt: Timestamp(milliseconds: 123456)))
        #expect(results[3] == .conflict(stored: try PayloadFingerprint(bytes: [9, 9]), outcome: .applied("serial-7")))

        let fenced = RedisReply.array([s("FENCED"), .integer(2), s("9")])
        let error = #expect(throws: ExactlyOnceError.self) {
            try RedisDedupeStore.decodeClaims(fenced, requests: requests, now: Timestamp(milliseconds: 0))
        }
        #expect(error?.code == .fenced)

        // A well-formed answer for the wrong number of requests is refused, not truncated.
        #expect(throws: ExactlyOnceError.self) {
            try RedisDedupeStore.decodeClaims(.array([.array([s("P"), s("1")])]), requests: requests, now: Timestamp(milliseconds: 0))
        }
        // An error reply (for example OOM) is storeUnavailable: retriable, outcome unknown.
        let oom = #expect(throws: ExactlyOnceError.self) {
            try RedisDedupeStore.decodeClaims(.error("OOM command not allowed"), requests: requests, now: Timestamp(milliseconds: 0))
        }
        #expect(oom?.code == .storeUnavailable)
    }
}

/// The wire encoding of a reply tree (what a server sends).
func encodeRESP(_ reply: RedisReply, into out: inout [UInt8]) {
    func line(_ type: Character, _ text: String) { out += Array("\(type)\(text)\r\n".utf8) }
    switch reply {
    case .string(let b):
        line("$", "\(b.count)")
        out += b
        out += [13, 10]
    case .status(let s): line("+", s)
    case .error(let s): line("-", s)
    case .integer(let i): line(":", "\(i)")
    case .null: line("$", "-1")
    case .array(let items):
        line("*", "\(items.count)")
        for i in items { encodeRESP(i, into: &out) }
    }
}

@Suite("RESP reader fuzz (raw bytes)")
struct RESPReaderFuzzTests {
    static let limits = RESPLimits(maxReplyBytes: 1 << 20, maxDepth: 8, maxLineBytes: 4096)

    /// Feeds `bytes` in random chunks; returns the replies read and whether the reader refused.
    static func read(_ bytes: [UInt8], limits: RESPLimits = limits, rng: inout SeededRandom) -> (replies: [RedisReply], refused: RESPError?) {
        var reader = RESPReader(limits: limits)
        var replies: [RedisReply] = []
        var i = 0
        while i < bytes.count {
            let n = min(bytes.count - i, [1, 2, 7, 64, 1000, Int.random(in: 1...5000, using: &rng)].randomElement(using: &rng)!)
            reader.feed(Array(bytes[i..<(i + n)]))
            i += n
            do {
                while let r = try reader.next() { replies.append(r) }
            } catch {
                return (replies, error)
            }
        }
        return (replies, nil)
    }

    /// Well-formed replies, in any chunking, decode to exactly the tree that was sent (no
    /// value (status and error texts are valid UTF-8 without CR/LF)).
    @Test func wellFormedBytesRoundTripInAnyChunking() {
        var gen = ReplyGenerator(rng: SeededRandom(seed: 0xE0_0002))
        var rng = SeededRandom(seed: 7)
        for _ in 0..<1500 {
            let trees = (0..<Int.random(in: 1...4, using: &gen.rng)).map { _ in gen.tree(depth: 5) }
            var bytes: [UInt8] = []
            for t in trees { encodeRESP(t, into: &bytes) }
            let r = Self.read(bytes, rng: &rng)
            #expect(r.refused == nil)
            #expect(r.replies == trees)
        }
    }

    /// Random bytes, damaged encodings, and headers announcing lengths beyond memory: the
    /// reader returns values or refuses with `RESPError`; it never traps, never hangs, and never
    /// holds more than the limits allow.
    @Test func randomAndDamagedBytesNeverTrapOrOverflow() {
        var gen = ReplyGenerator(rng: SeededRandom(seed: 0xE0_0003))
        var rng = SeededRandom(seed: 11)
        let absurd = ["$999999999999\r\n", "*999999999999\r\n", "$9223372036854775807\r\n", "*9223372036854775807\r\n",
                      "$99999999999999999999999\r\n", "$-2\r\n", "*-5\r\n", "$1048577\r\n", "*30000\r\n", ":1x\r\n",
                      ":-\r\n", "$\r\n", "*\r\n", "\r\n", "?\r\n"]
        var refused = 0
        var decoded = 0
        for iteration in 0..<4000 {
            var bytes: [UInt8] = []
            switch iteration % 4 {
            case 0:
                bytes = (0..<Int.random(in: 0..<300, using: &rng)).map { _ in
                    [UInt8(ascii: "*"), UInt8(ascii: "$"), UInt8(ascii: ":"), UInt8(ascii: "+"), 13, 10, UInt8(ascii: "1"), UInt8(ascii: "-"),
                     UInt8.random(in: 0...255, using: &rng)].randomElement(using: &rng)!
                }
            case 1:
                encodeRESP(gen.tree(depth: 5), into: &bytes)
                for _ in 0..<Int.random(in: 1...4, using: &rng) where !bytes.isEmpty {
                    bytes[Int.random(in: 0..<bytes.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                }
            case 2:
                encodeRESP(gen.tree(depth: 3), into: &bytes)
                bytes = Array(bytes.prefix(Int.random(in: 0...bytes.count, using: &rng))) + Array(absurd.randomElement(using: &rng)!.utf8)
                bytes += (0..<Int.random(in: 0..<2000, using: &rng)).map { _ in UInt8(ascii: "x") }
            default:
                // Deep nesting, or an array wider than the limit allows.
                bytes = Array(repeating: Array("*1\r\n".utf8), count: Int.random(in: 1...40, using: &rng)).flatMap { $0 } + Array(":1\r\n".utf8)
            }
            let r = Self.read(bytes, rng: &rng)
            if r.refused != nil { refused += 1 } else { decoded += 1 }
            for reply in r.replies { #expect(Self.depth(reply) <= Self.limits.maxDepth) }
        }
        #expect(refused > 500)
        #expect(decoded > 500)
    }

    /// A body beyond the limit is never buffered: the refusal comes with the header.
    @Test func lengthsBeyondMemoryAreRefusedAtTheHeader() {
        for header in ["$999999999999\r\n", "*999999999999\r\n", "$1048577\r\n", "*40000\r\n", "$9223372036854775807\r\n"] {
            var reader = RESPReader(limits: Self.limits)
            reader.feed(Array(header.utf8))
            #expect(throws: RESPError.self, "\(header)") { _ = try reader.next() }
        }
        var reader = RESPReader(limits: Self.limits)
        reader.feed(Array("$99999999999999999999\r\n".utf8))
        #expect(throws: RESPError.malformed("bad integer")) { _ = try reader.next() }
    }

    static func depth(_ r: RedisReply) -> Int {
        if case .array(let items) = r { return 1 + (items.map(depth).max() ?? 0) }
        return 0
    }
}
