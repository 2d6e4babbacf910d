-- start(): begin an attempt on a stream entry. With entry == '' it first reads the next new entry
-- itself (XREADGROUP without BLOCK), so a busy worker takes and starts a job in one round trip.
-- The job's own keys derive from the entry's job id and the namespace (so the job system needs a
-- standalone Redis, not Redis Cluster).
-- Returns {'empty'} | {'run', attempt, job hash, entry} | {'skip', why, entry, id}
--       | {'dead', error, entry, id}
local function start(stream, dead, ns, group, consumer, now, claim, entry, id)
  if entry == '' then
    local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', stream, '>')
    if not r then return {'empty'} end
    entry = r[1][2][1][1]
    local fields = r[1][2][1][2]
    id = ''
    for i = 1, #fields, 2 do if fields[i] == 'job' then id = fields[i + 1] end end
  end
  local job, events = ns .. ':job:' .. id, ns .. ':job:' .. id .. ':events'
  local f = redis.call('HMGET', job, 'state', 'entry', 'attempts', 'max_attempts', 'claim', 'worker',
    'error', 'started_at')
  local state, job_entry, job_claim, previous, last_error, started_at = f[1], f[2], f[5], f[6], f[7], f[8]
  local function drop()
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
  end
  if not state then drop() return {'skip', 'job record missing', entry, id} end
  -- a retry of this very start (its reply was lost): the attempt is already ours
  if job_claim == claim then return {'run', tonumber(f[3]), redis.call('HGETALL', job), entry} end
  if job_entry ~= entry or TERMINAL[state] then drop() return {'skip', state, entry, id} end
  local attempts, max_attempts = tonumber(f[3]), tonumber(f[4])
  if attempts >= max_attempts then
    local err = 'gave up after ' .. attempts .. ' attempt(s): the worker running attempt ' .. attempts ..
      ' (' .. (previous or '?') .. ') stopped heartbeating and its lease expired'
    if last_error and last_error ~= '' then err = err .. '; last error: ' .. last_error end
    redis.call('XADD', dead, '*', 'job', id, 'attempts', attempts, 'error', err, 'time', now)
    redis.call('HSET', job, 'state', 'FAILED', 'error', err, 'finished_at', now)
    event(events, now, 'state', 'FAILED', '{}', err)
    drop()
    return {'dead', err, entry, id}
  end
  attempts = attempts + 1
  redis.call('HSET', job, 'state', 'RUNNING', 'attempts', attempts, 'claim', claim, 'worker', consumer,
    'started_at', started_at or now)
  local msg = 'attempt ' .. attempts .. ' started on ' .. consumer
  if state == 'RUNNING' then msg = msg .. ' (lease of ' .. (previous or '?') .. ' expired)' end
  event(events, now, 'state', 'RUNNING', '{"attempt":' .. attempts .. '}', msg)
  return {'run', attempts, redis.call('HGETALL', job), entry}
end
