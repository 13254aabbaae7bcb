/// The handler's view of the store's transactional state (G3): reads go to the store and are
/// remembered with their versions; writes are buffered and committed atomically with the
/// record's completion, or dropped if the handler throws.
public struct EffectTransaction: Sendable {
    private let store: any DedupeStore
    private let pending: PendingEffects?
    /// What was read (with versions) and written so far; also the cache of read values.
    private var recorded = EffectWrites.none
    /// The values read, parallel to `recorded.readList`.
    private var readValues: [[UInt8]?] = []

    /// Starts a transaction on `store`.
    public init(store: any DedupeStore) {
        self.store = store
        self.pending = nil
    }

    /// Starts a transaction that also sees the writes of completions not yet sent to the store.
    init(store: any DedupeStore, pending: PendingEffects) {
        self.store = store
        self.pending = pending
    }

    /// The value of `key`, seeing this transaction's own writes (and the lane's pending ones).
    public mutating func get(_ key: String) async throws -> [UInt8]? {
        if let written = recorded.written(key) { return written }
        if let i = recorded.readList.firstIndex(where: { $0.key == key }) { return readValues[i] }
        let v = try await store.readState(key)
        if readValues.capacity == 0 { readValues.reserveCapacity(2) }
        if let p = pending?.writes[key] {
            // Not applied yet: by the time this completes, the pending writes will have been.
            recorded.noteRead(key, v.version + UInt64(p.count))
            readValues.append(p.value)
            return p.value
        }
        recorded.noteRead(key, v.version)
        readValues.append(v.value)
        return v.value
    }

    /// Buffers a write of `value` to `key`.
    public mutating func set(_ key: String, _ value: [UInt8]) { recorded.noteWrite(key, value) }

    /// Buffers the removal of `key`.
    public mutating func remove(_ key: String) { recorded.noteWrite(key, nil) }

    /// `key` as a decimal integer (nil when absent).
    /// - Throws: ``ExactlyOnceError/Code/invalidPayload`` when the stored value is not an integer.
    public mutating func getInt(_ key: String) async throws -> Int64? {
        guard let bytes = try await get(key) else { return nil }
        guard let v = Self.decimal(bytes) else {
            throw ExactlyOnceError(.invalidPayload, "state key \(IdempotencyKey.abbreviate(key)) does not hold an integer")
        }
        return v
    }

    /// Buffers `value` as a decimal integer.
    public mutating func setInt(_ key: String, _ value: Int64) { set(key, Self.decimalBytes(value)) }

    /// What the transaction read and wrote.
    public var effects: EffectWrites { recorded }

    /// The ASCII decimal form of `value`, without an intermediate string.
    static func decimalBytes(_ value: Int64) -> [UInt8] {
        var magnitude = value.magnitude
        var digits: [UInt8] = []
        digits.reserveCapacity(20)
        repeat {
            digits.append(UInt8(ascii: "0") + UInt8(magnitude % 10))
            magnitude /= 10
        } while magnitude > 0
        if value < 0 { digits.append(UInt8(ascii: "-")) }
        digits.reverse()
        return digits
    }

    /// Parses an ASCII decimal integer (optional leading `-`, at most 19 digits), as `Int64(_:)` does.
    static func decimal(_ bytes: [UInt8]) -> Int64? {
        var i = 0
        var negative = false
        if bytes.first == UInt8(ascii: "-") || bytes.first == UInt8(ascii: "+") {
            negative = bytes[0] == UInt8(ascii: "-")
            i = 1
        }
        guard i < bytes.count else { return nil }
        // Up to 18 digits cannot overflow; longer ones take the standard library's checked path.
        guard bytes.count - i <= 18 else { return Int64(String(decoding: bytes, as: UTF8.self)) }
        var v: Int64 = 0
        while i < bytes.count {
            let d = bytes[i] &- UInt8(ascii: "0")
            guard d < 10 else { return nil }
            v = v * 10 + Int64(d)
            i += 1
        }
        return negative ? -v : v
    }
}

