-- Finish one job and start the next new one in one round trip: what a busy worker loop does.
-- KEYS: job, stream, events, dead. ARGV: finish.lua's 8, then namespace, consumer, now, claim nonce
-- for the start. Returns {finish reply, start reply}.
local job, stream, events, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group = ARGV[1]
local done = finish(job, stream, events, dead, group, ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6],
  ARGV[7], ARGV[8])
return {done, start(stream, dead, ARGV[9], group, ARGV[10], ARGV[11], ARGV[12], '', '')}
