import CouponKit
import ExactlyOnce
import Foundation
import Hummingbird
import Prometheus

/// The HTTP API of the coupon service (every status code held by `ContractTests`).
public enum CouponRoutes {
    /// The router for `core`. `registry` is what `GET /metrics` emits (nil: an empty page).
    public static func router<B: CouponBackend>(_ core: CouponServiceCore<B>, registry: PrometheusCollectorRegistry?) -> Router<BasicRequestContext> {
        let router = Router(context: BasicRequestContext.self)
        router.add(middleware: MetricsMiddleware())

        router.get("/health") { _, _ in json(.ok, ["status": "ok"]) }
        router.get("/metrics") { _, _ in
            Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
                     body: .init(byteBuffer: ByteBuffer(string: registry?.emitToString() ?? "")))
        }

        router.post("/coupons") { request, context in
            let body: CreateCouponBody
            do { body = try await decode(CreateCouponBody.self, request) } catch let e as BadRequest { return e.response }
            guard body.couponId >= 0, body.stock >= 0, body.stock <= 100_000_000 else {
                return error(.badRequest, "couponId must be >= 0 and stock in 0...100000000")
            }
            return try await answer {
                guard try await core.createCoupon(body.couponId, stock: body.stock) else {
                    return error(.conflict, "coupon \(body.couponId) exists")
                }
                return json(.created, CouponCounts(couponId: body.couponId, stock: body.stock, issued: 0, remaining: body.stock))
            }
        }

        router.post("/coupons/:couponId/requests") { request, context in
            defer { core.clickResponses.add(1, ordering: .relaxed) }
            guard let couponId = context.parameters.get("couponId", as: Int64.self), couponId >= 0 else {
                return error(.badRequest, "couponId must be a non-negative integer")
            }
            let body: ClickBody
            do { body = try await decode(ClickBody.self, request) } catch let e as BadRequest { return e.response }
            guard body.memberId >= 0 else { return error(.badRequest, "memberId must be >= 0") }
            return try await answer {
                guard try await core.backend.catalog.stock(of: couponId) != nil else {
                    return error(.notFound, "coupon \(couponId) does not exist")
                }
                let p = try await core.click(couponId: couponId, memberId: body.memberId)
                return json(.accepted, Accepted(requestId: "\(couponId):\(body.memberId)", position: .init(p)))
            }
        }

        router.get("/requests/:requestId") { request, context in
            guard let raw = context.parameters.get("requestId")?.removingPercentEncoding,
                  let key = try? IdempotencyKey(rawValue: raw) else {
                return error(.badRequest, "a request id is couponId:memberId (or order:orderId:eventId)")
            }
            let waitMs = request.uri.queryParameters.get("waitMs", as: Int.self) ?? 0
            guard waitMs >= 0, waitMs <= 60_000 else { return error(.badRequest, "waitMs must be in 0...60000") }
            return try await answer {
                let r = try await core.record(key, wait: .milliseconds(waitMs))
                return json(.ok, RequestStatus(record: r))
            }
        }

        router.get("/coupons/:couponId") { _, context in
            guard let couponId = context.parameters.get("couponId", as: Int64.self) else {
                return error(.badRequest, "couponId must be an integer")
            }
            return try await answer {
                guard let c = try await core.counts(couponId) else { return error(.notFound, "coupon \(couponId) does not exist") }
                return json(.ok, c)
            }
        }

        router.get("/coupons/:couponId/issued") { _, context in
            guard let couponId = context.parameters.get("couponId", as: Int64.self) else {
                return error(.badRequest, "couponId must be an integer")
            }
            return try await answer {
                guard try await core.backend.catalog.stock(of: couponId) != nil else {
                    return error(.notFound, "coupon \(couponId) does not exist")
                }
                let encoder = JSONEncoder()
                encoder.outputFormatting = .sortedKeys
                var text = ""
                for e in try await core.ledger(couponId) {
                    text += String(decoding: try encoder.encode(e), as: UTF8.self) + "\n"
                }
                return Response(status: .ok, headers: [.contentType: "application/x-ndjson"], body: .init(byteBuffer: ByteBuffer(string: text)))
            }
        }

