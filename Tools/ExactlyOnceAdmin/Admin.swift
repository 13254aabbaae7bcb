import ArgumentParser
import ExactlyOnce
import ExactlyOnceFileStore
import ExactlyOnceRedis
import Foundation

/// `exactly-once-admin`: look at what a consumer recorded, and act on it — a key's processing
/// history, stuck or failed keys, consumer lag, dead letters and their replay — against any
/// durable store and transport.
@main
struct Admin: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exactly-once-admin",
        abstract: "Inspect and operate swift-exactly-once stores and transports: keys, lag, dead letters.",
        discussion: """
            Point it at the store (--store file --data-dir D, or --store redis --redis-url URL --key-prefix P) \
            and, for lag and dead letters, the transport (--transport redis-streams --streams-prefix P). \
            --sale ID names a coupon-demo sale's store and streams as the demo does. \
            Human output by default; --json prints JSON for scripts (one object, or one per line with --lines).
            Exit status: 0 done, 1 not found or a backend failed, 2 bad flags.
            """,
        subcommands: [KeyCommand.self, KeysCommand.self, LagCommand.self, DeadLetterCommand.self]
    )

    static func main() async {
        do {
            var command = try await asyncParseAsRoot()
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let e as ExactlyOnceError {
            FileHandle.standardError.write(Data("exactly-once-admin: \(e.isRetriable ? "cannot reach the backend: " : "")\(e.message)\n".utf8))
            Foundation.exit(e.code == .invalidConfiguration ? 2 : 1)
        } catch let e as AdminError {
            FileHandle.standardError.write(Data("exactly-once-admin: \(e.message)\n".utf8))
            Foundation.exit(e.status)
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                print(fullMessage(for: error))
                Foundation.exit(0)
            }
            if code == .validationFailure {
                FileHandle.standardError.write(Data("exactly-once-admin: \(message(for: error))\n  See 'exactly-once-admin help <subcommand>'.\n".utf8))
                Foundation.exit(2)
            }
            if let exit = error as? ExitCode { Foundation.exit(exit.rawValue) }
            FileHandle.standardError.write(Data("exactly-once-admin: \(String(describing: error).prefix(500))\n".utf8))
            Foundation.exit(1)
        }
    }
}

/// An error reported in one line with an exit status.
struct AdminError: Error {
    var message: String
    var status: Int32 = 1
}

/// The durable stores the tool can open.
enum AdminStoreKind: String, ExpressibleByArgument, CaseIterable {
    case file, redis, memory
}

/// The transports the tool can read.
enum AdminTransportKind: String, ExpressibleByArgument, CaseIterable {
    case redisStreams = "redis-streams"
    case memory
}

/// Where the store and the transport are.
struct BackendOptions: ParsableArguments {
    @Option(help: "The dedupe store.")
    var store: AdminStoreKind = .file

    @Option(name: .customLong("data-dir"), help: "The file store's directory (with --sale: the demo's --data-dir, holding sale-<id>).")
    var dataDir: String?

    @Option(name: .customLong("redis-url"), help: "redis://[user:password@]host:port[/db] or unix:///path (default: redis://127.0.0.1:6379).")
    var redisURL: String?

    @Option(name: .customLong("key-prefix"), help: "The Redis store's key prefix (default: exactly-once:).")
    var keyPrefix: String?

    @Option(help: "The transport (for lag and dead letters).")
    var transport: AdminTransportKind = .redisStreams

    @Option(name: .customLong("streams-prefix"), help: "The Redis Streams transport's key prefix (default: exactly-once-streams:).")
    var streamsPrefix: String?

    @Option(help: "A coupon-demo sale id: its store and streams, named as the demo names them.")
    var sale: String?

    @Flag(help: "Print JSON instead of text.")
    var json = false

    func validate() throws {
        if store == .memory || transport == .memory {
            throw ValidationError("an in-memory store or transport lives inside its process; point the tool at a durable one (--store file|redis, --transport redis-streams)")
        }
        if store == .file && dataDir == nil { throw ValidationError("--store file needs --data-dir") }
        if let sale, sale.isEmpty || sale.contains("/") { throw ValidationError("--sale must be a sale id as the demo prints it") }
        if let redisURL {
            do { _ = try RedisConfiguration(url: redisURL) } catch let e as ExactlyOnceError { throw ValidationError("--redis-url: \(e.message)") }
        }
    }

    var url: String { redisURL ?? "redis://127.0.0.1:6379" }

