-- Cancel a job. ARGV[4] id, ARGV[5] reason.
-- Returns {previous status, worker}; the hub tells that worker when it was active.
local id = ARGV[4]
local j = hget(id, {'status', 'class', 'worker'})
if not j.status then return redis.error_reply('NOJOB no such job: ' .. id) end
if j.status == 'pending' then
  dequeue(id, j.class)
  fair_cancelled(id)
elseif j.status == 'delayed' then
  redis.call('ZREM', K.delayed, id)
elseif j.status == 'active' then
  redis.call('ZREM', K.leases, id)
else
  return redis.error_reply('STATE job ' .. id .. ' is already ' .. j.status)
end
redis.call('HSET', K.job(id), 'cancellation_reason', ARGV[5], 'message', ARGV[5])
finish(id, nil, j.status, 'cancelled', CFG.retention)
event(id, 'type', 'status', 'status', 'cancelled', 'reason', ARGV[5])
return {j.status, j.worker or ''}
