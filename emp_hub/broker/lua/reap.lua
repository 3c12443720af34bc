-- Requeue jobs whose lease expired (their worker is gone), at most ARGV[4] of them.
-- A lease that ran into the job's deadline is a timeout: a failed attempt.
-- Otherwise the worker was lost: an orphaning, counted apart from failures, up to
-- CFG.max_orphans. ARGV[5] jitter. Returns a flat list of id, outcome.
local due = redis.call('ZRANGEBYSCORE', K.leases, '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
local requeued = {}
for _, id in ipairs(due) do
  redis.call('ZREM', K.leases, id)
  local j = hget(id, {'status', 'deadline', 'orphans', 'class', 'score', 'seq', 'timeout'})
  local outcome = 'ignored'
  if j.status == 'active' then
    local deadline = tonumber(j.deadline)
    if deadline > 0 and NOW >= deadline then
      outcome = fail_attempt(id, 'timed out after ' .. j.timeout .. ' s', true,
        tonumber(ARGV[5]))
    else
      local orphans = tonumber(j.orphans) + 1
      redis.call('HSET', K.job(id), 'orphans', orphans)
      if orphans > CFG.max_orphans then
        outcome = dead_letter(id, 'the worker running it was lost ' .. orphans .. ' times')
      else
        redis.call('HSET', K.job(id), 'token', '', 'worker', '')
        back_to_pending(id, j, 'active', 'lease expired')
        outcome = 'requeued'
        requeued[#requeued + 1] = j.class
      end
    end
  end
  out[#out + 1] = id
  out[#out + 1] = outcome
end
announce(requeued)
return out
