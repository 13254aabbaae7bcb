/// A partition of a topic, `0..<partitionCount`.
public struct PartitionID: Hashable, Sendable, Comparable, CustomStringConvertible, ExpressibleByIntegerLiteral {
    /// The partition number.
    public let rawValue: Int
    /// Wraps a partition number (not validated against a count; see ``Partitioning``).
    public init(_ rawValue: Int) { self.rawValue = rawValue }
    public init(integerLiteral value: Int) { self.rawValue = value }
    public static func < (l: PartitionID, r: PartitionID) -> Bool { l.rawValue < r.rawValue }
    public var description: String { "\(rawValue)" }
}

/// Chooses the partition of a record from its key bytes.
///
/// Contract: deterministic (the same key and count always give the same partition, in every
/// process), and the result is in `0..<partitionCount`. Invalid keys or counts throw
/// ``ExactlyOnceError/Code/invalidPartition`` or ``ExactlyOnceError/Code/invalidKey``.
public protocol Partitioner: Sendable {
    /// The partition for `key` among `partitionCount` partitions.
    func partition(forKey key: [UInt8], partitionCount: Int) throws -> PartitionID
}

@inline(__always)
func validatePartitionCount(_ count: Int) throws {
    guard count > 0 else {
        throw ExactlyOnceError(.invalidPartition, "partition count must be positive, got \(count)")
    }
}

/// The coupon sale's classic strategy: the key is a decimal, non-negative integer (the coupon id) and the
/// partition is `id % partitionCount`. Keeps all of one coupon's events in one partition.
public struct ModuloPartitioner: Partitioner {
    /// Creates the partitioner.
    public init() {}

    /// `id % partitionCount` for a non-negative id.
    /// - Throws: ``ExactlyOnceError/Code/invalidPartition`` for a count below 1,
    ///   ``ExactlyOnceError/Code/invalidKey`` for a negative id.
    public func partition(forId id: Int64, partitionCount: Int) throws -> PartitionID {
        try validatePartitionCount(partitionCount)
        guard id >= 0 else { throw ExactlyOnceError(.invalidKey, "modulo partitioning needs a non-negative id, got \(id)") }
        return PartitionID(Int(id % Int64(partitionCount)))
    }

    /// Parses the key as a decimal integer and applies ``partition(forId:partitionCount:)``.
    /// - Throws: ``ExactlyOnceError/Code/invalidKey`` when the key is not a decimal integer.
    public func partition(forKey key: [UInt8], partitionCount: Int) throws -> PartitionID {
        try validatePartitionCount(partitionCount)
        guard !key.isEmpty, key.count <= 20,
              key.allSatisfy({ ($0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9")) || $0 == UInt8(ascii: "-") }),
              let id = Int64(String(decoding: key, as: UTF8.self))
        else {
            throw ExactlyOnceError(.invalidKey, "modulo partitioning needs a decimal integer key (\(key.count) bytes given)")
        }
        return try partition(forId: id, partitionCount: partitionCount)
    }
}

/// Kafka's default partitioner for keyed records: `toPositive(murmur2(key)) % partitionCount`,
/// bit-for-bit the same as the Java client's `Utils.murmur2` and librdkafka's `murmur2`
/// partitioner, so Swift, Java and librdkafka producers agree on the partition of a key.
public struct Murmur2Partitioner: Partitioner {
    /// Creates the partitioner.
    public init() {}

    /// The partition of `key`.
    /// - Throws: ``ExactlyOnceError/Code/invalidPartition`` for a count below 1.
    public func partition(forKey key: [UInt8], partitionCount: Int) throws -> PartitionID {
        try validatePartitionCount(partitionCount)
        let positive = Self.murmur2(key) & 0x7fff_ffff
        return PartitionID(Int(positive % UInt32(partitionCount)))
    }

    /// Kafka's murmur2 (seed 0x9747b28c), as an unsigned 32-bit value. Java's `int` result is
    /// `Int32(bitPattern:)` of this.
    public static func murmur2<Bytes: Collection>(_ data: Bytes) -> UInt32 where Bytes.Element == UInt8, Bytes.Index == Int {
        let length = data.count
        let m: UInt32 = 0x5bd1_e995
        let r: UInt32 = 24
        var h: UInt32 = 0x9747_b28c ^ UInt32(truncatingIfNeeded: length)
        let base = data.startIndex
        let blocks = length / 4
        for i in 0..<blocks {
            let o = base + i * 4
            var k = UInt32(data[o]) | UInt32(data[o + 1]) << 8 | UInt32(data[o + 2]) << 16 | UInt32(data[o + 3]) << 24
            k = k &* m
            k ^= k >> r
            k = k &* m
            h = h &* m
            h ^= k
        }
        let tail = base + blocks * 4
        switch length % 4 {
        case 3:
            h ^= UInt32(data[tail + 2]) << 16
            h ^= UInt32(data[tail + 1]) << 8
            h ^= UInt32(data[tail])
            h = h &* m
        case 2:
            h ^= UInt32(data[tail + 1]) << 8
            h ^= UInt32(data[tail])
            h = h &* m
        case 1:
            h ^= UInt32(data[tail])
            h = h &* m
        default: break
        }
        h ^= h >> 13
        h = h &* m
        h ^= h >> 15
        return h
    }
}

/// How a record's partition is chosen when it is published.
public struct Partitioning: Sendable {
    enum Kind: Sendable {
        case keyed(any Partitioner)
        case explicit(PartitionID)
    }
    let kind: Kind

    /// Choose by the record key with `partitioner`.
    public static func keyed(_ partitioner: any Partitioner) -> Partitioning { Partitioning(kind: .keyed(partitioner)) }
    /// Always `partition` (validated against the topic's partition count at publish time).
    public static func explicit(_ partition: PartitionID) -> Partitioning { Partitioning(kind: .explicit(partition)) }
    /// ``ModuloPartitioner`` over the key (`couponId % partitionCount`).
    public static var modulo: Partitioning { .keyed(ModuloPartitioner()) }
    /// ``Murmur2Partitioner`` over the key (Kafka-compatible).
    public static var murmur2: Partitioning { .keyed(Murmur2Partitioner()) }

    /// Resolves the partition for `key` among `partitionCount` partitions.
    /// - Throws: ``ExactlyOnceError/Code/invalidPartition`` if an explicit partition is out of range
    ///   or the count is below 1; ``ExactlyOnceError/Code/invalidKey`` if a keyed strategy gets no key.
    public func resolve(key: [UInt8]?, partitionCount: Int) throws -> PartitionID {
        try validatePartitionCount(partitionCount)
        switch kind {
        case .explicit(let p):
            guard p.rawValue >= 0 && p.rawValue < partitionCount else {
                throw ExactlyOnceError(.invalidPartition, "partition \(p) is outside 0..<\(partitionCount)")
            }
            return p
        case .keyed(let partitioner):
            guard let key else { throw ExactlyOnceError(.invalidKey, "keyed partitioning needs a record key") }
            return try partitioner.partition(forKey: key, partitionCount: partitionCount)
        }
    }
}
