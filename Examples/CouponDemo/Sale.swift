import CouponKit
import ExactlyOnce
import ExactlyOnceFileStore
import ExactlyOnceRedis
import ExactlyOnceTestKit
import Foundation
#if Postgres
import ExactlyOncePostgres
#endif
import Logging
import Synchronization

/// Generates the sale's clicks from the seed: the same seed always gives the same requests in the same order.
func generateRequests(_ o: SaleOptions) -> [CouponRequest] {
    var rng = SeededRandom(seed: o.seed)
    var out: [CouponRequest] = []
    out.reserveCapacity(o.requests)
    for i in 0..<o.requests {
        if !out.isEmpty && rng.chance(o.duplicateRate) {
            var again = out[Int(rng.next() % UInt64(out.count))]
            // Half are producer retries (same request id), half double clicks (new request id).
            if rng.chance(0.5) { again.requestId = Int64(i + 1) }
            out.append(again)
        } else {
            out.append(CouponRequest(requestId: Int64(i + 1), couponId: Int64(1 + rng.next() % UInt64(o.coupons)),
                                     memberId: Int64(1 + rng.next() % UInt64(o.members))))
        }
    }
    return out
}

/// Crashes a consumer at a failure point with the configured chance.
final class DemoFaults: FaultInjector {
    let rate: Double
    let rng: Mutex<SeededRandom>
    init(rate: Double, seed: UInt64) {
        self.rate = rate
        self.rng = Mutex(SeededRandom(seed: seed ^ 0xC0FFEE))
    }
    func reach(_ point: FailurePoint, _ context: FaultContext) async throws {
        if rate > 0, rng.withLock({ $0.chance(rate) }) { throw InjectedCrash(at: point) }
    }
}

/// What the sale's processes count while they run.
final class Counters: Sendable {
    let polled = Atomic<Int>(0)
    let unavailable = Atomic<Int>(0)
    let duplicates = Atomic<Int>(0)
    let crashes = Atomic<Int>(0)
    let done = Atomic<Bool>(false)
    /// Milliseconds since the start at the last sign of progress (a publish or a finished record).
    let lastProgress = Atomic<Int>(0)
}

/// Runs one sale (or one role of it) and returns the exit status: 0 when the audit is clean.
struct SaleRunner {
    let options: SaleOptions

    func run() async throws -> Int32 {
        #if Postgres
        if options.store == .postgres { return try await runPostgres() }
        #endif
        let store = try await makeStore(options)
        do {
            let status = try await run(store: store)
            if let file = store as? FileDedupeStore { await file.close() }
            return status
        } catch {
            if let file = store as? FileDedupeStore { await file.close() }
            throw error
        }
    }

    private func run(store: any DedupeStore<EffectTransaction>) async throws -> Int32 {
        let o = options
        if o.store == .redis {
            // A Redis that is not there at the start is a setup error: say so after a few tries.
            // Bounded in time too: a server that accepts and never answers costs one command timeout.
            _ = try await retrying(attempts: 20, within: .seconds(5)) { try await store.readState("coupon-demo:probe") }
        }
        let stock = Dictionary(uniqueKeysWithValues: (1...Int64(o.coupons)).map { ($0, o.stock) })
        let issuer = CouponIssuer(stock: stock)
        let readLedger: @Sendable () async throws -> [LedgerEntry] = { try await CouponLedger.read(from: store, coupons: Array(stock.keys)) }
        return try await runOnTheTransport(store: store, stock: stock, handler: issuer.handler, readLedger: readLedger)
    }

    /// The sale on the transport the options name, with `store`, `handler` and `readLedger`.
    private func runOnTheTransport<Store: DedupeStore>(
        store: Store, stock: [Int64: Int64], handler: @escaping RecordHandler<Store.Transaction>,
        readLedger: @escaping @Sendable () async throws -> [LedgerEntry]
    ) async throws -> Int32 {
        let o = options
        switch o.transport {
        case .redisStreams:
            let sale = try await RedisSale(url: o.redisURL ?? defaultRedisURL, keyPrefix: "coupon-demo:\(o.saleID):streams:",
                                           sessionTimeout: .seconds(o.sessionTimeout), partitions: o.partitions)
            return try await run(sale: sale, store: store, stock: stock, handler: handler, readLedger: readLedger)
        case .kafka:
            let sale = try await KafkaSale(brokers: o.kafkaBrokers, sessionTimeout: .seconds(o.sessionTimeout), partitions: o.partitions,
                                           properties: try SaleOptions.parseKafkaProperties(o.kafkaProperties))
            return try await run(sale: sale, store: store, stock: stock, handler: handler, readLedger: readLedger)
        case .memory:
            return try await run(sale: try MemorySale(partitions: o.partitions), store: store, stock: stock, handler: handler, readLedger: readLedger)
        }
    }

