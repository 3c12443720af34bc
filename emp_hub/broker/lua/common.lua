-- Shared helpers, prepended to every broker script (see scripts.py).
-- ARGV[1] is the key prefix (e.g. "{emp}:", one hash tag so every key lives in one slot),
-- ARGV[2] the current time in seconds, ARGV[3] the broker's settings: numbers separated by
-- spaces, in the order of CONFIG_FIELDS (cheaper to parse than JSON). scripts.py puts
-- before this file: CONFIG_FIELDS, `local P = ARGV[1]` and the key layout `K`
-- (keys.py: `K.leases`, `K.job(id)`; no key name is spelled in the scripts).
-- Scores and sequence numbers are passed to redis.call as numbers, which Redis formats
-- exactly (%.17g); they are never concatenated into strings (Lua would round them).
local NOW_S = ARGV[2]
local NOW = tonumber(NOW_S)
local CFG = {}
do
  local i = 1
  for value in string.gmatch(ARGV[3], '%S+') do
    CFG[CONFIG_FIELDS[i]] = tonumber(value)
    i = i + 1
  end
end

-- Read some fields of a job's hash into a table (false for missing ones).
local function hget(id, fields)
  local values = redis.call('HMGET', K.job(id), unpack(fields))
  local out = {}
  for i, f in ipairs(fields) do out[f] = values[i] end
  return out
end

-- Append an event to the job's capped stream, and publish it (channel "jev:<id>") for the
-- WebSocket clients and monitors following the job on any hub replica.
local function event(id, ...)
  local stream_id = redis.call('XADD', K.events(id), 'MAXLEN', '~', CFG.event_cap, '*',
    'ts', NOW_S, ...)
  local fields = {job = id, id = stream_id, ts = NOW_S}
  local kv = {...}
  for i = 1, #kv, 2 do fields[kv[i]] = kv[i + 1] end
  redis.call('PUBLISH', K.job_channel(id), cjson.encode(fields))
end

-- Move a job from status `old` to `new` (the status indexes and its record); more
-- field-value pairs for its record may follow (one HSET for all).
local function set_status(id, seq, old, new, ...)
  redis.call('ZREM', K.by_status(old), id)
  redis.call('ZADD', K.by_status(new), seq, id)
  redis.call('HSET', K.job(id), 'status', new, ...)
end

-- A class with pending jobs is in `nonempty`; one without is in `idle` (since when), and
-- collect.lua drops it from `classes` once it has been idle for class_idle_s. A job that
-- becomes pending again (retry, release, lease expiry) lists its class again if it was
-- collected meanwhile, bumping `classes:ver` so every hub re-reads the list.
local function enqueue(id, class, score)
  redis.call('ZADD', K.queue(class), score, id)
  if redis.call('SADD', K.nonempty, class) == 1 then
    redis.call('ZREM', K.idle, class)
    if redis.call('HEXISTS', K.classes, class) == 0 then
      redis.call('HSET', K.classes, class, redis.call('HGET', K.job(id), 'requirements'))
      redis.call('INCR', K.classes_ver)
    end
  end
end

-- A class whose queue has just been emptied goes from `nonempty` to `idle`.
local function emptied(class)
  redis.call('SREM', K.nonempty, class)
  redis.call('ZADD', K.idle, NOW, class)
end

local function dequeue(id, class)
  redis.call('ZREM', K.queue(class), id)
  if redis.call('ZCARD', K.queue(class)) == 0 then emptied(class) end
end

