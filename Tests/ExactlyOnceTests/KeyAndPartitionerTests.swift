import ExactlyOnce
import ExactlyOnceTestKit
import Testing

@Suite struct IdempotencyKeyTests {
    @Test func couponKeyMatchesTheSeedFormat() throws {
        #expect(IdempotencyKey.coupon(couponId: 42, memberId: 1001).rawValue == "42:1001")
        #expect(try IdempotencyKey.coupon(couponId: "42", memberId: "1001").rawValue == "42:1001")
        #expect(try IdempotencyKey.orderEvent(orderId: "o-9", eventId: "paid").rawValue == "order:o-9:paid")
    }

    @Test func separatorsInsidePartsCannotCollide() throws {
        let a = try IdempotencyKey(parts: ["a:b", "c"])
        let b = try IdempotencyKey(parts: ["a", "b:c"])
        #expect(a != b)
        #expect(a.rawValue == "a%3Ab:c")
        #expect(b.rawValue == "a:b%3Ac")
        // An escaped-looking part cannot forge the escape of another part either.
        #expect(try IdempotencyKey(parts: ["a%3Ab", "c"]) != a)
        #expect(try IdempotencyKey(parts: ["x#y"]).rawValue == "x%23y")
    }

    @Test func emptyPartsAndControlCharactersAreRejected() {
        #expect(throws: ExactlyOnceError.self) { try IdempotencyKey(parts: []) }
        #expect(throws: ExactlyOnceError.self) { try IdempotencyKey(parts: ["a", ""]) }
        #expect(throws: ExactlyOnceError.self) { try IdempotencyKey(parts: ["a\u{0}b"]) }
        #expect(throws: ExactlyOnceError.self) { try IdempotencyKey.coupon(couponId: "", memberId: "1") }
        #expect(throws: ExactlyOnceError.self) { try IdempotencyKey(rawValue: "a::b") }
        #expect(throws: ExactlyOnceError.self) { try IdempotencyKey(rawValue: "") }
    }

    /// `init(rawValue:)` checks in one pass over the bytes; it accepts exactly what the
    /// definition (non-empty, at most 200 bytes, no control character, no empty part) accepts.
    @Test func rawValueValidationMatchesItsDefinition() {
        func reference(_ s: String) -> Bool {
            !s.isEmpty && s.utf8.count <= IdempotencyKey.maximumLength
                && !s.unicodeScalars.contains { $0.value < 0x20 || $0.value == 0x7F }
                && !s.split(separator: ":", omittingEmptySubsequences: false).contains { $0.isEmpty }
        }
        let alphabet: [String] = ["a", "1", ":", "é", "\u{1}", "\u{7F}", "%", "#", "😀", " "]
        var rng = SeededRandom(seed: 9)
        var cases = [":", "a:", ":a", "a::b", "a:b", "a", String(repeating: "x", count: 200), String(repeating: "x", count: 201)]
        for _ in 0..<5000 {
            let n = Int(rng.next() % 8)
            cases.append((0..<n).map { _ in alphabet[Int(rng.next() % UInt64(alphabet.count))] }.joined())
        }
        for c in cases {
            #expect(((try? IdempotencyKey(rawValue: c)) != nil) == reference(c), "\(c.debugDescription)")
        }
    }

    @Test func longKeysAreBoundedByAStableHash() throws {
        let long = String(repeating: "x", count: 1000)
        let k1 = try IdempotencyKey(parts: [long, "1"])
        let k2 = try IdempotencyKey(parts: [long, "2"])
        #expect(k1.rawValue.utf8.count <= IdempotencyKey.maximumLength)
        #expect(k1.isBounded)
        #expect(k1 != k2)
        #expect(try IdempotencyKey(parts: [long, "1"]) == k1)
        // Stable across processes: pinned value (SHA-256 based, not Hasher).
        #expect(k1.rawValue.hasSuffix("#" + SHA256Digest.hex(SHA256Digest.hash(Array((long + ":1").utf8)).prefix(16))))
        #expect(k1.rawValue == String(repeating: "x", count: 167) + "#7d96ea0a4e45d5cbebd7c51e437944fa", "pinned with hashlib")
        // A bounded key round-trips through its raw value.
        #expect(try IdempotencyKey(rawValue: k1.rawValue) == k1)
        // Multi-byte characters are not split.
        let emoji = try IdempotencyKey(parts: [String(repeating: "é", count: 300)])
        #expect(emoji.rawValue.utf8.count <= IdempotencyKey.maximumLength)
    }

