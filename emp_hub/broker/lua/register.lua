-- A worker connection registers: take the worker id, unless another live process holds it.
-- ARGV[4] worker id, ARGV[5] instance (the process; '-' for original workers, which send
-- none), ARGV[6] connection id, ARGV[7] capabilities (JSON), ARGV[8] worker_ttl_s,
-- ARGV[9] '1' for a dry run: answer as below, but record nothing; ARGV[10] this hub
-- replica (its origin).
-- The owner key holds "<state> <instance> <connection> <replica>", state 'up' while
-- connected and 'gone' during the reconnect grace after its connection ended (the key
-- expires with it). An 'up' holder on a replica that is no longer alive (killed, or
-- stopped: no `replica:<origin>` key) holds nothing: its socket is gone with its hub.
-- The id is taken when nobody holds it, by the same process (a reconnect takes over its
-- old socket at once), or from an original worker (today's behaviour: the newest wins).
-- Returns {1, previous connection or ''} or {0, state of the holder, seconds it has left,
-- seconds its replica has left when that is another replica (0 otherwise): if that
-- replica was killed, the id is free then}.
local worker, instance, conn = ARGV[4], ARGV[5], ARGV[6]
local ttl = tonumber(ARGV[8])
local okey = K.owner(worker)
local previous = ''
local current = redis.call('GET', okey)
if current then
  local state, holder, held_by, replica = string.match(current, '^(%S+) (%S+) (%S+) ?(%S*)$')
  if state == 'up' and replica ~= '' and replica ~= ARGV[10]
      and redis.call('EXISTS', K.replica(replica)) == 0 then
    current = nil  -- its hub is gone, and the connection with it
  end
end
if current then
  local state, holder, held_by, replica = string.match(current, '^(%S+) (%S+) (%S+) ?(%S*)$')
  if held_by ~= conn then
    if holder ~= '-' and holder ~= instance then
      local replica_left = 0
      if state == 'up' and replica ~= '' and replica ~= ARGV[10] then
        replica_left = redis.call('PTTL', K.replica(replica)) / 1000
      end
      return {0, state, tostring(redis.call('PTTL', okey) / 1000), tostring(replica_left)}
    end
    previous = held_by
  end
end
if ARGV[9] == '1' then return {1, previous} end
redis.call('SET', okey, 'up ' .. instance .. ' ' .. conn .. ' ' .. ARGV[10],
  'PX', math.ceil(ttl * 1000))
redis.call('ZADD', K.workers, NOW, worker)
redis.call('SET', K.worker(worker), ARGV[7], 'PX', math.ceil(ttl * 1000) + 1000)
return {1, previous}