-- Tell every hub replica that jobs became pending, so parked workers wake up at once:
-- "<origin> class:count class:count ..." on the work channel (`classes` lists a class once
-- per job, so a replica wakes as many workers as there are jobs). `origin` names the broker
-- that submitted them (it has woken its own workers already); '-' for everything else.
local function announce(classes, origin)
  if #classes == 0 then return end
  local counts, order = {}, {}
  for _, class in ipairs(classes) do
    if not counts[class] then
      counts[class] = 0
      order[#order + 1] = class
    end
    counts[class] = counts[class] + 1
  end
  local parts = {}
  for i, class in ipairs(order) do parts[i] = class .. ':' .. counts[class] end
  redis.call('PUBLISH', K.work_channel, (origin or '-') .. ' ' .. table.concat(parts, ' '))
end

-- Back to pending: queued in its class at its original place (its score), the status
-- changed from `from`, and a `pending` event saying why.
local function back_to_pending(id, j, from, reason)
  enqueue(id, j.class, j.score)
  set_status(id, j.seq, from, 'pending')
  event(id, 'type', 'status', 'status', 'pending', 'reason', reason)
end

-- When a lease taken or renewed now ends: `lease` seconds from now, but never past the
-- job's deadline (0: none).
local function lease_end(lease, deadline)
  local expires = NOW + lease
  if deadline > 0 and deadline < expires then return deadline end
  return expires
end

-- Move a held job's lease to end at `expires` (the `leases` entry and the record); more
-- field-value pairs for its record may follow (one HSET for all).
local function renew(id, expires, ...)
  redis.call('ZADD', K.leases, 'XX', expires, id)
  redis.call('HSET', K.job(id), 'lease_expires', expires, ...)
end

-- Check that `token` holds the active job `id`; returns its fields or an error reply.
local function held(id, token, fields)
  local want = {'status', 'token'}
  for _, f in ipairs(fields) do want[#want + 1] = f end
  local j = hget(id, want)
  if not j.status then
    return nil, redis.error_reply('NOJOB no such job: ' .. id)
  end
  if j.status ~= 'active' or j.token ~= token then
    return nil, redis.error_reply('STALE the lease token does not hold job ' .. id ..
      ' (it is ' .. j.status .. ')')
  end
  return j
end

-- The fields of a job that finish() reads.
local FINISH_FIELDS = {'seq', 'service', 'customer', 'steps'}

-- Make a job terminal: status, timestamps, retention (EXPIRE) and the janitor's entry;
-- more field-value pairs for its record may follow. `j` holds FINISH_FIELDS when the
-- caller has read them already (nil: read here).
local function finish(id, j, old, new, ttl, ...)
  j = j or hget(id, FINISH_FIELDS)
  local k = K.job(id)
  local member = id .. '\t' .. j.service .. '\t' .. j.customer .. '\t' .. new
  set_status(id, j.seq, old, new, 'finished_at', NOW_S, 'token', '', 'xm', member, ...)
  redis.call('ZADD', K.expiring, NOW + ttl, member)
  redis.call('EXPIRE', k, ttl)
  redis.call('EXPIRE', K.events(id), ttl)
  if j.steps and j.steps ~= '' then
    redis.call('ZREM', K.promotions, id)  -- its promotion steps (scheduling.md)
  end
end

-- Move an active job to the dead-letter set: failed for good, kept for dead_retention.
local function dead_letter(id, err)
  redis.call('ZADD', K.dead, NOW, id)
  redis.call('HSET', K.job(id), 'error', err)
  finish(id, nil, 'active', 'failed', CFG.dead_retention)
  event(id, 'type', 'status', 'status', 'failed', 'error', err)
  return 'failed'
end

-- The current attempt of an active job failed: back off and retry, or dead-letter it.
-- The worker that failed it is remembered so it is not handed the job again while
-- another worker can take it.
local function fail_attempt(id, err, retryable, jitter)
  local j = hget(id, {'failures', 'max_attempts', 'worker', 'seq', 'avoid'})
  local failures = tonumber(j.failures) + 1
  local k = K.job(id)
  redis.call('HSET', k, 'failures', failures, 'token', '', 'error', err,
    'avoid', (j.avoid or '|') .. j.worker .. '|')
  if retryable and failures < tonumber(j.max_attempts) then
    local backoff = math.min(CFG.retry_cap, CFG.retry_base * 2 ^ (failures - 1))
    backoff = backoff * (0.5 + 0.5 * jitter)
    redis.call('ZADD', K.delayed, NOW + backoff, id)
    redis.call('HSET', k, 'retry_at', NOW + backoff)
    set_status(id, j.seq, 'active', 'delayed')
    event(id, 'type', 'status', 'status', 'delayed', 'error', err)
    return 'delayed'
  end
  return dead_letter(id, err)
end

-- Priority policy, deadlines and aging (emp_hub/scheduling.py): a new job's record keeps
-- its effective priority, urgency, deadline and promotion steps ("when priority ..."):
-- they are appended to `fields`, the field-value pairs of the record's HSET; the first
-- step is scheduled in `promotions` (schedule.lua applies due steps). Nothing else for
-- a plain job.
local function schedule_promotions(fields, id, effective, urgency, deadline, steps, next_at)
  local function add(field, value)
    fields[#fields + 1] = field
    fields[#fields + 1] = value
  end
  add('effective_priority', effective)
  if urgency ~= '' then add('urgency', urgency) end
  if deadline ~= '' then add('deadline_at', deadline) end
  if steps ~= '' then
    add('steps', steps)
    redis.call('ZADD', K.promotions, tonumber(next_at), id)
  end
end

-- Model-warm affinity (docs/scheduling.md). `best` is the lowest-score head among heads[1..n]
-- (false: an empty queue); warm[i] is true when head i prefers a model the claiming worker
-- has loaded. A cold best gives way to W, the lowest-score warm head of the same band (the
-- same effective priority), unless a cold head ahead of W (best among them) has waited
-- CFG.affinity_wait seconds since it was submitted: then plain order, best. O(n), with one
-- read (created_at) per cold head ahead of W.
local function affinity_pick(heads, n, best, warm)
  if warm[best] then return best end
  local band = math.floor(heads[best][2] / CFG.pscale)
  local alt = nil
  for i = 1, n do
    local h = heads[i]
    if h and warm[i] and math.floor(h[2] / CFG.pscale) == band
        and (alt == nil or h[2] < heads[alt][2]) then
      alt = i
    end
  end
  if alt == nil then return best end
  for i = 1, n do
    local h = heads[i]
    if h and not warm[i] and h[2] < heads[alt][2] then
      local created = tonumber(redis.call('HGET', K.job(h[1]), 'created_at')) or 0
      if NOW - created >= CFG.affinity_wait then return best end
    end
  end
  return alt
end

-- Fair share (docs/scheduling.md): start-time fair queuing within one band and service.
-- The hash K.fair(band, service) holds the virtual clock V (field '.v': the largest tag
-- claimed, started at the seq of the first job) and, per customer ('' for none), the finish
-- tag F of its last job submitted. A job of cost c (FAIR_UNIT / weight) gets the tag
-- S = max(V, F) and moves F to S + c; returns S, S + c (S capped below CFG.pscale).
local function fair_tag(band, service, customer, cost, seq)
  local key = K.fair(band, service)
  local st = redis.call('HMGET', key, '.v', customer)
  local v = tonumber(st[1])
  if not v then
    v = seq
    redis.call('HSET', key, '.v', v)
  end
  local s = math.min(math.max(v, tonumber(st[2]) or 0), CFG.pscale - 1)
  redis.call('HSET', key, customer, s + cost)
  return s, s + cost
end

-- A fair job was claimed (j: its service, customer, fair_band, fair_s, fair_f): the clock
-- moves up to its tag; if it was its customer's last job submitted, the customer's entry
-- goes (its next job starts at the clock), so the state of idle customers does not stay.
local function fair_claimed(j)
  local key = K.fair(j.fair_band, j.service)
  local st = redis.call('HMGET', key, '.v', j.customer)
  if tonumber(j.fair_s) > (tonumber(st[1]) or -1) then
    redis.call('HSET', key, '.v', j.fair_s)
  end
  if st[2] and tonumber(st[2]) == tonumber(j.fair_f) then
    redis.call('HDEL', key, j.customer)
  end
end

-- A pending fair job was cancelled: if it was its customer's last job submitted, F goes
-- back to its start tag, and the entry goes once the clock has passed it.
local function fair_cancelled(id)
  local j = hget(id, {'service', 'customer', 'fair_band', 'fair_s', 'fair_f'})
  if not j.fair_s then return end
  local key = K.fair(j.fair_band, j.service)
  local st = redis.call('HMGET', key, '.v', j.customer)
  if not st[2] or tonumber(st[2]) ~= tonumber(j.fair_f) then return end
  if tonumber(j.fair_s) <= (tonumber(st[1]) or -1) then
    redis.call('HDEL', key, j.customer)
  else
    redis.call('HSET', key, j.customer, j.fair_s)
  end
end

-- Claim up to `count` of the best jobs among the heads of the candidate queues for a
-- worker, and lease each (claim.lua; submit.lua, for a worker waiting on the submitting
-- replica). Its arguments start at ARGV[a]: worker, token prefix (job i gets token
-- prefix:i), lease seconds, count, the version of the class list the candidates were
-- computed from, number of queues, then per queue: class, allow_avoided ("1" when no other
-- live worker can run that class); then, only with model-warm affinity on, a mask of
-- '0'/'1' per queue: '1' when its jobs prefer a model the worker has loaded (see
-- affinity_pick). `taken_ids`, when given, is a table that gets each claimed job's id
-- (as a key).
-- Returns {0, classes_version} when the candidates are out of date (a new class appeared),
-- else {1, classes_version, HGETALL of each claimed job...} (none when nothing matched, or
-- when an admin drained or stopped the worker: its `worker_state` key is set).
local CLAIM_FIELDS = {'avoid', 'seq', 'timeout', 'service', 'customer', 'attempt',
  'fair_band', 'fair_s', 'fair_f'}  -- whether to avoid a head, and what take() needs

local function claim_jobs(a, taken_ids)
  local worker, prefix, lease = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local count = tonumber(ARGV[a + 3])
  local ver = redis.call('GET', K.classes_ver) or '0'
  if ver ~= ARGV[a + 4] then return {0, ver} end
  if redis.call('EXISTS', K.worker_state(worker)) == 1 then return {1, ver} end
  local nq = tonumber(ARGV[a + 5])
  local classes, allow, offs, heads = {}, {}, {}, {}

  local function peek(i)
    local r = redis.call('ZRANGE', K.queue(classes[i]), offs[i], offs[i], 'WITHSCORES')
    if r[1] then heads[i] = {r[1], tonumber(r[2])} else heads[i] = false end
  end

  for i = 1, nq do
    classes[i] = ARGV[a + 4 + 2 * i]
    allow[i] = ARGV[a + 5 + 2 * i] == '1'
    offs[i] = 0
    peek(i)
  end
  local mask = ARGV[a + 6 + 2 * nq]
  local warm = {}
  for i = 1, nq do warm[i] = mask ~= nil and string.sub(mask, i, i) == '1' end

  -- A queue a job is taken from is peeked at again right after (peek), so whether it is
  -- empty is known at the end without a ZCARD per job: no head at offset 0.
  local function take(id, class, token, j)
    redis.call('ZREM', K.queue(class), id)
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
    if taken_ids then taken_ids[id] = true end
    return redis.call('HGETALL', k)
  end

  local out = {1, ver}
  local needle = '|' .. worker .. '|'
  local skips = 0
  local taken = {}  -- the queues jobs were taken from
  while #out - 2 < count and skips <= CFG.max_skip do
    local best = nil
    for i = 1, nq do
      if heads[i] and (best == nil or heads[i][2] < heads[best][2]) then best = i end
    end
    if best == nil then break end
    if mask then best = affinity_pick(heads, nq, best, warm) end
    local id = heads[best][1]
    local j = hget(id, CLAIM_FIELDS)
    if j.avoid and not allow[best] and string.find(j.avoid, needle, 1, true) then
      offs[best] = offs[best] + 1
      skips = skips + 1
    else
      out[#out + 1] = take(id, classes[best], prefix .. ':' .. (#out - 1), j)
      taken[best] = true
    end
    peek(best)
  end
  for i in pairs(taken) do
    if not heads[i] and offs[i] == 0 then emptied(classes[i]) end
  end
  return out
end
