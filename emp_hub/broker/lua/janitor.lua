-- Remove the index entries of terminal jobs whose retention ran out, at most ARGV[4].
-- The job hash and its events expire by themselves (EXPIRE); this removes what points at
-- them. Each member of the expiring set is "id TAB service TAB customer TAB status".
-- A job with stored files moves from `outputs` to `outputs:expired` (the hub removes them).
local due = redis.call('ZRANGEBYSCORE', P .. 'expiring', '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[4]))
for _, member in ipairs(due) do
  local id, service, customer, status = string.match(member, '^(.-)\t(.-)\t(.-)\t(.-)$')
  redis.call('ZREM', P .. 'idx:all', id)
  redis.call('ZREM', P .. 'idx:status:' .. status, id)
  redis.call('ZREM', P .. 'idx:svc:' .. service, id)
  if customer ~= '' then redis.call('ZREM', P .. 'idx:cust:' .. customer, id) end
  if status == 'failed' then redis.call('ZREM', P .. 'dead', id) end
  redis.call('DEL', jkey(id), ekey(id))
  if redis.call('SREM', P .. 'outputs', id) == 1 then
    redis.call('ZADD', P .. 'outputs:expired', NOW, id)
  end
  redis.call('ZREM', P .. 'expiring', member)
end
return #due
