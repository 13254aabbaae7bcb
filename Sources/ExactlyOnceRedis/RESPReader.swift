/// Limits on one Redis reply, checked while it is read, before its bytes are buffered.
///
/// A reply's *size* counts its bytes on the wire plus ``elementOverhead`` for every element
/// (scalar or array), so that a reply of many tiny elements, whose decoded form takes much more
/// memory than its wire bytes, is bounded too.
struct RESPLimits: Sendable, Hashable {
    /// The largest size one reply may have.
    var maxReplyBytes: Int
    /// The deepest nesting of arrays (a flat array is depth 1).
    var maxDepth: Int
    /// The longest line (status, error, integer or header) without its CRLF.
    var maxLineBytes: Int = 1 << 20
    /// What one element counts beside its wire bytes (about what its decoded value takes).
    static let elementOverhead = 32
    /// The fewest wire bytes an element can take (`+\r\n`).
    static let minimumElementBytes = 3
}

/// Why a reply was refused while it was read.
enum RESPError: Error, Equatable, CustomStringConvertible {
    /// A header announced, or the bytes received reached, more than the size limit.
    case tooLarge(announced: Int?, limit: Int)
    /// Arrays nested deeper than the limit.
    case tooDeep(limit: Int)
    /// A line grew past its limit without a CRLF.
    case lineTooLong(limit: Int)
    /// Bytes that are not RESP2.
    case malformed(String)

    var description: String {
        switch self {
        case .tooLarge(let announced?, let limit):
            "a Redis reply announced \(announced) bytes or elements, more than the limit of \(limit) bytes (maxReplyBytes)"
        case .tooLarge(nil, let limit): "a Redis reply exceeded the limit of \(limit) bytes (maxReplyBytes)"
        case .tooDeep(let limit): "a Redis reply nested arrays deeper than \(limit) (maxReplyDepth)"
        case .lineTooLong(let limit): "a Redis reply line exceeded \(limit) bytes without an end"
        case .malformed(let why): "a Redis reply is not valid RESP: \(why)"
        }
    }
}

/// An incremental RESP2 reader: bytes go in as they arrive (``feed(_:)``), complete replies come
/// out (``next()``). Nothing it is told can make it buffer more than the limits allow: a bulk
/// string or array header is checked against the size limit before its body arrives, nesting
/// against the depth limit, and a line against the line limit. Progress through a reply is kept
/// between calls, so reading a large reply in many chunks is linear in its size.
struct RESPReader {
    let limits: RESPLimits
    private var buffer: [UInt8] = []
    /// Bytes of `buffer` already consumed.
    private var start = 0
    /// Arrays open in the reply being read, outermost first.
    private var frames: [Frame] = []
    /// The size (see ``RESPLimits``) of the reply being read, so far.
    private var size = 0

    private struct Frame {
        var remaining: Int
        var items: [RedisReply]
    }

    init(limits: RESPLimits) { self.limits = limits }

    /// Whether bytes are buffered that no reply asked for yet (or a reply is half read).
    var hasPendingInput: Bool { start < buffer.count || !frames.isEmpty }

    /// Appends received bytes.
    mutating func feed(_ bytes: UnsafeRawBufferPointer) {
        if start > 0 && (start == buffer.count || start >= 1 << 16) {
            buffer.removeFirst(start)
            start = 0
        }
        buffer.append(contentsOf: bytes)
    }

    /// Appends received bytes.
    mutating func feed(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { feed($0) }
    }

