/// A Lua script run with `EVALSHA`, falling back to `EVAL` when the server answers `NOSCRIPT`
/// (after a restart or `SCRIPT FLUSH`).
struct RedisScript: Sendable {
    /// The script body.
    let body: [UInt8]
    /// The SHA-1 Redis names it by.
    let sha: [UInt8]

    init(_ source: String) {
        body = Array(source.utf8)
        sha = Array(SHA1.hex(body).utf8)
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

    """

    /// KEYS: token counter, fence hash, one record key per request.
    /// ARGV: now, then per request: fingerprint, lease end, has-fence (1/0), scope, epoch.
    /// Reply: `{'FENCED', index, seenEpoch}` or one entry per request:
    /// `{'N', token, attempt}`, `{'D', status, detail}`, `{'P', leaseEnd}`,
    /// `{'C', storedFingerprint, hasOutcome (1/0), status, detail}`.
    static let claim = RedisScript(helpers + """
    local now = tonumber(ARGV[1])
    local n = #KEYS - 2
    for i = 1, n do
      local b = 1 + (i - 1) * 5
      if ARGV[b + 3] == '1' then
        local seen = redis.call('HGET', KEYS[2], ARGV[b + 4])
        if seen and older(ARGV[b + 5], seen) then return {'FENCED', i, seen} end
      end
    end
    for i = 1, n do
      local b = 1 + (i - 1) * 5
      if ARGV[b + 3] == '1' then
        local seen = redis.call('HGET', KEYS[2], ARGV[b + 4])
        if (not seen) or older(seen, ARGV[b + 5]) then redis.call('HSET', KEYS[2], ARGV[b + 4], ARGV[b + 5]) end
      end
    end
    local out = {}
    for i = 1, n do
      local b = 1 + (i - 1) * 5
      local rk = KEYS[2 + i]
      local fp = ARGV[b + 1]
      local fenced = ARGV[b + 3] == '1'
      local r = redis.call('HMGET', rk, 'fp', 'ph', 'at', 'le', 'os', 'od', 'ex', 'fs', 'fe')
      local attempts = 0
      local take = true
      if r[1] then
        if r[2] == '3' and r[7] and r[7] ~= '' and now >= tonumber(r[7]) then
          redis.call('DEL', rk)
        elseif r[1] ~= fp then
          if r[2] == '3' then out[i] = {'C', r[1], '1', r[5] or '0', r[6] or ''} else out[i] = {'C', r[1], '0', '', ''} end
          take = false
        elseif r[2] == '3' then
          out[i] = {'D', r[5] or '0', r[6] or ''}
          take = false
        else
          if r[2] == '1' then
            local newer = fenced and r[8] == ARGV[b + 4] and r[9] and older(r[9], ARGV[b + 5])
            if now < tonumber(r[4]) and not newer then
              out[i] = {'P', r[4]}
              take = false
            end
          end
          attempts = tonumber(r[3]) or 0
        end
      end
      if take then
        local tok = redis.call('INCR', KEYS[1])
        attempts = attempts + 1
        redis.call('DEL', rk)
        if fenced then
          redis.call('HSET', rk, 'fp', fp, 'ph', '1', 'at', attempts, 'tok', tok, 'le', ARGV[b + 2], 'fs', ARGV[b + 4], 'fe', ARGV[b + 5])
        else
          redis.call('HSET', rk, 'fp', fp, 'ph', '1', 'at', attempts, 'tok', tok, 'le', ARGV[b + 2])
        end
        out[i] = {'N', tok, attempts}
      end
    end
    return out
    """)

    /// KEYS: fence hash, record, the read state keys, then the written state keys.
    /// ARGV: now, token, has-fence, scope, epoch, retention ms ('' for none), retention end,
    /// outcome status, outcome detail, read count, the read versions, then per write: 1/0
    /// (set/remove) and the value.
    /// Reply: `{'OK'}`, `{'REPEAT'}`, `{'FENCED', reason, detail}` or `{'CONFLICT', readIndex}`.
    static let complete = RedisScript(helpers + """
    local now = tonumber(ARGV[1])
    if ARGV[3] == '1' then
      local seen = redis.call('HGET', KEYS[1], ARGV[4])
      if seen and older(ARGV[5], seen) then return {'FENCED', 'epoch', seen} end
    end
    local r = redis.call('HMGET', KEYS[2], 'tok', 'ph', 'le')
    if not r[1] then return {'FENCED', 'missing', ''} end
    if r[1] ~= ARGV[2] then return {'FENCED', 'superseded', r[1]} end
    if r[2] == '3' then return {'REPEAT'} end
    if r[2] ~= '1' then return {'FENCED', 'released', ''} end
    if now >= tonumber(r[3]) then return {'FENCED', 'expired', ''} end
    local nr = tonumber(ARGV[10])
    for i = 1, nr do
      local ver = redis.call('HGET', KEYS[2 + i], 'ver') or '0'
      if ver ~= ARGV[10 + i] then return {'CONFLICT', i} end
    end
    local a = 11 + nr
    for j = 3 + nr, #KEYS do
      redis.call('HINCRBY', KEYS[j], 'ver', 1)
      if ARGV[a] == '1' then redis.call('HSET', KEYS[j], 'v', ARGV[a + 1]) else redis.call('HDEL', KEYS[j], 'v') end
      a = a + 2
    end
    redis.call('HSET', KEYS[2], 'ph', '3', 'os', ARGV[8], 'od', ARGV[9])
    if ARGV[6] ~= '' then
      redis.call('HSET', KEYS[2], 'ex', ARGV[7])
      redis.call('PEXPIRE', KEYS[2], ARGV[6])
    end
    return {'OK'}
    """)

    /// KEYS: fence hash, record. ARGV: now, token, has-fence, scope, epoch, reason.
    /// Reply: `{'OK'}` or `{'FENCED', reason, detail}`.
    static let release = RedisScript(helpers + """
    if ARGV[3] == '1' then
      local seen = redis.call('HGET', KEYS[1], ARGV[4])
      if seen and older(ARGV[5], seen) then return {'FENCED', 'epoch', seen} end
    end
    local r = redis.call('HMGET', KEYS[2], 'tok', 'ph')
    if not r[1] then return {'FENCED', 'missing', ''} end
    if r[1] ~= ARGV[2] then return {'FENCED', 'superseded', r[1]} end
    if r[2] == '2' then return {'OK'} end
    if r[2] ~= '1' then return {'FENCED', 'completed', ''} end
    redis.call('HSET', KEYS[2], 'ph', '2', 'lf', ARGV[6])
    return {'OK'}
    """)
}
