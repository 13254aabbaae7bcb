import ExactlyOnce
@testable import ExactlyOnceFileStore
import Foundation
import TestSupport
import Testing

/// Real crashes: a child process claims and completes at full speed (8 concurrent lanes, group
/// commit) and is killed with SIGKILL at random moments, again and again on the same directory.
/// After each kill the directory must open cleanly (at most a torn tail cut), every key the
/// child printed as acknowledged must be completed, and each lane's counter must equal the
/// number of its completed keys (no effect applied twice or lost).
@Suite("File store SIGKILL", .serialized, .timeLimit(.minutes(3)))
struct CrashChildTests {
    @Test func killedAtRandomMomentsLosesNothingAcknowledged() async throws {
        let dir = try TempDirectory()
        defer { dir.cleanup() }
        var rng = SystemRandomNumberGenerator()
        var acknowledged = Set<Int64>()
        var next: Int64 = 0
        var kills = 0
        for round in 0..<15 {
            // Output to a file, the exit awaited without blocking the cooperative pool.
            let p = try ChildProcess(ChildProcess.builtProduct("FileStoreCrashChild"), [dir.path, "\(next)"], name: "crash-round\(round)")
            // Let it get going (opening the store takes a moment), then kill it at a random moment.
            let deadline = ContinuousClock.now + .seconds(20)
            while p.stdout.utf8.count < 64 && p.isRunning && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(2))
            }
            try await Task.sleep(for: .milliseconds(Int.random(in: 0...60, using: &rng)))
            #expect(p.isRunning, "the child must still be working when killed (round \(round)): \(p.stderr)")
            p.kill(SIGKILL)
            await p.wait()
            #expect(p.wasSignalled)
            kills += 1

            let output = p.stdout
            let printed = output.split(separator: "\n")
            // A line cut by the kill is not an acknowledgement.
            let complete = output.hasSuffix("\n") ? printed : printed.dropLast()
            let acked = complete.compactMap { Int64($0) }
            acknowledged.formUnion(acked)
            next = (acked.max() ?? next) + 1

            let store = try await FileDedupeStore.open(FileStoreConfiguration(directory: dir.path))
            #expect(store.recovery.salvagedRanges.isEmpty)
            let records = try await store.records(for: acknowledged.map { IdempotencyKey.coupon(couponId: 7, memberId: $0) })
            #expect(records.count == acknowledged.count, "every acknowledged key is in the journal (round \(round))")
            #expect(records.values.allSatisfy { $0.phase == .completed }, "and completed")
            // Every completed key applied its effect exactly once: per lane, the counter equals
            // the number of completed keys of that lane.
            let all = store.core.withLock { s in s.machine.records.values.filter { $0.phase == .completed }.map(\.key.rawValue) }
            var perLane: [Int64: Int] = [:]
            for raw in all {
                let member = Int64(raw.split(separator: ":").last!)!
                perLane[member % 8, default: 0] += 1
            }
            for lane in 0..<8 as Range<Int64> {
                let counter = try await store.readState("count:\(lane)").value.flatMap { Int(String(decoding: $0, as: UTF8.self)) } ?? 0
                #expect(counter == perLane[lane] ?? 0, "lane \(lane): counter \(counter) vs \(perLane[lane] ?? 0) completed keys")
            }
            await store.close()
        }
        #expect(kills == 15)
        #expect(acknowledged.count > 100, "the child acknowledged work between kills (\(acknowledged.count) keys)")
    }
}