/// The writes of a lane's completions that are buffered for one batched store call. Handlers of
/// later records read through it, so a lane sees its own effects in order.
///
/// `@unchecked Sendable`: a lane is one sequential task, and only that task creates, reads and
/// mutates its `PendingEffects` (handlers run inline in it), so there is no concurrent access.
final class PendingEffects: @unchecked Sendable {
    var writes: [String: (value: [UInt8]?, count: Int)] = [:]
    func add(_ effects: EffectWrites) {
        for w in effects.writeList { writes[w.key] = (w.value, (writes[w.key]?.count ?? 0) + 1) }
    }
    func clear() { writes.removeAll(keepingCapacity: true) }
}

/// The completion batch of key-value stores: a handler's effect is an ``EffectTransaction``
/// whose reads and buffered writes travel with its ``Completion``; ``commit()`` sends the staged
/// completions in one `complete(_:)` (the batch form) call, which the store applies
/// atomically per completion (G3), in order, stopping at the first it refuses.
///
/// Handlers of later records in the batch read the staged writes of earlier ones (an overlay),
/// so a lane sees its own effects in order before they are committed. A commit whose outcome is
/// unknown is resent with the same claims up to ``CompletionBatchOptions/unknownOutcomeRetries``
/// times: completions are idempotent per fencing token.
public struct KeyValueBatch<Store: DedupeStore>: CompletionBatch {
    /// The key-value transaction.
    public typealias Transaction = EffectTransaction

    let store: Store
    let options: CompletionBatchOptions
    var staged: [Completion] = []
    /// The overlay of staged writes; nil when the batch holds one completion at a time.
    let pending: PendingEffects?

    /// Creates an empty batch over `store`.
    public init(store: Store, options: CompletionBatchOptions) {
        self.store = store
        self.options = options
        self.pending = options.limit > 1 ? PendingEffects() : nil
        staged.reserveCapacity(options.limit)
    }

    /// Completions staged.
    public var count: Int { staged.count }

    /// Runs the handler with a transaction that sees the store and the staged writes; stages the
    /// completion with the transaction's reads and writes.
    public mutating func perform(_ claim: Claim, _ body: (inout EffectTransaction) async throws -> Outcome) async throws -> Outcome {
        var transaction = pending.map { EffectTransaction(store: store, pending: $0) } ?? EffectTransaction(store: store)
        let outcome = try await body(&transaction)
        let effects = transaction.effects
        pending?.add(effects)
        staged.append(Completion(claim: claim, outcome: outcome, effects: effects))
        return outcome
    }

    /// Stages a completion without effect.
    public mutating func stage(_ claim: Claim, outcome: Outcome) async throws {
        staged.append(Completion(claim: claim, outcome: outcome))
    }

    /// Sends the staged completions in one call, resending after an unknown outcome.
    public mutating func commit() async throws -> BatchCompletion {
        guard !staged.isEmpty else { return BatchCompletion(applied: 0, failure: nil) }
        // Moved out and back, so clearing keeps the buffer (no copy-on-write of a shared array).
        var batch: [Completion] = []
        swap(&batch, &staged)
        defer {
            batch.removeAll(keepingCapacity: true)
            staged = batch
            pending?.clear()
        }
        var attempt = 0
        while true {
            do {
                let result = try await store.complete(batch)
                return BatchCompletion(applied: min(max(result.applied, 0), batch.count), failure: result.failure)
            } catch let e as ExactlyOnceError where e.isRetriable && e.code != .transactionConflict && attempt < options.unknownOutcomeRetries {
                attempt += 1
                let d = options.backoff.delay(forRetry: attempt)
                if d > .zero { try await Task.sleep(for: d) }
            }
        }
    }

    /// Drops the staged completions and the overlay.
    public mutating func discard() async {
        staged.removeAll(keepingCapacity: true)
        pending?.clear()
    }
}