    @Test func longKeysNeverAppearInFullInErrorsOrDescriptions() throws {
        let secretish = String(repeating: "s", count: 500)
        let k = try IdempotencyKey(parts: [secretish])
        #expect(k.description.utf8.count < 80)
        do {
            _ = try IdempotencyKey(rawValue: secretish + "\u{1}")
            Issue.record("should throw")
        } catch let e as ExactlyOnceError {
            #expect(!e.description.contains(secretish))
            #expect(e.code == .invalidKey)
        }
    }

    @Test func sha256KnownVectors() {
        #expect(SHA256Digest.hex(SHA256Digest.hash([UInt8]())) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(SHA256Digest.hex(SHA256Digest.hash(Array("abc".utf8))) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        let msg = Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)
        #expect(SHA256Digest.hex(SHA256Digest.hash(msg)) == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        // NIST FIPS 180-2 long messages: 896 bits, and one million "a".
        let long = Array("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu".utf8)
        #expect(SHA256Digest.hex(SHA256Digest.hash(long)) == "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1")
        #expect(SHA256Digest.hex(SHA256Digest.hash([UInt8](repeating: UInt8(ascii: "a"), count: 1_000_000))) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
        // Padding boundaries (55/56 bytes fit one or two blocks; 63/64/65 around a block), checked against Python's hashlib.
        let boundaries: [(Int, String)] = [
            (55, "d5e285683cd4efc02d021a5c62014694958901005d6f71e89e0989fac77e4072"),
            (56, "04c26261370ee7541549d16dee320c723e3fd14671e66a099afe0a377c16888e"),
            (63, "75220b47218278e656f2013bb8f0c455a25eaf01e86c64924e9d48d89776d6f2"),
            (64, "7ce100971f64e7001e8fe5a51973ecdfe1ced42befe7ee8d5fd6219506b5393c"),
            (65, "9537c5fdf120482f7d58d25e9ed583f52c02b4e304ea814db1633ad565aed7e9"),
            (119, "000b48d4edf0fa7bee3c6236ecd2785baa5db4eeb8bb54341b029e0d9fa5fb0c"),
            (120, "13f05a0b594787f5ecd315edc96141bd3243203d1b7d4f0836f37308b276ba98"),
        ]
        for (n, hex) in boundaries {
            #expect(SHA256Digest.hex(SHA256Digest.hash([UInt8](repeating: UInt8(ascii: "x"), count: n))) == hex, "\(n) bytes")
        }
    }

    /// Stored fingerprints and bounded keys are persisted by every durable store: their bytes
    /// must never change across versions (pinned values, computed independently with hashlib).
    @Test func storedFingerprintsKeepTheirBytes() throws {
        #expect(PayloadFingerprint.of(Array("42,1001".utf8)).bytes == [7] + Array("42,1001".utf8), "short payloads are their own fingerprint")
        #expect(PayloadFingerprint.of(Array("1234567890,1234567890".utf8)).description == "8e1a6fc9ee44484407ce1f6a23bc18f2")
        #expect(PayloadFingerprint.of(Array("coupon-payload-of-seventeen".utf8)).description == "f0e34f9f7fa1274e7673eae034667661")
        #expect(PayloadFingerprint.of(Array(repeating: UInt8(ascii: "x"), count: 15)).bytes.count == 16)
        #expect(PayloadFingerprint.of(Array(repeating: UInt8(ascii: "x"), count: 16)).description == "9c5729595fb287cc2a2256280448bbe7")
    }
}

