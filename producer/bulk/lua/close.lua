-- The submitter read its manifest to the end: the run's total is final, and the run ends as
-- soon as nothing is in flight (now, if nothing is).
-- ARGV: 1 lease token, 2 manifest lines, 3 ttl, 4 finished ttl, 5 segment key prefix.
-- Returns {'ok' | 'lease', 1 if the run ended now, the segment sealed or 0}.
if redis.call('GET', KEYS[7]) ~= ARGV[1] then
  return {'lease', 0, 0}
end
redis.call('HSET', KEYS[1], 'manifest_complete', '1', 'manifest_lines', ARGV[2])
local ended, seq = finalize(ARGV[5], tonumber(ARGV[3]), tonumber(ARGV[4]))
return {'ok', ended, seq}
