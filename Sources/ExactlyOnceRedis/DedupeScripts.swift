/// A Lua script, run with `EVALSHA` under the SHA-1 that Redis itself answered to
/// `SCRIPT LOAD` (the client loads it on first use and again after `NOSCRIPT`, when the server
/// restarted or its script cache was flushed).
struct RedisScript: Sendable {
    /// A name unique among the library's scripts (the client's cache key).
    let name: String
    /// The script body.
    let body: [UInt8]

    init(_ name: String, _ source: String) {
        self.name = name
        self.body = Array(source.utf8)
    }
}

/// The dedupe contract (`DedupeStateMachine` in the core) as Lua scripts, one atomic unit each.
///
/// Times are the client's `WallClock` in milliseconds, passed as `ARGV[1]`, so tests can use a
/// manual clock and every store agrees on the same lease arithmetic; epochs and tokens are
/// compared as decimal strings (exact for any `UInt64`, unlike Lua's doubles).
///
/// Record hash fields: `fp` fingerprint, `ph` phase (1 in progress, 2 released, 3 completed),
/// `at` attempts, `tok` token, `le` lease end, `os`/`od` outcome status and detail, `ex`
/// retention end, `lf` last failure, `fs`/`fe` fence scope and epoch.
enum DedupeScripts {
    private static let helpers = """
    local function older(a, b)
      if #a ~= #b then return #a < #b end
      return a < b
    end
    -- The epoch of fence scope `scope` in the hash `fences` (false when none), read once per
    -- call: `cache` keeps what was read (a batch's records nearly always share one fence).
    local function cachedEpoch(cache, fences, scope)
      local v = cache[scope]
      if v == nil then
        v = redis.call('HGET', fences, scope) or false
        cache[scope] = v
      end
      return v
    end

    """

    /// KEYS: token counter, fence hash, one record key per request.
    /// ARGV: now, then per request: fingerprint, lease end, has-fence (1/0), scope, epoch,
    /// prefetch (1/0).
    /// Reply: `{'FENCED', index, seenEpoch}` or one entry per request:
    /// `{'N', token, attempt}`, `{'D', status, detail}`, `{'P', leaseEnd}`,
    /// `{'C', storedFingerprint, hasOutcome (1/0), status, detail}`.
    static let claim = RedisScript("dedupe.claim", helpers + """
    local now = tonumber(ARGV[1])
    local n = #KEYS - 2
    local seenByScope = {}
    for i = 1, n do
      local b = 1 + (i - 1) * 6
      if ARGV[b + 3] == '1' then
        local seen = cachedEpoch(seenByScope, KEYS[2], ARGV[b + 4])
        if seen and older(ARGV[b + 5], seen) then return {'FENCED', i, seen} end
      end
    end
    for i = 1, n do
      local b = 1 + (i - 1) * 6
      if ARGV[b + 3] == '1' then
        local seen = cachedEpoch(seenByScope, KEYS[2], ARGV[b + 4])
        if (not seen) or older(seen, ARGV[b + 5]) then
          redis.call('HSET', KEYS[2], ARGV[b + 4], ARGV[b + 5])
          seenByScope[ARGV[b + 4]] = ARGV[b + 5]
        end
      end
    end
    local out = {}
    local granted = false
    local counterBefore = tonumber(redis.call('GET', KEYS[1]) or '0')
    local counter = counterBefore
    for i = 1, n do
      local b = 1 + (i - 1) * 6
      local rk = KEYS[2 + i]
      local fp = ARGV[b + 1]
      local fenced = ARGV[b + 3] == '1'
      local r = redis.call('HMGET', rk, 'fp', 'ph', 'at', 'le', 'os', 'od', 'ex', 'fs', 'fe')
      local attempts = 0
      local sameOwner = false
      local take = true
      if r[1] then
        if r[2] == '3' and r[7] and r[7] ~= '' and now >= tonumber(r[7]) then
          attempts = 0 -- retention ended: forget it and start afresh
        elseif r[1] ~= fp then
          if r[2] == '3' then out[i] = {'C', r[1], '1', r[5] or '0', r[6] or ''} else out[i] = {'C', r[1], '0', '', ''} end
          take = false
        elseif r[2] == '3' then
          out[i] = {'D', r[5] or '0', r[6] or ''}
          take = false
        else
          if r[2] == '1' then
            local newerOrSame = false
            if fenced and r[8] == ARGV[b + 4] and r[9] then
              newerOrSame = not older(ARGV[b + 5], r[9])
              sameOwner = r[9] == ARGV[b + 5]
            end
            if now < tonumber(r[4]) and not newerOrSame then
              out[i] = {'P', r[4]}
              take = false
            end
          end
          attempts = tonumber(r[3]) or 0
        end
      end
      if take then
        -- Old fields (outcome, failure, fence, TTL) must not leak into the new claim.
        if r[1] then redis.call('DEL', rk) end
        local charged = not (ARGV[b + 6] == '1' and granted) and not sameOwner
        granted = true
        local stored = attempts
        if charged then stored = attempts + 1 end
        local attempt = attempts + 1
        if sameOwner then attempt = math.max(1, attempts) end
        counter = counter + 1
        if fenced then
          redis.call('HSET', rk, 'fp', fp, 'ph', '1', 'at', stored, 'tok', counter, 'le', ARGV[b + 2], 'fs', ARGV[b + 4], 'fe', ARGV[b + 5])
        else
          redis.call('HSET', rk, 'fp', fp, 'ph', '1', 'at', stored, 'tok', counter, 'le', ARGV[b + 2])
        end
        out[i] = {'N', counter, attempt}
      end
    end
    -- One read and one write of the token counter per batch (as if INCR per new claim).
    if counter ~= counterBefore then redis.call('SET', KEYS[1], counter) end
    return out
    """)

