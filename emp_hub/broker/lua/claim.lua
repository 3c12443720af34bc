-- Claim up to `count` of the best jobs among the heads of the candidate queues; lease each.
-- ARGV[4] worker, ARGV[5] token prefix (job i gets token prefix:i), ARGV[6] lease seconds,
-- ARGV[7] count, ARGV[8] the version of the class list the candidates were computed from,
-- ARGV[9] number of queues, then per queue: class, allow_avoided ("1" when no other live
-- worker can run that class); then, only with model-warm affinity on, a mask of '0'/'1' per
-- queue: '1' when its jobs prefer a model the worker has loaded (see affinity_pick).
-- Returns {0, classes_version} when the candidates are out of date (a new class appeared),
-- else {1, classes_version, HGETALL of each claimed job...} (none when nothing matched, or
-- when an admin drained or stopped the worker: its `worker_state` key is set).
local worker, prefix, lease = ARGV[4], ARGV[5], tonumber(ARGV[6])
local count = tonumber(ARGV[7])
local ver = redis.call('GET', K.classes_ver) or '0'
if ver ~= ARGV[8] then return {0, ver} end
if redis.call('EXISTS', K.worker_state(worker)) == 1 then return {1, ver} end
local nq = tonumber(ARGV[9])
local classes, allow, offs, heads = {}, {}, {}, {}

local function peek(i)
  local r = redis.call('ZRANGE', K.queue(classes[i]), offs[i], offs[i], 'WITHSCORES')
  if r[1] then heads[i] = {r[1], tonumber(r[2])} else heads[i] = false end
end

for i = 1, nq do
  classes[i] = ARGV[8 + 2 * i]
  allow[i] = ARGV[9 + 2 * i] == '1'
  offs[i] = 0
  peek(i)
end
local mask = ARGV[10 + 2 * nq]
local warm = {}
for i = 1, nq do warm[i] = mask ~= nil and string.sub(mask, i, i) == '1' end

-- A head's fields: whether this worker is to avoid it, and what take() needs.
local FIELDS = {'avoid', 'seq', 'timeout', 'service', 'customer', 'attempt', 'fair_band',
  'fair_s', 'fair_f'}

local function take(id, class, token, j)
  dequeue(id, class)
  local k = K.job(id)
  if j.fair_s then fair_claimed(j) end
  local timeout = tonumber(j.timeout)
  local deadline = 0
  if timeout > 0 then deadline = NOW + timeout + CFG.timeout_grace end
  local expires = lease_end(lease, deadline)
  if j.attempt ~= '0' then redis.call('HDEL', k, 'started_at') end  -- an earlier attempt's
  redis.call('ZADD', K.leases, expires, id)
  set_status(id, j.seq, 'pending', 'active', 'worker', worker, 'token', token, 'claimed_at',
    NOW_S, 'deadline', deadline, 'lease_expires', expires, 'progress', 0, 'message', '',
    'attempt', tonumber(j.attempt) + 1)
  event(id, 'type', 'status', 'status', 'active', 'worker', worker)
  return redis.call('HGETALL', k)
end

local out = {1, ver}
local needle = '|' .. worker .. '|'
local skips = 0
while #out - 2 < count and skips <= CFG.max_skip do
  local best = nil
  for i = 1, nq do
    if heads[i] and (best == nil or heads[i][2] < heads[best][2]) then best = i end
  end
  if best == nil then break end
  if mask then best = affinity_pick(heads, nq, best, warm) end
  local id = heads[best][1]
  local j = hget(id, FIELDS)
  if j.avoid and not allow[best] and string.find(j.avoid, needle, 1, true) then
    offs[best] = offs[best] + 1
    skips = skips + 1
  else
    out[#out + 1] = take(id, classes[best], prefix .. ':' .. (#out - 1), j)
  end
  peek(best)
end
return out
