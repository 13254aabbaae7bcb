import ExactlyOnce
import Foundation
import Hummingbird

/// The live sale dashboard: one HTML page without a build step or framework, polling
/// `GET /dashboard/state` twice a second, and looking request outcomes up with
/// `GET /requests/{requestId}`.
public enum Dashboard {
    static func add<B: CouponBackend>(to router: Router<BasicRequestContext>, _ core: CouponServiceCore<B>) {
        router.get("/dashboard") { _, _ in
            Response(status: .ok, headers: [.contentType: "text/html; charset=utf-8"], body: .init(byteBuffer: ByteBuffer(string: page)))
        }
        router.get("/dashboard/state") { _, _ in
            try await CouponRoutes.answer { json(.ok, try await state(core)) }
        }
    }

    /// What the dashboard shows, as JSON.
    public struct State: Codable, Sendable {
        /// Every coupon, counts from the source of truth.
        public var coupons: [CouponCounts]
        /// Clicks accepted per second (mean of the last two full seconds).
        public var requestsPerSecond: Double
        /// Consumer lag per partition of each topic.
        public var partitions: [Lag]
        /// Records in the dead-letter topics.
        public var deadLetters: Int
        /// The latest dead letters (up to 10).
        public var recentDeadLetters: [DeadLetter]
        /// The legacy lock's counters, when Redis is configured.
        public var legacy: LegacyIssuer.Stats?
    }

    /// Lag of one partition.
    public struct Lag: Codable, Sendable {
        /// The topic.
        public var topic: String
        /// The partition.
        public var partition: Int
        /// The group's committed offset (next to read), nil before the first commit.
        public var committed: Int64?
        /// The end offset.
        public var end: Int64
        /// end - committed.
        public var lag: Int64
    }

    /// A dead letter.
    public struct DeadLetter: Codable, Sendable {
        /// The dead-letter topic.
        public var topic: String
        /// Its offset there.
        public var offset: Int64
        /// The payload as text.
        public var payload: String
        /// Why it was given up on (the consumer's `x-dead-letter-reason` header).
        public var reason: String?
        /// The headers (reason, origin).
        public var headers: [String: String]
    }

    /// Collects the state.
    public static func state<B: CouponBackend>(_ core: CouponServiceCore<B>) async throws -> State {
        var coupons: [CouponCounts] = []
        for (c, stock) in try await core.backend.catalog.all().sorted(by: { $0.key < $1.key }) {
            let issued = try await core.issuedFromStore(c)
            coupons.append(CouponCounts(couponId: c, stock: stock, issued: issued, remaining: max(0, stock - issued)))
        }
        var lags: [Lag] = []
        var dead = 0
        var recent: [DeadLetter] = []
        for topic in [ServiceTopics.clicks, ServiceTopics.orderEvents] {
            for s in try await core.backend.transport.partitionStatus(group: ServiceTopics.group, topic: topic).sorted(by: { $0.partition < $1.partition }) {
                lags.append(Lag(topic: topic, partition: s.partition.rawValue, committed: s.committed?.rawValue, end: s.end.rawValue, lag: s.lag))
            }
            let dlq = ServiceTopics.deadLetters(topic)
            for s in try await core.backend.transport.partitionStatus(group: ServiceTopics.group, topic: dlq) {
                dead += Int(s.end.rawValue)
                let from = Offset(max(0, s.end.rawValue - 10))
                for r in try await core.backend.transport.read(topic: dlq, partition: s.partition, from: from, maxRecords: 10) {
                    recent.append(DeadLetter(topic: dlq, offset: r.offset.rawValue, payload: String(decoding: r.payload.prefix(200), as: UTF8.self),
                                              reason: r.headers[DeadLetterHeaders.reason], headers: r.headers))
                }
            }
        }
        return State(coupons: coupons, requestsPerSecond: core.requestsPerSecond, partitions: lags, deadLetters: dead,
                     recentDeadLetters: Array(recent.suffix(10)), legacy: core.legacy?.stats)
    }

