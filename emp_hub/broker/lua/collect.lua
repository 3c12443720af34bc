-- Drop requirement classes that have had no pending job for ARGV[5] seconds from
-- `classes`, at most ARGV[4] of them, and bump `classes:ver` so every hub re-reads the
-- list. Atomic: a submit of such a class runs wholly before (the class has a pending job
-- and stays) or after (it lists the class again). Until it has walked `classes` once, it
-- also notes the classes listed before collection existed as idle from now, ARGV[4] a
-- pass. Returns how many classes it dropped.
local limit = tonumber(ARGV[4])
if redis.call('EXISTS', K.classes_swept) == 0 then
  local cursor = redis.call('GET', K.classes_cursor) or '0'
  local page = redis.call('HSCAN', K.classes, cursor, 'COUNT', limit)
  for i = 1, #page[2], 2 do
    if redis.call('SISMEMBER', K.nonempty, page[2][i]) == 0 then
      redis.call('ZADD', K.idle, 'NX', NOW, page[2][i])
    end
  end
  if page[1] == '0' then
    redis.call('SET', K.classes_swept, 1)
    redis.call('DEL', K.classes_cursor)
  else
    redis.call('SET', K.classes_cursor, page[1])
  end
end
local due = redis.call('ZRANGEBYSCORE', K.idle, '-inf', NOW - tonumber(ARGV[5]),
  'LIMIT', 0, limit)
local dropped = 0
for _, class in ipairs(due) do
  redis.call('ZREM', K.idle, class)
  if redis.call('SISMEMBER', K.nonempty, class) == 0 then
    dropped = dropped + redis.call('HDEL', K.classes, class)
  end
end
if dropped > 0 then redis.call('INCR', K.classes_ver) end
return dropped
