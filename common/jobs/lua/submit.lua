-- Create a job (record, stream entry, index entry, first event), or name the job that already
-- holds this idempotency key. Returns {1, id} when created, {0, existing id} when not.
local job, stream, index, events, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, now, job_type, spec, idem_key = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local max_attempts, has_idem = ARGV[6], ARGV[7] == '1'

if has_idem then
  local existing = redis.call('GET', idem)
  if existing then return {0, existing} end
end
if redis.call('EXISTS', job) == 1 then return {0, id} end
local entry = redis.call('XADD', stream, '*', 'job', id)
-- sparse record: absent fields read as empty/default (Job.from_hash)
redis.call('HSET', job, 'id', id, 'type', job_type, 'state', 'PENDING', 'spec', spec,
  'idem', idem_key, 'attempts', 0, 'max_attempts', max_attempts, 'created_at', now, 'entry', entry)
redis.call('ZADD', index, now, id)
event(events, now, 'state', 'PENDING', '{}', 'submitted')
if has_idem then redis.call('SET', idem, id) end
return {1, id}