    /// The page. Numbers carry `data-*` attributes so a test can read them from the rendered DOM.
    static let page = """
    <!doctype html>
    <html lang="en">
    <head>
    <meta charset="utf-8">
    <title>Coupon sale</title>
    <style>
    body { font-family: system-ui, sans-serif; margin: 24px; color: #1d2330; background: #f6f7fb; }
    h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 22px 0 8px; }
    .muted { color: #667; font-size: 13px; }
    .tiles { display: flex; gap: 16px; flex-wrap: wrap; }
    .tile { background: #fff; border-radius: 8px; padding: 12px 16px; box-shadow: 0 1px 3px #0002; min-width: 150px; }
    .tile .v { font-size: 28px; font-weight: 600; }
    table { border-collapse: collapse; background: #fff; box-shadow: 0 1px 3px #0002; }
    th, td { padding: 6px 12px; text-align: right; border-bottom: 1px solid #e5e7ef; font-variant-numeric: tabular-nums; }
    th { background: #eef0f6; } td.l, th.l { text-align: left; }
    .bar { background: #e5e7ef; width: 160px; height: 10px; border-radius: 5px; overflow: hidden; }
    .bar > div { background: #3b6fd8; height: 10px; }
    input { padding: 6px; width: 220px; } button { padding: 6px 12px; }
    #outcome { margin-left: 12px; font-weight: 600; }
    </style>
    </head>
    <body>
    <h1>Coupon flash sale</h1>
    <div class="muted">Live from <code>/dashboard/state</code>, every 500 ms. Updated <span id="updated">never</span>.</div>
    <div class="tiles" style="margin-top:14px">
      <div class="tile"><div class="muted">requests/s</div><div class="v" id="rps" data-rps="">–</div></div>
      <div class="tile"><div class="muted">consumer lag (total)</div><div class="v" id="lag" data-lag="">–</div></div>
      <div class="tile"><div class="muted">dead letters</div><div class="v" id="dead" data-dead="">–</div></div>
      <div class="tile"><div class="muted">legacy lock timeouts</div><div class="v" id="legacy">–</div></div>
    </div>
    <h2>Coupons</h2>
    <table><thead><tr><th class="l">coupon</th><th>stock</th><th>issued</th><th>remaining</th><th class="l">sold</th></tr></thead>
    <tbody id="coupons"></tbody></table>
    <h2>Consumer lag per partition</h2>
    <table><thead><tr><th class="l">topic</th><th>partition</th><th>committed</th><th>end</th><th>lag</th></tr></thead>
    <tbody id="partitions"></tbody></table>
    <h2>Dead letters</h2>
    <table><thead><tr><th class="l">topic</th><th>offset</th><th class="l">payload</th><th class="l">reason</th></tr></thead>
    <tbody id="deadletters"></tbody></table>
    <h2>Look up a request</h2>
    <form id="lookup"><input id="rid" placeholder="couponId:memberId"> <button>Look up</button><span id="outcome" data-outcome=""></span></form>
    <script>
    const esc = s => String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
    async function refresh() {
      try {
        const r = await fetch('/dashboard/state', {cache: 'no-store'});
        if (!r.ok) throw new Error('HTTP ' + r.status);
        const s = await r.json();
        document.getElementById('rps').textContent = s.requestsPerSecond.toFixed(0);
        document.getElementById('rps').dataset.rps = s.requestsPerSecond;
        const lag = s.partitions.reduce((a, p) => a + p.lag, 0);
        document.getElementById('lag').textContent = lag; document.getElementById('lag').dataset.lag = lag;
        document.getElementById('dead').textContent = s.deadLetters; document.getElementById('dead').dataset.dead = s.deadLetters;
        document.getElementById('legacy').textContent = s.legacy ? s.legacy.lockTimeouts : 'no Redis';
        document.getElementById('coupons').innerHTML = s.coupons.map(c => {
          const pct = c.stock > 0 ? Math.round(100 * c.issued / c.stock) : 0;
          return `<tr data-coupon="${c.couponId}"><td class="l">${c.couponId}</td><td data-field="stock">${c.stock}</td>` +
            `<td data-field="issued">${c.issued}</td><td data-field="remaining">${c.remaining}</td>` +
            `<td class="l"><div class="bar"><div style="width:${pct}%"></div></div></td></tr>`;
        }).join('');
        document.getElementById('partitions').innerHTML = s.partitions.map(p =>
          `<tr data-topic="${esc(p.topic)}" data-partition="${p.partition}"><td class="l">${esc(p.topic)}</td><td>${p.partition}</td>` +
          `<td data-field="committed">${p.committed ?? '–'}</td><td data-field="end">${p.end}</td><td data-field="lag">${p.lag}</td></tr>`).join('');
        document.getElementById('deadletters').innerHTML = s.recentDeadLetters.length ? s.recentDeadLetters.map(d =>
          `<tr><td class="l">${esc(d.topic)}</td><td>${d.offset}</td><td class="l">${esc(d.payload)}</td>` +
          `<td class="l" data-field="reason">${esc(d.reason ?? '(no reason header)')}</td></tr>`).join('')
          : '<tr><td class="l" colspan="4">none</td></tr>';
        document.getElementById('updated').textContent = new Date().toISOString();
        document.body.dataset.loaded = 'true';
      } catch (e) {
        document.getElementById('updated').textContent = 'error: ' + e.message;
      }
    }
    async function lookup(id) {
      const out = document.getElementById('outcome');
      const r = await fetch('/requests/' + encodeURIComponent(id));
      const o = await r.json();
      const text = o.status === 'issued' ? `issued, serial ${o.serial}` : o.status + (o.reason ? ` (${o.reason})` : '');
      out.textContent = id + ': ' + text; out.dataset.outcome = o.status; out.dataset.serial = o.serial ?? '';
    }
    document.getElementById('lookup').addEventListener('submit', e => { e.preventDefault(); lookup(document.getElementById('rid').value.trim()); });
    const q = new URLSearchParams(location.search).get('request');
    if (q) { document.getElementById('rid').value = q; lookup(q); }
    refresh(); setInterval(refresh, 500);
    </script>
    </body>
    </html>
    """
}
