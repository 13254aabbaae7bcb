import Foundation

// `make bench`: every figure below is measured in this run; each ratio's baseline ran in this
// same invocation. The last line is one JSON object.
var results: [String: Double] = [:]
@MainActor func report(_ name: String, _ figures: [String: Double]) {
    for (k, v) in figures.sorted(by: { $0.key < $1.key }) {
        print("\(name): \(k) = \(String(format: "%.3f", v))")
        results[k] = v
    }
}

// BENCH_ONLY=consumer|ordering|redis|file|kafka runs one group (for iterating; `make bench` runs all).
let only = ProcessInfo.processInfo.environment["BENCH_ONLY"]
if only == nil || only == "consumer" { report("consumer", try await runConsumerBenchmarks()) }
if only == nil || only == "ordering" { report("ordering", try await runOrderingBenchmarks()) }
if only == nil || only == "redis" { report("redis", try await runRedisBenchmarks()) }
if only == nil || only == "redis" { report("redis", try await runRedisEndToEndBenchmarks()) }
if only == nil || only == "file" { report("file", try await runFileBenchmarks()) }
if only == nil || only == "kafka" { report("kafka", try await runKafkaBenchmarks()) }
if only == nil || only == "postgres" { report("postgres", try await runPostgresBenchmarks()) }

let json = results.sorted { $0.key < $1.key }.map { "\"\($0.key)\":\(String(format: "%.3f", $0.value))" }.joined(separator: ",")
print("{\(json)}")