    /// Completes claims in order, each with its effect, stopping at the first that fails; the
    /// whole call is one atomic unit.
    ///
    /// KEYS: fence hash, then per completion: its record, its read state keys, its written
    /// state keys. ARGV: now, retention ms ('' for none), then per completion: token, has-fence,
    /// scope, epoch, retention end, outcome status, outcome detail, read count, write count,
    /// the read versions, then per write 1/0 (set/remove) and the value.
    /// Reply: one entry per completion handled: `{'OK'}` or `{'REPEAT'}`; the last may instead be
    /// `{'FENCED', reason, detail}` or `{'CONFLICT', readIndex}`, and then the rest were not run.
    static let complete = RedisScript("dedupe.complete", helpers + """
    local now = tonumber(ARGV[1])
    local retention = ARGV[2]
    local a = 3
    local k = 2
    local out = {}
    local seenByScope = {}
    local function one()
      local token, hasFence, scope, epoch = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
      local retentionEnd, ostatus, odetail = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
      local nr, nw = tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8])
      local rk = KEYS[k]
      local reads = a + 9
      local writes = reads + nr
      local firstRead = k + 1
      local firstWrite = k + 1 + nr
      a = writes + 2 * nw
      k = firstWrite + nw
      if hasFence == '1' then
        local seen = cachedEpoch(seenByScope, KEYS[1], scope)
        if seen and older(epoch, seen) then return {'FENCED', 'epoch', seen} end
      end
      local r = redis.call('HMGET', rk, 'tok', 'ph', 'le')
      if not r[1] then return {'FENCED', 'missing', ''} end
      if r[1] ~= token then return {'FENCED', 'superseded', r[1]} end
      if r[2] == '3' then return {'REPEAT'} end
      if r[2] ~= '1' then return {'FENCED', 'released', ''} end
      if now >= tonumber(r[3]) then return {'FENCED', 'expired', ''} end
      for i = 0, nr - 1 do
        local ver = redis.call('HGET', KEYS[firstRead + i], 'ver') or '0'
        if ver ~= ARGV[reads + i] then return {'CONFLICT', i + 1} end
      end
      for i = 0, nw - 1 do
        local sk = KEYS[firstWrite + i]
        redis.call('HINCRBY', sk, 'ver', 1)
        if ARGV[writes + 2 * i] == '1' then redis.call('HSET', sk, 'v', ARGV[writes + 2 * i + 1]) else redis.call('HDEL', sk, 'v') end
      end
      redis.call('HSET', rk, 'ph', '3', 'os', ostatus, 'od', odetail)
      if retention ~= '' then
        redis.call('HSET', rk, 'ex', retentionEnd)
        redis.call('PEXPIRE', rk, retention)
      end
      return {'OK'}
    end
    while k <= #KEYS do
      local r = one()
      out[#out + 1] = r
      if r[1] ~= 'OK' and r[1] ~= 'REPEAT' then return out end
    end
    return out
    """)

    /// KEYS: fence hash, record. ARGV: now, token, has-fence, scope, epoch, reason, attempt.
    /// Reply: `{'OK'}` or `{'FENCED', reason, detail}`. Charges the claim's attempt: the
    /// record's attempts become at least ARGV[7].
    static let release = RedisScript("dedupe.release", helpers + """
    if ARGV[3] == '1' then
      local seen = redis.call('HGET', KEYS[1], ARGV[4])
      if seen and older(ARGV[5], seen) then return {'FENCED', 'epoch', seen} end
    end
    local r = redis.call('HMGET', KEYS[2], 'tok', 'ph', 'at')
    if not r[1] then return {'FENCED', 'missing', ''} end
    if r[1] ~= ARGV[2] then return {'FENCED', 'superseded', r[1]} end
    if r[2] == '2' then return {'OK'} end
    if r[2] ~= '1' then return {'FENCED', 'completed', ''} end
    local at = tonumber(r[3] or '0') or 0
    local charged = tonumber(ARGV[7] or '0') or 0
    if charged > at then at = charged end
    redis.call('HSET', KEYS[2], 'ph', '2', 'lf', ARGV[6], 'at', tostring(at))
    return {'OK'}
    """)

    /// KEYS: record. ARGV: now (lease end of the reopened record), reason.
    /// Reply: 1 when a dead-lettered record was reopened, 0 otherwise.
    static let reopenDeadLettered = RedisScript("dedupe.reopen", """
    local r = redis.call('HMGET', KEYS[1], 'ph', 'os', 'od')
    if r[1] ~= '3' or r[2] ~= '2' then return 0 end
    redis.call('HSET', KEYS[1], 'ph', '2', 'at', '0', 'le', ARGV[1], 'lf', ARGV[2] .. (r[3] or '') .. ')')
    redis.call('HDEL', KEYS[1], 'os', 'od', 'ex')
    redis.call('PERSIST', KEYS[1])
    return 1
    """)
}
