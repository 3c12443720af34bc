-- Re-queue a dead-lettered job with fresh attempts, at its original place. ARGV[4] id.
local id = ARGV[4]
local j = hget(id, {'status', 'class', 'score', 'seq', 'xm'})
if not j.status then return redis.error_reply('NOJOB no such job: ' .. id) end
if j.status ~= 'failed' then
  return redis.error_reply('STATE job ' .. id .. ' is ' .. j.status ..
    '; only failed (dead-lettered) jobs can be retried')
end
local k = jkey(id)
redis.call('ZREM', P .. 'dead', id)
redis.call('ZREM', P .. 'expiring', j.xm)
redis.call('PERSIST', k)
redis.call('PERSIST', ekey(id))
redis.call('HSET', k, 'failures', 0, 'orphans', 0, 'avoid', '', 'error', '', 'worker', '')
redis.call('HDEL', k, 'finished_at', 'xm', 'retry_at')
enqueue(id, j.class, j.score)
set_status(id, j.seq, 'failed', 'pending')
event(id, 'type', 'status', 'status', 'pending', 'reason', 'retried')
announce({j.class})
return 1
