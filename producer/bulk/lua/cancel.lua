-- Cancel the run: publish.lua refuses from now on and the manifest is closed at what was
-- published; the caller then revokes the jobs in flight. Ends the run now if none is.
-- ARGV: 1 ttl, 2 finished ttl, 3 segment key prefix. Returns {state before, 1 if ended now, segment or 0}.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return {'missing', 0, 0}
end
if state == 'in_progress' then
  redis.call('HSET', KEYS[1], 'state', 'cancelling', 'manifest_complete', '1', 'cancelled_at', tostring(now_s()))
end
local ended, seq = finalize(ARGV[3], tonumber(ARGV[1]), tonumber(ARGV[2]))
return {state, ended, seq}
