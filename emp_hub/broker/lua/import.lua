-- Import finished jobs of another system as history (the migration from emp-redis).
-- ARGV[4] = a JSON array with one array of strings per job:
-- [id, service, class, requirements, priority, customer, status, payload, result, error,
--  created_at, finished_at, worker, client]. status is completed, failed or cancelled.
-- Jobs whose id exists are skipped. Returns the number imported.
local jobs = cjson.decode(ARGV[4])
local imported = 0
for _, j in ipairs(jobs) do
  local id, service, class, req, priority, customer, status = unpack(j, 1, 7)
  local payload, result, err, created_at, finished_at, worker, client = unpack(j, 8, 14)
  if redis.call('EXISTS', K.job(id)) == 0 then
    local seq = redis.call('INCR', K.seq)
    local score = (CFG.pmax - tonumber(priority)) * CFG.pscale + seq
    redis.call('HSET', K.job(id), 'id', id, 'service', service, 'class', class,
      'requirements', req, 'priority', priority, 'seq', seq, 'score', score,
      'customer', customer, 'status', 'imported', 'attempt', 1, 'failures', 0, 'orphans', 0,
      'max_attempts', 1, 'timeout', 0, 'payload', payload, 'created_at', created_at,
      'progress', status == 'completed' and 100 or 0, 'result', result, 'worker', worker,
      'client', client)
    if redis.call('HSETNX', K.classes, class, req) == 1 then
      redis.call('ZADD', K.idle, 'NX', NOW, class)  -- history only: collected later
    end
    redis.call('ZADD', K.all_jobs, seq, id)
    redis.call('ZADD', K.by_service(service), seq, id)
    if customer ~= '' then redis.call('ZADD', K.by_customer(customer), seq, id) end
    if status == 'failed' then
      dead_letter(id, err)
    else
      if err ~= '' then redis.call('HSET', K.job(id), 'error', err) end
      finish(id, nil, 'imported', status, CFG.retention)
    end
    redis.call('HSET', K.job(id), 'finished_at', finished_at)
    imported = imported + 1
  end
end
return imported
