import Dispatch
import ExactlyOnce
import Logging
import Synchronization

/// Configuration of a simulated run. Every choice the simulator makes comes from ``seed``, so a
/// failing run is reproduced by running the same configuration again.
public struct SimulationConfiguration: Sendable {
    /// The seed of every random choice.
    public var seed: UInt64
    /// Partitions of the topic. Default: 3.
    public var partitions = 3
    /// Members at the start. Default: 2.
    public var initialMembers = 2
    /// Most members at once. Default: 4.
    public var maxMembers = 4
    /// Probability of a crash at each failure point reached (F1-F6). Default: 0.02.
    public var crashRate = 0.02
    /// Probability that a member pauses at a per-record failure point long enough to be
    /// expelled, while others take over its partitions, and then resumes as a zombie (F7, F11). Default: 0.01.
    public var zombieRate = 0.01
    /// Probability that a store operation fails as unreachable, before or after it applied (F8). Default: 0.02.
    public var storeFaultRate = 0.02
    /// Probability per tick of a member joining or leaving (F7). Default: 0.03.
    public var rebalanceRate = 0.03
    /// Probability that a published record is published again by a "producer retry" (F9). Default: 0.1.
    public var republishRate = 0.1
    /// Records published per publish tick. Default: 4.
    public var publishChunk = 4
    /// Records per poll. Default: 8.
    public var maxPollRecords = 8
    /// Attempts before dead-lettering (F12). Default: 3.
    public var maxAttempts = 3
    /// Ticks before the fault phase ends. Default: 4,000.
    public var maxTicks = 4_000
    /// Steps allowed to drain after the fault phase. Default: 4,000.
    public var maxDrainSteps = 4_000
    /// The consumers' ordering mode. Default: `Ordering/partition`.
    public var ordering: Ordering = .partition
    /// Creates a configuration.
    public init(seed: UInt64) { self.seed = seed }
}

/// What a simulated run did and left behind.
public struct SimulationReport: Sendable {
    /// The seed.
    public var seed: UInt64
    /// Ticks of the fault phase.
    public var ticks = 0
    /// Members killed by injected crashes.
    public var crashes = 0
    /// Members that paused, were expelled and resumed as zombies.
    public var zombies = 0
    /// Completions refused to zombies or rebalanced-out lanes (fencing at work).
    public var fencedLanes = 0
    /// Joins and leaves.
    public var rebalances = 0
    /// Store operations failed on purpose.
    public var storeFaults = 0
    /// Extra publishes by producer retries.
    public var republished = 0
    /// Failure points hit by a fault, by name.
    public var faultsByPoint: [String: Int] = [:]
    /// Whether every partition was committed to its end after the drain.
    public var drained = false
    /// Every record of the topic, each partition's in offset order.
    public var log: [ConsumedRecord] = []
    /// Every record of the dead-letter topic.
    public var deadLetters: [ConsumedRecord] = []

    /// A one-line summary, with the seed to reproduce it.
    public var summary: String {
        "seed=\(seed) ticks=\(ticks) crashes=\(crashes) zombies=\(zombies) fenced=\(fencedLanes) rebalances=\(rebalances) storeFaults=\(storeFaults) republished=\(republished) drained=\(drained) dlq=\(deadLetters.count)"
    }
}

/// The deterministic fault-injection simulator.
///
/// It runs a consumer group over the in-memory transport and a store of your choice with a
/// manual clock, all on one task, so a run is a pure function of the seed. It publishes your
/// records (with producer retries, F9) while members poll and process them through
/// `ExactlyOnceConsumer`, and injects, by seed: crashes at every failure point (F1-F6),
/// rebalances (F7), an unreachable store (F8), zombies whose lease and session lapsed while
/// paused (F11). Poison records (F12) and conflicting payloads (F10) come from your workload and
/// handler. After the fault phase it drains without faults and reports whether every partition
/// was committed to its end.
///
/// Check your invariants on the report and on the store afterwards.
public final class Simulator<Store: DedupeStore> {
    /// The configuration.
    public let configuration: SimulationConfiguration
    /// The topic name.
    public let topic = "sim"
    /// The consumer group.
    public let group = "sim-group"

    let clock = ManualClock()
    let transport: InMemoryTransport
    let shared: SimulatorShared
    private(set) var store: FaultyStore<Store>!
    private var members: [Member] = []
    private var nextMember = 0
    private var depth = 0
    private(set) var report: SimulationReport

