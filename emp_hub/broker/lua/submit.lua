-- Submit a batch of jobs atomically: all or none.
-- ARGV[4] = n, then 9 fields per job:
-- id, service, class, requirements, priority, customer, max_attempts, timeout, payload.
local n = tonumber(ARGV[4])
local F = 9
for i = 0, n - 1 do
  local id = ARGV[5 + i * F]
  if redis.call('EXISTS', jkey(id)) == 1 then
    return redis.error_reply('DUPLICATE a job with id ' .. id .. ' already exists')
  end
end
local last = redis.call('INCRBY', P .. 'seq', n)
local first = last - n + 1
local new_classes = {}
for i = 0, n - 1 do
  local b = 5 + i * F
  local id, service, class, req = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
  local customer = ARGV[b + 5]
  local seq = first + i
  local score = (CFG.pmax - tonumber(ARGV[b + 4])) * CFG.pscale + seq
  redis.call('HSET', jkey(id), 'id', id, 'service', service, 'class', class,
    'requirements', req, 'priority', ARGV[b + 4], 'seq', seq, 'score', score,
    'customer', customer, 'status', 'pending', 'attempt', 0, 'failures', 0, 'orphans', 0,
    'max_attempts', ARGV[b + 6], 'timeout', ARGV[b + 7], 'payload', ARGV[b + 8],
    'created_at', NOW_S, 'progress', 0)
  enqueue(id, class, score)
  if redis.call('HSETNX', P .. 'classes', class, req) == 1 then
    redis.call('INCR', P .. 'classes:ver')
    new_classes[#new_classes + 1] = class
  end
  redis.call('ZADD', P .. 'idx:all', seq, id)
  redis.call('ZADD', P .. 'idx:status:pending', seq, id)
  redis.call('ZADD', P .. 'idx:svc:' .. service, seq, id)
  if customer ~= '' then
    redis.call('ZADD', P .. 'idx:cust:' .. customer, seq, id)
  end
  event(id, 'type', 'status', 'status', 'pending')
end
return {first, new_classes}
