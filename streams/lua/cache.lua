-- Cache recommendations: SET each key to its JSON with a TTL, and count them, in one call
-- (one command to pack and parse instead of one per record).
-- ARGV = [ttl_s, stats key, key1, value1, key2, value2, ...]
local ttl = ARGV[1]
for i = 3, #ARGV, 2 do
  redis.call('SET', ARGV[i], ARGV[i + 1], 'EX', ttl)
end
redis.call('HINCRBY', ARGV[2], 'recommendations', (#ARGV - 2) / 2)
return 0
