-- Complete a held job with its result. ARGV[4] id, ARGV[5] token, ARGV[6] result JSON.
local id, token = ARGV[4], ARGV[5]
local j, err = held(id, token, {'worker'})
if not j then return err end
local k = K.job(id)
redis.call('HSET', k, 'result', ARGV[6], 'progress', 100, 'message', 'completed')
redis.call('HSETNX', k, 'started_at', NOW_S)
redis.call('ZREM', K.leases, id)
finish(id, 'active', 'completed', CFG.retention)
event(id, 'type', 'status', 'status', 'completed', 'worker', j.worker)
return j.worker
