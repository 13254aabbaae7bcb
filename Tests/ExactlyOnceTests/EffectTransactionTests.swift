@testable import ExactlyOnce
import ExactlyOnceTestKit
import Testing

/// The handler's key-value transaction: its integer encoding (the stored bytes must stay what
/// `String(value).utf8` gives, and parsing must agree with `Int64(_:)`), and the effects it
/// records (one entry per key: the first read, the last write).
@Suite struct EffectTransactionTests {
    @Test func decimalBytesAreWhatStringGives() {
        var values: [Int64] = [0, 1, -1, 9, 10, 99, 100, 12_345, -987_654_321, .max, .min, .max - 1, .min + 1]
        var g = SeededRandom(seed: 7)
        for _ in 0..<2000 { values.append(Int64(bitPattern: g.next())) }
        for v in values {
            #expect(EffectTransaction.decimalBytes(v) == Array(String(v).utf8), "\(v)")
            #expect(EffectTransaction.decimal(EffectTransaction.decimalBytes(v)) == v, "\(v)")
        }
    }

    @Test func decimalParsingAgreesWithInt64() {
        var inputs = ["", "-", "+", "0", "-0", "+7", "007", "12a", " 1", "1 ", "9223372036854775807", "9223372036854775808",
                      "-9223372036854775808", "-9223372036854775809", "99999999999999999999", "123456789012345678", "1234567890123456789",
                      "--1", "+-1", "١٢"]
        var g = SeededRandom(seed: 11)
        let alphabet = Array("0123456789-+ x".utf8)
        for _ in 0..<5000 {
            let n = Int(g.next() % 22)
            inputs.append(String(decoding: (0..<n).map { _ in alphabet[Int(g.next() % UInt64(alphabet.count))] }, as: UTF8.self))
        }
        for s in inputs {
            #expect(EffectTransaction.decimal(Array(s.utf8)) == Int64(s), "\"\(s)\"")
        }
    }

    @Test func effectsKeepTheFirstReadAndTheLastWritePerKey() {
        var e = EffectWrites.none
        e.noteRead("a", 3)
        e.noteRead("a", 9)
        e.noteWrite("b", [1])
        e.noteWrite("c", nil)
        e.noteWrite("b", [2])
        #expect(e.readList == [EffectWrites.Read(key: "a", version: 3)])
        #expect(e.writeList == [EffectWrites.Write(key: "b", value: [2]), EffectWrites.Write(key: "c", value: nil)])
        #expect(e.reads == ["a": 3])
        let removed: [UInt8]? = nil
        #expect(e.writes == ["b": [2], "c": removed])
        // The dictionary and list forms describe the same effects, whatever the order.
        let same = EffectWrites(reads: ["a": 3], writes: ["c": removed, "b": [2]])
        #expect(same == e && same.hashValue == e.hashValue)
        let lists = EffectWrites(readList: [.init(key: "a", version: 3), .init(key: "a", version: 4)],
                                 writeList: [.init(key: "b", value: [1]), .init(key: "c", value: nil), .init(key: "b", value: [2])])
        #expect(lists == e)
        #expect(lists.writeList.map(\.key) == ["c", "b"] || lists.writeList.map(\.key) == ["b", "c"])
    }
}
