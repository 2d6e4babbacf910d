-- Cancel a job: a PENDING one ends CANCELLED at once; a RUNNING one gets the cancel flag its
-- worker checks between steps. Returns {state after} or {'missing'}.
local job, stream, events = KEYS[1], KEYS[2], KEYS[3]
local now, reason, group = ARGV[1], ARGV[2], ARGV[3]

local f = redis.call('HMGET', job, 'state', 'entry')
local state, entry = f[1], f[2]
if not state then return {'missing'} end
if TERMINAL[state] then return {state} end
if state == 'PENDING' then
  redis.call('HSET', job, 'state', 'CANCELLED', 'finished_at', now, 'error', reason, 'cancel', '1',
             'cancel_reason', reason)
  event(events, now, 'state', 'CANCELLED', '{}', 'cancelled: ' .. reason)
  redis.call('XACK', stream, group, entry)  -- it may sit, unstarted, in a worker's pending list
  redis.call('XDEL', stream, entry)
  return {'CANCELLED'}
end
if redis.call('HGET', job, 'cancel') ~= '1' then
  redis.call('HSET', job, 'cancel', '1', 'cancel_reason', reason)
  event(events, now, 'log', 'RUNNING', '{}', 'cancel requested: ' .. reason)
end
return {'RUNNING'}
