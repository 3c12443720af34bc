-- Read job records without their large fields unless asked, so that a list of jobs never
-- carries megabytes of payloads through Redis and the hub. ARGV[4] the cap in bytes (-1:
-- none), ARGV[5] the large fields to read when within the cap, ARGV[6] those to leave
-- out (both space separated), ARGV[7..] job ids. Returns, per id, {fields, cut}: the
-- record as a flat field/value list (empty for a missing job), and the large fields left
-- out as a flat field/size list.
local cap = tonumber(ARGV[4])
local wanted, skipped = {}, {}
for f in string.gmatch(ARGV[5], '%S+') do wanted[f] = true end
for f in string.gmatch(ARGV[6], '%S+') do skipped[f] = true end
local out = {}
for i = 7, #ARGV do
  local k = K.job(ARGV[i])
  local read, row, cut = {}, {}, {}
  for _, f in ipairs(redis.call('HKEYS', k)) do
    if wanted[f] or skipped[f] then
      local size = redis.call('HSTRLEN', k, f)
      if wanted[f] and (cap < 0 or size <= cap) then
        read[#read + 1] = f
      else
        cut[#cut + 1] = f
        cut[#cut + 1] = size
      end
    else
      read[#read + 1] = f
    end
  end
  if #read > 0 then
    local values = redis.call('HMGET', k, unpack(read))
    for j, f in ipairs(read) do
      row[#row + 1] = f
      row[#row + 1] = values[j]
    end
  end
  out[#out + 1] = {row, cut}
end
return out
