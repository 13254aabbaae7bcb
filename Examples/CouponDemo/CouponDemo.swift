import ArgumentParser
import ExactlyOnce
import Foundation

/// `coupon-demo`: a first-come-first-served coupon flash sale, end to end, audited.
///
/// The sale is the default subcommand (`coupon-demo --requests 20000 ...` is
/// `coupon-demo sale --requests 20000 ...`); `partition` maps keys to partitions, and the
/// backends' subcommands (a standalone Kafka mock cluster) sit beside it.
@main
struct CouponDemo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "coupon-demo",
        abstract: "A first-come-first-served coupon flash sale on swift-exactly-once, end to end, audited.",
        discussion: """
            Publishes seeded "get coupon" clicks (with repeats), issues coupons through a consumer \
            group with injected crashes, then audits the ledger read back from the store against \
            the published requests: overIssued, doubleIssued, lost and fcfsViolations must all be 0.

            The same options and seed are the same sale: kill a run with a durable store and start \
            it again, and it resumes and finishes with a clean audit.

            The sale is the default subcommand: its flags (coupon-demo sale --help) can be given \
            without the word "sale".
            """,
        subcommands: [SaleCommand.self, PartitionCommand.self, KafkaMockCommand.self],
        defaultSubcommand: SaleCommand.self,
    )

    /// Parses and runs, with the demo's exit statuses: 0 done (audit clean), 1 the sale failed
    /// (audit, backend), 2 bad flags. Messages start with `coupon-demo:`.
    static func main() async {
        do {
            var command = try await asyncParseAsRoot()
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let exit as ExitCode {
            Foundation.exit(exit.rawValue)
        } catch let e as DemoError {
            FileHandle.standardError.write(Data("coupon-demo: \(e.message)\n".utf8))
            Foundation.exit(e.status)
        } catch let e as ExactlyOnceError {
            let status: Int32 = e.code == .invalidConfiguration ? 2 : 1
            let prefix = e.isRetriable ? "cannot reach the backend: " : ""
            FileHandle.standardError.write(Data("coupon-demo: \(prefix)\(e.message)\n".utf8))
            Foundation.exit(status)
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                print(fullMessage(for: error))
                Foundation.exit(0)
            }
            if code == .validationFailure {
                FileHandle.standardError.write(Data("coupon-demo: \(message(for: error))\n  See 'coupon-demo sale --help' (or 'coupon-demo help <subcommand>').\n".utf8))
                Foundation.exit(2)
            }
            FileHandle.standardError.write(Data("coupon-demo: \(String(describing: error).prefix(500))\n".utf8))
            Foundation.exit(1)
        }
    }
}

/// `coupon-demo sale` (the default): the flash sale.
struct SaleCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sale",
        abstract: "Run the flash sale (the default subcommand): publish, issue, audit.",
        discussion: """
            Exit status: 0 when the audit is clean, 1 when it is not or a backend failed, 2 for bad flags.
            With --json one JSON object is printed; on a terminal a progress line shows published \
            and processed records and records/s while the sale runs.
            """)

    @OptionGroup var sale: SaleOptions

    mutating func validate() throws {
        try sale.check()
    }

    mutating func run() async throws {
        let code = try await SaleRunner(options: sale).run()
        if code != 0 { throw ExitCode(code) }
    }
}

/// An error the demo reports in one line, with its exit status.
struct DemoError: Error, CustomStringConvertible {
    var message: String
    var status: Int32 = 1
    var description: String { message }
    /// A bad flag (exit status 2).
    static func usage(_ message: String) -> DemoError { DemoError(message: message, status: 2) }
}
