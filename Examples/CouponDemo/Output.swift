import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The JSON object `coupon-demo --json` prints after a whole sale (the demo contract's fields).
struct SaleSummary: Encodable {
    var requests: Int
    var issued: Int
    var soldOut: Int
    var duplicatesSuppressed: Int
    var redelivered: Int
    var crashes: Int
    var overIssued: Int
    var doubleIssued: Int
    var lost: Int
    var fcfsViolations: Int
    var duplicateRequests: Int
    var deadLettered: Int
    var backendUnavailable: Int
    /// Seconds the sale took in this process (for `--role audit`: the audit's own time).
    var elapsedSeconds: Double
    /// Requests per second over `elapsedSeconds`; null for `--role audit`, which times no sale.
    var recordsPerSecond: Int?
    var coupons: Int
    var stock: Int64
    var partitions: Int
    var seed: UInt64
    var store: String
    var transport: String
    var ordering: String
    var role: String
    var sale: String

    // recordsPerSecond is written as null, not left out, when there is no rate.
    func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(requests, forKey: .requests)
        try c.encode(issued, forKey: .issued)
        try c.encode(soldOut, forKey: .soldOut)
        try c.encode(duplicatesSuppressed, forKey: .duplicatesSuppressed)
        try c.encode(redelivered, forKey: .redelivered)
        try c.encode(crashes, forKey: .crashes)
        try c.encode(overIssued, forKey: .overIssued)
        try c.encode(doubleIssued, forKey: .doubleIssued)
        try c.encode(lost, forKey: .lost)
        try c.encode(fcfsViolations, forKey: .fcfsViolations)
        try c.encode(duplicateRequests, forKey: .duplicateRequests)
        try c.encode(deadLettered, forKey: .deadLettered)
        try c.encode(backendUnavailable, forKey: .backendUnavailable)
        try c.encode(elapsedSeconds, forKey: .elapsedSeconds)
        if let recordsPerSecond { try c.encode(recordsPerSecond, forKey: .recordsPerSecond) } else { try c.encodeNil(forKey: .recordsPerSecond) }
        try c.encode(coupons, forKey: .coupons)
        try c.encode(stock, forKey: .stock)
        try c.encode(partitions, forKey: .partitions)
        try c.encode(seed, forKey: .seed)
        try c.encode(store, forKey: .store)
        try c.encode(transport, forKey: .transport)
        try c.encode(ordering, forKey: .ordering)
        try c.encode(role, forKey: .role)
        try c.encode(sale, forKey: .sale)
    }

    enum CodingKeys: String, CodingKey {
        case requests, issued, soldOut, duplicatesSuppressed, redelivered, crashes, overIssued, doubleIssued, lost
        case fcfsViolations, duplicateRequests, deadLettered, backendUnavailable, elapsedSeconds, recordsPerSecond
        case coupons, stock, partitions, seed, store, transport, ordering, role, sale
    }
}

/// The JSON object of `--role publish` and `--role consume`.
struct RoleSummary: Encodable {
    var role: String
    var sale: String
    var requests: Int
    var published: Int
    var polled: Int
    var crashes: Int
    var elapsedSeconds: Double
}

/// One published request, as `--requests-out` writes it.
struct PublishedRequest: Encodable {
    var requestId: Int64
    var couponId: Int64
    var memberId: Int64
}

/// Encodes one value as a JSON line (keys sorted, so output is stable).
func jsonLine<T: Encodable>(_ value: T) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}

/// Rounds to `places` decimals (for seconds in JSON).
func rounded(_ v: Double, _ places: Int) -> Double {
    let f = pow(10, Double(places))
    return (v * f).rounded() / f
}

/// The one-line progress display of a long sale on a terminal: published, processed and
/// records/s, redrawn in place. Silent when standard output is not a terminal or with `--json`.
final class ProgressLine: Sendable {
    let enabled: Bool
    let published = Atomic<Int>(0)
    let processed = Atomic<Int>(0)
    private let drawn = Atomic<Bool>(false)

    init(enabled: Bool) {
        self.enabled = enabled && isatty(STDOUT_FILENO) == 1
    }

    /// Redraws every 200 ms until cancelled.
    func run(total: Int, since start: ContinuousClock.Instant) async {
        guard enabled else { return }
        while !Task.isCancelled {
            try? await Task.sleep(for: .milliseconds(200))
            if Task.isCancelled { break }
            let elapsed = ContinuousClock.now - start
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            let done = processed.load(ordering: .relaxed)
            let rate = seconds > 0 ? Int(Double(done) / seconds) : 0
            let line = "  published \(published.load(ordering: .relaxed))/\(total)   processed \(done)   \(rate) records/s   \(String(format: "%.1f", seconds)) s"
            FileHandle.standardOutput.write(Data("\r\(line)\u{1B}[K".utf8))
            drawn.store(true, ordering: .relaxed)
        }
    }

