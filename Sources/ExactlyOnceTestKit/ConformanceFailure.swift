import ExactlyOnce

/// A conformance check that did not hold. Thrown by ``StoreConformance`` and
/// ``TransportConformance``; its description names the check and what was seen.
public struct ConformanceFailure: Error, CustomStringConvertible, Sendable {
    /// The check's name.
    public var check: String
    /// What was expected and what was seen.
    public var detail: String
    /// Creates a failure.
    public init(check: String, detail: String) {
        self.check = check
        self.detail = detail
    }
    public var description: String { "conformance check '\(check)' failed: \(detail)" }
}

func require(_ condition: Bool, _ check: String, _ detail: @autoclosure () -> String) throws {
    if !condition { throw ConformanceFailure(check: check, detail: detail()) }
}

func requireThrows(_ code: String, _ check: String, _ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let e as ExactlyOnceError where e.code.name == code {
        return
    } catch {
        throw ConformanceFailure(check: check, detail: "expected error \(code), got \(error)")
    }
    throw ConformanceFailure(check: check, detail: "expected error \(code), got success")
}