    /// The next complete reply, or nil when more bytes are needed.
    /// - Throws: ``RESPError``; the reader must not be used again after it threw.
    mutating func next() throws(RESPError) -> RedisReply? {
        while true {
            guard start < buffer.count else { return nil }
            guard let lineEnd = lineEnd(from: start + 1) else {
                if buffer.count - start > limits.maxLineBytes + 1 { throw .lineTooLong(limit: limits.maxLineBytes) }
                return nil
            }
            let type = buffer[start]
            let lineStart = start + 1
            var end = lineEnd + 2
            var value: RedisReply
            switch type {
            case UInt8(ascii: "+"): value = .status(String(decoding: buffer[lineStart..<lineEnd], as: UTF8.self))
            case UInt8(ascii: "-"): value = .error(String(decoding: buffer[lineStart..<lineEnd], as: UTF8.self))
            case UInt8(ascii: ":"): value = .integer(try integer(lineStart, lineEnd))
            case UInt8(ascii: "$"):
                let n = try integer(lineStart, lineEnd)
                if n == -1 {
                    value = .null
                } else {
                    guard n >= 0 else { throw .malformed("bulk length \(n)") }
                    guard n <= Int64(limits.maxReplyBytes - size - (end - start) - RESPLimits.elementOverhead) else {
                        throw .tooLarge(announced: Int(clamping: n), limit: limits.maxReplyBytes)
                    }
                    let count = Int(n)
                    // Wait for the whole body (the header is read again then: it is short).
                    guard buffer.count - end >= count + 2 else { return nil }
                    guard buffer[end + count] == 13, buffer[end + count + 1] == 10 else { throw .malformed("bulk string without CRLF") }
                    value = .string(Array(buffer[end..<(end + count)]))
                    end += count + 2
                }
            case UInt8(ascii: "*"):
                let n = try integer(lineStart, lineEnd)
                if n == -1 {
                    value = .null
                } else if n == 0 {
                    value = .array([])
                } else {
                    guard n > 0 else { throw .malformed("array length \(n)") }
                    guard frames.count < limits.maxDepth else { throw .tooDeep(limit: limits.maxDepth) }
                    let perElement = Int64(RESPLimits.minimumElementBytes + RESPLimits.elementOverhead)
                    let room = Int64(limits.maxReplyBytes - size - (end - start) - RESPLimits.elementOverhead)
                    guard n <= room / perElement else { throw .tooLarge(announced: Int(clamping: n), limit: limits.maxReplyBytes) }
                    size += (end - start) + RESPLimits.elementOverhead
                    start = end
                    var items: [RedisReply] = []
                    items.reserveCapacity(min(Int(n), 1024))
                    frames.append(Frame(remaining: Int(n), items: items))
                    continue
                }
            default:
                throw .malformed("unknown reply type byte \(type)")
            }
            size += (end - start) + RESPLimits.elementOverhead
            guard size <= limits.maxReplyBytes else { throw .tooLarge(announced: nil, limit: limits.maxReplyBytes) }
            start = end
            // Hand the value to the array it completes, and close every array it completes.
            while let last = frames.indices.last {
                frames[last].items.append(value)
                frames[last].remaining -= 1
                guard frames[last].remaining == 0 else { break }
                value = .array(frames.removeLast().items)
            }
            if frames.isEmpty {
                size = 0
                if start == buffer.count {
                    buffer.removeAll(keepingCapacity: buffer.capacity <= 1 << 20)
                    start = 0
                }
                return value
            }
        }
    }

    /// The index of the CR of the first CRLF at or after `from`, within the line limit.
    private func lineEnd(from: Int) -> Int? {
        let limit = min(buffer.count - 1, from + limits.maxLineBytes)
        var i = from
        while i < limit {
            if buffer[i] == 13 && buffer[i + 1] == 10 { return i }
            i += 1
        }
        return nil
    }

    /// A strict decimal integer: an optional `-`, then 1 to 19 digits, within `Int64`.
    private func integer(_ from: Int, _ to: Int) throws(RESPError) -> Int64 {
        var i = from
        var negative = false
        if i < to && buffer[i] == UInt8(ascii: "-") {
            negative = true
            i += 1
        }
        guard i < to, to - i <= 19 else { throw .malformed("bad integer") }
        var v: Int64 = 0
        while i < to {
            let d = buffer[i]
            guard d >= 48 && d <= 57 else { throw .malformed("bad integer") }
            let (m, o1) = v.multipliedReportingOverflow(by: 10)
            let (s, o2) = negative ? m.subtractingReportingOverflow(Int64(d - 48)) : m.addingReportingOverflow(Int64(d - 48))
            guard !o1, !o2 else { throw .malformed("integer out of range") }
            v = s
            i += 1
        }
        return v
    }
}

/// RESP2 encoding of a command (an array of bulk strings).
enum RESPEncoder {
    static func append(_ argv: [[UInt8]], to out: inout [UInt8]) {
        out.append(UInt8(ascii: "*"))
        out.append(contentsOf: String(argv.count).utf8)
        out.append(13); out.append(10)
        for a in argv {
            out.append(UInt8(ascii: "$"))
            out.append(contentsOf: String(a.count).utf8)
            out.append(13); out.append(10)
            out.append(contentsOf: a)
            out.append(13); out.append(10)
        }
    }
}
