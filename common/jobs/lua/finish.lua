-- Record an attempt's outcome (see fn_finish.lua). KEYS: job, stream, events, dead.
-- ARGV: group, job id, attempt, entry, now, outcome, result, error
return finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
