-- A worker is about to store an output of job ARGV[4] (the hub's PUT of an output): when its
-- lease token ARGV[5] holds the active job, note that the job has files (SADD `outputs`: the
-- janitor lists them with the job when its retention runs out) and return 1; else 0, and
-- nothing is noted. One round trip for both.
local id, token = ARGV[4], ARGV[5]
local t = redis.call('HMGET', K.job(id), 'status', 'token')
if token ~= '' and t[1] == 'active' and t[2] == token then
  redis.call('SADD', K.outputs, id)
  return 1
end
return 0
