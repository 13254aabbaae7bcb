import ArgumentParser
import ExactlyOnce
import Foundation

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
    static let configuration = CommandConfiguration(commandName: "keys", abstract: "List records by phase, outcome or last failure, a page at a time.")

    enum PhaseArgument: String, ExpressibleByArgument, CaseIterable { case inProgress, released, completed }
    enum StatusArgument: String, ExpressibleByArgument, CaseIterable { case applied, rejected, deadLettered }

    @OptionGroup var backend: BackendOptions
    @Option(help: "Only records in this phase.") var phase: PhaseArgument?
    @Option(help: "Only completed records with this outcome.") var outcome: StatusArgument?
    @Option(help: "Only records whose last failure contains this text (empty: any failure).") var failure: String?
    @Option(help: "Most records to list (1...10000).") var limit = 100
    @Option(help: "Start after this cursor (printed at the end of a page).") var cursor: String?

    func validate() throws {
        guard (1...10_000).contains(limit) else { throw ValidationError("--limit must be in 1...10000, got \(limit)") }
    }

    func run() async throws {
        var q = RecordQuery()
        q.phase = phase.map { p in switch p { case .inProgress: .inProgress; case .released: .released; case .completed: .completed } }
        q.outcomeStatus = outcome.map { s in switch s { case .applied: .applied; case .rejected: .rejected; case .deadLettered: .deadLettered } }
        q.failureContains = failure
        q.limit = limit
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
        print(page.nextCursor.map { "(\(page.records.count) records; more: --cursor '\($0)')" } ?? "(\(page.records.count) records, end of listing)")
    }
}

/// `lag --group G --topic T`.
struct LagCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lag",
        abstract: "Committed offset, end offset, lag, owner and epoch of each partition of a group.",
        discussion: "On Kafka, owner and epoch are known only inside the consumer processes: they are shown as unknown, with a note.")

    @OptionGroup var backend: BackendOptions
    @Option(help: "The consumer group.") var group = "coupon-issuers"
    @Option(help: "The topic.") var topic = "coupon-requests"

    func run() async throws {
        let opened = try backend.makeTransport()
        let status = try await opened.transport.partitionStatus(group: group, topic: topic)
        let total = status.reduce(0) { $0 + $1.lag }
        if backend.json {
            struct Row: Encodable { var partition: Int; var committed: Int64?; var end: Int64; var lag: Int64; var owner: String?; var epoch: UInt64? }
            struct Lag: Encodable {
                var group: String; var topic: String; var totalLag: Int64; var partitions: [Row]
                /// False when owner and epoch are unknown to this process (null then means unknown, not unowned).
                var ownersKnown: Bool
                var note: String?
            }
            try printJSON(Lag(group: group, topic: topic, totalLag: total, partitions: status.map {
                Row(partition: $0.partition.rawValue, committed: $0.committed?.rawValue, end: $0.end.rawValue, lag: $0.lag,
                    owner: opened.ownersUnknown == nil ? $0.owner : nil, epoch: opened.ownersUnknown == nil ? $0.epoch : nil)
            }, ownersKnown: opened.ownersUnknown == nil, note: opened.ownersUnknown))
            return
        }
        print("partition\tcommitted\tend\tlag\towner\tepoch")
        for s in status {
            let owner = opened.ownersUnknown == nil ? s.owner ?? "-" : "unknown"
            let epoch = opened.ownersUnknown == nil ? s.epoch.map { "\($0)" } ?? "-" : "unknown"
            print("\(s.partition)\t\(s.committed.map { "\($0)" } ?? "-")\t\(s.end)\t\(s.lag)\t\(owner)\t\(epoch)")
        }
        print("total lag \(total) records (group \(group), topic \(topic))")
        if let note = opened.ownersUnknown { print("note: \(note)") }
    }
}
