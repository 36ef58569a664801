-- Apply a micro-batch of interactions atomically (a Lua script runs alone in Redis).
-- ARGV[1] = JSON {p: key prefix, wm: watermark key prefix, cfg: {...}, ev: [[q, src, off,
--   user, platform, item, label, weight, time, kind, eid], ...]}
-- Per event: skip if its source offset <= the (unified partition, source partition)
-- watermark, or if its event id was already applied for this user; else update state.
-- Returns JSON {a: applied, o: offset dups, e: event-id dups, r: {"user\tplatform": [recent
-- positive items, newest first]}, and when cfg.hist > 0: i: [1-based indices of the applied
-- events], h: {user: cross-platform history BEFORE the batch, newest first, as its JSON
--   entries joined by commas},
-- s: {"user\tplatform": [items the user had on the platform before the batch]}}.
local req = cjson.decode(ARGV[1])
local P, c = req.p, req.cfg
local applied, dup_off, dup_ev = 0, 0, 0
local recent_pos, anchors, trim_co = {}, {}, {}
local hist_before, seen_before, applied_idx = {}, {}, {}

for n, ev in ipairs(req.ev) do
  local q, src, off, u, p, item, label, w, t, kind, eid = unpack(ev)
  local pk = u .. '\t' .. p
  local base = P .. 'u:' .. u .. ':' .. p
  local rk = base .. ':recent'
  local rpk = base .. ':rpos'
  local hk = P .. 'u:' .. u .. ':history'
  if recent_pos[pk] == nil then
    -- the user's last distinct positives on the platform, kept as plain item ids (no
    -- JSON to decode: decoding the recent list here was a fifth of the script's time)
    recent_pos[pk] = redis.call('LRANGE', rpk, 0, c.win - 1)
    if c.hist > 0 then seen_before[pk] = redis.call('ZRANGE', base .. ':seen', 0, -1) end
  end
  if c.hist > 0 and hist_before[u] == nil then
    -- the members are JSON arrays: joined, the caller decodes them with one parse
    hist_before[u] = table.concat(redis.call('ZREVRANGE', hk, 0, c.hist - 1), ',')
  end
  local wmk = req.wm .. q
  local cur = tonumber(redis.call('HGET', wmk, src) or '-1')
  if off <= cur then
    dup_off = dup_off + 1
  else
    redis.call('HSET', wmk, src, string.format('%d', off))
    local ek = P .. 'u:' .. u .. ':eids'
    if redis.call('ZSCORE', ek, eid) then
      dup_ev = dup_ev + 1
    else
      applied = applied + 1
      if c.hist > 0 then
        applied_idx[#applied_idx + 1] = n
        -- ordered by event time, not arrival: the same events give the same history
        -- whatever the interleaving of platforms (the event id keeps members unique)
        redis.call('ZADD', hk, t, cjson.encode({p, item, label, t, eid}))
        redis.call('ZREMRANGEBYRANK', hk, 0, -(c.hist + 1))
      end
      redis.call('ZADD', ek, t, eid)
      redis.call('ZREMRANGEBYRANK', ek, 0, -(c.eids + 1))
      redis.call('LPUSH', rk, cjson.encode({item, label, w, t, kind}))
      redis.call('LTRIM', rk, 0, c.recent - 1)
      local sk = base .. ':seen'
      redis.call('ZADD', sk, 'GT', t, item)
      redis.call('ZREMRANGEBYRANK', sk, 0, -(c.seen + 1))
      local stk = P .. 'u:' .. u .. ':stats'
      redis.call('HINCRBY', stk, p .. ':events', 1)
      redis.call('HINCRBY', stk, p .. ((label == 1) and ':pos' or ':neg'), 1)
      redis.call('HSET', stk, p .. ':last', string.format('%.3f', t))
      redis.call('SADD', P .. 'users', u)
      if label == 1 then
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
        local rp = recent_pos[pk]
        local nrp = {item}
        for rank, other in ipairs(rp) do
          if other ~= item then
            local cw = w / rank
            local k1, k2 = P .. 'co:' .. p .. ':' .. other, P .. 'co:' .. p .. ':' .. item
            redis.call('ZINCRBY', k1, cw, item)
            redis.call('ZINCRBY', k2, cw, other)
            trim_co[k1] = true
            trim_co[k2] = true
            if #nrp < c.win then nrp[#nrp + 1] = other end
          end
        end
        recent_pos[pk] = nrp
        redis.call('LREM', rpk, 0, item)
        redis.call('LPUSH', rpk, item)
        redis.call('LTRIM', rpk, 0, c.win - 1)
      end
    end
  end
end
for k, _ in pairs(trim_co) do
  redis.call('ZREMRANGEBYRANK', k, 0, -(c.cokeep + 1))
end
local sk = P .. 'stats'
redis.call('HINCRBY', sk, 'events_applied', applied)
redis.call('HINCRBY', sk, 'duplicates_offset', dup_off)
redis.call('HINCRBY', sk, 'duplicates_event', dup_ev)
if c.hist > 0 then
  return cjson.encode({a = applied, o = dup_off, e = dup_ev, r = recent_pos, i = applied_idx,
                       h = hist_before, s = seen_before})
end
return cjson.encode({a = applied, o = dup_off, e = dup_ev, r = recent_pos})
