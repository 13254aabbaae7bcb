import Metrics
import Logging
import ServiceLifecycle

/// The exactly-once-effect consumer: turns the transport's at-least-once delivery into one effect
/// per idempotency key, in order, committing offsets only past finished records.
///
/// For every poll: records are grouped by partition; each partition is a lane and lanes run in
/// parallel. In a lane the batch's keys are claimed in one store call; new records run the
/// handler, whose effect commits with the record's completion; duplicates get the stored
/// outcome; conflicts and records that exhaust their attempts go to the dead-letter topic. Then
/// the finished prefix of each lane is committed. A lane that cannot finish a record (store
/// unreachable, key held elsewhere) stops there, commits what precedes it and re-reads the rest.
/// A lane whose partition moved on is fenced by the store and commits nothing. Within a lane,
/// records run one at a time (``Ordering/partition``) or one sequence per record key
/// (``Ordering/key(maxConcurrency:)``).
///
/// Run it as a `Service` in a `ServiceGroup`: ``run()`` joins the group, processes until
/// cancelled or gracefully shut down (finishing and committing the batch in hand), and leaves
/// the group on every way out.
public final class ExactlyOnceConsumer<Transport: MessageTransport, Store: DedupeStore>: Service {
    let transport: Transport
    let store: Store
    let configuration: ConsumerConfiguration
    let keyFor: KeyExtractor
    let handler: RecordHandler<Store.Transaction>
    let observer: OutcomeObserver?
    let faults: any FaultInjector
    /// False when no injector was given: the hot path then skips the hook calls entirely.
    let faultsEnabled: Bool
    let logger: Logger
    let metrics: ConsumerMetrics
    /// Whether a tracer is bootstrapped: handlers then run in spans.
    let tracing: Bool

    /// Creates a consumer. Nothing runs until ``run()`` (or ``makeSession()``).
    /// - Parameters:
    ///   - transport: where records come from (and dead letters go).
    ///   - store: the dedupe store; its ``DedupeStore/Transaction`` is what the handler writes with.
    ///   - configuration: topic, group, member and tuning.
    ///   - logger: where the consumer logs (info and below; per-record events at debug).
    ///   - key: derives each record's idempotency key.
    ///   - observer: receives every outcome, replayed or not (to answer clients).
    ///   - faults: fault injection (tests and demos only).
    ///   - handler: the effect for new records.
    /// - Throws: ``ExactlyOnceError/Code/invalidConfiguration`` for an invalid configuration.
    public init(transport: Transport, store: Store, configuration: ConsumerConfiguration, logger: Logger,
                key: @escaping KeyExtractor, observer: OutcomeObserver? = nil, faults: any FaultInjector = NoFaults(),
                handler: @escaping RecordHandler<Store.Transaction>) throws {
        try configuration.validate()
        self.transport = transport
        self.store = store
        self.configuration = configuration
        self.keyFor = key
        self.handler = handler
        self.observer = observer
        self.faults = faults
        self.faultsEnabled = !(faults is NoFaults)
        self.logger = logger
        self.metrics = ConsumerMetrics(group: configuration.group, topic: configuration.topic)
        self.tracing = tracingEnabled()
    }

    /// Joins the group and processes until cancelled or gracefully shut down.
    ///
    /// - A graceful shutdown finishes the batch in hand, commits it, leaves the group and returns.
    /// - Cancellation stops at the next suspension point, leaves the group and returns.
    /// - Retriable errors (an unreachable transport or store) are waited out with
    ///   ``ConsumerConfiguration/unavailableBackoff``; a member that was rebalanced out joins
    ///   again.
    /// - Any other error (an unknown topic or dead-letter topic, a refused configuration, a full
    ///   store, damaged data, a partition fenced for longer than
    ///   ``ConsumerConfiguration/maxFencedDuration``) leaves the group and is thrown.
    public func run() async throws {
        var session: ConsumerSession<Transport, Store>?
        var failures = 0
        do {
            while !Task.isShuttingDownGracefully && !Task.isCancelled {
                do {
                    if session == nil { session = try await makeSession() }
                    try await session!.step()
                    failures = 0
                } catch let e as ExactlyOnceError where e.code == .staleGeneration {
                    logger.info("this member was rebalanced out (or its session lapsed); joining again", metadata: [
                        "member": "\(configuration.memberID)", "error": "\(e)",
                    ])
                    await leave(session)
                    session = nil
                } catch let e as ExactlyOnceError where e.isRetriable {
                    failures += 1
                    metrics.pollFailures.increment()
                    let metadata: Logger.Metadata = ["member": "\(configuration.memberID)", "error": "\(e)", "retry": "\(failures)"]
                    if failures == 1 {
                        logger.info("transport or store unreachable; retrying", metadata: metadata)
                    } else {
                        logger.debug("transport or store still unreachable; retrying", metadata: metadata)
                    }
                    await wait(configuration.unavailableBackoff.delay(forRetry: failures))
                }
            }
        } catch is CancellationError where Task.isCancelled {
            await leave(session)
            return
        } catch {
            await leave(session)
            throw error
        }
        await leave(session)
    }

    /// Checks that the topic and the dead-letter topic exist, joins the group, and returns a
    /// session that processes one poll per ``ConsumerSession/step()``. The service's ``run()``
    /// loops over this; the simulator drives it step by step.
    /// - Throws: ``ExactlyOnceError/Code/unknownTopic`` naming the topic that is missing.
    public func makeSession() async throws -> ConsumerSession<Transport, Store> {
        try await requireTopic(configuration.topic, "the topic to consume")
        try await requireTopic(configuration.deadLetterTopic, "the dead-letter topic (records that cannot be processed go there)")
        let sub = try await transport.subscribe(topic: configuration.topic, group: configuration.group, memberID: configuration.memberID)
        return ConsumerSession(consumer: self, subscription: sub)
    }

    private func requireTopic(_ topic: String, _ what: String) async throws {
        do {
            _ = try await transport.partitionCount(of: topic)
        } catch let e as ExactlyOnceError where e.code == .unknownTopic {
            throw ExactlyOnceError(.unknownTopic, "\(what), \(topic), does not exist: create it before starting the consumer", cause: .init(of: e))
        }
    }

    /// Leaves the group, even when the calling task is cancelled (the close runs in a task of
    /// its own, so a cancelled caller still leaves instead of waiting out its session).
    private func leave(_ session: ConsumerSession<Transport, Store>?) async {
        guard let subscription = session?.subscription else { return }
        let logger = self.logger
        let member = configuration.memberID
        await Task {
            do {
                try await subscription.close()
            } catch {
                logger.info("leaving the group failed; the transport expels this member when its session lapses", metadata: [
                    "member": "\(member)", "error": "\(error)",
                ])
            }
        }.value
    }

    /// Sleeps, unless a graceful shutdown or cancellation comes first.
    func wait(_ duration: Duration) async {
        guard duration > .zero else { return }
        try? await cancelWhenGracefulShutdown {
            try await Task.sleep(for: duration)
        }
    }
}