    #if Postgres
    /// The sale on PostgreSQL: the dedupe records in schema `eo_sale_<sale>`, the coupons in
    /// the plain tables `coupons_<sale>.coupon_stock` and `coupons_<sale>.issued_coupons`, which
    /// the handler writes in the store's SQL transaction and the audit reads back.
    private func runPostgres() async throws -> Int32 {
        let o = options
        var config = try PostgresStoreConfiguration(url: o.postgresURL ?? "")
        config.schema = "eo_sale_\(o.saleID)"
        config.poolSize = max(4, o.memberCount * max(1, o.partitions) + 2)
        let store = try await retrying(attempts: 20) { try await PostgresDedupeStore.connect(config) }
        do {
            let stock = Dictionary(uniqueKeysWithValues: (1...Int64(o.coupons)).map { ($0, o.stock) })
            let tables = try PostgresCouponTables(schema: "coupons_\(o.saleID)")
            try await retrying(attempts: 20) { try await tables.create(on: store, stock: stock) }
            if !o.json { print("coupon-demo: issued coupons go to the table \(tables.schema).issued_coupons (psql: SELECT * FROM \(tables.schema).issued_coupons ORDER BY coupon_id, serial;)") }
            let readLedger: @Sendable () async throws -> [LedgerEntry] = { try await tables.ledger(from: store) }
            let status = try await runOnTheTransport(store: store, stock: stock, handler: tables.handler, readLedger: readLedger)
            await store.shutdown()
            return status
        } catch {
            await store.shutdown()
            throw error
        }
    }
    #endif

