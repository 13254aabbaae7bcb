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
    /// Whether chosen entries whose key already holds an applied or rejected outcome are
    /// replayed too (see ``DeadLetterQueue/replay(_:)``). True for ``key(_:)``: a key named
    /// explicitly is replayed whatever its stored outcome, so a conflict shows up as a conflict
    /// again. False for ``all``, ``reason(containing:)`` and ``matching(_:_:)``; turn it on with
    /// ``includingAnswered``.
    public var includesAnswered: Bool

    init(matches: @escaping @Sendable (DeadLetter) -> Bool, text: String, includesAnswered: Bool) {
        self.matches = matches
        self.text = text
        self.includesAnswered = includesAnswered
    }

    /// Every dead letter.
    public static let all = DeadLetterSelection(matches: { _ in true }, text: "all", includesAnswered: false)
    /// Dead letters of one idempotency key, replayed whatever the key's stored outcome.
    public static func key(_ key: IdempotencyKey) -> DeadLetterSelection {
        DeadLetterSelection(matches: { $0.key == key }, text: "key \(key)", includesAnswered: true)
    }
    /// Dead letters whose reason contains `text`.
    public static func reason(containing text: String) -> DeadLetterSelection {
        DeadLetterSelection(matches: { $0.reason.contains(text) }, text: "reason containing \"\(text)\"", includesAnswered: false)
    }
    /// Dead letters `predicate` accepts.
    public static func matching(_ description: String, _ predicate: @escaping @Sendable (DeadLetter) -> Bool) -> DeadLetterSelection {
        DeadLetterSelection(matches: predicate, text: description, includesAnswered: false)
    }
    /// The same selection, replaying entries whose key already holds an applied or rejected outcome too.
    public var includingAnswered: DeadLetterSelection {
        var s = self
        s.includesAnswered = true
        return s
    }
    /// What it selects, in words.
    public var description: String { text }
}

/// A dead letter ``DeadLetterQueue/replay(_:)`` chose and did not replay, with why.
public struct ReplaySkip: Sendable {
    /// Why an entry was not replayed.
    public struct Reason: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The code, as the admin tool's JSON prints it.
        public let rawValue: String
        /// A reason from its code.
        public init(rawValue: String) { self.rawValue = rawValue }
        /// The entry names no original topic: there is nowhere to send it.
        public static let noOriginalTopic = Reason(rawValue: "noOriginalTopic")
        /// Its original topic does not exist (any more).
        public static let unknownTopic = Reason(rawValue: "unknownTopic")
        /// Its key already holds an applied or rejected outcome: a replay would only be answered
        /// with it (or, for a conflict, be a conflict again). Replayed anyway when the selection
        /// ``DeadLetterSelection/includesAnswered``.
        public static let answered = Reason(rawValue: "answered")
        /// It was replayed before and its replay was dead-lettered again: the later entry is the
        /// one to replay.
        public static let replayedBefore = Reason(rawValue: "replayedBefore")
        /// Another entry of this replay has the same key and payload and was republished.
        public static let sameAsAnother = Reason(rawValue: "sameAsAnother")
        /// The code.
        public var description: String { rawValue }
    }

    /// The entry.
    public var deadLetter: DeadLetter
    /// Why it was not replayed.
    public var reason: Reason
    /// The same in words, with the details (the stored outcome, the later entry).
    public var why: String

    /// Creates a skip.
    public init(deadLetter: DeadLetter, reason: Reason, why: String) {
        self.deadLetter = deadLetter
        self.reason = reason
        self.why = why
    }
}

/// What ``DeadLetterQueue/replay(_:)`` did.
public struct ReplayReport: Sendable {
    /// The dead letters republished, with the position each got in its original topic.
    public var replayed: [(deadLetter: DeadLetter, position: RecordPosition)] = []
    /// Keys whose stored dead-lettered outcome was released, so the replay is processed, not answered.
    public var reopened: [IdempotencyKey] = []
    /// Dead letters selected but not replayed, with why.
    public var skipped: [ReplaySkip] = []
    /// Creates an empty report.
    public init() {}
}

/// One page of a dead-letter topic (``DeadLetterQueue/page(from:limit:)``).
public struct DeadLetterPage: Sendable {
    /// The entries, in partition then offset order.
    public var letters: [DeadLetter]
    /// Where the next page starts; nil when this page reached the end of every partition.
    public var next: RecordPosition?
    /// Creates a page.
    public init(letters: [DeadLetter], next: RecordPosition?) {
        self.letters = letters
        self.next = next
    }
}

