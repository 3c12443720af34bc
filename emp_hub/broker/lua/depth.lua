-- Pending jobs of one class per priority, walking distinct priorities by score range:
-- O(P log N) for P priorities present. ARGV[4] class. Returns a flat list priority, count.
local q = qkey(ARGV[4])
local out = {}
local head = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
while head[1] do
  local band = math.floor(tonumber(head[2]) / CFG.pscale)
  local lo = band * CFG.pscale
  local hi = (band + 1) * CFG.pscale
  out[#out + 1] = CFG.pmax - band
  out[#out + 1] = redis.call('ZCOUNT', q, lo, '(' .. string.format('%.0f', hi))
  head = redis.call('ZRANGEBYSCORE', q, string.format('%.0f', hi), '+inf', 'WITHSCORES',
    'LIMIT', 0, 1)
end
return out
