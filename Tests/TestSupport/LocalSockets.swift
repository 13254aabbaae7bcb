import ExactlyOnce

#if canImport(Glibc)
import Glibc
#endif

/// TCP sockets on 127.0.0.1 for tests: throwaway servers' ports, hostile servers, proxies.
public enum LocalSockets {
    /// A TCP socket bound to a free port of 127.0.0.1 (the kernel picks it), listening with
    /// `backlog` when one is given; the caller owns (and closes) the descriptor.
    public static func tcpSocket(listening backlog: Int32?) throws -> (fd: Int32, port: Int) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ExactlyOnceError(.ioFailure, "cannot open a TCP socket (errno \(errno))") }
        if backlog != nil {
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 && (backlog.map { listen(fd, $0) == 0 } ?? true)
            }
        }
        guard ok else {
            let e = errno
            close(fd)
            throw ExactlyOnceError(.ioFailure, "cannot \(backlog == nil ? "bind" : "listen on") a local TCP port (errno \(e))")
        }
        return (fd, Int(UInt16(bigEndian: addr.sin_port)))
    }

    /// A free TCP port of 127.0.0.1 (bound once and released: free when this returns).
    public static func freePort() throws -> Int {
        let (fd, port) = try tcpSocket(listening: nil)
        close(fd)
        return port
    }

    /// Runs `body` with the port of a listener that completes connections (the kernel's
    /// backlog) and never reads nor answers: a server that accepts and stays silent. Closed
    /// when `body` returns.
    public static func withSilentListener<T>(_ body: (Int) async throws -> T) async throws -> T {
        let (fd, port) = try tcpSocket(listening: 64)
        defer { close(fd) }
        return try await body(port)
    }
}
