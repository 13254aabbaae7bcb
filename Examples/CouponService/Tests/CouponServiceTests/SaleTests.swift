import CouponKit
import CouponService
import ExactlyOnce
import Foundation
import Hummingbird
import HummingbirdTesting
import Testing

/// A deterministic click sequence: `count` clicks from `members` members, with repeats.
func clickSequence(count: Int, members: Int, seed: UInt64) -> [Int64] {
    var state = seed
    func next() -> UInt64 {
        state = state &* 6364136223846793005 &+ 1442695040888963407
        return state >> 33
    }
    var out: [Int64] = []
    for _ in 0..<count {
        if !out.isEmpty && next() % 5 == 0 {
            out.append(out[Int(next() % UInt64(out.count))])
        } else {
            out.append(Int64(next() % UInt64(members)) + 1)
        }
    }
    return out
}

/// Sends `clicks` through HTTP from `workers` concurrent clients; returns the statuses.
func sendClicks(_ client: some TestClientProtocol, coupon: Int64, _ clicks: [Int64], workers: Int) async throws -> [HTTPResponse.Status] {
    try await withThrowingTaskGroup(of: [HTTPResponse.Status].self) { group in
        for w in 0..<workers {
            group.addTask {
                var statuses: [HTTPResponse.Status] = []
                for i in stride(from: w, to: clicks.count, by: workers) {
                    statuses.append(try await client.call(.post, "/coupons/\(coupon)/requests", #"{"memberId": \#(clicks[i])}"#).0)
                }
                return statuses
            }
        }
        var all: [HTTPResponse.Status] = []
        for try await s in group { all += s }
        return all
    }
}

/// The independent audit: winners must be exactly the first `stock` distinct members by log
/// position, serial n going to the n-th of them; computed here from the log and the ledger.
func expectFirstComeFirstServed(core: some SaleCore, client: some TestClientProtocol, coupon: Int64, stock: Int) async throws {
    let log = try await core.clicksInLogOrder(coupon)
    var seen = Set<Int64>()
    var firstDistinct: [Int64] = []
    for r in log where seen.insert(r.memberId).inserted { firstDistinct.append(r.memberId) }
    let winners = Array(firstDistinct.prefix(stock))
    let lines = try await client.call(.get, "/coupons/\(coupon)/issued").1.split(separator: "\n").map { object(String($0)) }
    let ledger = lines.compactMap { l -> (Int64, Int64)? in
        guard let m = l["memberId"] as? Int, let s = l["serial"] as? Int else { return nil }
        return (Int64(m), Int64(s))
    }
    #expect(ledger.count == min(stock, firstDistinct.count), "issued exactly the stock")
    #expect(ledger.map(\.0) == winners, "serial n goes to the n-th distinct member by log position")
    #expect(ledger.map(\.1) == Array(1...Int64(ledger.count)))
    let audit = try #require(try await core.audit(coupon))
    #expect(audit.overIssued == 0)
    #expect(audit.doubleIssued == 0)
    #expect(audit.lost == 0)
    #expect(audit.fcfsViolations == 0)
    #expect(audit.issued == stock)
    #expect(audit.soldOut == firstDistinct.count - stock)
}

@Suite struct SaleTests {
    @Test func flashSaleThroughHTTPWithRepeatedClicks() async throws {
        let core = try makeCore()
        try await running(try core.services()) {
            try await app(core).test(.router) { client in
                try await flashSale(core: core, client: client, coupon: 7, stock: 40, clicks: clickSequence(count: 400, members: 150, seed: 7))
            }
        }
    }

    @Test func consumerRestartedMidSale() async throws {
        // --role api: the test runs the consumers itself, so it can stop one mid-sale.
        let core = try makeCore(role: .api)
        let stock = 150
        let clicks = clickSequence(count: 900, members: 400, seed: 11)
        try await running(try core.services()) {
            try await app(core).test(.router) { client in
                #expect(try await client.call(.post, "/coupons", #"{"couponId": 8, "stock": \#(stock)}"#).0 == .created)
                let first = try core.makeClickConsumer(memberID: "consumer-a")
                let task = Task { try await first.run() }
                // The first part holds fewer distinct members than the stock: the sale is still
                // on when the first consumer stops.
                var distinct = Set<Int64>()
                var half = 0
                while half < clicks.count && distinct.count < 100 {
                    distinct.insert(clicks[half]); half += 1
                }
                #expect(try await sendClicks(client, coupon: 8, Array(clicks[..<half]), workers: 6).allSatisfy { $0 == .accepted })
                // Wait until it issued some, then stop it mid-sale.
                let clock = ContinuousClock()
                let deadline = clock.now + .seconds(20)
                while try await core.issuedFromStore(8) < 20 && clock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
                task.cancel()
                try await task.value
                let atStop = try await core.issuedFromStore(8)
                #expect(atStop >= 20)
                #expect(atStop < Int64(stock), "the consumer was stopped before the sale ended")

                #expect(try await sendClicks(client, coupon: 8, Array(clicks[half...]), workers: 6).allSatisfy { $0 == .accepted })
                let second = try core.makeClickConsumer(memberID: "consumer-b")
                let task2 = Task { try await second.run() }
                while !core.backend.transport.isFullyCommitted(group: ServiceTopics.group, topic: ServiceTopics.clicks) && clock.now < deadline + .seconds(20) {
                    try await Task.sleep(for: .milliseconds(10))
                }
                #expect(core.backend.transport.isFullyCommitted(group: ServiceTopics.group, topic: ServiceTopics.clicks))
                task2.cancel()
                try await task2.value
                try await expectFirstComeFirstServed(core: core, client: client, coupon: 8, stock: stock)
            }
        }
    }

    @Test func paymentEventsOutOfOrderAtTheAPIInOrderPerOrder() async throws {
        let core = try makeCore()
        try await running(try core.services()) {
            try await app(core).test(.router) { client in try await paymentEvents(client) }
        }
    }
}

/// A flash sale through HTTP: `clicks` (member ids, with repeats) sent by 8 concurrent clients;
/// every distinct click gets its final outcome, consistent with the ledger, and the independent
/// audit holds.
func flashSale(core: some SaleCore, client: some TestClientProtocol, coupon: Int64, stock: Int, clicks: [Int64],
                                 waitMs: Int = 10_000) async throws {
    #expect(try await client.call(.post, "/coupons", #"{"couponId": \#(coupon), "stock": \#(stock)}"#).0 == .created)
    let statuses = try await sendClicks(client, coupon: coupon, clicks, workers: 8)
    #expect(statuses.count == clicks.count)
    #expect(statuses.allSatisfy { $0 == .accepted })
    var serials: [Int64: Int] = [:]
    var soldOut = 0
    for m in Set(clicks) {
        let o = object(try await client.call(.get, "/requests/\(coupon):\(m)?waitMs=\(waitMs)").1)
        if o["status"] as? String == "issued" { serials[m] = o["serial"] as? Int } else if o["status"] as? String == "soldOut" { soldOut += 1 }
    }
    #expect(serials.count == stock)
    #expect(soldOut == Set(clicks).count - stock)
    #expect(Set(serials.values) == Set(1...stock))
    try await expectFirstComeFirstServed(core: core, client: client, coupon: coupon, stock: stock)
    // With Redis the counts come from the read cache, which the consumer refreshes after its
    // commits: give it a moment.
    let clock = ContinuousClock()
    let deadline = clock.now + .seconds(10)
    var counts = object(try await client.call(.get, "/coupons/\(coupon)").1)
    while counts["issued"] as? Int != stock && clock.now < deadline {
        try await Task.sleep(for: .milliseconds(20))
        counts = object(try await client.call(.get, "/coupons/\(coupon)").1)
    }
    #expect(counts["issued"] as? Int == stock)
    #expect(counts["remaining"] as? Int == 0)
}

/// Payment events of 30 orders through HTTP, interleaved at the API and in order per order,
/// with the stored negative outcomes.
func paymentEvents(_ client: some TestClientProtocol) async throws {
    _ = try await client.call(.post, "/coupons", #"{"couponId": 20, "stock": 30}"#)
    for m in 1...30 { _ = try await client.call(.post, "/coupons/20/requests", #"{"memberId": \#(m)}"#) }
    for m in 1...30 { #expect(object(try await client.call(.get, "/requests/20:\(m)?waitMs=10000").1)["status"] as? String == "issued") }

    // 30 orders, each a use then a restore (and a repeat of its use), sent from
    // concurrent clients: the API sees the orders interleaved, each order in order.
    func event(_ order: String, _ id: String, _ type: String, _ member: Int) -> String {
        #"{"eventId": "\#(id)", "type": "\#(type)", "couponId": 20, "memberId": \#(member)}"#
    }
    try await withThrowingTaskGroup(of: Void.self) { group in
        for m in 1...30 {
            group.addTask {
                let o = "o\(m)"
                for (id, type) in [("use", "use"), ("use", "use"), ("restore", "restore")] {
                    let r = try await client.call(.post, "/orders/\(o)/events", event(o, id, type, m))
                    #expect(r.0 == .accepted)
                }
            }
        }
        try await group.waitForAll()
    }
    for m in 1...30 {
        let use = object(try await client.call(.get, "/requests/order:o\(m):use?waitMs=10000").1)
        #expect(use["status"] as? String == "applied")
        #expect(use["detail"] as? String == "used")
        let restore = object(try await client.call(.get, "/requests/order:o\(m):restore?waitMs=10000").1)
        #expect(restore["detail"] as? String == "restored", "restore of o\(m) applied after its use")
    }
    // A restore that reaches the API before its use; a use of a coupon not held.
    #expect(try await client.call(.post, "/orders/early/events", event("early", "r", "restore", 5)).0 == .accepted)
    #expect(try await client.call(.post, "/orders/early/events", event("early", "u", "use", 5)).0 == .accepted)
    #expect(try await client.call(.post, "/orders/stranger/events", event("stranger", "u", "use", 99)).0 == .accepted)
    // After o7's restore (checked above), another order may use member 7's coupon again.
    #expect(try await client.call(.post, "/orders/again/events", event("again", "u", "use", 7)).0 == .accepted)

    let early = object(try await client.call(.get, "/requests/order:early:r?waitMs=10000").1)
    #expect(early["status"] as? String == "rejected")
    #expect(early["reason"] as? String == "restore before use")
    #expect(object(try await client.call(.get, "/requests/order:early:u?waitMs=10000").1)["detail"] as? String == "used")
    let stranger = object(try await client.call(.get, "/requests/order:stranger:u?waitMs=10000").1)
    #expect(stranger["reason"] as? String == "coupon not held")
    #expect(object(try await client.call(.get, "/requests/order:again:u?waitMs=10000").1)["detail"] as? String == "used")
}
