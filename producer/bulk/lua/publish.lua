-- Publish one chunk of the manifest, all or nothing: its messages onto the queue, its jobs into
-- the in-flight set, its invalid lines into the report, the cursor past its last line. Nothing is
-- published while the window is full, once the run is cancelled, or by anyone but the lease holder.
-- ARGV: 1 lease token, 2 first line, 3 last line, 4 position after the chunk, 5 window (0: none),
--       6 ttl, 7 invalid reports kept, 8 jobs n, 9 invalid lines m,
--       then n job ids, n messages, m invalid reports.
-- Returns {'ok', in flight} | {'full', in flight} | {'stopped', state} | {'lease'} | {'stale', lines done}.
if redis.call('GET', KEYS[7]) ~= ARGV[1] then
  return {'lease'}
end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'in_progress' then
  return {'stopped', state or 'missing'}
end
local lines_done = tonumber(redis.call('HGET', KEYS[1], 'lines_done') or '0')
if tonumber(ARGV[2]) <= lines_done then
  return {'stale', lines_done}
end
local n, m, window = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[5])
local open = redis.call('SCARD', KEYS[2])
if n > 0 and window > 0 and open + n > window then
  return {'full', open}
end
local added = 0
for i = 1, n do
  -- A job already in flight is not pushed again (the set is what the window and counts trust).
  if redis.call('SADD', KEYS[2], ARGV[9 + i]) == 1 then
    redis.call('LPUSH', KEYS[8], ARGV[9 + n + i])
    added = added + 1
  end
end
if m > 0 then
  redis.call('HINCRBY', KEYS[1], 'invalid', m)
  for i = 1, m do
    redis.call('RPUSH', KEYS[6], ARGV[9 + 2 * n + i])
  end
  redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[7]) - 1)
end
redis.call('HINCRBY', KEYS[1], 'total', added)
redis.call('HSET', KEYS[1], 'lines_done', ARGV[3], 'position', ARGV[4])
local ttl = tonumber(ARGV[6])
for _, key in ipairs({KEYS[1], KEYS[2], KEYS[6]}) do
  redis.call('EXPIRE', key, ttl)
end
return {'ok', open + added}
