-- A worker connection ended. Nothing happens unless it still owns the worker id (a newer
-- connection of the same process may have taken over already).
-- ARGV[4] worker id, ARGV[5] connection id, ARGV[6] 'bye' (it stopped cleanly, holding
-- nothing: forget it now) or 'lost', ARGV[7] reconnect_grace_s, ARGV[8] worker_ttl_s, then
-- pairs of job id and lease token it held.
-- Lost: it stays live for the grace (its score is set so that it ages out of the live
-- window then), the owner key expires with the grace, and the leases of its jobs end with
-- the grace, so the reaper requeues them then unless it comes back and renews them.
-- A clean goodbye also ends a shutdown an admin asked for (its `worker_state`), so that
-- the worker's next start is active; a drain stays (a cordon) until it is resumed.
-- Returns 1 when it owned the id, else 0.
local worker, conn, mode = ARGV[4], ARGV[5], ARGV[6]
local grace, ttl = tonumber(ARGV[7]), tonumber(ARGV[8])
local okey = K.owner(worker)
local current = redis.call('GET', okey)
if not current then return 0 end
local state, instance, held_by, replica = string.match(current, '^(%S+) (%S+) (%S+) ?(%S*)$')
if held_by ~= conn or state ~= 'up' then return 0 end
if mode == 'bye' then
  redis.call('DEL', okey, K.worker(worker))
  redis.call('ZREM', K.workers, worker)
  if redis.call('GET', K.worker_state(worker)) == 'shutdown' then
    redis.call('DEL', K.worker_state(worker))
  end
  return 1
end
redis.call('SET', okey, 'gone ' .. instance .. ' ' .. conn .. ' ' .. replica,
  'PX', math.ceil(grace * 1000))
redis.call('ZADD', K.workers, 'XX', NOW - ttl + grace, worker)
local ends = NOW + grace
for i = 9, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local t = redis.call('HMGET', K.job(id), 'status', 'token', 'lease_expires')
  if t[1] == 'active' and t[2] == token and (tonumber(t[3]) or math.huge) > ends then
    renew(id, ends)
  end
end
return 1
