-- Create the run unless it exists; either way return its meta hash (as HGETALL does).
-- ARGV: 1 ttl, then field, value pairs.
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 2, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
