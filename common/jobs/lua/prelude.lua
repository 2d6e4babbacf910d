-- Shared by every job script (prepended by scripts.py): the terminal states and the writer of a
-- job's event stream. Each script is one atomic state change; KEYS are declared for cluster
-- safety. A client may retry a script after a lost reply, so each is idempotent for a retry.
local EVENTS_MAXLEN = 10000  -- per-job event stream cap (approximate trimming)
local TERMINAL = {SUCCEEDED=true, FAILED=true, CANCELLED=true}

local function event(key, now, kind, state, data, message)
  return redis.call('XADD', key, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'kind', kind, 'state', state,
                    'time', now, 'data', data, 'message', message)
end
