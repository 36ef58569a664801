-- Filter ranked candidates against users' consumed items.
-- ARGV[1] = JSON {p: prefix, q: [[user, platform, [item, ...], need], ...]}
-- Returns JSON [[indices of unseen items, in order, at most `need`], ...] (1-based).
local req = cjson.decode(ARGV[1])
local out = {}
for n, qq in ipairs(req.q) do
  local sk = req.p .. 'u:' .. qq[1] .. ':' .. qq[2] .. ':seen'
  local keep, need = {}, qq[4]
  for i, item in ipairs(qq[3]) do
    if not redis.call('ZSCORE', sk, item) then
      keep[#keep + 1] = i
      if #keep >= need then break end
    end
  end
  if #keep == 0 then keep = cjson.null end
  out[n] = keep
end
return cjson.encode(out)
