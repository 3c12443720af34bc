-- A worker's reports on the jobs it holds, applied in order (one call for a whole batch):
-- progress, completion, failure. ARGV[4] the lease in seconds (progress renews it), then
-- seven values per report: kind, job id, lease token, and
--   'p' (progress): percent, message, stage label (started, processing, ...), connector
--                   details (JSON, may be empty)
--   'c' (complete): the result (JSON), '', '', ''
--   'f' (fail):     the error, retryable ('1'/'0'), a jitter 0..1, ''
-- Returns one reply per report: 'progress', 'completed', 'delayed' (a retry follows) or
-- 'failed' (dead-lettered), or the refusal ("STALE ...", "NOJOB ...": the token does not
-- hold the job); a refused report changes nothing.
local lease = tonumber(ARGV[4])
local fields = {'worker', 'deadline', 'started_at'}
for _, f in ipairs(FINISH_FIELDS) do fields[#fields + 1] = f end
local out = {}
for i = 5, #ARGV, 7 do
  local kind, id = ARGV[i], ARGV[i + 1]
  local j, err = held(id, ARGV[i + 2], fields)
  -- The first report (or the result, when none came before) stamps started_at.
  local started = j and not j.started_at and {'started_at', NOW_S} or {}
  if not j then
    out[#out + 1] = err.err
  elseif kind == 'p' then
    renew(id, lease_end(lease, tonumber(j.deadline)), 'progress', ARGV[i + 3], 'message',
      ARGV[i + 4], unpack(started))
    event(id, 'type', 'progress', 'progress', ARGV[i + 3], 'message', ARGV[i + 4],
      'stage', ARGV[i + 5], 'details', ARGV[i + 6])
    out[#out + 1] = 'progress'
  elseif kind == 'c' then
    redis.call('ZREM', K.leases, id)
    finish(id, j, 'active', 'completed', CFG.retention, 'result', ARGV[i + 3], 'progress', 100,
      'message', 'completed', unpack(started))
    event(id, 'type', 'status', 'status', 'completed', 'worker', j.worker)
    out[#out + 1] = 'completed'
  else
    redis.call('ZREM', K.leases, id)
    out[#out + 1] = fail_attempt(id, ARGV[i + 3], ARGV[i + 4] == '1', tonumber(ARGV[i + 5]))
  end
end
return out
