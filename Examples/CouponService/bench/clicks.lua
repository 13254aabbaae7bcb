-- wrk script of `make bench-service`: each thread sends its share of a deterministic click
-- sequence (members 1..MEMBERS, 20% of clicks repeat an earlier click of the thread) to PATH
-- (/coupons/C/requests or /legacy/coupons/C/issue), then stops.
-- Arguments (after --): PATH TOTAL MEMBERS THREADS
local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  path = args[1]
  local total = tonumber(args[2])
  local members = tonumber(args[3])
  local nthreads = tonumber(args[4])
  share = math.floor(total / nthreads)
  math.randomseed(4242 + id * 7919)
  seq = {}
  for i = 1, share do
    if i > 1 and math.random() < 0.2 then
      seq[i] = seq[math.random(1, i - 1)]
    else
      seq[i] = math.random(1, members)
    end
  end
  sent = 0
  answered = 0
  codes = {}
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  sent = sent + 1
  -- Past its share (connections still in flight), a thread repeats its sequence from the start.
  local m = seq[((sent - 1) % share) + 1]
  return wrk.format("POST", path, headers, '{"memberId":' .. m .. '}')
end

function response(status, hdrs, body)
  answered = answered + 1
  codes[status] = (codes[status] or 0) + 1
  if answered >= share then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local statuses = {}
  for _, t in ipairs(threads) do
    local c = t:get("codes")
    for k, v in pairs(c) do statuses[k] = (statuses[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(statuses) do table.insert(parts, string.format('"%d":%d', k, v)) end
  io.write(string.format('BENCH {"requests":%d,"durationUs":%d,"p50Us":%d,"p99Us":%d,"p999Us":%d,"maxUs":%d,"timeouts":%d,"connectErrors":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
    summary.errors.timeout, summary.errors.connect, table.concat(parts, ",")))
end
