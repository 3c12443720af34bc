-- Submit a batch of jobs atomically: all or none.
-- ARGV[4] = a JSON array with one array of strings per job:
-- [id, service, class, requirements, priority, customer, max_attempts, timeout, payload,
--  client, effective priority, urgency, deadline, promotion steps, when the first is due,
--  fair-share cost ("0": off, the tag is the seq)].
-- ARGV[5]: the submitting broker's origin.
-- ARGV[6..8]: the token whose allowance the jobs spend ('': none), seconds per job (1 /
-- the rate), burst (jobs): refused with "RATE <seconds to wait>" when over it, spending
-- nothing (generic cell rate algorithm: `rate:<token>` holds the theoretical arrival time).
-- From ARGV[9], optional: a claim for a worker waiting on the submitting replica (the
-- arguments of claim_jobs, common.lua), run once the jobs are stored: it saves the worker
-- a wake-up and a call of its own.
local jobs = cjson.decode(ARGV[4])
local n = #jobs
for i = 1, n do
  local id = jobs[i][1]
  if redis.call('EXISTS', K.job(id)) == 1 then
    return redis.error_reply('DUPLICATE a job with id ' .. id .. ' already exists')
  end
end
if ARGV[6] ~= '' then
  local key, interval, burst = K.rate(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  local tat = math.max(tonumber(redis.call('GET', key)) or NOW, NOW)
  local new_tat = tat + n * interval
  local allow_at = new_tat - burst * interval
  if allow_at > NOW then return redis.error_reply('RATE ' .. tostring(allow_at - NOW)) end
  redis.call('SET', key, new_tat, 'PX', math.ceil((new_tat - NOW) * 1000) + 1000)
end
local last = redis.call('INCRBY', K.seq, n)
local first = last - n + 1
local new_classes = {}
for i = 1, n do
  local id, service, class, req, priority, customer, max_attempts, timeout, payload, client,
    effective, urgency, deadline, steps, next_at, cost = unpack(jobs[i])
  local seq = first + i - 1
  local band = CFG.pmax - tonumber(effective)
  local tag, fin = seq, nil
  if tonumber(cost) > 0 then tag, fin = fair_tag(band, service, customer, tonumber(cost), seq) end
  local score = band * CFG.pscale + tag
  local fields = {'id', id, 'service', service, 'class', class,
    'requirements', req, 'priority', priority, 'seq', seq, 'score', score,
    'customer', customer, 'status', 'pending', 'attempt', 0, 'failures', 0, 'orphans', 0,
    'max_attempts', max_attempts, 'timeout', timeout, 'payload', payload,
    'created_at', NOW_S, 'progress', 0, 'client', client}
  schedule_promotions(fields, id, effective, urgency, deadline, steps, next_at)
  if fin then
    for _, v in ipairs({'fair_band', band, 'fair_s', tag, 'fair_f', fin}) do
      fields[#fields + 1] = v
    end
  end
  redis.call('HSET', K.job(id), unpack(fields))  -- one write of the whole record
  if redis.call('HSETNX', K.classes, class, req) == 1 then
    redis.call('INCR', K.classes_ver)
    new_classes[#new_classes + 1] = class
  end
  enqueue(id, class, score)
  redis.call('ZADD', K.all_jobs, seq, id)
  redis.call('ZADD', K.by_status('pending'), seq, id)
  redis.call('ZADD', K.by_service(service), seq, id)
  if customer ~= '' then
    redis.call('ZADD', K.by_customer(customer), seq, id)
  end
  event(id, 'type', 'status', 'status', 'pending')
end
local claimed, taken = {}, {}
if ARGV[9] then claimed = claim_jobs(9, taken) end
-- The jobs still pending are announced; one the claim took would wake a worker for nothing.
local pending = {}
for i = 1, n do
  if not taken[jobs[i][1]] then pending[#pending + 1] = jobs[i][3] end
end
announce(pending, ARGV[5])
-- A single job's place in line (jobs of its class ahead of it; -1: claimed), saving a
-- round trip.
local rank = -1
if n == 1 and not taken[jobs[1][1]] then
  rank = redis.call('ZRANK', K.queue(jobs[1][3]), jobs[1][1]) or -1
end
return {first, new_classes, rank, claimed}