    /// Clears the line before the summary.
    func clear() {
        if enabled && drawn.load(ordering: .relaxed) { FileHandle.standardOutput.write(Data("\r\u{1B}[K".utf8)) }
    }
}

/// Writes an output file the user named, without ever replacing a node they pointed at:
/// - a new path, or an existing regular file: written to a temporary file beside it, synced,
///   and renamed over it (readers see the old or the new file, never a half-written one);
/// - a symbolic link to a regular file: the same, on the file it points to (the link stays);
/// - a FIFO or a character device (`/dev/stdout`, a pipe): written through;
/// - anything else (a directory, a socket, a block device, a dangling link): refused.
enum OutputFile {
    /// How an output path will be written.
    enum Plan: Equatable {
        /// Written beside and renamed over `target` (a new path, a regular file, or the regular
        /// file a symbolic link points to).
        case replace(target: String)
        /// Written through (a FIFO or a character device).
        case writeThrough(target: String)
    }

    /// How `path` would be written, or why it cannot be: checked before the sale starts (so a
    /// bad path is a bad flag, not an error after the whole sale ran) and again when writing.
    static func plan(_ path: String, flag: String) throws -> Plan {
        var target = path
        var st = stat()
        if lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFLNK {
            guard let resolved = realpathString(path), stat(resolved, &st) == 0 else {
                throw DemoError.usage("\(flag) \(path) is a symbolic link to nothing")
            }
            target = resolved
        } else if lstat(path, &st) != 0 {
            guard errno == ENOENT else { throw DemoError.usage("\(flag) \(path): \(String(cString: strerror(errno)))") }
            let dir = (path as NSString).deletingLastPathComponent
            var parent = stat()
            guard stat(dir.isEmpty ? "." : dir, &parent) == 0, (parent.st_mode & S_IFMT) == S_IFDIR else {
                throw DemoError.usage("\(flag) \(path): its directory \(dir.isEmpty ? "." : dir) does not exist")
            }
            return .replace(target: path)
        }
        switch st.st_mode & S_IFMT {
        case S_IFREG: return .replace(target: target)
        case S_IFIFO, S_IFCHR: return .writeThrough(target: target)
        case S_IFDIR: throw DemoError.usage("\(flag) \(path) is a directory")
        default: throw DemoError.usage("\(flag) \(path) is not a regular file, a FIFO or a character device")
        }
    }

    static func write(_ data: Data, to path: String, flag: String) throws {
        switch try plan(path, flag: flag) {
        case .replace(let target): try replace(data, at: target, flag: flag)
        case .writeThrough(let target): try writeThrough(data, to: target, flag: flag)
        }
    }

    private static func realpathString(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }

    private static func replace(_ data: Data, at path: String, flag: String) throws {
        let dir = (path as NSString).deletingLastPathComponent
        let tmp = (dir.isEmpty ? "." : dir) + "/.\((path as NSString).lastPathComponent).\(getpid()).tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw DemoError(message: "\(flag) \(path): cannot create a file beside it (\(String(cString: strerror(errno))))") }
        do {
            try writeAll(fd, data, path: path, flag: flag)
            guard fsync(fd) == 0 else { throw DemoError(message: "\(flag) \(path): sync failed (\(String(cString: strerror(errno))))") }
        } catch {
            close(fd)
            unlink(tmp)
            throw error
        }
        close(fd)
        guard rename(tmp, path) == 0 else {
            let failed = DemoError(message: "\(flag) \(path): rename failed (\(String(cString: strerror(errno))))")
            unlink(tmp)
            throw failed
        }
    }

    private static func writeThrough(_ data: Data, to path: String, flag: String) throws {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw DemoError(message: "\(flag) \(path): cannot open (\(String(cString: strerror(errno))))") }
        defer { close(fd) }
        try writeAll(fd, data, path: path, flag: flag)
    }

    private static func writeAll(_ fd: Int32, _ data: Data, path: String, flag: String) throws {
        try data.withUnsafeBytes { (buf: UnsafeRawBufferPointer) in
            var offset = 0
            while offset < buf.count {
                let n = systemWrite(fd, buf.baseAddress! + offset, buf.count - offset)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw DemoError(message: "\(flag) \(path): write failed (\(String(cString: strerror(errno))))")
                }
                offset += n
            }
        }
    }
}

/// JSON lines of `items`.
func jsonLines<T: Encodable>(_ items: [T]) throws -> Data {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    var data = Data()
    for item in items {
        data.append(try encoder.encode(item))
        data.append(0x0A)
    }
    return data
}

/// `write(2)`, named apart from `OutputFile.write`.
private func systemWrite(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int) -> Int {
    #if canImport(Glibc)
    Glibc.write(fd, p, n)
    #else
    Darwin.write(fd, p, n)
    #endif
}
