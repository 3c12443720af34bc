-- Retry a job now. ARGV[4] id.
-- A dead-lettered (failed) job is re-queued with fresh attempts, at its original place.
-- A job waiting for its next attempt (delayed, or pending after failures) is queued now,
-- and the workers that failed it may take it again (the original force_retry_job).
local id = ARGV[4]
local j = hget(id, {'status', 'class', 'score', 'seq', 'xm', 'avoid'})
if not j.status then return redis.error_reply('NOJOB no such job: ' .. id) end
local k = K.job(id)
if j.status == 'delayed' then
  redis.call('ZREM', K.delayed, id)
  redis.call('HSET', k, 'avoid', '')
  redis.call('HDEL', k, 'retry_at')
  back_to_pending(id, j, 'delayed', 'retried')
  announce({j.class})
  return 1
end
if j.status == 'pending' and j.avoid and j.avoid ~= '' then
  redis.call('HSET', k, 'avoid', '')
  announce({j.class})
  return 1
end
if j.status ~= 'failed' then
  return redis.error_reply('STATE job ' .. id .. ' is ' .. j.status ..
    '; only failed jobs and jobs waiting for a retry can be retried')
end
redis.call('ZREM', K.dead, id)
redis.call('ZREM', K.expiring, j.xm)
redis.call('PERSIST', k)
redis.call('PERSIST', K.events(id))
redis.call('HSET', k, 'failures', 0, 'orphans', 0, 'avoid', '', 'error', '', 'worker', '')
redis.call('HDEL', k, 'finished_at', 'xm', 'retry_at')
back_to_pending(id, j, 'failed', 'retried')
announce({j.class})
return 1