/// A dead-letter topic, for operators: list what is in it, and replay chosen entries to their
/// original topic so the consumer processes them again — once.
///
/// ``replay(_:)`` reads the whole topic (page by page, however long it is) and decides per
/// chosen entry, in this order:
///
/// 1. No original topic recorded, or that topic is gone: skipped (``ReplaySkip/Reason/noOriginalTopic``,
///    ``ReplaySkip/Reason/unknownTopic``).
/// 2. Replayed before and dead-lettered again (a later entry carries this one's position in
///    its `x-replayed-from` header): skipped, the later entry stands for it
///    (``ReplaySkip/Reason/replayedBefore``).
/// 3. The same key and payload as an entry republished earlier in this replay (a record
///    dead-lettered twice): skipped (``ReplaySkip/Reason/sameAsAnother``).
/// 4. Its key's stored outcome is applied or rejected — an earlier replay was processed, or the
///    entry is a conflict (G5) whose key holds the first payload's outcome: skipped
///    (``ReplaySkip/Reason/answered``) unless the selection ``DeadLetterSelection/includesAnswered``
///    (``DeadLetterSelection/key(_:)`` does). Replayed anyway, it is answered with that outcome,
///    or dead-lettered as a conflict again.
/// 5. Otherwise it is republished: when its key's stored outcome is
///    ``Outcome/Status/deadLettered``, the store first releases it
///    (``DedupeStore/reopenDeadLettered(_:)``: claimable again, attempts reset); then the record
///    goes to its original topic and partition with its key, payload and headers (without the
///    dead-letter headers, plus `x-replayed-from`).
///
/// So a replay is processed once: replayed twice before the consumer gets to it, one copy is
/// processed and the other answered with the new outcome (G4); replayed again after it was
/// processed, it is skipped as answered. An entry whose key was released but not processed yet
/// (or a replay interrupted between the release and the publish) is republished again: the
/// consumer processes one copy. Entries without a key are republished each time they are chosen
/// and not replayed before.
public struct DeadLetterQueue<Transport: MessageTransport, Store: DedupeStore>: Sendable {
    /// The header naming the dead letter a replayed record came from (`<topic>/<partition>@<offset>`).
    public static var replayedFromHeader: String { DeadLetterHeaders.replayedFrom }

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

    /// Up to `limit` dead letters from `start` (default: the first partition's start), in
    /// partition then offset order, and where the next page starts.
    /// - Throws: `unknownTopic` when the topic does not exist; `invalidConfiguration` for a
    ///   `limit` below 1; `invalidPartition` for a `start` outside the topic.
    public func page(from start: RecordPosition? = nil, limit: Int = 1_000) async throws -> DeadLetterPage {
        guard limit >= 1 else { throw ExactlyOnceError(.invalidConfiguration, "a page of dead letters holds at least 1 entry, got \(limit)") }
        let partitions = try await transport.partitionCount(of: topic)
        let first = start ?? RecordPosition(partition: PartitionID(0), offset: Offset(0))
        guard first.partition.rawValue >= 0, first.partition.rawValue < partitions else {
            throw ExactlyOnceError(.invalidPartition, "partition \(first.partition) is outside 0..<\(partitions) of \(topic)")
        }
        var out: [DeadLetter] = []
        var p = first.partition.rawValue
        var next = first.offset
        while p < partitions && out.count < limit {
            let records = try await transport.read(topic: topic, partition: PartitionID(p), from: next, maxRecords: min(1_000, limit - out.count))
            if let last = records.last {
                out += records.map(DeadLetter.init)
                next = last.offset.next
            } else {
                p += 1
                next = Offset(0)
            }
        }
        // Full page: is there more? (A page that ends exactly at the end says nil.)
        while p < partitions {
            if try await !transport.read(topic: topic, partition: PartitionID(p), from: next, maxRecords: 1).isEmpty {
                return DeadLetterPage(letters: out, next: RecordPosition(partition: PartitionID(p), offset: next))
            }
            p += 1
            next = Offset(0)
        }
        return DeadLetterPage(letters: out, next: nil)
    }

    /// Every dead letter, every partition from its start, in partition then offset order (read
    /// page by page).
    /// - Throws: `unknownTopic` when the topic does not exist.
    public func list() async throws -> [DeadLetter] {
        var out: [DeadLetter] = []
        var start: RecordPosition?
        repeat {
            let page = try await page(from: start, limit: 1_000)
            out += page.letters
            start = page.next
        } while start != nil
        return out
    }

    /// The dead letter at `partition`/`offset` of the dead-letter topic, if any.
    public func show(partition: PartitionID, offset: Offset) async throws -> DeadLetter? {
        try await transport.read(topic: topic, partition: partition, from: offset, maxRecords: 1)
            .first { $0.offset == offset }.map(DeadLetter.init)
    }

    /// Where `letter` sits, as the `x-replayed-from` header names it.
    func origin(_ letter: DeadLetter) -> String {
        "\(topic)/\(letter.record.partition.rawValue)@\(letter.record.offset.rawValue)"
    }