        router.post("/orders/:orderId/events") { request, context in
            guard let orderId = context.parameters.get("orderId"), OrderEvent.isValidID(orderId) else {
                return error(.badRequest, "orderId must be 1 to 64 characters of A-Z a-z 0-9 - _ .")
            }
            let body: EventBody
            do { body = try await decode(EventBody.self, request) } catch let e as BadRequest { return e.response }
            guard OrderEvent.isValidID(body.eventId) else { return error(.badRequest, "eventId must be 1 to 64 characters of A-Z a-z 0-9 - _ .") }
            guard let kind = OrderEvent.Kind(rawValue: body.type) else { return error(.badRequest, "type must be use or restore") }
            let event = OrderEvent(orderId: orderId, eventId: body.eventId, type: kind, couponId: body.couponId, memberId: body.memberId)
            return try await answer {
                let p = try await core.publish(event)
                return json(.accepted, Accepted(requestId: try event.key().rawValue, position: .init(p)))
            }
        }

        router.post("/legacy/coupons/:couponId/issue") { request, context in
            defer { core.legacyResponses.add(1, ordering: .relaxed) }
            guard let couponId = context.parameters.get("couponId", as: Int64.self), couponId >= 0 else {
                return error(.badRequest, "couponId must be a non-negative integer")
            }
            let body: ClickBody
            do { body = try await decode(ClickBody.self, request) } catch let e as BadRequest { return e.response }
            guard let legacy = core.legacy else {
                return error(.serviceUnavailable, "the legacy design needs Redis: start the service with --redis-url redis://HOST:PORT")
            }
            return try await answer {
                switch try await legacy.issue(couponId: couponId, memberId: body.memberId) {
                case .issued(let serial): return json(.ok, LegacyIssued(status: "issued", serial: serial))
                case .soldOut: return json(.conflict, ["status": "soldOut"])
                case .alreadyIssued: return json(.conflict, ["status": "alreadyIssued"])
                case .lockTimeout: return error(.serviceUnavailable, "the coupon's lock was not acquired within the wait budget")
                case .unknownCoupon: return error(.notFound, "coupon \(couponId) does not exist")
                }
            }
        }

        router.get("/legacy/coupons/:couponId/audit") { _, context in
            guard let couponId = context.parameters.get("couponId", as: Int64.self) else { return error(.badRequest, "couponId must be an integer") }
            guard let legacy = core.legacy else { return error(.serviceUnavailable, "the legacy design needs Redis: start the service with --redis-url") }
            return try await answer { json(.ok, try await legacy.audit(couponId: couponId)) }
        }

        router.get("/audit/coupons/:couponId") { _, context in
            guard let couponId = context.parameters.get("couponId", as: Int64.self) else { return error(.badRequest, "couponId must be an integer") }
            return try await answer {
                guard let a = try await core.audit(couponId) else { return error(.notFound, "coupon \(couponId) does not exist") }
                return json(.ok, a)
            }
        }

        // Response counters, for a load tool that waits for its last response (make bench-service).
        router.get("/counters") { _, _ in
            json(.ok, ["clickResponses": core.clickResponses.load(ordering: .relaxed), "legacyResponses": core.legacyResponses.load(ordering: .relaxed)])
        }

        Dashboard.add(to: router, core)
        return router
    }

    /// Maps backend errors: unreachable or stopped → 503 (never a 2xx for what was not done).
    static func answer(_ body: () async throws -> Response) async throws -> Response {
        do {
            return try await body()
        } catch let e as ExactlyOnceError where e.isRetriable || e.code == .transportUnavailable || e.code == .storeUnavailable || e.code == .shutDown {
            return error(.serviceUnavailable, "backend unavailable: \(e)")
        } catch let e as ExactlyOnceError where e.code == .invalidKey || e.code == .invalidPayload {
            return error(.badRequest, "\(e)")
        } catch let e as ServiceError {
            return error(.serviceUnavailable, e.message)
        }
    }
}

