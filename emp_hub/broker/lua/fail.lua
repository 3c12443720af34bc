-- Fail the current attempt of a held job.
-- ARGV[4] id, ARGV[5] token, ARGV[6] error, ARGV[7] retryable ("1"/"0"), ARGV[8] jitter 0..1.
-- Returns the new status: "delayed" (a retry is due later) or "failed" (dead-lettered).
local id, token = ARGV[4], ARGV[5]
local j, err = held(id, token, {'worker'})
if not j then return err end
redis.call('ZREM', K.leases, id)
return fail_attempt(id, ARGV[6], ARGV[7] == '1', tonumber(ARGV[8]))
