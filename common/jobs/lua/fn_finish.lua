-- finish(): record an attempt's outcome (SUCCEEDED | FAILED | CANCELLED | RETRY), fenced by the
-- attempt number. RETRY re-queues the job under a new entry, or dead-letters it and ends it FAILED
-- once max_attempts are used. Returns {'fenced', state} | {state after}.
local function finish(job, stream, events, dead, group, id, attempt, entry, now, outcome, result, err)
  local f = redis.call('HMGET', job, 'state', 'attempts', 'max_attempts')
  local state, attempts, max_attempts = f[1], f[2], f[3]
  local function drop()
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
  end
  if not state then return {'fenced', 'missing'} end
  if attempts ~= attempt then return {'fenced', state} end
  if TERMINAL[state] then drop() return {state} end  -- a retry after a lost reply, or dead-lettered
  if state ~= 'RUNNING' then return {'fenced', state} end
  if outcome == 'RETRY' then
    if tonumber(attempts) >= tonumber(max_attempts) then
      err = 'failed after ' .. attempts .. ' attempt(s): ' .. err
      -- dead-letter first; XACK follows in the same script, so the entry is never lost
      redis.call('XADD', dead, '*', 'job', id, 'attempts', attempts, 'error', err, 'time', now)
      outcome = 'FAILED'
    else
      local requeued = redis.call('XADD', stream, '*', 'job', id)
      redis.call('HSET', job, 'state', 'PENDING', 'entry', requeued, 'error', err, 'claim', '')
      event(events, now, 'state', 'PENDING', '{}', 'attempt ' .. attempts .. ' failed, retrying: ' .. err)
      drop()
      return {'PENDING'}
    end
  end
  redis.call('HSET', job, 'state', outcome, 'finished_at', now, 'result', result, 'error', err)
  local data = '{}'
  if outcome == 'SUCCEEDED' then data = result end
  local msg = string.lower(outcome)
  if err ~= '' then msg = msg .. ': ' .. err end
  event(events, now, 'state', outcome, data, msg)
  drop()
  return {outcome}
end
