-- Record progress of a held job and extend its lease.
-- ARGV[4] id, ARGV[5] token, ARGV[6] progress, ARGV[7] message, ARGV[8] lease seconds,
-- ARGV[9] the worker's stage label (e.g. started, processing, finalizing), ARGV[10]
-- connector details (JSON, may be empty).
local id, token = ARGV[4], ARGV[5]
local j, err = held(id, token, {'deadline'})
if not j then return err end
local k = K.job(id)
redis.call('HSET', k, 'progress', ARGV[6], 'message', ARGV[7])
redis.call('HSETNX', k, 'started_at', NOW_S)
renew(id, lease_end(tonumber(ARGV[8]), tonumber(j.deadline)))
event(id, 'type', 'progress', 'progress', ARGV[6], 'message', ARGV[7], 'stage', ARGV[9],
  'details', ARGV[10])
return 1
