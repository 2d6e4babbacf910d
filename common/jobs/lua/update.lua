-- A running attempt reports back: heartbeat, progress, log line or artifacts. Fenced: only the
-- current attempt of a RUNNING job may write. Any accepted call renews the lease (XCLAIM of the
-- attempt's own entry resets its idle time). Returns {alive 0|1, cancel '0'|'1'}.
local job, stream, events = KEYS[1], KEYS[2], KEYS[3]
local attempt, entry, group, consumer, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local op, data, message = ARGV[6], ARGV[7], ARGV[8]

local f = redis.call('HMGET', job, 'state', 'attempts', 'cancel')
local cancel = f[3] or '0'
if f[1] ~= 'RUNNING' or f[2] ~= attempt then return {0, cancel} end
redis.call('XCLAIM', stream, group, consumer, 0, entry, 'JUSTID')
if op == 'progress' then
  redis.call('HSET', job, 'progress', data)
  event(events, now, 'progress', 'RUNNING', data, message)
elseif op == 'log' then
  event(events, now, 'log', 'RUNNING', '{}', message)
elseif op == 'artifacts' then
  redis.call('HSET', job, 'artifacts', data)
end
return {1, cancel}
