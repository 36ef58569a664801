-- Apply a micro-batch of interactions atomically (a Lua script runs alone in Redis).
-- ARGV[1] = JSON {p: key prefix, wm: watermark key prefix, cfg: {...}, ev: [[q, src, off,
--   user, platform, item, label, weight, time, fp, produced], ...]}; fp = the event id's
--   fixed-width fingerprint (streams.state.event_fp), produced = when the platform produced it.
-- Per event: skip if its source offset <= the (unified partition, source partition)
-- watermark (unless the pair remembers every event it applied and not this one: then it
-- is applied, late), if its user was erased at or after `produced` (`erased`,
-- lua/forget.lua), or if its fingerprint is among the (user, platform)'s remembered ones;
-- else update state. Reads happen once per key and batch and writes are gathered per key to the
-- end (watermarks, fingerprints, history, seen, stats, users, rpos): a key's end state is
-- what per-event writes would have left, with fewer Redis commands.
-- Popularity and co-occurrence (the platform-wide aggregates): each applied positive gives
-- one record {platform, item, weight, time, [its pair's recent positives before it]}; the
-- script folds it into pop:/co: itself, or, with cfg.defer, appends the batch's records to
-- the list `aggq` (atomically with the watermarks: exactly once) for a later call with
-- {p, fold: true, cfg} to fold, so the caller need not wait for those writes. Every call
-- first folds what `aggq` holds (oldest first): the aggregates never trail by more than the
-- batches whose fold has not run yet, and the increments keep their order.
-- Returns JSON {a: applied, o: offset dups, e: event-id dups, x: {user: true} of the users
-- whose events were skipped as erased (absent when none), r: {"user\tplatform": [recent
-- positive items, newest first]}, and when cfg.hist > 0: i: [1-based indices of the applied
-- events], h: {user: cross-platform history BEFORE the batch, newest first, as its JSON
--   entries joined by commas},
-- s: {"user\tplatform": [items the user had on the platform before the batch]}}.
local req = cjson.decode(ARGV[1])
local P, c = req.p, req.cfg
local applied, dup_off, dup_ev = 0, 0, 0
local recent_pos, anchors, trim_co = {}, {}, {}
local hist_before, seen_before, applied_idx = {}, {}, {}
local wm, wm_key = {}, {}        -- "q\tsrc" → offset / {hash, field} once it moved
local fps, fp_dirty = {}, {}     -- pair → fingerprint string / true when it grew
local hist_add, seen_add = {}, {}  -- user / pair → ZADD arguments gathered
local stat, stat_last = {}, {}   -- user → {field → increment} / {platform → time}
local users, users_n = {}, 0     -- users applied in this batch (one SADD)
local rpos_dirty = {}            -- pair → true when its recent positives changed
local erased, x, nx = {}, {}, 0  -- user → erasure time (-1: none) / skipped as erased
local n_late = 0                 -- applied below their watermark (never applied before)
local agg, aggq = {}, P .. 'aggq'  -- this batch's aggregate records / where deferred

-- fold aggregate records into the decayed popularity and the co-occurrence lists
local function fold(records)
  for _, rec in ipairs(records) do
    local p, item, w, t, rp = rec[1], rec[2], rec[3], rec[4], rec[5]
    local popk, mk = P .. 'pop:' .. p, P .. 'popmeta:' .. p
    local a = anchors[p]
    if a == nil then
      a = tonumber(redis.call('HGET', mk, 'anchor'))
      if a == nil then
        a = t
        redis.call('HSET', mk, 'anchor', string.format('%.3f', t))
      end
    end
    if (t - a) / c.hl > c.rebase then
      -- rescale every weight to a new anchor so 2^e stays small
      redis.call('ZUNIONSTORE', popk, 1, popk, 'WEIGHTS', 2 ^ ((a - t) / c.hl))
      redis.call('HSET', mk, 'anchor', string.format('%.3f', t))
      a = t
    end
    anchors[p] = a
    local e = (t - a) / c.hl
    if e < -1000 then e = -1000 end
    redis.call('ZINCRBY', popk, w * 2 ^ e, item)
    for rank, other in ipairs(rp) do
      if other ~= item then
        local cw = w / rank
        local k1, k2 = P .. 'co:' .. p .. ':' .. other, P .. 'co:' .. p .. ':' .. item
        redis.call('ZINCRBY', k1, cw, item)
        redis.call('ZINCRBY', k2, cw, other)
        trim_co[k1] = true
        trim_co[k2] = true
      end
    end
  end
end

local function trim()
  for k, _ in pairs(trim_co) do
    redis.call('ZREMRANGEBYRANK', k, 0, -(c.cokeep + 1))
  end
  trim_co = {}
end

-- what earlier calls deferred, first and in order
if redis.call('EXISTS', aggq) == 1 then
  local q = redis.call('LRANGE', aggq, 0, -1)
  redis.call('DEL', aggq)
  for _, js in ipairs(q) do fold(cjson.decode(js)) end
end
if req.fold then
  trim()
  return cjson.encode({f = 1})
end

local any_erased = redis.call('EXISTS', P .. 'erased') == 1

-- is fingerprint f (width L) one of the aligned fields of s?
local function has_fp(s, f, L)
  local i = 1
  while true do
    local j = string.find(s, f, i, true)
    if j == nil then return false end
    if (j - 1) % L == 0 then return true end
    i = j + 1
  end
end

for n, ev in ipairs(req.ev) do
  local q, src, off, u, p, item, label, w, t, fp, pat = unpack(ev)
  local pk = u .. '\t' .. p
  local base = P .. 'u:' .. u .. ':' .. p
  if recent_pos[pk] == nil then
    -- the user's last distinct positives on the platform, kept as plain item ids
    recent_pos[pk] = redis.call('LRANGE', base .. ':rpos', 0, c.win - 1)
    if c.hist > 0 then seen_before[pk] = redis.call('ZRANGE', base .. ':seen', 0, -1) end
  end
  if c.hist > 0 and hist_before[u] == nil then
    -- the members are JSON arrays: joined, the caller decodes them with one parse
    hist_before[u] = table.concat(redis.call('ZREVRANGE', P .. 'u:' .. u .. ':history', 0,
                                             c.hist - 1), ',')
  end
  local wk = q .. '\t' .. src
  local cur = wm[wk]
  if cur == nil then
    cur = tonumber(redis.call('HGET', req.wm .. q, src) or '-1')
    wm[wk] = cur
  end
  local ea = erased[u]
  if ea == nil then
    ea = any_erased and tonumber(redis.call('ZSCORE', P .. 'erased', u) or '-1') or -1
    erased[u] = ea
  end
  -- produced before its user's erasure: never applied, and (even when a redelivered
  -- duplicate) nothing is recommended from it
  if pat <= ea then x[u] = true end
  local have, late = nil, false
  if off <= cur and pat > ea then
    -- at or below the watermark: a redelivery, unless the (user, platform) has applied
    -- fewer events than it remembers (so it remembers every one) and this one is not among
    -- them: then it was never applied (it arrived after a later event of its source
    -- partition, e.g. after a failed and repeated produce upstream) and is applied now
    have = fps[pk]
    if have == nil then
      have = redis.call('GET', base .. ':ef') or ''
      fps[pk] = have
    end
    late = #have < c.eids * c.fpw and not has_fp(have, fp, c.fpw)
  end
  if off <= cur and not late then
    dup_off = dup_off + 1
  else
    if off > cur then
      wm[wk] = off
      wm_key[wk] = {req.wm .. q, src}
    end
    if pat <= ea then
      nx = nx + 1
    else
      if have == nil then have = fps[pk] end
      if have == nil then have = redis.call('GET', base .. ':ef') or '' end
      if has_fp(have, fp, c.fpw) then
        fps[pk] = have
        dup_ev = dup_ev + 1
      else
        fps[pk] = have .. fp
        fp_dirty[pk] = base .. ':ef'
        applied = applied + 1
        if late then n_late = n_late + 1 end
        -- event times in whole milliseconds: an integer score is stored compactly
        local tms = math.floor(t * 1000 + 0.5)
        if c.hist > 0 then
          applied_idx[#applied_idx + 1] = n
          -- ordered by event time, not arrival: the same events give the same history
          -- whatever the interleaving of platforms (the fingerprint keeps members unique).
          -- Members stay under 64 bytes for usual ids, so Redis keeps them compact.
          local h = hist_add[u]
          if h == nil then h = {}; hist_add[u] = h end
          h[#h + 1] = tms
          h[#h + 1] = cjson.encode({p, item, label, t, string.sub(fp, 1, 6)})
        end
        local sa = seen_add[pk]
        if sa == nil then sa = {base .. ':seen'}; seen_add[pk] = sa end
        sa[#sa + 1] = math.floor(t)
        sa[#sa + 1] = item
        local su = stat[u]
        if su == nil then
          su = {}; stat[u] = su; stat_last[u] = {}
          users_n = users_n + 1; users[users_n] = u
        end
        local f = p .. ':events'
        su[f] = (su[f] or 0) + 1
        f = p .. ((label == 1) and ':pos' or ':neg')
        su[f] = (su[f] or 0) + 1
        stat_last[u][p] = t
        if label == 1 then
          local rp = recent_pos[pk]
          agg[#agg + 1] = {p, item, w, t, rp}
          local nrp = {item}
          for _, other in ipairs(rp) do
            if #nrp >= c.win then break end
            if other ~= item then nrp[#nrp + 1] = other end
          end
          recent_pos[pk] = nrp
          rpos_dirty[pk] = base .. ':rpos'
        end
      end
    end
  end
end

-- the gathered writes, once per key
for wk, hk in pairs(wm_key) do
  redis.call('HSET', hk[1], hk[2], string.format('%d', wm[wk]))
end
local fp_max = c.eids * c.fpw
for pk, key in pairs(fp_dirty) do
  local s = fps[pk]
  if #s > fp_max then s = string.sub(s, #s - fp_max + 1) end
  redis.call('SET', key, s)
end
for u, h in pairs(hist_add) do
  local hk = P .. 'u:' .. u .. ':history'
  for i = 1, #h, 400 do
    redis.call('ZADD', hk, unpack(h, i, math.min(i + 399, #h)))
  end
  redis.call('ZREMRANGEBYRANK', hk, 0, -(c.hist + 1))
end
for _, sa in pairs(seen_add) do
  local sk = sa[1]
  for i = 2, #sa, 400 do
    redis.call('ZADD', sk, 'GT', unpack(sa, i, math.min(i + 399, #sa)))
  end
  redis.call('ZREMRANGEBYRANK', sk, 0, -(c.seen + 1))
end
for u, su in pairs(stat) do
  local stk = P .. 'u:' .. u .. ':stats'
  for f, v in pairs(su) do redis.call('HINCRBY', stk, f, v) end
  for p, t in pairs(stat_last[u]) do
    redis.call('HSET', stk, p .. ':last', string.format('%.3f', t))
  end
end
if users_n > 0 then
  for i = 1, users_n, 400 do
    redis.call('SADD', P .. 'users', unpack(users, i, math.min(i + 399, users_n)))
  end
end
for pk, key in pairs(rpos_dirty) do
  redis.call('DEL', key)
  redis.call('RPUSH', key, unpack(recent_pos[pk]))
end
local deferred = 0
if #agg > 0 then
  if c.defer then
    redis.call('RPUSH', aggq, cjson.encode(agg))
    deferred = 1
  else
    fold(agg)
  end
end
trim()
local sk = P .. 'stats'
redis.call('HINCRBY', sk, 'events_applied', applied)
redis.call('HINCRBY', sk, 'duplicates_offset', dup_off)
redis.call('HINCRBY', sk, 'duplicates_event', dup_ev)
if nx > 0 then redis.call('HINCRBY', sk, 'erased_skipped', nx) end
if n_late > 0 then redis.call('HINCRBY', sk, 'late_applied', n_late) end
if next(x) == nil then x = nil end
if c.hist > 0 then
  return cjson.encode({a = applied, o = dup_off, e = dup_ev, x = x, r = recent_pos, q = deferred,
                       i = applied_idx, h = hist_before, s = seen_before})
end
return cjson.encode({a = applied, o = dup_off, e = dup_ev, x = x, r = recent_pos, q = deferred})
