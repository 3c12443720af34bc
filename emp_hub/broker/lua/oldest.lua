-- The oldest pending job of each priority of each class in ARGV[4..]: the head of each
-- priority band of the class's queue (within a band the lowest score is the lowest seq:
-- submitted first). O(P log N) per class for P priorities present, whatever the backlog.
-- Returns, per class, a flat list {priority, job id, created_at, ...} ({} for an empty queue).
local out = {}
for a = 4, #ARGV do
  local q = K.queue(ARGV[a])
  local found = {}
  local head = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
  while head[1] do
    local band = math.floor(tonumber(head[2]) / CFG.pscale)
    found[#found + 1] = CFG.pmax - band
    found[#found + 1] = head[1]
    found[#found + 1] = redis.call('HGET', K.job(head[1]), 'created_at') or ''
    local hi = (band + 1) * CFG.pscale
    head = redis.call('ZRANGEBYSCORE', q, string.format('%.0f', hi), '+inf', 'WITHSCORES',
      'LIMIT', 0, 1)
  end
  out[#out + 1] = found
end
return out