    /// The sale on one transport and store: publish, consume with crashes, audit.
    func run<Sale: SaleTransport, Store: DedupeStore>(
        sale: Sale, store: Store, stock: [Int64: Int64], handler: @escaping RecordHandler<Store.Transaction>,
        readLedger: @escaping @Sendable () async throws -> [LedgerEntry]
    ) async throws -> Int32 {
        let o = options
        let requests = generateRequests(o)
        let logger = o.makeLogger()
        let faults = DemoFaults(rate: o.crashRate, seed: o.seed)
        let counters = Counters()
        let progress = ProgressLine(enabled: !o.json && o.role != .audit)
        let memberIDs: [String]
        switch o.role {
        case .consume:
            let base = o.memberID ?? "issuer-\(ProcessInfo.processInfo.processIdentifier)"
            memberIDs = o.consumers.map { n in (0..<n).map { "\(base)-\($0)" } } ?? [base]
        default:
            memberIDs = (0..<o.memberCount).map { "issuer-\($0)" }
        }

        let start = ContinuousClock.now
        @Sendable func sinceStart() -> Int {
            let d = ContinuousClock.now - start
            return Int(d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000)
        }
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            if o.role == .all || o.role == .publish {
                // The API side: publish every click at once, in batches; each coupon's clicks keep their order.
                tasks.addTask {
                    try await publishSale(requests, partitions: o.partitions, partitioning: sale.partitioning, transport: sale.transport, endOffsets: { try await sale.endOffsets() }) { n in
                        if progress.published.exchange(n, ordering: .relaxed) != n { counters.lastProgress.store(sinceStart(), ordering: .relaxed) }
                    }
                }
            }
            for id in memberIDs {
                tasks.addTask {
                    var config = ConsumerConfiguration(topic: saleTopic, group: saleGroup, memberID: id)
                    config.pollWait = .milliseconds(20)
                    config.concurrentLanes = false  // one member per lane set; members run in parallel
                    config.lease = .seconds(5)      // a crashed run's claims are taken over within seconds
                    config.ordering = o.ordering == .key ? .key() : .partition
                    let consumer = try ExactlyOnceConsumer(
                        transport: sale.transport, store: store, configuration: config, logger: logger,
                        key: CouponRequest.keyExtractor, faults: faults, handler: handler)
                    var session: ConsumerSession<Sale.Transport, Store>?
                    var failures = 0
                    // Cancelled when another task of the sale failed (a stall, a backend error): the
                    // loop ends so the sale's error is reported instead of polling on in silence.
                    while !counters.done.load(ordering: .acquiring) && !Task.isCancelled {
                        do {
                            if session == nil {
                                session = try await consumer.makeSession()
                                logger.info("session started (in the sale's group)", metadata: ["member": "\(id)", "group": "\(saleGroup)"])
                            }
                            let r = try await session!.step()
                            failures = 0
                            counters.polled.add(r.records, ordering: .relaxed)
                            counters.duplicates.add(r.duplicates, ordering: .relaxed)
                            let finished = r.processed + r.duplicates + r.deadLettered
                            if finished > 0 {
                                progress.processed.add(finished, ordering: .relaxed)
                                counters.lastProgress.store(sinceStart(), ordering: .relaxed)
                            }
                        } catch is InjectedCrash {
                            // The process "dies": its in-flight state is gone, its partitions move on,
                            // and it comes back as a new process that resumes from committed offsets.
                            counters.crashes.add(1, ordering: .relaxed)
                            sale.crashed(memberID: id)
                            session = nil
                        } catch let e as ExactlyOnceError where e.code == .staleGeneration {
                            session = nil
                        } catch let e as ExactlyOnceError where e.isRetriable {
                            // The backend is unreachable (for example Redis restarting): wait, poll again.
                            logger.info("backend unavailable; polling again after a pause", metadata: ["member": "\(id)", "error": "\(e)"])
                            failures += 1
                            counters.unavailable.add(1, ordering: .relaxed)
                            try await Task.sleep(for: config.unavailableBackoff.delay(forRetry: failures))
                        }
                    }
                    try? await session?.close()
                }
            }
            if !memberIDs.isEmpty {
                tasks.addTask {
                    let stall = o.stallTimeout * 1000
                    // The sale's progress elsewhere (other processes' members): the log's end and
                    // the group's committed offsets, looked at once this process has been quiet
                    // for a while. A member that owns no partition (more members than partitions)
                    // is idle, not stalled, while the others go on.
                    var elsewhere: Int64?
                    var lookedElsewhere = 0
                    while !((try? await sale.isFinished(total: requests.count)) ?? false) {
                        try await Task.sleep(for: .milliseconds(Sale.self == MemorySale.self ? 2 : 20))
                        var quiet = sinceStart() - counters.lastProgress.load(ordering: .relaxed)
                        if quiet > min(stall / 2, 5_000) && sinceStart() - lookedElsewhere >= 1_000 {
                            lookedElsewhere = sinceStart()
                            if let status = try? await sale.transport.partitionStatus(group: saleGroup, topic: saleTopic) {
                                let total = status.reduce(Int64(0)) { $0 + $1.end.rawValue + ($1.committed?.rawValue ?? 0) }
                                if elsewhere != nil && elsewhere != total {
                                    counters.lastProgress.store(sinceStart(), ordering: .relaxed)
                                    quiet = 0
                                }
                                elsewhere = total
                            }
                        }
                        if quiet > stall {
                            // Where it stands, per partition: what an operator needs to see why.
                            let status = (try? await sale.transport.partitionStatus(group: saleGroup, topic: saleTopic))?
                                .map { "\($0.partition): committed \($0.committed.map { "\($0.rawValue)" } ?? "none") of \($0.end.rawValue), owner \($0.owner ?? "none")" }
                                .joined(separator: "; ") ?? "unavailable"
                            throw DemoError(message: """
                                the sale made no progress for \(o.stallTimeout) s (published \(progress.published.load(ordering: .relaxed)) \
                                of \(requests.count), \(counters.crashes.load(ordering: .relaxed)) crashes, \
                                \(counters.unavailable.load(ordering: .relaxed)) backend failures; partitions: \(status)): giving up; \
                                a rerun with the same options resumes it
                                """)
                        }
                    }
                    counters.done.store(true, ordering: .releasing)
                }
            }
            let draw = Task { await progress.run(total: requests.count, since: start) }
            defer { draw.cancel() }
            do {
                // Not waitForAll(): it waits for every task before it rethrows the first error,
                // and the consumer tasks only stop when the sale is over or they are cancelled.
                while try await tasks.next() != nil {}
            } catch {
                tasks.cancelAll()
                draw.cancel()
                progress.clear()
                throw error
            }
        }
        progress.clear()
        let elapsed = ContinuousClock.now - start
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        if o.role == .publish || o.role == .consume {
            let polled = counters.polled.load(ordering: .relaxed)
            if o.json {
                print(try jsonLine(RoleSummary(role: o.role.rawValue, sale: o.saleID, requests: requests.count, published: progress.published.load(ordering: .relaxed),
                                               polled: polled, crashes: counters.crashes.load(ordering: .relaxed), elapsedSeconds: rounded(seconds, 3))))
            } else {
                print("coupon-demo \(o.role.rawValue): done in \(String(format: "%.2f", seconds)) s (sale \(o.saleID), \(requests.count) requests, \(polled) records polled here)")
            }
            return 0
        }

