/// The one error type of the library.
///
/// Errors are structs with a nested ``Code`` rather than a public enum, so new codes can be added
/// without breaking users' `switch` statements. The ``description`` never carries payloads,
/// passwords or long keys in full: it is safe to log.
public struct ExactlyOnceError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What went wrong, as a stable, comparable code.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        /// The code's stable name.
        public let name: String
        private init(_ name: String) { self.name = name }

        /// A key, part of a key, or a partition key was malformed (empty part, bad character, ...).
        public static let invalidKey = Code("invalidKey")
        /// A configuration value was out of range.
        public static let invalidConfiguration = Code("invalidConfiguration")
        /// A partition count or explicit partition was out of range.
        public static let invalidPartition = Code("invalidPartition")
        /// A payload could not be decoded.
        public static let invalidPayload = Code("invalidPayload")
        /// The dedupe store could not be reached or answered with an error. Retriable: the
        /// outcome of the operation is unknown, so the caller must claim again before acting.
        public static let storeUnavailable = Code("storeUnavailable")
        /// The store is full and its eviction policy refuses to drop live records. Retriable.
        public static let capacityExceeded = Code("capacityExceeded")
        /// A completion or release was refused because the caller's claim is no longer current:
        /// its lease expired, a newer claim (higher fencing token) took over, or the partition
        /// moved to a newer epoch. The caller must not apply any effect.
        public static let fenced = Code("fenced")
        /// The optimistic read set of a transactional effect changed before completion. Retriable.
        public static let transactionConflict = Code("transactionConflict")
        /// A completion referred to a key the store does not hold.
        public static let unknownKey = Code("unknownKey")
        /// The transport refused the operation (unknown topic, not a member, ...).
        public static let transportFailure = Code("transportFailure")
        /// A commit was refused because this member's generation is stale (it was rebalanced out).
        public static let staleGeneration = Code("staleGeneration")
        /// Stored data failed validation (checksum, format, version).
        public static let corruptData = Code("corruptData")
        /// An I/O operation failed.
        public static let ioFailure = Code("ioFailure")
        /// A store's directory is held by another open store (another process, or another
        /// instance in this one). Not retriable until that one closes.
        public static let storeLocked = Code("storeLocked")
        /// The component was used after it was shut down.
        public static let shutDown = Code("shutDown")

        public var description: String { name }
    }

    /// What went wrong.
    public let code: Code
    /// A human-readable explanation. Never contains payload bytes, secrets or long keys in full.
    public let message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// Whether retrying the same operation later may succeed.
    public var isRetriable: Bool {
        code == .storeUnavailable || code == .capacityExceeded || code == .transactionConflict
            || code == .transportFailure || code == .ioFailure
    }

    public var description: String { "ExactlyOnceError(\(code.name)): \(message)" }
}