struct BadRequest: Error {
    var message: String
    var response: Response { error(.badRequest, message) }
}

/// Decodes a JSON body of at most 64 KiB.
func decode<T: Decodable>(_ type: T.Type, _ request: Request) async throws -> T {
    var request = request
    let buffer: ByteBuffer
    do {
        buffer = try await request.collectBody(upTo: 65_536)
    } catch {
        throw BadRequest(message: "the body is missing or larger than 64 KiB")
    }
    do {
        return try JSONDecoder().decode(T.self, from: Data(buffer.readableBytesView))
    } catch {
        throw BadRequest(message: "the body is not the expected JSON: \(T.self == ClickBody.self ? "{\"memberId\": <int>}" : T.self == CreateCouponBody.self ? "{\"couponId\": <int>, \"stock\": <int>}" : "{\"eventId\", \"type\": \"use\"|\"restore\", \"couponId\", \"memberId\"}")")
    }
}

func json<T: Encodable>(_ status: HTTPResponse.Status, _ value: T) -> Response {
    let encoder = JSONEncoder()
    encoder.outputFormatting = .sortedKeys
    let data = (try? encoder.encode(value)) ?? Data("{}".utf8)
    return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: data)))
}

func error(_ status: HTTPResponse.Status, _ message: String) -> Response { json(status, ["error": message]) }

struct CreateCouponBody: Decodable { var couponId: Int64; var stock: Int64 }
struct ClickBody: Decodable { var memberId: Int64 }
struct EventBody: Decodable {
    var eventId: String
    var type: String
    var couponId: Int64
    var memberId: Int64
    enum CodingKeys: String, CodingKey { case eventId, type, couponId, memberId }
    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        if let s = try? c.decode(String.self, forKey: .eventId) { eventId = s } else { eventId = String(try c.decode(Int64.self, forKey: .eventId)) }
        type = try c.decode(String.self, forKey: .type)
        couponId = try c.decode(Int64.self, forKey: .couponId)
        memberId = try c.decode(Int64.self, forKey: .memberId)
    }
}

/// `{"requestId", "position": {"partition", "offset"}}`.
public struct Accepted: Codable, Sendable, Hashable {
    /// The request's id (its idempotency key).
    public var requestId: String
    /// Where the log holds it.
    public var position: Position
    /// A log position.
    public struct Position: Codable, Sendable, Hashable {
        /// The partition.
        public var partition: Int
        /// The offset.
        public var offset: Int64
        init(_ p: RecordPosition) { partition = p.partition.rawValue; offset = p.offset.rawValue }
    }
}

struct LegacyIssued: Codable { var status: String; var serial: Int64 }

/// `GET /requests/{requestId}`: the stored outcome (G4), or pending.
public struct RequestStatus: Codable, Sendable, Hashable {
    /// pending, issued, soldOut, applied, rejected or deadLettered.
    public var status: String
    /// The serial, for issued.
    public var serial: Int64?
    /// The handler's detail, for applied.
    public var detail: String?
    /// Why, for rejected and deadLettered.
    public var reason: String?

    init(record: DedupeRecord?) {
        guard let record, record.phase == .completed, let o = record.outcome else { status = "pending"; return }
        switch o.status {
        case .applied:
            if let s = Int64(o.detailText), record.key.rawValue.split(separator: ":").count == 2 {
                status = "issued"; serial = s
            } else {
                status = "applied"; detail = o.detailText
            }
        case .rejected:
            if o.detailText == "sold out" { status = "soldOut" } else { status = "rejected"; reason = o.detailText }
        default:
            status = "deadLettered"; reason = o.detailText
        }
    }
}