    final class Member {
        let id: String
        let session: ConsumerSession<InMemoryTransport, FaultyStore<Store>>
        init(id: String, session: ConsumerSession<InMemoryTransport, FaultyStore<Store>>) {
            self.id = id
            self.session = session
        }
    }

    /// Creates a simulator.
    public init(configuration: SimulationConfiguration) throws {
        self.configuration = configuration
        var tc = InMemoryTransport.Configuration()
        tc.sessionTimeout = .seconds(30)
        self.transport = try InMemoryTransport(topics: ["sim": configuration.partitions, "sim.dlq": 1], configuration: tc, clock: clock)
        self.shared = SimulatorShared(seed: configuration.seed)
        self.report = SimulationReport(seed: configuration.seed)
    }

    func chance(_ p: Double) -> Bool { shared.rng.withLock { $0.chance(p) } }
    func pick(_ n: Int) -> Int { shared.rng.withLock { Int($0.next() % UInt64(max(1, n))) } }

    private var keyFor: KeyExtractor!
    private var handler: RecordHandler<Store.Transaction>!

    /// Runs the simulation and returns its report and the (unwrapped) store.
    /// - Parameters:
    ///   - records: the workload, in publish order.
    ///   - partitioning: how records are partitioned (for the coupon sale, `Partitioning/modulo`).
    ///   - makeStore: makes the store under test from the simulator's clock.
    ///   - key: the key extractor.
    ///   - handler: your handler.
    ///
    /// With key ordering (records of one partition running concurrently) the whole run is
    /// confined to one serial executor, so concurrency is interleaving at suspension points only
    /// and the run stays a function of the seed (for stores that never suspend on other threads).
    public func run(records: [OutgoingRecord], partitioning: Partitioning, makeStore: (ManualClock) async throws -> Store,
                    key: @escaping KeyExtractor, handler: @escaping RecordHandler<Store.Transaction>) async throws -> (SimulationReport, Store) {
        guard configuration.ordering.runsKeysConcurrently else {
            return try await runBody(records: records, partitioning: partitioning, makeStore: makeStore, key: key, handler: handler)
        }
        let executor = SerialJobExecutor()
        return try await withTaskExecutorPreference(executor) {
            try await runBody(records: records, partitioning: partitioning, makeStore: makeStore, key: key, handler: handler)
        }
    }

    private func runBody(records: [OutgoingRecord], partitioning: Partitioning, makeStore: (ManualClock) async throws -> Store,
                         key: @escaping KeyExtractor, handler: @escaping RecordHandler<Store.Transaction>) async throws -> (SimulationReport, Store) {
        let base = try await makeStore(clock)
        let rate = configuration.storeFaultRate
        store = FaultyStore(base) { [shared] op in
            guard shared.faultsOn.load(ordering: .relaxed), op != .records else { return .none }
            return shared.rng.withLock { r in
                guard r.chance(rate) else { return .none }
                return r.chance(0.5) ? .failBefore : .failAfter
            }
        }
        keyFor = key
        self.handler = handler
        for _ in 0..<configuration.initialMembers { try await addMember() }

        var published = 0
        var tick = 0
        while tick < configuration.maxTicks && (published < records.count || !transport.isFullyCommitted(group: group, topic: topic)) {
            tick += 1
            // The in-memory transport and store never suspend: yield now and then so a long run
            // does not hold a thread of the cooperative pool from everything else.
            if tick % 128 == 0 { await Task.yield() }
            if published < records.count && chance(0.3) {
                for _ in 0..<configuration.publishChunk where published < records.count {
                    _ = try transport.publishSync(records[published], to: topic, partitioning: partitioning)
                    if chance(configuration.republishRate) {
                        // A producer retry: the same record again, now or a little later.
                        let again = records[max(0, published - pick(3))]
                        _ = try transport.publishSync(again, to: topic, partitioning: partitioning)
                        report.republished += 1
                    }
                    published += 1
                }
            } else if chance(configuration.rebalanceRate) {
                if members.count < configuration.maxMembers && (members.count <= 1 || chance(0.5)) {
                    try await addMember()
                } else if members.count > 1 {
                    let m = members.remove(at: pick(members.count))
                    try await m.session.close()
                }
                report.rebalances += 1
            } else if chance(0.02) {
                clock.advance(by: .seconds(1))
            } else {
                if members.isEmpty { try await addMember() }
                try await stepMember(at: pick(members.count))
            }
        }
        report.ticks = tick
        // Drain: no more faults; whoever is alive finishes the work.
        shared.faultsOn.store(false, ordering: .relaxed)
        while published < records.count {
            _ = try transport.publishSync(records[published], to: topic, partitioning: partitioning)
            published += 1
        }
        var steps = 0
        while steps < configuration.maxDrainSteps && !transport.isFullyCommitted(group: group, topic: topic) {
            if members.isEmpty { try await addMember() }
            try await stepMember(at: steps % members.count)
            steps += 1
            if steps % 128 == 0 { await Task.yield() }
            if steps % 50 == 0 { clock.advance(by: .seconds(5)) }  // let abandoned leases lapse
        }
        report.drained = transport.isFullyCommitted(group: group, topic: topic)
        for p in 0..<configuration.partitions { report.log += transport.records(topic: topic, partition: PartitionID(p)) }
        report.deadLetters = transport.records(topic: "sim.dlq", partition: 0)
        report.storeFaults = store.faultsInjected
        return (report, base)
    }

