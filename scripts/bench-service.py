#!/usr/bin/env python3
"""`make bench-service`: the coupon service's log design against its legacy Redis-lock design.

Starts one throwaway redis-server and the release `coupon-service` against it (in-memory log and
store, Redis for the read cache and the lock), then drives both designs with the same load from
wrk (Examples/CouponService/bench/clicks.lua): one hot coupon, stock 1,000, 50,000 clicks from
20,000 members, 20% repeats, at several concurrency levels. A last run shows the lock design
when its critical section outlives the lease. Prints the figures, writes
.build/service-comparison.svg (and Docs/service-comparison.svg), ends with one JSON line.

Environment: BENCH_CLICKS (50000), BENCH_MEMBERS (20000), BENCH_STOCK (1000),
BENCH_CONCURRENCY (comma list, default 16,64,256), BENCH_THREADS (2), BENCH_BINARY (the
release build of coupon-service).
"""
import json, os, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request, urllib.error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "Examples", "CouponService")
LUA = os.path.join(PKG, "bench", "clicks.lua")
CLICKS = int(os.environ.get("BENCH_CLICKS", "50000"))
MEMBERS = int(os.environ.get("BENCH_MEMBERS", "20000"))
STOCK = int(os.environ.get("BENCH_STOCK", "1000"))
LEVELS = [int(x) for x in os.environ.get("BENCH_CONCURRENCY", "16,64,256").split(",")]
THREADS = int(os.environ.get("BENCH_THREADS", "2"))

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def http(method, url, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()

def need(tool):
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if not path:
        sys.exit(f"bench-service: {tool} is not installed (scripts/install-deps.sh bench installs it)")
    return path

class Service:
    def __init__(self, redis_url, extra):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        binary = os.environ.get("BENCH_BINARY") or os.path.join(PKG, ".build", "release", "coupon-service")
        if not os.path.exists(binary):
            sys.exit(f"bench-service: {binary} is missing: cd Examples/CouponService && swift build -c release")
        self.log = open(os.path.join(tempfile.gettempdir(), f"coupon-service-bench-{self.port}.log"), "w")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--redis-url", redis_url, "--log-level", "warning"] + extra,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(200):
            try:
                if http("GET", self.base + "/health", timeout=1)[0] == 200: return
            except Exception:
                pass
            if self.proc.poll() is not None: break
            time.sleep(0.05)
        self.stop()
        sys.exit(f"bench-service: coupon-service did not start (log: {self.log.name})")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()

def counter(base, name):
    return json.loads(http("GET", base + "/counters")[1])[name]

def wrk(base, path, concurrency, clicks, counter_name):
    """Runs wrk until the service answered `clicks` requests of `path`, then stops it (SIGINT:
    wrk prints its latency summary). wrk's threads stop after their share, but wrk itself waits
    out its -d duration, so the load window is measured here: from just before wrk starts to the
    moment the service's response counter reached the total."""
    share = clicks // THREADS
    target = counter(base, counter_name) + share * THREADS
    start = time.monotonic()
    proc = subprocess.Popen([need("wrk"), f"-t{THREADS}", f"-c{concurrency}", "-d600s", "--timeout", "10s", "-s", LUA, base,
                             "--", path, str(clicks), str(MEMBERS), str(THREADS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while counter(base, counter_name) < target and proc.poll() is None:
        time.sleep(0.002)
    end = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    line = next((l for l in out.splitlines() if l.startswith("BENCH ")), None)
    if line is None:
        sys.exit(f"bench-service: wrk printed no result:\n{out}\n{err}")
    r = json.loads(line[6:])
    r["windowSeconds"] = end - start
    return r

def clicks_lag(base):
    state = json.loads(http("GET", base + "/dashboard/state")[1])
    return sum(p["lag"] for p in state["partitions"] if p["topic"] == "coupon-requests")

def run_log(svc, coupon, concurrency, clicks=CLICKS):
    assert http("POST", svc.base + "/coupons", {"couponId": coupon, "stock": STOCK})[0] == 201
    start = time.monotonic()
    r = wrk(svc.base, f"/coupons/{coupon}/requests", concurrency, clicks, "clickResponses")
    load_end = time.monotonic()
    while clicks_lag(svc.base) > 0: time.sleep(0.005)
    final = time.monotonic()
    audit = json.loads(http("GET", svc.base + f"/audit/coupons/{coupon}", timeout=120)[1])
    accepted = r["statuses"].get("202", 0)
    return dict(design="log", concurrency=concurrency, sent=r["requests"], accepted=accepted,
                refused=r["requests"] - accepted, acceptedPerSecond=accepted / r["windowSeconds"],
                p50Ms=r["p50Us"] / 1e3, p99Ms=r["p99Us"] / 1e3, p999Ms=r["p999Us"] / 1e3, maxMs=r["maxUs"] / 1e3,
                finalOutcomeSeconds=final - start, finalAfterLoadSeconds=final - load_end, statuses=r["statuses"],
                audit=dict(issued=audit["issued"], overIssued=audit["overIssued"], doubleIssued=audit["doubleIssued"],
                           lost=audit["lost"], fcfsViolations=audit["fcfsViolations"], soldOut=audit["soldOut"]))

def run_lock(svc, coupon, concurrency, clicks=CLICKS):
    assert http("POST", svc.base + "/coupons", {"couponId": coupon, "stock": STOCK})[0] == 201
    start = time.monotonic()
    r = wrk(svc.base, f"/legacy/coupons/{coupon}/issue", concurrency, clicks, "legacyResponses")
    final = start + r["windowSeconds"]  # synchronous: the last answer is the last final outcome
    audit = json.loads(http("GET", svc.base + f"/legacy/coupons/{coupon}/audit")[1])
    answered = r["statuses"].get("200", 0) + r["statuses"].get("409", 0)
    return dict(design="lock", concurrency=concurrency, sent=r["requests"], accepted=answered,
                refused=r["requests"] - answered, acceptedPerSecond=answered / r["windowSeconds"],
                p50Ms=r["p50Us"] / 1e3, p99Ms=r["p99Us"] / 1e3, p999Ms=r["p999Us"] / 1e3, maxMs=r["maxUs"] / 1e3,
                finalOutcomeSeconds=final - start, finalAfterLoadSeconds=0.0, statuses=r["statuses"],
                audit=dict(issued=audit["issued"], overIssued=audit["overIssued"], doubleIssued=audit["doubleIssued"],
                           lost=audit["lost"], fcfsViolations=audit["fcfsViolations"], lockTimeouts=audit["lockTimeouts"],
                           leaseExpiries=audit["leaseExpiries"], contendedAttempts=audit["contendedAttempts"]))

def svg(results, path):
    levels = sorted({r["concurrency"] for r in results})
    colors = {"log": "#3b6fd8", "lock": "#d8633b"}
    W, H = 900, 380
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{W/2}" y="20" text-anchor="middle" font-size="15">coupon-service: log design vs Redis-lock design '
           f'(stock {STOCK}, {CLICKS} clicks, {MEMBERS} members)</text>']
    # Panel 1: accepted requests/s.
    x0, y0, pw, ph = 60, 50, 340, 260
    top = max(r["acceptedPerSecond"] for r in results) * 1.1
    out.append(f'<text x="{x0 + pw/2}" y="{y0 - 8}" text-anchor="middle">accepted requests/s</text>')
    out.append(f'<line x1="{x0}" y1="{y0+ph}" x2="{x0+pw}" y2="{y0+ph}" stroke="#333"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0+ph}" stroke="#333"/>')
    for i in range(5):
        v = top * i / 4; y = y0 + ph - ph * i / 4
        out.append(f'<text x="{x0-4}" y="{y+4}" text-anchor="end">{v:,.0f}</text>')
    gw = pw / len(levels)
    for li, c in enumerate(levels):
        for di, d in enumerate(["log", "lock"]):
            r = next((r for r in results if r["concurrency"] == c and r["design"] == d), None)
            if not r: continue
            h = ph * r["acceptedPerSecond"] / top
            x = x0 + li * gw + 10 + di * (gw - 20) / 2
            out.append(f'<rect x="{x:.1f}" y="{y0+ph-h:.1f}" width="{(gw-20)/2-2:.1f}" height="{h:.1f}" fill="{colors[d]}"/>')
        out.append(f'<text x="{x0 + li*gw + gw/2}" y="{y0+ph+16}" text-anchor="middle">{c} connections</text>')
    # Panel 2: latency percentiles, log scale.
    import math
    x1 = 500
    lo, hi = 0.05, max(max(r["p999Ms"] for r in results), 1) * 2
    def ly(v): return y0 + ph - ph * (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    out.append(f'<text x="{x1 + pw/2}" y="{y0 - 8}" text-anchor="middle">response latency, ms (log scale): p50 ○ p99 ◆ p999 ▲</text>')
    out.append(f'<line x1="{x1}" y1="{y0+ph}" x2="{x1+pw}" y2="{y0+ph}" stroke="#333"/><line x1="{x1}" y1="{y0}" x2="{x1}" y2="{y0+ph}" stroke="#333"/>')
    v = 0.1
    while v < hi:
        out.append(f'<text x="{x1-4}" y="{ly(v)+4:.1f}" text-anchor="end">{v:g}</text><line x1="{x1}" x2="{x1+pw}" y1="{ly(v):.1f}" y2="{ly(v):.1f}" stroke="#eee"/>')
        v *= 10
    for li, c in enumerate(levels):
        for di, d in enumerate(["log", "lock"]):
            r = next((r for r in results if r["concurrency"] == c and r["design"] == d), None)
            if not r: continue
            x = x1 + li * gw + gw * (0.33 + 0.34 * di)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{ly(r["p50Ms"]):.1f}" y2="{ly(r["p999Ms"]):.1f}" stroke="{colors[d]}"/>')
            out.append(f'<circle cx="{x:.1f}" cy="{ly(r["p50Ms"]):.1f}" r="4" fill="white" stroke="{colors[d]}" stroke-width="2"/>')
            out.append(f'<rect x="{x-4:.1f}" y="{ly(r["p99Ms"])-4:.1f}" width="8" height="8" fill="{colors[d]}" transform="rotate(45 {x:.1f} {ly(r["p99Ms"]):.1f})"/>')
            out.append(f'<polygon points="{x-5:.1f},{ly(r["p999Ms"])+4:.1f} {x+5:.1f},{ly(r["p999Ms"])+4:.1f} {x:.1f},{ly(r["p999Ms"])-5:.1f}" fill="{colors[d]}"/>')
        out.append(f'<text x="{x1 + li*gw + gw/2}" y="{y0+ph+16}" text-anchor="middle">{c} connections</text>')
    out.append(f'<rect x="60" y="{H-30}" width="12" height="12" fill="{colors["log"]}"/><text x="78" y="{H-20}">log design (202 once the log confirmed; outcome via GET /requests)</text>')
    out.append(f'<rect x="500" y="{H-30}" width="12" height="12" fill="{colors["lock"]}"/><text x="518" y="{H-20}">Redis-lock design (synchronous 200/409; 503 on lock timeout)</text>')
    out.append('</svg>')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f: f.write("\n".join(out) + "\n")

def main():
    need("wrk")
    redis_bin = need("redis-server")
    rport = free_port()
    rdir = tempfile.mkdtemp(prefix="coupon-service-bench-redis-")
    redis = subprocess.Popen([redis_bin, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", rdir],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis_url = f"redis://127.0.0.1:{rport}"
    results, expiry = [], None
    svc = None
    try:
        time.sleep(0.3)
        svc = Service(redis_url, [])
        coupon = 1000
        for c in LEVELS:
            for design in ("log", "lock"):
                coupon += 1
                r = run_log(svc, coupon, c) if design == "log" else run_lock(svc, coupon, c)
                results.append(r)
                a = r["audit"]
                print(f"{design:4} c={c:<4} sent {r['sent']:>6}  accepted {r['accepted']:>6} ({r['acceptedPerSecond']:>9,.0f}/s)  refused {r['refused']:>6}  "
                      f"p50 {r['p50Ms']:8.2f} ms  p99 {r['p99Ms']:8.2f} ms  p999 {r['p999Ms']:8.2f} ms  final after {r['finalOutcomeSeconds']:6.2f} s  "
                      f"audit: issued {a['issued']} over {a['overIssued']} double {a['doubleIssued']} lost {a['lost']} fcfs {a['fcfsViolations']}"
                      + (f"  lock timeouts {a['lockTimeouts']} lease expiries {a['leaseExpiries']}" if design == "lock" else ""), flush=True)
        svc.stop()
        # Lease expiry: a critical section (5 ms standing for the DB write) longer than the lease (2 ms).
        svc = Service(redis_url, ["--legacy-lease-ms", "2", "--legacy-work-ms", "5", "--key-prefix", "expiry:"])
        expiry = run_lock(svc, 9001, 64, clicks=10_000)
        a = expiry["audit"]
        print(f"lock with lease 2 ms < 5 ms work, c=64, 10000 clicks: accepted {expiry['accepted']} ({expiry['acceptedPerSecond']:,.0f}/s)  "
              f"issued {a['issued']} of stock {STOCK}: over-issued {a['overIssued']} double {a['doubleIssued']} fcfs {a['fcfsViolations']} "
              f"lease expiries {a['leaseExpiries']}", flush=True)
    finally:
        if svc: svc.stop()
        redis.kill(); redis.wait()
        shutil.rmtree(rdir, ignore_errors=True)

    chart = os.path.join(PKG, ".build", "service-comparison.svg")
    svg(results, chart)
    shutil.copy(chart, os.path.join(ROOT, "Docs", "service-comparison.svg"))
    top = max(LEVELS)
    log = next(r for r in results if r["design"] == "log" and r["concurrency"] == top)
    lock = next(r for r in results if r["design"] == "lock" and r["concurrency"] == top)
    print(f"chart: {chart} (copy in Docs/service-comparison.svg)")
    print(json.dumps(dict(
        logVsLockThroughput=round(log["acceptedPerSecond"] / lock["acceptedPerSecond"], 2),
        logVsLockP99=round(log["p99Ms"] / lock["p99Ms"], 4),
        logFinalOutcomeSeconds=round(log["finalOutcomeSeconds"], 3),
        lockFinalOutcomeSeconds=round(lock["finalOutcomeSeconds"], 3),
        atConcurrency=top, clicks=CLICKS, members=MEMBERS, stock=STOCK,
        levels=results, leaseExpiryRun=expiry)))

if __name__ == "__main__":
    if os.environ.get("BENCH_TRACE"):
        import faulthandler; faulthandler.dump_traceback_later(int(os.environ["BENCH_TRACE"]))
    main()
