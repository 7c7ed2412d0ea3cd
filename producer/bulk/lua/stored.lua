-- A job's record is stored: count its outcome and append it to the log, once per job. A job
-- leaves the in-flight set once; a redelivery or a duplicate message finds it gone and changes
-- nothing. The log is sealed into a segment when it reaches the segment size, and the run
-- ends here when this was its last job.
-- ARGV: 1 job id, 2 outcome (succeeded|failed|cancelled|expired), 3 log entry, 4 prompt tokens,
--       5 image tokens, 6 generated tokens, 7 model ms, 8 segment size, 9 ttl, 10 finished ttl,
--       11 segment key prefix.
-- Returns {1 if counted now, the segment sealed or 0, 1 if the run ended now}.
if redis.call('SREM', KEYS[2], ARGV[1]) == 0 then
  return {0, 0, 0}
end
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
for i, field in ipairs({'prompt_tokens', 'image_tokens', 'generated_tokens'}) do
  local value = tonumber(ARGV[3 + i])
  if value > 0 then
    redis.call('HINCRBY', KEYS[1], field, value)
  end
end
if tonumber(ARGV[7]) > 0 then
  redis.call('HINCRBYFLOAT', KEYS[1], 'model_ms', ARGV[7])
end
redis.call('RPUSH', KEYS[4], ARGV[3])
local ttl = tonumber(ARGV[9])
local seq = 0
if redis.call('LLEN', KEYS[4]) >= tonumber(ARGV[8]) then
  seq = seal(ARGV[11], ttl)
end
for _, key in ipairs({KEYS[1], KEYS[2], KEYS[3], KEYS[4]}) do
  redis.call('EXPIRE', key, ttl)
end
local ended, last = finalize(ARGV[11], ttl, tonumber(ARGV[10]))
if last > 0 then
  seq = last
end
return {1, seq, ended}