    func addMember() async throws {
        nextMember += 1
        let id = "m\(nextMember)"
        var cc = ConsumerConfiguration(topic: topic, group: group, memberID: id)
        cc.maxPollRecords = configuration.maxPollRecords
        cc.maxAttempts = configuration.maxAttempts
        cc.lease = .seconds(10)
        cc.retryBackoff = .none
        cc.unavailableBackoff = .none
        cc.completionRetries = 1
        cc.concurrentLanes = false
        cc.pollWait = .zero
        cc.ordering = configuration.ordering
        cc.deadLetterTopic = "sim.dlq"
        let consumer = try ExactlyOnceConsumer(
            transport: transport, store: store!, configuration: cc, logger: Logger(label: "sim", factory: { _ in SwiftLogNoOpLogHandler() }),
            key: keyFor, faults: SimulatorFaults(simulator: self), handler: handler)
        members.append(Member(id: id, session: try await consumer.makeSession()))
    }

    func stepMember(at index: Int) async throws {
        let m = members[index]
        do {
            let r = try await m.session.step()
            report.fencedLanes += r.fencedLanes
        } catch is InjectedCrash {
            kill(m)
            report.crashes += 1
        } catch let e as ExactlyOnceError where e.code == .staleGeneration {
            // Expelled (session lapsed or zombie): it rejoins as a new member, like a restarted process.
            kill(m)
        }
    }

    func kill(_ m: Member) {
        transport.expel(memberID: m.id, group: group, topic: topic)
        members.removeAll { $0 === m }
    }

    /// Called by the consumer at each failure point.
    func reach(_ point: FailurePoint, _ context: FaultContext) async throws {
        guard shared.faultsOn.load(ordering: .relaxed), depth == 0 else { return }
        if chance(configuration.crashRate) {
            report.faultsByPoint[point.name, default: 0] += 1
            throw InjectedCrash(at: point)
        }
        let perRecord = point == .afterClaim || point == .insideEffect || point == .afterEffect || point == .afterComplete
        guard perRecord, chance(configuration.zombieRate), let me = members.first(where: { $0.id == context.memberID }) else { return }
        // Pause: the member's session and leases lapse, others take over, then it resumes.
        report.zombies += 1
        report.faultsByPoint["F11.zombie@" + point.name, default: 0] += 1
        transport.expel(memberID: me.id, group: group, topic: topic)
        members.removeAll { $0 === me }
        clock.advance(by: .seconds(11))
        depth += 1
        defer { depth -= 1 }
        if members.isEmpty { try await addMember() }
        for _ in 0..<3 {
            for i in members.indices.reversed() where i < members.count { try await stepMember(at: i) }
        }
    }
}

/// The simulator's fault injector. `@unchecked Sendable`: the simulator runs every member on
/// one task, so the simulator it points to is never touched concurrently.
final class SimulatorFaults<Store: DedupeStore>: FaultInjector, @unchecked Sendable {
    unowned let simulator: Simulator<Store>
    init(simulator: Simulator<Store>) { self.simulator = simulator }
    func reach(_ point: FailurePoint, _ context: FaultContext) async throws {
        try await simulator.reach(point, context)
    }
}

final class SimulatorShared: Sendable {
    let rng: Mutex<SeededRandom>
    let faultsOn = Atomic<Bool>(true)
    init(seed: UInt64) { rng = Mutex(SeededRandom(seed: seed)) }
}

/// Runs every job on one serial queue, in the order enqueued: tasks that prefer it (and their
/// child tasks) interleave at suspension points and never run in parallel.
final class SerialJobExecutor: TaskExecutor, @unchecked Sendable {
    // @unchecked: the only state is the serial queue, which is thread-safe.
    private let queue = DispatchQueue(label: "exactly-once.simulator")

    func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        queue.async { unowned.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}
