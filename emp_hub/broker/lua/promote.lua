-- Move delayed jobs whose retry is due back to their queues, at most ARGV[4] of them.
-- Returns the classes that got jobs (so waiting workers can be woken).
local due = redis.call('ZRANGEBYSCORE', K.delayed, '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[4]))
local classes = {}
for _, id in ipairs(due) do
  redis.call('ZREM', K.delayed, id)
  local j = hget(id, {'status', 'class', 'score', 'seq'})
  if j.status == 'delayed' then
    back_to_pending(id, j, 'delayed', 'retry due')
    classes[#classes + 1] = j.class
  end
end
announce(classes)
return classes