@Suite struct PartitionerTests {
    /// Apache Kafka's `UtilsTest.testMurmur2` vectors (Java `int` results).
    @Test(arguments: [
        ("21", Int32(-973_932_308)), ("foobar", -790_332_482), ("a-little-bit-long-string", -985_981_536),
        ("a-little-bit-longer-string", -1_486_304_829), ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
        ("abc", 479_470_107),
    ])
    func murmur2MatchesKafkaJava(key: String, expected: Int32) {
        #expect(Int32(bitPattern: Murmur2Partitioner.murmur2(Array(key.utf8))) == expected)
    }

    /// librdkafka's `unittest_murmur2` vectors (checked there against the Java client).
    @Test(arguments: [
        ("kafka", UInt32(0xd067_cf64)), ("giberish123456789", 0x8f55_2b0c), ("1234", 0x9fc9_7b14), ("234", 0xe7c0_09ca),
        ("34", 0x8739_30da), ("4", 0x5a4b_5ca1), ("PreAmbleWillBeRemoved,ThePrePartThatIs", 0x7842_4f1c),
        ("reAmbleWillBeRemoved,ThePrePartThatIs", 0x4a62_b377), ("eAmbleWillBeRemoved,ThePrePartThatIs", 0xe0e4_e09e),
        ("AmbleWillBeRemoved,ThePrePartThatIs", 0x62b8_b43f), ("", 0x106e_08d9),
    ])
    func murmur2MatchesLibrdkafka(key: String, expected: UInt32) {
        #expect(Murmur2Partitioner.murmur2(Array(key.utf8)) == expected)
    }

    @Test func murmur2PartitionIsToPositiveModCount() throws {
        // Java: Utils.toPositive(murmur2(key)) % numPartitions.
        let p = Murmur2Partitioner()
        let h = UInt32(bitPattern: -973_932_308) & 0x7fff_ffff
        #expect(try p.partition(forKey: Array("21".utf8), partitionCount: 7) == PartitionID(Int(h % 7)))
        #expect(try p.partition(forKey: Array("kafka".utf8), partitionCount: 1) == 0)
        // Works on slices that do not start at index 0.
        let bytes = Array("xx1234".utf8)
        #expect(Murmur2Partitioner.murmur2(bytes[2...]) == 0x9fc9_7b14)
        #expect(throws: ExactlyOnceError.self) { try p.partition(forKey: [1], partitionCount: 0) }
    }

    @Test func moduloIsCouponIdModPartitions() throws {
        let p = ModuloPartitioner()
        #expect(try p.partition(forId: 10, partitionCount: 3) == 1)
        #expect(try p.partition(forKey: Array("11".utf8), partitionCount: 3) == 2)
        #expect(try p.partition(forId: 0, partitionCount: 3) == 0)
        #expect(throws: ExactlyOnceError.self) { try p.partition(forId: -1, partitionCount: 3) }
        #expect(throws: ExactlyOnceError.self) { try p.partition(forKey: Array("-4".utf8), partitionCount: 3) }
        #expect(throws: ExactlyOnceError.self) { try p.partition(forId: 1, partitionCount: 0) }
        #expect(throws: ExactlyOnceError.self) { try p.partition(forKey: Array("abc".utf8), partitionCount: 3) }
        #expect(throws: ExactlyOnceError.self) { try p.partition(forKey: [], partitionCount: 3) }
        #expect(throws: ExactlyOnceError.self) { try p.partition(forKey: Array("99999999999999999999999".utf8), partitionCount: 3) }
    }

    @Test func explicitPartitionIsValidated() throws {
        #expect(try Partitioning.explicit(2).resolve(key: nil, partitionCount: 3) == 2)
        #expect(throws: ExactlyOnceError.self) { try Partitioning.explicit(3).resolve(key: nil, partitionCount: 3) }
        #expect(throws: ExactlyOnceError.self) { try Partitioning.explicit(-1).resolve(key: nil, partitionCount: 3) }
        #expect(throws: ExactlyOnceError.self) { try Partitioning.murmur2.resolve(key: nil, partitionCount: 3) }
    }
}
