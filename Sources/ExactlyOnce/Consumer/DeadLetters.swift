/// One record of a dead-letter topic, with why it was given up on and where it came from (read
/// from the ``DeadLetterHeaders`` the consumer adds).
public struct DeadLetter: Sendable, Hashable {
    /// The record as it sits in the dead-letter topic (its position is the dead-letter topic's).
    public var record: ConsumedRecord
    /// Why it was dead-lettered (`conflict: ...`, `gave up after N attempts`, `malformed record: ...`).
    public var reason: String
    /// Its idempotency key, when it had a valid one.
    public var key: IdempotencyKey?
    /// The topic it was consumed from.
    public var originalTopic: String?
    /// Its partition there.
    public var originalPartition: PartitionID?
    /// Its offset there.
    public var originalOffset: Offset?

    /// Reads a dead letter from a record of a dead-letter topic; headers it does not find are nil.
    public init(_ record: ConsumedRecord) {
        self.record = record
        let h = record.headers
        reason = h[DeadLetterHeaders.reason] ?? "(no reason recorded)"
        key = h[DeadLetterHeaders.idempotencyKey].flatMap { try? IdempotencyKey(rawValue: $0) }
        originalTopic = h[DeadLetterHeaders.originalTopic].flatMap { $0.isEmpty ? nil : $0 }
        originalPartition = h[DeadLetterHeaders.originalPartition].flatMap { Int($0) }.flatMap { $0 >= 0 ? PartitionID($0) : nil }
        originalOffset = h[DeadLetterHeaders.originalOffset].flatMap { Int64($0) }.flatMap { $0 >= 0 ? Offset($0) : nil }
    }

    /// Whether the record was dead-lettered because its key came with another payload (G5):
    /// replaying it gives the same conflict.
    public var isConflict: Bool { reason.hasPrefix("conflict") }
}

/// Which dead letters to replay.
public struct DeadLetterSelection: Sendable, CustomStringConvertible {
    let matches: @Sendable (DeadLetter) -> Bool
    let text: String
    /// Every dead letter.
    public static let all = DeadLetterSelection(matches: { _ in true }, text: "all")
    /// Dead letters of one idempotency key.
    public static func key(_ key: IdempotencyKey) -> DeadLetterSelection {
        DeadLetterSelection(matches: { $0.key == key }, text: "key \(key)")
    }
    /// Dead letters whose reason contains `text`.
    public static func reason(containing text: String) -> DeadLetterSelection {
        DeadLetterSelection(matches: { $0.reason.contains(text) }, text: "reason containing \"\(text)\"")
    }
    /// Dead letters `predicate` accepts.
    public static func matching(_ description: String, _ predicate: @escaping @Sendable (DeadLetter) -> Bool) -> DeadLetterSelection {
        DeadLetterSelection(matches: predicate, text: description)
    }
    public var description: String { text }
}

/// What ``DeadLetterQueue/replay(_:)`` did.
public struct ReplayReport: Sendable {
    /// The dead letters republished, with the position each got in its original topic.
    public var replayed: [(deadLetter: DeadLetter, position: RecordPosition)] = []
    /// Keys whose stored dead-lettered outcome was released, so the replay is processed, not answered.
    public var reopened: [IdempotencyKey] = []
    /// Dead letters selected but not replayed, with why (no original topic, an unknown topic, ...).
    public var skipped: [(deadLetter: DeadLetter, why: String)] = []
    /// Creates an empty report.
    public init() {}
}

/// A dead-letter topic, for operators: list what is in it, and replay chosen entries to their
/// original topic so the consumer processes them again — once.
///
/// Replay is idempotent. For each chosen entry with a key whose stored outcome is
/// ``Outcome/Status/deadLettered``, the store releases that outcome first
/// (``DedupeStore/reopenDeadLettered(_:)``: claimable again, attempts reset); then the record is
/// published to its original topic and partition with its key, payload and headers (without the
/// dead-letter headers, plus `x-replayed-from`). The consumer then processes it like any record:
/// replayed twice (or dead-lettered twice and both replayed), it is processed once and the other
/// copy is answered with the new outcome (G4). An entry dead-lettered as a conflict (G5) is
/// replayed as what it is: the key still holds the first payload's outcome, so it is a conflict
/// again. A replay interrupted between the release and the publish is safe to run again.
public struct DeadLetterQueue<Transport: MessageTransport, Store: DedupeStore>: Sendable {
    /// The header naming the dead letter a replayed record came from (`<topic>/<partition>@<offset>`).
    public static var replayedFromHeader: String { "x-replayed-from" }

    let transport: Transport
    let store: Store
    /// The dead-letter topic.
    public let topic: String

    /// A dead-letter topic on `transport`, with the `store` its consumer used.
    public init(transport: Transport, store: Store, topic: String) {
        self.transport = transport
        self.store = store
        self.topic = topic
    }

    /// Up to `limit` dead letters, every partition from its start, in partition then offset order.
    /// - Throws: `unknownTopic` when the topic does not exist.
    public func list(limit: Int = 10_000) async throws -> [DeadLetter] {
        let partitions = try await transport.partitionCount(of: topic)
        var out: [DeadLetter] = []
        for p in 0..<partitions where out.count < limit {
            var next = Offset(0)
            while out.count < limit {
                let records = try await transport.read(topic: topic, partition: PartitionID(p), from: next, maxRecords: min(1_000, limit - out.count))
                guard let last = records.last else { break }
                out += records.map(DeadLetter.init)
                next = last.offset.next
            }
        }
        return out
    }

    /// The dead letter at `partition`/`offset` of the dead-letter topic, if any.
    public func show(partition: PartitionID, offset: Offset) async throws -> DeadLetter? {
        try await transport.read(topic: topic, partition: partition, from: offset, maxRecords: 1)
            .first { $0.offset == offset }.map(DeadLetter.init)
    }

    /// Replays the dead letters `selection` chooses (see the type's documentation).
    public func replay(_ selection: DeadLetterSelection) async throws -> ReplayReport {
        var report = ReplayReport()
        var reopened = Set<IdempotencyKey>()
        for letter in try await list() where selection.matches(letter) {
            guard let original = letter.originalTopic else {
                report.skipped.append((letter, "no original topic recorded"))
                continue
            }
            let partitions: Int
            do {
                partitions = try await transport.partitionCount(of: original)
            } catch let e as ExactlyOnceError where e.code == .unknownTopic {
                report.skipped.append((letter, "original topic \(original) does not exist"))
                continue
            }
            if let key = letter.key, !reopened.contains(key) {
                if try await store.reopenDeadLettered(key) { report.reopened.append(key) }
                reopened.insert(key)
            }
            var headers = letter.record.headers
            for h in [DeadLetterHeaders.reason, DeadLetterHeaders.originalTopic, DeadLetterHeaders.originalPartition,
                      DeadLetterHeaders.originalOffset, DeadLetterHeaders.idempotencyKey] {
                headers[h] = nil
            }
            headers[Self.replayedFromHeader] = "\(topic)/\(letter.record.partition.rawValue)@\(letter.record.offset.rawValue)"
            let out = OutgoingRecord(key: letter.record.key, payload: letter.record.payload, headers: headers)
            // Back to its own partition, so it keeps its place among its key's records.
            let partitioning: Partitioning = letter.originalPartition.map { $0.rawValue < partitions ? .explicit($0) : .murmur2 } ?? .murmur2
            let position = try await transport.publish(out, to: original, partitioning: letter.record.key == nil && letter.originalPartition == nil ? .explicit(0) : partitioning)
            report.replayed.append((letter, position))
        }
        return report
    }
}
