-- Extend the leases of jobs a worker holds (its heartbeat).
-- ARGV[4] lease seconds, then pairs of job id and token. Returns 1/0 per job:
-- 0 means the token no longer holds the job and the worker should drop it.
local lease = tonumber(ARGV[4])
local out = {}
for i = 5, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local t = redis.call('HMGET', K.job(id), 'status', 'token', 'deadline')
  if t[1] == 'active' and t[2] == token then
    renew(id, lease_end(lease, tonumber(t[3])))
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
