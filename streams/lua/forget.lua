-- Erase one user (its shard's keys): mark it erased, then delete every per-user key.
-- KEYS[1] = a key of the user's shard (routes the call on a cluster).
-- ARGV[1] = JSON {p: the shard's key prefix, u: user key, at: erasure time (s),
--   now: current time (s), keep: how long marks are kept (s), plats: [platform, ...]}.
-- The mark (`erased`: user → time) makes the apply script skip the user's events produced
-- up to that time (still in the logs: replays, in-flight batches); marks older than `keep`
-- are pruned here. Repeating an erasure changes nothing but the mark's time (the latest
-- wins). Returns the number of keys deleted.
local r = cjson.decode(ARGV[1])
local P, u = r.p, r.u
local ek = P .. 'erased'
local prev = tonumber(redis.call('ZSCORE', ek, u) or '-1')
if r.at > prev then redis.call('ZADD', ek, r.at, u) end
redis.call('ZREMRANGEBYSCORE', ek, '-inf', '(' .. string.format('%.3f', r.now - r.keep))
local base = P .. 'u:' .. u
local keys = {base .. ':history', base .. ':stats'}
for _, p in ipairs(r.plats) do
  for _, s in ipairs({':seen', ':rpos', ':ef'}) do keys[#keys + 1] = base .. ':' .. p .. s end
  keys[#keys + 1] = P .. 'recs:' .. p .. ':' .. u
end
local n = redis.call('DEL', unpack(keys))
redis.call('SREM', P .. 'users', u)
return n
