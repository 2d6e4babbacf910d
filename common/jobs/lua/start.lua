-- Start an attempt (see fn_start.lua). KEYS: stream, dead.
-- ARGV: namespace, group, consumer, now, claim nonce, entry ('' = read the next new one), job id
return start(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
