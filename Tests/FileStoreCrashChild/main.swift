import ExactlyOnce
import ExactlyOnceFileStore
import Foundation

// A child process for the file store's tests.
//
// usage: FileStoreCrashChild DIRECTORY FIRST-KEY
//   claims and completes keys at full speed from several tasks and prints each key once its
//   completion is acknowledged (durable). The test kills it with SIGKILL at random moments and
//   checks the directory after each kill.
// usage: FileStoreCrashChild open DIRECTORY [salvage]
//   opens the store once and prints one JSON object: what recovery did or the error, and the
//   process's peak resident memory before and after the open (so a test can bound what opening
//   a huge or sparse journal costs, in a process of its own: an allocation failure kills this
//   child, not the test runner).

let args = CommandLine.arguments

// Die with the test runner: a runner killed mid-test must not leave a child appending forever.
let parent = getppid()
Thread.detachNewThread {
    while getppid() == parent { usleep(100_000) }
    exit(3)
}

func peakResidentKiB() -> Int {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return Int(usage.ru_maxrss)
}

/// The process's peak virtual memory (`VmPeak`), which counts reservations never touched: a
/// multi-gigabyte reservation shows here even when it is not resident (and may fail outright).
func peakVirtualKiB() -> Int {
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return -1 }
    for line in status.split(separator: "\n") where line.hasPrefix("VmPeak:") {
        return Int(line.dropFirst("VmPeak:".count).split(whereSeparator: { $0 == " " || $0 == "\t" }).first ?? "") ?? -1
    }
    return -1
}

if args.count >= 3 && args[1] == "open" {
    var config = FileStoreConfiguration(directory: args[2])
    config.salvage = args.count > 3 && args[3] == "salvage"
    var out: [String: Any] = ["peakKiBBefore": peakResidentKiB(), "peakVirtualKiBBefore": peakVirtualKiB()]
    let start = ContinuousClock.now
    do {
        let store = try await FileDedupeStore.open(config)
        out["ok"] = true
        out["records"] = store.count
        out["counter"] = Int(String(decoding: try await store.readState("count").value ?? [], as: UTF8.self)) ?? 0
        out["truncatedTailBytes"] = store.recovery.truncatedTailBytes
        out["salvageActions"] = store.recovery.salvageActions.count
        out["report"] = store.recovery.description
        await store.close()
    } catch let e as ExactlyOnceError {
        out["ok"] = false
        out["code"] = "\(e.code)"
        out["message"] = e.message
    }
    let elapsed = ContinuousClock.now - start
    out["seconds"] = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    out["peakKiBAfter"] = peakResidentKiB()
    out["peakVirtualKiBAfter"] = peakVirtualKiB()
    let json = try JSONSerialization.data(withJSONObject: out, options: [.sortedKeys])
    FileHandle.standardOutput.write(json + Data("\n".utf8))
    exit(0)
}

guard args.count == 3, let first = Int64(args[2]) else {
    FileHandle.standardError.write(Data("usage: FileStoreCrashChild DIRECTORY FIRST-KEY | FileStoreCrashChild open DIRECTORY [salvage]\n".utf8))
    exit(2)
}
let lanes: Int64 = 8
do {
    let store = try await FileDedupeStore.open(FileStoreConfiguration(directory: args[1]))
    let fingerprint = PayloadFingerprint.of(Array("payload".utf8))
    try await withThrowingTaskGroup(of: Void.self) { group in
        for lane in 0..<lanes {
            group.addTask {
                var i = first + lane
                while true {
                    let key = IdempotencyKey.coupon(couponId: 7, memberId: i)
                    let result = try await store.claim([ClaimRequest(key: key, fingerprint: fingerprint, lease: .seconds(600))])[0]
                    switch result {
                    case .new(let claim):
                        let counter = "count:\(i % lanes)"  // each task keeps one residue, so no two tasks share a counter
                        let current = try await store.readState(counter)
                        let n = current.value.flatMap { Int64(String(decoding: $0, as: UTF8.self)) } ?? 0
                        let effects = EffectWrites(reads: [counter: current.version],
                                                   writes: [counter: Array(String(n + 1).utf8), "issued:\(i)": Array("1".utf8)])
                        try await store.complete(Completion(claim: claim, outcome: .applied("\(n + 1)"), effects: effects))
                        FileHandle.standardOutput.write(Data("\(i)\n".utf8))  // one write(2) per acknowledgement
                    case .completed:
                        FileHandle.standardOutput.write(Data("\(i)\n".utf8))
                    default:
                        break
                    }
                    i += lanes
                }
            }
        }
        try await group.waitForAll()
    }
} catch {
    FileHandle.standardError.write(Data("FileStoreCrashChild: \(error)\n".utf8))
    exit(1)
}
