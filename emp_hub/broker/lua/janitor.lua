-- Remove the index entries of terminal jobs whose retention ran out, at most ARGV[4].
-- The job hash and its events expire by themselves (EXPIRE); this removes what points at
-- them. Each member of the expiring set is "id TAB service TAB customer TAB status".
-- A job with stored files moves from `outputs` to `outputs:expired` (the hub removes them).
local due = redis.call('ZRANGEBYSCORE', K.expiring, '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[4]))
for _, member in ipairs(due) do
  local id, service, customer, status = string.match(member, '^(.-)\t(.-)\t(.-)\t(.-)$')
  redis.call('ZREM', K.all_jobs, id)
  redis.call('ZREM', K.by_status(status), id)
  redis.call('ZREM', K.by_service(service), id)
  if customer ~= '' then redis.call('ZREM', K.by_customer(customer), id) end
  if status == 'failed' then redis.call('ZREM', K.dead, id) end
  redis.call('DEL', K.job(id), K.events(id))
  if redis.call('SREM', K.outputs, id) == 1 then
    redis.call('ZADD', K.outputs_expired, NOW, id)
  end
  redis.call('ZREM', K.expiring, member)
end
return #due
