/// The identity of an effect: two records with the same key must have their effect at most once.
///
/// Keys are built from parts joined by `:`, as in the flash-sale design (`couponId:memberId`).
/// Each part is escaped (`%` → `%25`, `:` → `%3A`, `#` → `%23`) so a separator inside a part can
/// never make two different part lists produce one key: `["a:b", "c"]` and `["a", "b:c"]` give
/// `a%3Ab:c` and `a:b%3Ac`. Empty parts and control characters are rejected.
///
/// Keys longer than ``maximumLength`` bytes are bounded: the first bytes are kept and the rest is
/// replaced by `#` and 32 hex digits of the SHA-256 of the full key, so the bounded form is stable
/// across processes and versions. `#` never occurs in an unbounded key, so a bounded key cannot
/// collide with an unbounded one.
///
/// ``description`` shortens long keys, so a key is safe to put in logs and errors.
public struct IdempotencyKey: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// The canonical, escaped, bounded form. This is what stores persist.
    public let rawValue: String

    /// The longest raw value, in UTF-8 bytes, before the key is bounded by a hash. Default: 200.
    public static let maximumLength = 200
    private static let keptPrefixLength = maximumLength - 33

    /// Builds a key from parts (and an optional namespace as the first part).
    ///
    /// - Throws: ``ExactlyOnceError/Code/invalidKey`` when there are no parts, a part is empty,
    ///   or a part holds a control character.
    public init(namespace: String? = nil, parts: [String]) throws {
        guard !parts.isEmpty else { throw ExactlyOnceError(.invalidKey, "an idempotency key needs at least one part") }
        var all = parts
        if let namespace { all.insert(namespace, at: 0) }
        var raw = ""
        for (index, part) in all.enumerated() {
            if index > 0 { raw.append(":") }
            raw.append(try Self.escape(part, index: index))
        }
        self.rawValue = Self.bound(raw)
    }

    /// Reads back a raw value produced by this type (for example one a store persisted).
    ///
    /// - Throws: ``ExactlyOnceError/Code/invalidKey`` if `rawValue` is empty, too long, or holds
    ///   an empty part or a control character.
    public init(rawValue: String) throws {
        // One pass over the UTF-8 bytes (stores read keys back by the million on recovery):
        // control characters are single bytes in UTF-8, and an empty part is a ':' at either
        // end or next to another.
        var count = 0
        var control = false
        var emptyPart = false
        var afterColon = true
        for byte in rawValue.utf8 {
            count += 1
            if byte < 0x20 || byte == 0x7F { control = true }
            let colon = byte == UInt8(ascii: ":")
            if colon && afterColon { emptyPart = true }
            afterColon = colon
        }
        if afterColon { emptyPart = true }
        guard count > 0 else { throw ExactlyOnceError(.invalidKey, "empty idempotency key") }
        guard count <= Self.maximumLength else {
            throw ExactlyOnceError(.invalidKey, "idempotency key longer than \(Self.maximumLength) bytes: \(Self.abbreviate(rawValue))")
        }
        if control { throw ExactlyOnceError(.invalidKey, "control character in idempotency key \(Self.abbreviate(rawValue))") }
        if emptyPart { throw ExactlyOnceError(.invalidKey, "empty part in idempotency key \(Self.abbreviate(rawValue))") }
        self.rawValue = rawValue
    }

    /// The flash-sale key `couponId:memberId`.
    public static func coupon(couponId: Int64, memberId: Int64) -> IdempotencyKey {
        IdempotencyKey(unchecked: String(couponId) + ":" + String(memberId))  // small strings stay inline
    }

    /// The flash-sale key `couponId:memberId` for string identifiers.
    /// - Throws: ``ExactlyOnceError/Code/invalidKey`` for an empty id or a control character.
    public static func coupon(couponId: String, memberId: String) throws -> IdempotencyKey {
        try IdempotencyKey(parts: [couponId, memberId])
    }

    /// A key for events of one order (payments): `order:orderId:eventId`.
    /// - Throws: ``ExactlyOnceError/Code/invalidKey`` for an empty id or a control character.
    public static func orderEvent(orderId: String, eventId: String) throws -> IdempotencyKey {
        try IdempotencyKey(namespace: "order", parts: [orderId, eventId])
    }

    private init(unchecked: String) { self.rawValue = unchecked }

    /// Whether the key was shortened by a hash because it was too long.
    public var isBounded: Bool { rawValue.utf8.contains(UInt8(ascii: "#")) }

    /// The key as it is safe to log: in full up to 64 bytes, shortened beyond.
    public var description: String { Self.abbreviate(rawValue) }

    public static func < (lhs: IdempotencyKey, rhs: IdempotencyKey) -> Bool { lhs.rawValue < rhs.rawValue }

    package static func abbreviate(_ s: String) -> String {
        let utf8 = s.utf8
        guard utf8.count > 64 else { return s }
        let head = String(decoding: utf8.prefix(40), as: UTF8.self)
        return "\(head)…(\(utf8.count) bytes)"
    }

    private static func isControl(_ s: Unicode.Scalar) -> Bool { s.value < 0x20 || s.value == 0x7f }

    private static func escape(_ part: String, index: Int) throws -> String {
        guard !part.isEmpty else { throw ExactlyOnceError(.invalidKey, "part \(index) of an idempotency key is empty") }
        var out = ""
        out.reserveCapacity(part.utf8.count)
        for scalar in part.unicodeScalars {
            if isControl(scalar) {
                throw ExactlyOnceError(.invalidKey, "part \(index) of an idempotency key holds a control character")
            }
            switch scalar {
            case "%": out.append("%25")
            case ":": out.append("%3A")
            case "#": out.append("%23")
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }

    private static func bound(_ raw: String) -> String {
        let utf8 = Array(raw.utf8)
        guard utf8.count > maximumLength else { return raw }
        var cut = keptPrefixLength
        // Do not split a UTF-8 sequence: back up to a scalar boundary.
        while cut > 0 && (utf8[cut] & 0xC0) == 0x80 { cut -= 1 }
        let digest = SHA256Digest.hex(SHA256Digest.hash(utf8).prefix(16))
        return String(decoding: utf8[..<cut], as: UTF8.self) + "#" + digest
    }
}

/// A stable fingerprint of a record's payload, used to detect the same key arriving with a
/// different payload (G5). Payloads shorter than 16 bytes are their own fingerprint (a length
/// byte followed by the bytes: exact, no hashing); longer ones use the first 16 bytes of their
/// SHA-256.
public struct PayloadFingerprint: Hashable, Sendable, CustomStringConvertible {
    /// The fingerprint bytes.
    public let bytes: [UInt8]

    /// Wraps precomputed fingerprint bytes (1 to 64 bytes).
    public init(bytes: [UInt8]) throws {
        guard (1...64).contains(bytes.count) else {
            throw ExactlyOnceError(.invalidPayload, "a fingerprint must be 1 to 64 bytes, got \(bytes.count)")
        }
        self.bytes = bytes
    }

    /// The default fingerprint of a payload: the payload itself (length-prefixed) below 16
    /// bytes, else 16 bytes of its SHA-256.
    public static func of<Bytes: Collection>(_ payload: Bytes) -> PayloadFingerprint where Bytes.Element == UInt8 {
        let n = payload.count
        if n < 16 {
            var bytes = [UInt8]()
            bytes.reserveCapacity(n + 1)
            bytes.append(UInt8(n))
            bytes.append(contentsOf: payload)
            return PayloadFingerprint(unchecked: bytes)
        }
        return PayloadFingerprint(unchecked: Array(SHA256Digest.hash(payload).prefix(16)))
    }

    init(unchecked: [UInt8]) { self.bytes = unchecked }

    /// Hexadecimal form.
    public var description: String { SHA256Digest.hex(bytes) }
}
