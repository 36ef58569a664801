-- Count a dead letter exactly once, whatever the redeliveries (a crash between publishing
-- it and committing the offset makes the worker see the source record again).
-- KEYS[1] = watermark hash ("<src topic>:<src partition>" -> highest offset counted),
-- KEYS[2] = the stats hash. ARGV = src, offset, code. Returns 1 if counted, 0 if seen.
-- Each source partition is read in order, so "offset <= watermark" means "counted".
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
local off = tonumber(ARGV[2])
if off <= cur then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], 'deadlettered', 1)
redis.call('HINCRBY', KEYS[2], 'deadletter:' .. ARGV[3], 1)
return 1
