-- Sealed segments still waiting for their S3 write after ARGV[2] seconds (their writer died):
-- claim up to ARGV[3] of them for the caller by renewing their time. ARGV: 1 unused, 2 age, 3 limit.
local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now_s() - tonumber(ARGV[2]), 'LIMIT', 0, tonumber(ARGV[3]))
for _, seq in ipairs(old) do
  redis.call('ZADD', KEYS[5], now_s(), seq)
end
return old