    /// Opens the store, runs `body`, and closes it (the file store's directory lock is held meanwhile).
    func withStore<R>(_ body: (any DedupeStore) async throws -> R) async throws -> R {
        switch store {
        case .file:
            var dir = dataDir!
            if let sale { dir += "/sale-" + sale }
            guard FileManager.default.fileExists(atPath: dir) else { throw AdminError(message: "no file store at \(dir)") }
            let file = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir))
            do {
                let r = try await body(file)
                await file.close()
                return r
            } catch {
                await file.close()
                throw error
            }
        case .redis:
            let prefix = keyPrefix ?? sale.map { "coupon-demo:\($0):store:" } ?? "exactly-once:"
            return try await body(try RedisDedupeStore(url: url, keyPrefix: prefix))
        case .memory:
            throw AdminError(message: "an in-memory store cannot be inspected from outside its process", status: 2)
        }
    }

    /// The transport.
    func makeTransport() throws -> RedisStreamsTransport {
        var c = RedisStreamsTransport.Configuration(redis: try RedisConfiguration(url: url))
        c.keyPrefix = streamsPrefix ?? sale.map { "coupon-demo:\($0):streams:" } ?? "exactly-once-streams:"
        return try RedisStreamsTransport(configuration: c)
    }
}

/// A dedupe record as the tool prints it.
struct RecordView: Encodable {
    var key: String
    var phase: String
    var attempts: Int
    var token: UInt64
    var leaseExpiresAt: Int64
    var outcome: String?
    var outcomeDetail: String?
    var expiresAt: Int64?
    var lastFailure: String?
    var fenceScope: String?
    var fenceEpoch: UInt64?

    init(_ r: DedupeRecord) {
        key = r.key.rawValue
        phase = switch r.phase {
        case .inProgress: "inProgress"
        case .released: "released"
        case .completed: "completed"
        }
        attempts = r.attempts
        token = r.token.rawValue
        leaseExpiresAt = r.leaseExpiresAt.milliseconds
        outcome = r.outcome.map { "\($0.status)" }
        outcomeDetail = r.outcome.map(\.detailText)
        expiresAt = r.expiresAt?.milliseconds
        lastFailure = r.lastFailure
        fenceScope = r.fence?.scope
        fenceEpoch = r.fence?.epoch
    }

    var text: String {
        var lines = ["key          \(key)", "phase        \(phase)", "attempts     \(attempts)", "token        \(token)",
                     "lease ends   \(Self.time(leaseExpiresAt))"]
        if let outcome { lines.append("outcome      \(outcome)\(outcomeDetail.map { $0.isEmpty ? "" : " (\($0))" } ?? "")") }
        if let expiresAt { lines.append("forgotten at \(Self.time(expiresAt))") }
        if let lastFailure { lines.append("last failure \(lastFailure)") }
        if let fenceScope, let fenceEpoch { lines.append("fence        \(fenceScope) epoch \(fenceEpoch)") }
        return lines.joined(separator: "\n")
    }

    static func time(_ ms: Int64) -> String {
        let d = Date(timeIntervalSince1970: Double(ms) / 1000)
        return ISO8601DateFormatter().string(from: d)
    }
}

func printJSON<T: Encodable>(_ value: T) throws {
    let e = JSONEncoder()
    e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    print(String(decoding: try e.encode(value), as: UTF8.self))
}

/// `key <key>`: one key's record.
struct KeyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "key", abstract: "Show one idempotency key's record: phase, attempts, outcome, last failure, fence, token, lease.")

    @OptionGroup var backend: BackendOptions
    @Argument(help: "The idempotency key, as stored (for the coupon sale: couponId:memberId).")
    var key: String

    func run() async throws {
        let k: IdempotencyKey
        do { k = try IdempotencyKey(rawValue: key) } catch let e as ExactlyOnceError { throw AdminError(message: e.message, status: 2) }
        let record = try await backend.withStore { try await $0.records(for: [k])[k] }
        guard let record else {
            if backend.json { print("null") }
            throw AdminError(message: "no record of key \(k) (never claimed, or forgotten after its retention)")
        }
        if backend.json { try printJSON(RecordView(record)) } else { print(RecordView(record).text) }
    }
}