        // The audit: from the ledger (read back from the store) and the published requests only.
        let auditStart = ContinuousClock.now
        let ledger = try await retrying { try await readLedger() }
        let records = try await retrying { try await store.records(for: Array(Set(requests.map(\.key)))) }
        // Requests given up on (dead-lettered after exhausting their attempts, e.g. under a very high
        // crash rate) are accounted for, not lost; they are left out of the first-come expectation.
        let deadLettered = Set(records.filter { $0.value.outcome?.status == .deadLettered }.keys)
        let audit = CouponAudit.audit(requests: requests, ledger: ledger, stock: stock, records: records, excluded: deadLettered)
        if let path = o.ledger { try OutputFile.write(try jsonLines(ledger), to: path, flag: "--ledger") }
        if let path = o.requestsOut {
            let published = requests.map { PublishedRequest(requestId: $0.requestId, couponId: $0.couponId, memberId: $0.memberId) }
            try OutputFile.write(try jsonLines(published), to: path, flag: "--requests-out")
        }
        let polled = sale.deliveredRecords ?? counters.polled.load(ordering: .relaxed)
        let crashes = counters.crashes.load(ordering: .relaxed)
        let duplicates = counters.duplicates.load(ordering: .relaxed)
        let redelivered = max(0, polled - requests.count)
        let auditOnly = o.role == .audit
        let measured = auditOnly ? ContinuousClock.now - auditStart : elapsed
        let measuredSeconds = Double(measured.components.seconds) + Double(measured.components.attoseconds) / 1e18
        let rps = seconds > 0 ? Double(requests.count) / seconds : 0
        let clean = audit.overIssued == 0 && audit.doubleIssued == 0 && audit.lost == 0 && audit.fcfsViolations == 0

        if o.json {
            let summary = SaleSummary(
                requests: requests.count, issued: audit.issued, soldOut: audit.soldOut, duplicatesSuppressed: duplicates,
                redelivered: redelivered, crashes: crashes, overIssued: audit.overIssued, doubleIssued: audit.doubleIssued, lost: audit.lost,
                fcfsViolations: audit.fcfsViolations, duplicateRequests: audit.duplicateRequests, deadLettered: deadLettered.count,
                backendUnavailable: counters.unavailable.load(ordering: .relaxed), elapsedSeconds: rounded(measuredSeconds, 3),
                recordsPerSecond: auditOnly ? nil : Int(rps.rounded()), coupons: o.coupons, stock: o.stock, partitions: o.partitions,
                seed: o.seed, store: o.store.rawValue, transport: o.transport.rawValue, ordering: o.ordering.rawValue,
                role: o.role.rawValue, sale: o.saleID)
            print(try jsonLine(summary))
        } else {
            let distinct = requests.count - audit.duplicateRequests
            let consumers = memberIDs.count
            let timing = auditOnly
                ? "audited in \(String(format: "%.2f", measuredSeconds)) s"
                : "\(String(format: "%.2f", seconds)) s, \(String(format: "%.0f", rps)) requests/s"
            print("""
                Flash sale: \(requests.count) clicks on \(o.coupons) coupons (stock \(o.stock) each) by up to \(o.members) members
                  over \(o.partitions) partitions, \(consumers) consumers, seed \(o.seed), store \(o.store.rawValue), transport \(o.transport.rawValue)

                  sold       \(audit.issued) coupons issued (total stock \(Int64(o.coupons) * o.stock))
                  sold out   \(audit.soldOut) member-coupon requests came too late and were told "sold out"
                  repeats    \(audit.duplicateRequests) clicks repeated an earlier one (\(distinct) distinct member-coupon pairs);
                             \(duplicates) records were answered from the dedupe store instead of issuing again
                  crashes    \(crashes) consumer crashes injected (rate \(o.crashRate) per failure point);
                             \(redelivered) records were delivered again after crashes and rebalances
                  given up   \(deadLettered.count) requests dead-lettered after \(ConsumerConfiguration(topic: "t", group: "g", memberID: "m").maxAttempts) attempts each (to the dead-letter topic, not lost)

                Audit (from the ledger read back from the store and the published requests, not from counters):
                  overIssued \(audit.overIssued)   doubleIssued \(audit.doubleIssued)   lost \(audit.lost)   fcfsViolations \(audit.fcfsViolations)
                  \(clean ? "OK: every coupon went to exactly the first \(o.stock) distinct members who clicked, once each." : "FAILED: see the counts above.")

                \(timing)\(o.store == .memory && o.transport == .memory ? "" : "   (sale \(o.saleID): rerun with the same options to resume or re-audit it)")
                """)
        }
        return clean ? 0 : 1
    }
}
