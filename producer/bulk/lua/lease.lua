-- Take or renew the submitter's lease: one process publishes a run at a time.
-- ARGV: 1 our token, 2 ttl in ms, 3 a holder known to be dead, to take over from ('' for none).
-- Returns {1, our token} or {0, the holder's token}.
local holder = redis.call('GET', KEYS[7])
if holder == false or holder == ARGV[1] or (ARGV[3] ~= '' and holder == ARGV[3]) then
  redis.call('SET', KEYS[7], ARGV[1], 'PX', ARGV[2])
  return {1, ARGV[1]}
end
return {0, holder}