    /// Replays the dead letters `selection` chooses (see the type's documentation for what is
    /// skipped and why).
    public func replay(_ selection: DeadLetterSelection) async throws -> ReplayReport {
        let letters = try await list()
        // Entries that are replays dead-lettered again name the entry they came from.
        var cameBackAs: [String: RecordPosition] = [:]
        for l in letters {
            if let from = l.record.headers[Self.replayedFromHeader], cameBackAs[from] == nil {
                cameBackAs[from] = RecordPosition(partition: l.record.partition, offset: l.record.offset)
            }
        }
        let chosen = letters.filter(selection.matches)
        let keys = Array(Set(chosen.compactMap(\.key)))
        var stored: [IdempotencyKey: DedupeRecord] = [:]
        for start in stride(from: 0, to: keys.count, by: 500) {
            stored.merge(try await store.records(for: Array(keys[start..<min(keys.count, start + 500)]))) { a, _ in a }
        }

        var report = ReplayReport()
        var reopened = Set<IdempotencyKey>()
        var republished: [ReplayIdentity: RecordPosition] = [:]
        for letter in chosen {
            func skip(_ reason: ReplaySkip.Reason, _ why: String) {
                report.skipped.append(ReplaySkip(deadLetter: letter, reason: reason, why: why))
            }
            guard let original = letter.originalTopic else {
                skip(.noOriginalTopic, "no original topic recorded")
                continue
            }
            if let later = cameBackAs[origin(letter)] {
                skip(.replayedBefore, "replayed before and dead-lettered again as \(later)")
                continue
            }
            if let key = letter.key {
                if let earlier = republished[ReplayIdentity(key: key, payload: letter.record.payload)] {
                    skip(.sameAsAnother, "same key and payload as \(earlier), republished by this replay")
                    continue
                }
                if let record = stored[key], record.phase == .completed, let outcome = record.outcome,
                   outcome.status != .deadLettered, !selection.includesAnswered {
                    let held = "\(outcome.status)\(outcome.detail.isEmpty ? "" : " (\(outcome.detailText))")"
                    skip(.answered, letter.isConflict
                        ? "a conflict: its key holds the first payload's outcome \(held), so a replay is a conflict again (replay it by key to see that)"
                        : "already processed: its key holds the outcome \(held), which a replay would only be answered with")
                    continue
                }
            }
            let partitions: Int
            do {
                partitions = try await transport.partitionCount(of: original)
            } catch let e as ExactlyOnceError where e.code == .unknownTopic {
                skip(.unknownTopic, "original topic \(original) does not exist")
                continue
            }
            if let key = letter.key, !reopened.contains(key), stored[key]?.outcome?.status == .deadLettered {
                if try await store.reopenDeadLettered(key) { report.reopened.append(key) }
                reopened.insert(key)
            }
            var headers = letter.record.headers
            for h in [DeadLetterHeaders.reason, DeadLetterHeaders.originalTopic, DeadLetterHeaders.originalPartition,
                      DeadLetterHeaders.originalOffset, DeadLetterHeaders.idempotencyKey] {
                headers[h] = nil
            }
            headers[Self.replayedFromHeader] = origin(letter)
            let out = OutgoingRecord(key: letter.record.key, payload: letter.record.payload, headers: headers)
            // Back to its own partition, so it keeps its place among its key's records.
            let partitioning: Partitioning = letter.originalPartition.map { $0.rawValue < partitions ? .explicit($0) : .murmur2 } ?? .murmur2
            let position = try await transport.publish(out, to: original, partitioning: letter.record.key == nil && letter.originalPartition == nil ? .explicit(0) : partitioning)
            report.replayed.append((letter, position))
            if let key = letter.key { republished[ReplayIdentity(key: key, payload: letter.record.payload)] = RecordPosition(partition: letter.record.partition, offset: letter.record.offset) }
        }
        return report
    }
}

/// A dead letter's key and payload: two entries with the same are the same record.
struct ReplayIdentity: Hashable {
    var key: IdempotencyKey
    var payload: [UInt8]
}

/// The headers the consumer adds to a dead-lettered record.
public enum DeadLetterHeaders {
    /// Why the record was given up on (`conflict: ...`, `gave up after N attempts`, `malformed record: ...`).
    public static let reason = "x-dead-letter-reason"
    /// The topic the record was consumed from.
    public static let originalTopic = "x-original-topic"
    /// Its partition there.
    public static let originalPartition = "x-original-partition"
    /// Its offset there.
    public static let originalOffset = "x-original-offset"
    /// Its idempotency key, when it had one.
    public static let idempotencyKey = "x-idempotency-key"
    /// On a record republished by ``DeadLetterQueue/replay(_:)``: the dead letter it came from
    /// (`<topic>/<partition>@<offset>`); kept when the replay is dead-lettered again.
    public static let replayedFrom = "x-replayed-from"
}
