-- Cache recommendations: SET each key to its JSON with a TTL, and count them, in one call
-- (one command to pack and parse instead of one per record).
-- ARGV = [ttl_s, stats key, erased key, key1, value1, user1, produced1, key2, ...]
-- A record is not cached when its user was erased (`xrec forget`) at or after the oldest
-- event it covers was produced: a batch applied just before an erasure must not write the
-- user's recommendations back after the erasure deleted them.
local ttl, ek = ARGV[1], ARGV[3]
local n = 0
for i = 4, #ARGV, 4 do
  local gone = redis.call('ZSCORE', ek, ARGV[i + 2])
  if not gone or tonumber(gone) < tonumber(ARGV[i + 3]) then
    redis.call('SET', ARGV[i], ARGV[i + 1], 'EX', ttl)
    n = n + 1
  end
end
if n > 0 then redis.call('HINCRBY', ARGV[2], 'recommendations', n) end
return n
