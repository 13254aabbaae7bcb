import ArgumentParser
import ExactlyOnce
import Foundation

/// `dlq list|show|replay`.
struct DeadLetterCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "dlq", abstract: "List, show and replay dead letters.",
                                                    subcommands: [List.self, Show.self, Replay.self])

    /// The dead-letter topic.
    struct Topic: ParsableArguments {
        @Option(help: "The dead-letter topic (default: <--topic>.dlq).") var dlq: String?
        @Option(help: "The consumed topic.") var topic = "coupon-requests"
        var name: String { dlq ?? topic + ".dlq" }
    }

    /// A dead letter as the tool prints it.
    struct LetterView: Encodable {
        var partition: Int
        var offset: Int64
        var reason: String
        var key: String?
        var originalTopic: String?
        var originalPartition: Int?
        var originalOffset: Int64?
        var replayedFrom: String?
        var payloadBytes: Int
        init(_ d: DeadLetter) {
            partition = d.record.partition.rawValue
            offset = d.record.offset.rawValue
            reason = d.reason
            key = d.key?.rawValue
            originalTopic = d.originalTopic
            originalPartition = d.originalPartition?.rawValue
            originalOffset = d.originalOffset?.rawValue
            replayedFrom = d.record.headers[DeadLetterHeaders.replayedFrom]
            payloadBytes = d.record.payload.count
        }
        var line: String {
            "\(partition)@\(offset)\t\(key ?? "(no key)")\tfrom \(originalTopic ?? "?")/\(originalPartition.map { "\($0)" } ?? "?")@\(originalOffset.map { "\($0)" } ?? "?")\t\(reason)"
        }
    }

    /// Reads `P@O` (a position in the dead-letter topic).
    static func position(_ text: String, _ flag: String) throws -> RecordPosition {
        let parts = text.split(separator: "@", omittingEmptySubsequences: false)
        guard parts.count == 2, let p = Int(parts[0]), p >= 0, let o = Int64(parts[1]), o >= 0 else {
            throw ValidationError("\(flag) must be PARTITION@OFFSET as printed by dlq list, got \"\(text)\"")
        }
        return RecordPosition(partition: PartitionID(p), offset: Offset(o))
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List dead letters: position, idempotency key, original position, reason; a page at a time.")
        @OptionGroup var backend: BackendOptions
        @OptionGroup var topic: Topic
        @Option(help: "Most entries to list (1...100000).") var limit = 1_000
        @Option(help: "Start at this position (PARTITION@OFFSET, printed at the end of a page).") var cursor: String?

        func validate() throws {
            guard (1...100_000).contains(limit) else { throw ValidationError("--limit must be in 1...100000, got \(limit)") }
            if let cursor { _ = try DeadLetterCommand.position(cursor, "--cursor") }
        }

        func run() async throws {
            let start = try cursor.map { try DeadLetterCommand.position($0, "--cursor") }
            let page = try await listLetters(try backend.makeTransport().transport, topic: topic.name, from: start, limit: limit)
            if backend.json {
                struct Page: Encodable { var letters: [LetterView]; var nextCursor: String? }
                try printJSON(Page(letters: page.letters.map(LetterView.init), nextCursor: page.next?.description))
                return
            }
            for l in page.letters.map(LetterView.init) { print(l.line) }
            if let next = page.next {
                print("(\(page.letters.count) dead letters of \(topic.name) listed; more: --cursor '\(next)')")
            } else {
                print("(\(page.letters.count) dead letters in \(topic.name)\(start == nil ? "" : " from \(start!)"), end of listing)")
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one dead letter by its position in the dead-letter topic, with its headers and payload.")
        @OptionGroup var backend: BackendOptions
        @OptionGroup var topic: Topic
        @Option(help: "Its partition in the dead-letter topic.") var partition = 0
        @Option(help: "Its offset there.") var offset: Int64

        func validate() throws {
            guard partition >= 0 else { throw ValidationError("--partition must be 0 or more, got \(partition)") }
            guard offset >= 0 else { throw ValidationError("--offset must be 0 or more, got \(offset)") }
        }

        func run() async throws {
            let letter = try await showLetter(try backend.makeTransport().transport, topic: topic.name, partition: PartitionID(partition), offset: Offset(offset))
            guard let letter else { throw AdminError(message: "no dead letter at \(topic.name) \(partition)@\(offset)") }
            let payload = String(decoding: letter.record.payload, as: UTF8.self)
            if backend.json {
                struct Shown: Encodable { var letter: LetterView; var headers: [String: String]; var payload: String }
                try printJSON(Shown(letter: LetterView(letter), headers: letter.record.headers, payload: payload))
                return
            }
            print(LetterView(letter).line)
            for (k, v) in letter.record.headers.sorted(by: { $0.key < $1.key }) { print("  header \(k): \(v)") }
            print("  payload (\(letter.record.payload.count) bytes): \(payload.prefix(500))")
        }
    }

    struct Replay: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Republish chosen dead letters to their original topic, once: a dead-lettered outcome is released first, so the replay is processed, not answered.",
            discussion: """
                Skipped, and listed as such: entries replayed before whose replay was dead-lettered again (the later \
                entry stands for them), repeats of an entry republished in the same run, and — unless chosen by --key \
                or with --include-answered — entries whose key already holds an applied or rejected outcome (an earlier \
                replay was processed, or the entry is a conflict: replayed, it would only be answered, or be a conflict again).
                """)
        @OptionGroup var backend: BackendOptions
        @OptionGroup var topic: Topic
        @Option(help: "Replay the dead letters of this idempotency key (whatever its stored outcome).") var key: String?
        @Option(help: "Replay the dead letters whose reason contains this text.") var reason: String?
        @Flag(help: "Replay every dead letter.") var all = false
        @Flag(name: .customLong("include-answered"), help: "With --all or --reason: also replay entries whose key already holds an applied or rejected outcome.")
        var includeAnswered = false

        func validate() throws {
            guard [key != nil, reason != nil, all].filter({ $0 }).count == 1 else {
                throw ValidationError("choose what to replay: exactly one of --key K, --reason TEXT, --all")
            }
            if includeAnswered && key != nil { throw ValidationError("--include-answered is for --all and --reason (--key replays whatever the key holds)") }
            if let reason, reason.isEmpty { throw ValidationError("--reason needs some text (use --all for every entry)") }
        }

        func run() async throws {
            var selection: DeadLetterSelection
            if let key {
                do { selection = .key(try IdempotencyKey(rawValue: key)) } catch let e as ExactlyOnceError { throw AdminError(message: "--key: \(e.message)", status: 2) }
            } else if let reason {
                selection = .reason(containing: reason)
            } else {
                selection = .all
            }
            if includeAnswered { selection = selection.includingAnswered }
            let report = try await backend.withStore { store in
                try await replayLetters(store, transport: try backend.makeTransport().transport, topic: topic.name, selection)
            }
            if backend.json {
                struct Replayed: Encodable { var from: LetterView; var partition: Int; var offset: Int64 }
                struct Skipped: Encodable { var from: LetterView; var reason: String; var why: String }
                struct Out: Encodable { var replayed: [Replayed]; var reopened: [String]; var skipped: [Skipped] }
                try printJSON(Out(replayed: report.replayed.map { Replayed(from: LetterView($0.deadLetter), partition: $0.position.partition.rawValue, offset: $0.position.offset.rawValue) },
                                  reopened: report.reopened.map { $0.rawValue },
                                  skipped: report.skipped.map { Skipped(from: LetterView($0.deadLetter), reason: $0.reason.rawValue, why: $0.why) }))
                return
            }
            for r in report.replayed { print("replayed \(LetterView(r.deadLetter).line) -> \(r.position)") }
            for s in report.skipped { print("skipped  \(LetterView(s.deadLetter).line): \(s.why)") }
            print("\(report.replayed.count) replayed (\(selection)), \(report.reopened.count) dead-lettered outcomes released, \(report.skipped.count) skipped")
        }
    }
}

// The dead-letter queue is generic over its store and transport: these open the existentials.
// Listing and showing read the transport only, so they never open the store (a running
// consumer's file store stays locked by it): the queue gets an empty in-memory store it never uses.
func listLetters<T: MessageTransport>(_ transport: T, topic: String, from start: RecordPosition?, limit: Int) async throws -> DeadLetterPage {
    try await DeadLetterQueue(transport: transport, store: try InMemoryDedupeStore(), topic: topic).page(from: start, limit: limit)
}
func showLetter<T: MessageTransport>(_ transport: T, topic: String, partition: PartitionID, offset: Offset) async throws -> DeadLetter? {
    try await DeadLetterQueue(transport: transport, store: try InMemoryDedupeStore(), topic: topic).show(partition: partition, offset: offset)
}
func replayLetters<S: DedupeStore, T: MessageTransport>(_ store: S, transport: T, topic: String, _ selection: DeadLetterSelection) async throws -> ReplayReport {
    try await DeadLetterQueue(transport: transport, store: store, topic: topic).replay(selection)
}
