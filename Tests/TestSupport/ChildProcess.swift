import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A child process for tests, driven without blocking the cooperative thread pool: its output
/// goes to files (no pipe can fill up and stall it), and its exit is awaited through the
/// termination handler, never with `waitUntilExit()` on a pool thread.
public final class ChildProcess: Sendable {
    private let process: Process
    /// Where standard output goes.
    public let outURL: URL
    /// Where standard error goes.
    public let errURL: URL
    private final class ExitState: Sendable {
        let state = Mutex<(status: Int32?, waiters: [CheckedContinuation<Int32, Never>])>((nil, []))
        func withLock<R>(_ body: (inout (status: Int32?, waiters: [CheckedContinuation<Int32, Never>])) -> R) -> R {
            state.withLock { body(&$0) }
        }
    }
    private let exit = ExitState()
    private let ownsFiles: Bool

    /// Starts `executable` with `arguments`; `stdin` (if any) is written and closed at once.
    public init(_ executable: URL, _ arguments: [String], stdin: String? = nil, environment: [String: String]? = nil,
                outputIn directory: URL? = nil, name: String = "child") throws {
        let dir = directory ?? FileManager.default.temporaryDirectory
        ownsFiles = directory == nil
        let tag = "\(name)-\(UUID().uuidString.prefix(8))"
        outURL = dir.appendingPathComponent("\(tag).out")
        errURL = dir.appendingPathComponent("\(tag).err")
        _ = FileManager.default.createFile(atPath: outURL.path, contents: nil)
        _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)
        let p = Process()
        p.executableURL = executable
        p.arguments = arguments
        if let environment { p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        p.standardOutput = try FileHandle(forWritingTo: outURL)
        p.standardError = try FileHandle(forWritingTo: errURL)
        let input = Pipe()
        p.standardInput = input
        process = p
        p.terminationHandler = { [exit] proc in
            let status = proc.terminationStatus
            let waiters = exit.withLock { s -> [CheckedContinuation<Int32, Never>] in
                s.status = status
                defer { s.waiters = [] }
                return s.waiters
            }
            for w in waiters { w.resume(returning: status) }
        }
        try p.run()
        if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
        try input.fileHandleForWriting.close()
    }

    deinit {
        if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
        if ownsFiles {
            try? FileManager.default.removeItem(at: outURL)
            try? FileManager.default.removeItem(at: errURL)
        }
    }

    /// The process id.
    public var pid: Int32 { process.processIdentifier }
    /// Whether it still runs.
    public var isRunning: Bool { exit.withLock { $0.status == nil } }
    /// Whether it was ended by a signal.
    public var wasSignalled: Bool { !isRunning && process.terminationReason == .uncaughtSignal }

    /// Sends `signal` (SIGKILL by default) if it still runs.
    public func kill(_ signal: Int32 = SIGKILL) {
        if isRunning { Glibc.kill(process.processIdentifier, signal) }
    }

    /// Sends `signal` (SIGKILL by default) as soon as `condition` holds, checked every
    /// `interval` on a thread of its own; gives up when the process ends first or after
    /// `timeout`. Not on the cooperative pool: on a loaded machine the tests running beside this
    /// one can keep the pool's threads busy for seconds, and a kill that must land mid-run would
    /// come too late.
    /// - Returns: whether the signal went to the process while it still ran.
    public func kill(_ signal: Int32 = SIGKILL, when condition: @escaping @Sendable () -> Bool,
                     checkEvery interval: Duration = .milliseconds(10), timeout: Duration = .seconds(90)) async -> Bool {
        await withCheckedContinuation { (c: CheckedContinuation<Bool, Never>) in
            let thread = Thread { [self] in
                let deadline = ContinuousClock.now + timeout
                while isRunning && ContinuousClock.now < deadline {
                    if condition() {
                        let sent = exit.withLock { s -> Bool in
                            // Under the lock the termination handler cannot record the exit meanwhile.
                            guard s.status == nil else { return false }
                            return Glibc.kill(process.processIdentifier, signal) == 0
                        }
                        c.resume(returning: sent)
                        return
                    }
                    Thread.sleep(forTimeInterval: Double(interval.components.attoseconds) / 1e18 + Double(interval.components.seconds))
                }
                c.resume(returning: false)
            }
            thread.start()
        }
    }

    /// Waits for the exit status; past `timeout` the child is killed (and the wait goes on).
    @discardableResult
    public func wait(timeout: Duration = .seconds(300)) async -> Int32 {
        let killer = Task { [weak self] in
            try? await Task.sleep(for: timeout)
            if !Task.isCancelled { self?.kill() }
        }
        defer { killer.cancel() }
        return await withCheckedContinuation { (c: CheckedContinuation<Int32, Never>) in
            let done: Int32? = exit.withLock { s in
                if let st = s.status { return st }
                s.waiters.append(c)
                return nil
            }
            if let done { c.resume(returning: done) }
        }
    }

    /// What it wrote to standard output so far.
    public var stdout: String { (try? String(contentsOf: outURL, encoding: .utf8)) ?? "" }
    /// What it wrote to standard error so far.
    public var stderr: String { (try? String(contentsOf: errURL, encoding: .utf8)) ?? "" }

    /// Runs to completion and returns status and output.
    public static func run(_ executable: URL, _ arguments: [String], stdin: String? = nil, environment: [String: String]? = nil,
                           timeout: Duration = .seconds(300)) async throws -> (status: Int32, out: String, err: String) {
        let child = try ChildProcess(executable, arguments, stdin: stdin, environment: environment)
        let status = await child.wait(timeout: timeout)
        return (status, child.stdout, child.stderr)
    }

    /// A product built next to the running test bundle (for example `coupon-demo`).
    public static func builtProduct(_ name: String) -> URL {
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        while !FileManager.default.fileExists(atPath: dir.appendingPathComponent(name).path) && dir.path != "/" {
            dir = dir.deletingLastPathComponent()
        }
        return dir.appendingPathComponent(name)
    }

    /// An executable found in PATH or the usual places, or nil.
    public static func which(_ name: String) -> URL? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let dirs = path.split(separator: ":").map(String.init) + ["/usr/bin", "/usr/local/bin", "/usr/sbin", "/opt/homebrew/bin"]
        for dir in dirs {
            let candidate = URL(fileURLWithPath: dir).appendingPathComponent(name)
            if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate }
        }
        return nil
    }
}

/// A temporary directory removed by `cleanup()`.
public struct ScratchDirectory: Sendable {
    /// Its URL.
    public let url: URL
    /// Its path.
    public var path: String { url.path }
    /// Creates one under the system's temporary directory.
    public init(_ prefix: String = "eo-test") throws {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("\(prefix)-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }
    /// Removes it.
    public func cleanup() { try? FileManager.default.removeItem(at: url) }
}
