-- Apply due promotion steps (priority policy, deadlines, aging: emp_hub/scheduling.py), at
-- most ARGV[4] jobs, oldest due first: bounded work whatever the backlog. Per job: the
-- effective priority rises to the highest priority among its steps due by now (never
-- falls), keeping its tag (its place within a band); a pending job moves in its queue, any
-- other keeps the new score in its hash for when it comes back (retry, orphan). A job
-- still waiting (pending or delayed) at its deadline step (priority ARGV[5]) is failed with
-- error `deadline` and dead-lettered when ARGV[6] is 1 (deadline_action=expire); an active
-- one runs on. A finished job's entry went when it finished (common.lua finish); a gone
-- one's is dropped.
-- Returns {steps applied, expired job ids...}.
local limit, marker = tonumber(ARGV[4]), tonumber(ARGV[5])
local expire = ARGV[6] == '1'
local due = redis.call('ZRANGEBYSCORE', K.promotions, '-inf', NOW, 'LIMIT', 0, limit)
local out = {0}

local function expire_job(id, j)
  if j.status == 'pending' then dequeue(id, j.class)
  else redis.call('ZREM', K.delayed, id) end
  redis.call('ZADD', K.dead, NOW, id)
  redis.call('HSET', K.job(id), 'error', 'deadline')
  finish(id, nil, j.status, 'failed', CFG.dead_retention)
  event(id, 'type', 'status', 'status', 'failed', 'error', 'deadline', 'reason', 'deadline')
  out[#out + 1] = id
end

local function promote(id, j)
  local effective = tonumber(j.effective_priority)
  local best, next_at, expired = effective, nil, false
  local it = string.gmatch(j.steps or '', '%S+')
  for at_s in it do
    local at, p = tonumber(at_s), tonumber(it())
    if at <= NOW then
      if p == marker then expired = expire elseif p > best then best = p end
    elseif next_at == nil or at < next_at then
      next_at = at
    end
  end
  local waiting = j.status == 'pending' or j.status == 'delayed'
  if expired and waiting then
    expire_job(id, j)
    return
  end
  if best > effective then
    local score = tonumber(j.score)
    score = (CFG.pmax - best) * CFG.pscale + score % CFG.pscale
    redis.call('HSET', K.job(id), 'effective_priority', best, 'score', score)
    if j.status == 'pending' then redis.call('ZADD', K.queue(j.class), 'XX', score, id) end
  end
  if next_at then redis.call('ZADD', K.promotions, next_at, id) end
end

for _, id in ipairs(due) do
  redis.call('ZREM', K.promotions, id)
  local j = hget(id, {'status', 'class', 'score', 'effective_priority', 'steps'})
  if j.status == 'pending' or j.status == 'delayed' or j.status == 'active' then
    promote(id, j)
  end
  out[1] = out[1] + 1
end
return out