/// `keys --phase P`: a filtered listing.
struct KeysCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "keys", abstract: "List records by phase, outcome or last failure.")

    enum PhaseArgument: String, ExpressibleByArgument, CaseIterable { case inProgress, released, completed }
    enum StatusArgument: String, ExpressibleByArgument, CaseIterable { case applied, rejected, deadLettered }

    @OptionGroup var backend: BackendOptions
    @Option(help: "Only records in this phase.") var phase: PhaseArgument?
    @Option(help: "Only completed records with this outcome.") var outcome: StatusArgument?
    @Option(help: "Only records whose last failure contains this text (empty: any failure).") var failure: String?
    @Option(help: "Most records to list.") var limit = 100
    @Option(help: "Start after this cursor (printed at the end of a page).") var cursor: String?

    func run() async throws {
        var q = RecordQuery()
        q.phase = phase.map { p in switch p { case .inProgress: .inProgress; case .released: .released; case .completed: .completed } }
        q.outcomeStatus = outcome.map { s in switch s { case .applied: .applied; case .rejected: .rejected; case .deadLettered: .deadLettered } }
        q.failureContains = failure
        q.limit = min(max(1, limit), 10_000)
        q.cursor = cursor
        let page = try await backend.withStore { try await $0.listRecords(q) }
        if backend.json {
            struct Page: Encodable { var records: [RecordView]; var nextCursor: String? }
            try printJSON(Page(records: page.records.map(RecordView.init), nextCursor: page.nextCursor))
            return
        }
        for r in page.records.map(RecordView.init) {
            print("\(r.key)\t\(r.phase)\tattempts \(r.attempts)\t\(r.outcome ?? "-")\(r.lastFailure.map { "\tlast failure: \($0)" } ?? "")")
        }
        print(page.nextCursor.map { "(more: --cursor '\($0)')" } ?? "(\(page.records.count) records, end of listing)")
    }
}

/// `lag --group G --topic T`.
struct LagCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "lag", abstract: "Committed offset, end offset, lag, owner and epoch of each partition of a group.")

    @OptionGroup var backend: BackendOptions
    @Option(help: "The consumer group.") var group = "coupon-issuers"
    @Option(help: "The topic.") var topic = "coupon-requests"

    func run() async throws {
        let status = try await backend.makeTransport().partitionStatus(group: group, topic: topic)
        if backend.json {
            struct Row: Encodable { var partition: Int; var committed: Int64?; var end: Int64; var lag: Int64; var owner: String?; var epoch: UInt64? }
            struct Lag: Encodable { var group: String; var topic: String; var totalLag: Int64; var partitions: [Row] }
            try printJSON(Lag(group: group, topic: topic, totalLag: status.reduce(0) { $0 + $1.lag }, partitions: status.map {
                Row(partition: $0.partition.rawValue, committed: $0.committed?.rawValue, end: $0.end.rawValue, lag: $0.lag, owner: $0.owner, epoch: $0.epoch)
            }))
            return
        }
        print("partition\tcommitted\tend\tlag\towner\tepoch")
        for s in status {
            print("\(s.partition)\t\(s.committed.map { "\($0)" } ?? "-")\t\(s.end)\t\(s.lag)\t\(s.owner ?? "-")\t\(s.epoch.map { "\($0)" } ?? "-")")
        }
        print("total lag \(status.reduce(0) { $0 + $1.lag }) records (group \(group), topic \(topic))")
    }
}

