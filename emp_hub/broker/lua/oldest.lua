-- The oldest pending job of each class in ARGV[4..]: the head of each priority band of its
-- queue (within a band, the lowest score is the lowest seq: submitted first), the lowest
-- seq of those heads. O(P log N) per class for P priorities present, whatever the backlog.
-- Returns, per class, {job id, created_at} ({} for an empty queue).
local out = {}
for a = 4, #ARGV do
  local q = K.queue(ARGV[a])
  local best, best_seq = nil, math.huge
  local head = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
  while head[1] do
    local score = tonumber(head[2])
    local band = math.floor(score / CFG.pscale)
    local seq = score - band * CFG.pscale
    if seq < best_seq then best, best_seq = head[1], seq end
    local hi = (band + 1) * CFG.pscale
    head = redis.call('ZRANGEBYSCORE', q, string.format('%.0f', hi), '+inf', 'WITHSCORES',
      'LIMIT', 0, 1)
  end
  if best then
    out[#out + 1] = {best, redis.call('HGET', K.job(best), 'created_at') or ''}
  else
    out[#out + 1] = {}
  end
end
return out
