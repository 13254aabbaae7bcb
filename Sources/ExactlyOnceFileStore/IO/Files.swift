#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ExactlyOnce

/// Thin, checked wrappers over the POSIX calls the journal needs. Every failure becomes an
/// `ExactlyOnceError` naming the path and `errno`; nothing traps.
enum Files {
    static func error(_ what: String, _ path: String, code: ExactlyOnceError.Code = .ioFailure) -> ExactlyOnceError {
        let e = errno
        let reason = String(cString: strerror(e))
        return ExactlyOnceError(code, "\(what) \(path): \(reason) (errno \(e))", cause: cause(errno: e))
    }

    /// The cause kept for diagnostics: `POSIXErrorCode` and the errno's symbolic name.
    static func cause(errno e: Int32) -> ExactlyOnceError.Cause {
        ExactlyOnceError.Cause(type: "POSIXErrorCode", code: POSIXErrorCode(rawValue: e).map { "\($0)" } ?? "\(e)")
    }

    /// Opens (creating with mode 0600 when `create`) for reading and appending writes.
    static func openFile(_ path: String, create: Bool) throws -> Int32 {
        let flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0)
        let fd = open(path, flags, 0o600)
        guard fd >= 0 else { throw error("cannot open", path) }
        return fd
    }

    static func closeFile(_ fd: Int32) { _ = close(fd) }

    /// Writes all of `bytes` at the file's current offset.
    static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, path: String) throws {
        var done = 0
        while done < bytes.count {
            let n = write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw error("cannot write", path)
            }
            done += n
        }
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8], path: String) throws {
        if bytes.isEmpty { return }
        try bytes.withUnsafeBytes { try writeAll(fd, $0, path: path) }
    }

    /// Forces written data to disk (`fdatasync`).
    static func sync(_ fd: Int32, path: String) throws {
        #if os(Linux)
        let sync = { fdatasync(fd) }
        #else
        let sync = { fcntl(fd, F_FULLFSYNC) }
        #endif
        while sync() != 0 {
            if errno == EINTR { continue }
            throw error("cannot fdatasync", path)
        }
    }

    /// Makes a directory entry change (create, rename, unlink) durable.
    static func syncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw error("cannot open directory", path) }
        defer { close(fd) }
        while fsync(fd) != 0 {
            if errno == EINTR { continue }
            throw error("cannot fsync directory", path)
        }
    }

    static func size(_ fd: Int32, path: String) throws -> Int {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw error("cannot stat", path) }
        return Int(st.st_size)
    }

    /// The file's size and its allocated bytes (less than the size when it is sparse).
    static func sizes(_ fd: Int32, path: String) throws -> (size: Int, allocated: Int) {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw error("cannot stat", path) }
        return (Int(st.st_size), Int(st.st_blocks) * 512)
    }

    static func truncateFile(_ fd: Int32, to length: Int, path: String) throws {
        guard ftruncate(fd, off_t(length)) == 0 else { throw error("cannot truncate", path) }
    }

    static func seekToEnd(_ fd: Int32, path: String) throws {
        guard lseek(fd, 0, SEEK_END) >= 0 else { throw error("cannot seek", path) }
    }

    /// Takes an exclusive, non-blocking `flock` on `path` (created 0600); returns its descriptor.
    ///
    /// A lock that is busy is tried again for up to `grace` (checking every 10 ms) before it is
    /// reported: a child process that another thread of this process is spawning holds a copy
    /// of every descriptor between its fork and its exec (ours are close-on-exec), and with it,
    /// for that instant, a store's lock that was just released. Runs on the store's opening
    /// thread, never on the cooperative pool.
    static func lock(_ path: String, directory: String, grace: Duration = .milliseconds(500)) throws -> Int32 {
        let fd = try openFile(path, create: true)
        let clock = ContinuousClock()
        let deadline = clock.now + grace
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let e = errno
            if e == EINTR { continue }
            if e == EWOULDBLOCK && clock.now < deadline {
                usleep(10_000)
                continue
            }
            close(fd)
            if e == EWOULDBLOCK {
                throw ExactlyOnceError(.storeLocked, "store directory \(directory) is locked by another open store (another process, or another FileDedupeStore in this one)")
            }
            errno = e
            throw error("cannot lock", path)
        }
        return fd
    }

    static func renameFile(_ from: String, _ to: String) throws {
        guard rename(from, to) == 0 else { throw error("cannot rename \(from) to", to) }
    }

    static func unlinkFile(_ path: String) { _ = unlink(path) }

    /// Names in a directory.
    static func list(_ directory: String) throws -> [String] {
        guard let dir = opendir(directory) else { throw error("cannot list", directory) }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    enum Kind { case missing, directory, other }

    static func kind(_ path: String) -> Kind {
        var st = stat()
        guard stat(path, &st) == 0 else { return .missing }
        return (st.st_mode & S_IFMT) == S_IFDIR ? .directory : .other
    }

    static func makeDirectory(_ path: String) throws {
        guard mkdir(path, 0o700) == 0 || errno == EEXIST else { throw error("cannot create directory", path) }
    }
}
