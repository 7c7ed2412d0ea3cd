-- Jobs a worker is about to run in a model: those still in flight count as running.
-- ARGV: 1 ttl, then job ids. Returns how many became running.
local n = 0
for i = 2, #ARGV do
  if redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 1 then
    n = n + redis.call('SADD', KEYS[3], ARGV[i])
  end
end
if n > 0 then
  redis.call('EXPIRE', KEYS[3], ARGV[1])
end
return n
