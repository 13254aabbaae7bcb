/// The one error type of the library.
///
/// Errors are structs with a nested ``Code`` rather than a public enum, so new codes can be added
/// without breaking users' `switch` statements (compare codes with `==`, or `switch` over them
/// with a `default`). The ``description`` never carries payloads, passwords or long keys in full:
/// it is safe to log.
///
/// ``isRetriable`` says whether retrying the same operation later can help. The consumer's
/// ``ExactlyOnceConsumer/run()`` waits and retries on retriable errors and stops with any other.
public struct ExactlyOnceError: Error, Sendable, CustomStringConvertible {
    /// What went wrong, as a stable, comparable code.
    ///
    /// Backed by a private enum, so comparing two codes compares no strings.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        fileprivate enum Base: UInt8, Sendable, Hashable, CaseIterable {
            case invalidKey, invalidConfiguration, invalidPartition, invalidPayload
            case storeUnavailable, storeFailure, capacityExceeded, fenced, transactionConflict, unknownKey
            case transportUnavailable, transportFailure, unknownTopic, staleGeneration
            case corruptData, ioFailure, storeLocked, shutDown, limitExceeded, timeout
        }
        fileprivate let base: Base
        private init(_ base: Base) { self.base = base }

        /// A key, part of a key, or a partition key was malformed (empty part, bad character, ...).
        public static let invalidKey = Code(.invalidKey)
        /// A configuration value was refused (out of range, inconsistent, or not supported by
        /// the backend). Not retriable: fix the configuration.
        public static let invalidConfiguration = Code(.invalidConfiguration)
        /// A partition count or explicit partition was out of range.
        public static let invalidPartition = Code(.invalidPartition)
        /// A payload (or a value read back from a backend) could not be decoded.
        public static let invalidPayload = Code(.invalidPayload)
        /// The dedupe store could not be reached, or the reply was lost. Retriable: the outcome
        /// of the operation is unknown, so the caller must claim again before acting.
        public static let storeUnavailable = Code(.storeUnavailable)
        /// The dedupe store answered with an error that retrying will not fix (a refused
        /// command, a schema it does not know, a permission problem). Not retriable.
        public static let storeFailure = Code(.storeFailure)
        /// The store is full and its eviction policy refuses to drop live records. Not
        /// retriable: the store needs more capacity (or retention) before it can take new keys.
        public static let capacityExceeded = Code(.capacityExceeded)
        /// A claim, completion or release was refused because the caller's claim or partition
        /// ownership is no longer current: its lease expired, a newer claim (higher fencing
        /// token) took over, or the partition moved to a newer epoch. The caller must not apply
        /// any effect.
        public static let fenced = Code(.fenced)
        /// The optimistic read set of a transactional effect changed before completion. Retriable.
        public static let transactionConflict = Code(.transactionConflict)
        /// An operation referred to a key the store does not hold.
        public static let unknownKey = Code(.unknownKey)
        /// The transport (broker) could not be reached, or the reply was lost. Retriable: a
        /// publish whose outcome is unknown may have happened (publish again; the consumer's
        /// dedupe makes the repeat harmless, F9).
        public static let transportUnavailable = Code(.transportUnavailable)
        /// The transport refused the operation in a way retrying will not fix (not authorised,
        /// a protocol error, a request the broker does not support). Not retriable.
        public static let transportFailure = Code(.transportFailure)
        /// The topic does not exist. Not retriable: create it first.
        public static let unknownTopic = Code(.unknownTopic)
        /// This member's group generation is stale: it was rebalanced out (or its session
        /// lapsed), so its commits are refused. The consumer rejoins the group.
        public static let staleGeneration = Code(.staleGeneration)
        /// Stored data failed validation (checksum, order, format, version).
        public static let corruptData = Code(.corruptData)
        /// An I/O operation failed.
        public static let ioFailure = Code(.ioFailure)
        /// A store's directory is held by another open store (another process, or another
        /// instance in this one). Not retriable until that one closes.
        public static let storeLocked = Code(.storeLocked)
        /// The component was used after it was shut down.
        public static let shutDown = Code(.shutDown)
        /// A reply or input exceeded a configured limit (a reply too large or nested too deep,
        /// a file of implausible size). Not retriable.
        public static let limitExceeded = Code(.limitExceeded)
        /// An operation did not finish within its deadline. Retriable: the outcome is unknown.
        public static let timeout = Code(.timeout)

        /// Every code, for documentation and tests.
        public static var allCodes: [Code] { Base.allCases.map(Code.init) }

        /// The code's stable name, for logs, metrics and JSON.
        public var name: String {
            switch base {
            case .invalidKey: "invalidKey"
            case .invalidConfiguration: "invalidConfiguration"
            case .invalidPartition: "invalidPartition"
            case .invalidPayload: "invalidPayload"
            case .storeUnavailable: "storeUnavailable"
            case .storeFailure: "storeFailure"
            case .capacityExceeded: "capacityExceeded"
            case .fenced: "fenced"
            case .transactionConflict: "transactionConflict"
            case .unknownKey: "unknownKey"
            case .transportUnavailable: "transportUnavailable"
            case .transportFailure: "transportFailure"
            case .unknownTopic: "unknownTopic"
            case .staleGeneration: "staleGeneration"
            case .corruptData: "corruptData"
            case .ioFailure: "ioFailure"
            case .storeLocked: "storeLocked"
            case .shutDown: "shutDown"
            case .limitExceeded: "limitExceeded"
            case .timeout: "timeout"
            }
        }

        /// Whether retrying the same operation later can succeed: true for an unreachable store
        /// or transport, a deadline that passed, and an optimistic-read conflict; false for
        /// everything that needs a change first (configuration, topic, data, capacity).
        public var isRetriable: Bool {
            switch base {
            case .storeUnavailable, .transportUnavailable, .transactionConflict, .timeout: true
            default: false
            }
        }

        public var description: String { name }
    }

    /// What caused an error, as far as it is safe to keep: the type of the underlying error and
    /// its code (an errno, a server's error class such as `NOSCRIPT`, a SQLSTATE, a librdkafka
    /// error name), never its message, which may quote payloads or credentials.
    public struct Cause: Sendable, Hashable, CustomStringConvertible {
        /// The underlying error's type, for example `POSIXErrorCode` or `RedisServerError`.
        public var type: String
        /// The underlying error's code, when it has one.
        public var code: String?
        /// Creates a cause.
        public init(type: String, code: String? = nil) {
            self.type = type
            self.code = code
        }
        /// The cause of `error`: its type and, for library errors, its code.
        public init(of error: any Error) {
            if let e = error as? ExactlyOnceError {
                self.init(type: "ExactlyOnceError", code: e.code.name)
            } else {
                self.init(type: String(describing: Swift.type(of: error)), code: nil)
            }
        }
        public var description: String { code.map { "\(type)(\($0))" } ?? type }
    }

    /// What went wrong.
    public let code: Code
    /// A human-readable explanation. Never contains payload bytes, secrets or long keys in full.
    public let message: String
    /// What caused it, when it wraps another error (see ``Cause``).
    public let cause: Cause?

    /// Creates an error.
    public init(_ code: Code, _ message: String, cause: Cause? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    /// Whether retrying the same operation later may succeed (see ``Code/isRetriable``).
    public var isRetriable: Bool { code.isRetriable }

    public var description: String {
        if let cause { return "ExactlyOnceError(\(code.name)): \(message) [cause: \(cause)]" }
        return "ExactlyOnceError(\(code.name)): \(message)"
    }
}

extension ExactlyOnceError: Equatable {
    /// Two errors are equal when code, message and cause are.
    public static func == (l: ExactlyOnceError, r: ExactlyOnceError) -> Bool {
        l.code == r.code && l.message == r.message && l.cause == r.cause
    }
}
