import ArgumentParser
import ExactlyOnce
import Foundation

/// `exactly-once-admin`: look at what a consumer recorded, and act on it — a key's processing
/// history, stuck or failed keys, consumer lag, dead letters and their replay — against any
/// durable store and transport.
@main
struct Admin: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exactly-once-admin",
        abstract: "Inspect and operate swift-exactly-once stores and transports: keys, lag, dead letters.",
        discussion: """
            Point it at the store (--store file --data-dir D, --store redis --redis-url URL --key-prefix P, \
            or --store postgres --postgres-url URL --schema S) and, for lag and dead letters, the transport \
            (--transport redis-streams --streams-prefix P, or --transport kafka --kafka-brokers HOST:PORT). \
            --sale ID names a coupon-demo sale's store and streams as the demo does. \
            In-memory stores and transports live inside their process and cannot be inspected from here. \
            Human output by default; --json prints one JSON object for scripts.
            Exit status: 0 done, 1 not found or a backend failed, 2 bad flags.
            """,
        subcommands: [KeyCommand.self, KeysCommand.self, LagCommand.self, DeadLetterCommand.self]
    )

    static func main() async {
        do {
            var command = try await asyncParseAsRoot()
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let e as ExactlyOnceError {
            FileHandle.standardError.write(Data("exactly-once-admin: \(e.isRetriable ? "cannot reach the backend: " : "")\(e.message)\n".utf8))
            Foundation.exit(e.code == .invalidConfiguration ? 2 : 1)
        } catch let e as AdminError {
            FileHandle.standardError.write(Data("exactly-once-admin: \(e.message)\n".utf8))
            Foundation.exit(e.status)
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                print(fullMessage(for: error))
                Foundation.exit(0)
            }
            if code == .validationFailure {
                FileHandle.standardError.write(Data("exactly-once-admin: \(message(for: error))\n  See 'exactly-once-admin help <subcommand>'.\n".utf8))
                Foundation.exit(2)
            }
            if let exit = error as? ExitCode { Foundation.exit(exit.rawValue) }
            FileHandle.standardError.write(Data("exactly-once-admin: \(String(describing: error).prefix(500))\n".utf8))
            Foundation.exit(1)
        }
    }
}

/// An error reported in one line with an exit status (1: not found or a backend failed; 2: bad flags).
struct AdminError: Error {
    var message: String
    var status: Int32 = 1
}

/// Prints `value` as one line of JSON, keys sorted.
func printJSON<T: Encodable>(_ value: T) throws {
    let e = JSONEncoder()
    e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    print(String(decoding: try e.encode(value), as: UTF8.self))
}
