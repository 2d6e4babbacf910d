-- Take over abandoned entries: XAUTOCLAIM ... JUSTID, then fetch the claimed entries. Redis 6.2
-- keeps entries deleted while pending in the PEL forever (7.0 drops them); acknowledge those here
-- so they stop coming back. KEYS: stream. ARGV: group, consumer, min idle ms, cursor, count.
-- Returns {next cursor, {id, {field, value, ...}}, ...}.
local stream = KEYS[1]
local group = ARGV[1]
local r = redis.call('XAUTOCLAIM', stream, group, ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
local out = {r[1]}
for _, id in ipairs(r[2]) do
  local e = redis.call('XRANGE', stream, id, id)
  if #e == 0 then redis.call('XACK', stream, group, id) else table.insert(out, e[1]) end
end
return out
