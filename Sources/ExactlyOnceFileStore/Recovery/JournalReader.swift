#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ExactlyOnce

/// Reads a journal file through one reusable window, so recovery needs memory for one record
/// at most (``JournalFormat/maximumPayload``), never for the file: a 10 GiB file costs the
/// same 1 MiB as a small one.
///
/// One owner: created, used and dropped by the thread that opens the store.
final class JournalReader {
    let fd: Int32
    let path: String
    /// The file's size when the reader was made.
    let size: Int
    /// The file's allocated bytes (smaller than `size` for a sparse file).
    let allocatedBytes: Int
    /// The window's usual size.
    static let chunk = 1 << 20

    private var buffer: UnsafeMutableRawBufferPointer
    private var windowStart = 0
    private var windowCount = 0

    init(fd: Int32, path: String) throws {
        self.fd = fd
        self.path = path
        (size, allocatedBytes) = try Files.sizes(fd, path: path)
        buffer = .allocate(byteCount: Self.chunk, alignment: 16)
    }

    deinit { buffer.deallocate() }

    /// Whether `count` bytes at `offset` are in the window (a read would not touch the disk).
    func inWindow(_ offset: Int, _ count: Int) -> Bool {
        offset >= windowStart && offset + count <= windowStart + windowCount
    }

    /// The `count` bytes at `offset`, valid until the next call; nil when the file ends first.
    /// `count` must be at most a record (``JournalFormat/recordHeaderSize`` plus
    /// ``JournalFormat/maximumPayload``).
    func bytes(at offset: Int, count: Int) throws -> UnsafeRawBufferPointer? {
        guard offset >= 0, count >= 0, count <= size, offset <= size - count else { return nil }
        if !inWindow(offset, count) { try fill(at: offset, atLeast: count) }
        guard inWindow(offset, count) else { return nil }
        let from = offset - windowStart
        return UnsafeRawBufferPointer(rebasing: buffer[from..<(from + count)])
    }

    /// The bytes from `offset` to the end of the window, at least `minimum` of them; nil when
    /// the file ends first.
    func window(at offset: Int, minimum: Int) throws -> UnsafeRawBufferPointer? {
        guard offset >= 0, minimum <= size, offset <= size - minimum else { return nil }
        if !inWindow(offset, minimum) { try fill(at: offset, atLeast: minimum) }
        guard inWindow(offset, minimum) else { return nil }
        return UnsafeRawBufferPointer(rebasing: buffer[(offset - windowStart)..<windowCount])
    }

    /// The first offset at or after `offset` that is not in a hole of a sparse file (holes read
    /// as zeros), or nil when only a hole follows. Without `SEEK_DATA` support: `offset`.
    func nextData(from offset: Int) -> Int? {
        guard offset < size else { return nil }
        #if os(Linux)
        let seekData: Int32 = 3  // SEEK_DATA (Linux; Glibc's module map does not export it)
        let d = lseek(fd, off_t(offset), seekData)
        if d < 0 { return errno == ENXIO ? nil : offset }
        return Int(d)
        #else
        return offset
        #endif
    }

    private func fill(at offset: Int, atLeast count: Int) throws {
        if count > buffer.count {
            // A large record: grow (bounded by the record limit the caller checked).
            let grown = UnsafeMutableRawBufferPointer.allocate(byteCount: max(count, min(2 * buffer.count, JournalFormat.recordHeaderSize + JournalFormat.maximumPayload)), alignment: 16)
            buffer.deallocate()
            buffer = grown
            windowCount = 0
        }
        // Keep what the window already holds from `offset` on.
        var kept = 0
        if offset >= windowStart && offset < windowStart + windowCount {
            kept = windowStart + windowCount - offset
            buffer.baseAddress!.copyMemory(from: buffer.baseAddress! + (offset - windowStart), byteCount: kept)
        }
        windowStart = offset
        windowCount = kept
        let want = min(buffer.count, size - offset)
        while windowCount < want {
            let n = pread(fd, buffer.baseAddress! + windowCount, want - windowCount, off_t(offset + windowCount))
            if n < 0 {
                if errno == EINTR { continue }
                throw Files.error("cannot read", path)
            }
            if n == 0 { break }  // the file shrank under us: what is there is all there is
            windowCount += n
        }
    }
}