/// `dlq list|show|replay`.
struct DeadLetterCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "dlq", abstract: "List, show and replay dead letters.",
                                                    subcommands: [List.self, Show.self, Replay.self])

    struct Topic: ParsableArguments {
        @Option(help: "The dead-letter topic (default: <--topic>.dlq).") var dlq: String?
        @Option(help: "The consumed topic.") var topic = "coupon-requests"
        var name: String { dlq ?? topic + ".dlq" }
    }

    struct LetterView: Encodable {
        var partition: Int
        var offset: Int64
        var reason: String
        var key: String?
        var originalTopic: String?
        var originalPartition: Int?
        var originalOffset: Int64?
        var payloadBytes: Int
        init(_ d: DeadLetter) {
            partition = d.record.partition.rawValue
            offset = d.record.offset.rawValue
            reason = d.reason
            key = d.key?.rawValue
            originalTopic = d.originalTopic
            originalPartition = d.originalPartition?.rawValue
            originalOffset = d.originalOffset?.rawValue
            payloadBytes = d.record.payload.count
        }
        var line: String {
            "\(partition)@\(offset)\t\(key ?? "(no key)")\tfrom \(originalTopic ?? "?")/\(originalPartition.map { "\($0)" } ?? "?")@\(originalOffset.map { "\($0)" } ?? "?")\t\(reason)"
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List dead letters: reason, idempotency key, original position.")
        @OptionGroup var backend: BackendOptions
        @OptionGroup var topic: Topic
        @Option(help: "Most entries to list.") var limit = 1_000

        func run() async throws {
            let letters = try await backend.withStore { store in
                try await listLetters(store, transport: try backend.makeTransport(), topic: topic.name, limit: max(1, limit))
            }
            if backend.json { try printJSON(letters.map(LetterView.init)); return }
            for l in letters.map(LetterView.init) { print(l.line) }
            print("(\(letters.count) dead letters in \(topic.name))")
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one dead letter by its position in the dead-letter topic.")
        @OptionGroup var backend: BackendOptions
        @OptionGroup var topic: Topic
        @Option(help: "Its partition in the dead-letter topic.") var partition = 0
        @Option(help: "Its offset there.") var offset: Int64

        func run() async throws {
            let letter = try await backend.withStore { store in
                try await showLetter(store, transport: try backend.makeTransport(), topic: topic.name, partition: PartitionID(partition), offset: Offset(offset))
            }
            guard let letter else { throw AdminError(message: "no dead letter at \(topic.name) \(partition)@\(offset)") }
            if backend.json { try printJSON(LetterView(letter)); return }
            print(LetterView(letter).line)
            for (k, v) in letter.record.headers.sorted(by: { $0.key < $1.key }) { print("  header \(k): \(v)") }
        }
    }

    struct Replay: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Republish chosen dead letters to their original topic, once: a dead-lettered outcome is released first, so the replay is processed, not answered.")
        @OptionGroup var backend: BackendOptions
        @OptionGroup var topic: Topic
        @Option(help: "Replay the dead letters of this idempotency key.") var key: String?
        @Option(help: "Replay the dead letters whose reason contains this text.") var reason: String?
        @Flag(help: "Replay every dead letter.") var all = false

        func validate() throws {
            guard [key != nil, reason != nil, all].filter({ $0 }).count == 1 else {
                throw ValidationError("choose what to replay: exactly one of --key K, --reason TEXT, --all")
            }
        }

        func run() async throws {
            let selection: DeadLetterSelection
            if let key {
                do { selection = .key(try IdempotencyKey(rawValue: key)) } catch let e as ExactlyOnceError { throw AdminError(message: e.message, status: 2) }
            } else if let reason {
                selection = .reason(containing: reason)
            } else {
                selection = .all
            }
            let report = try await backend.withStore { store in
                try await replayLetters(store, transport: try backend.makeTransport(), topic: topic.name, selection)
            }
            if backend.json {
                struct Replayed: Encodable { var from: LetterView; var partition: Int; var offset: Int64 }
                struct Skipped: Encodable { var from: LetterView; var why: String }
                struct Out: Encodable { var replayed: [Replayed]; var reopened: [String]; var skipped: [Skipped] }
                try printJSON(Out(replayed: report.replayed.map { Replayed(from: LetterView($0.deadLetter), partition: $0.position.partition.rawValue, offset: $0.position.offset.rawValue) },
                                  reopened: report.reopened.map { $0.rawValue }, skipped: report.skipped.map { Skipped(from: LetterView($0.deadLetter), why: $0.why) }))
                return
            }
            for r in report.replayed { print("replayed \(LetterView(r.deadLetter).line) -> \(r.position)") }
            for s in report.skipped { print("skipped  \(LetterView(s.deadLetter).line): \(s.why)") }
            print("\(report.replayed.count) replayed (\(selection)), \(report.reopened.count) dead-lettered outcomes released, \(report.skipped.count) skipped")
        }
    }
}

// The dead-letter queue is generic over its store: these open the existential store.
func listLetters<S: DedupeStore, T: MessageTransport>(_ store: S, transport: T, topic: String, limit: Int) async throws -> [DeadLetter] {
    try await DeadLetterQueue(transport: transport, store: store, topic: topic).page(limit: limit).letters
}
func showLetter<S: DedupeStore, T: MessageTransport>(_ store: S, transport: T, topic: String, partition: PartitionID, offset: Offset) async throws -> DeadLetter? {
    try await DeadLetterQueue(transport: transport, store: store, topic: topic).show(partition: partition, offset: offset)
}
func replayLetters<S: DedupeStore, T: MessageTransport>(_ store: S, transport: T, topic: String, _ selection: DeadLetterSelection) async throws -> ReplayReport {
    try await DeadLetterQueue(transport: transport, store: store, topic: topic).replay(selection)
}
