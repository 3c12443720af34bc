-- Pending jobs of each class in ARGV[4..] per priority, walking distinct priorities by
-- score range: O(P log N) per class for P priorities present. Returns, per class, a flat
-- list priority, count.
local out = {}
for a = 4, #ARGV do
  local q = K.queue(ARGV[a])
  local row = {}
  local head = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
  while head[1] do
    local band = math.floor(tonumber(head[2]) / CFG.pscale)
    local lo = band * CFG.pscale
    local hi = (band + 1) * CFG.pscale
    row[#row + 1] = CFG.pmax - band
    row[#row + 1] = redis.call('ZCOUNT', q, lo, '(' .. string.format('%.0f', hi))
    head = redis.call('ZRANGEBYSCORE', q, string.format('%.0f', hi), '+inf', 'WITHSCORES',
      'LIMIT', 0, 1)
  end
  out[#out + 1] = row
end
return out
