-- Shared by every bulk-run script: producer/bulk/state.py puts it in front of each one.
-- Every script gets the same KEYS, those of one run:
--   1 meta (hash)   2 inflight (set)   3 running (set)   4 log (list)
--   5 sealed (zset) 6 invalid (list)   7 lease (string)  8 the queue's list (publish.lua only)
-- A sealed segment's key is a prefix (an ARGV) plus its number: runs never span Redis Cluster slots.

local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Move the whole log into a new sealed segment; return its number, or 0 when the log was empty.
local function seal(segment_prefix, ttl)
  local entries = redis.call('LRANGE', KEYS[4], 0, -1)
  if #entries == 0 then
    return 0
  end
  local seq = redis.call('HINCRBY', KEYS[1], 'segments', 1)
  redis.call('SET', segment_prefix .. seq, table.concat(entries, '\n') .. '\n', 'EX', ttl)
  redis.call('DEL', KEYS[4])
  redis.call('ZADD', KEYS[5], now_s(), seq)
  redis.call('EXPIRE', KEYS[5], ttl)
  return seq
end

-- End the run once its manifest is closed and no job is in flight: its final state and end
-- time, the log's tail sealed, its keys set to expire (sealed segments keep their TTL until
-- they are in S3). Returns (1 if it ended now, the segment sealed or 0).
local function finalize(segment_prefix, ttl, finished_ttl)
  if redis.call('HGET', KEYS[1], 'manifest_complete') ~= '1' then
    return 0, 0
  end
  if redis.call('SCARD', KEYS[2]) > 0 or redis.call('HEXISTS', KEYS[1], 'ended_at') == 1 then
    return 0, 0
  end
  local final = 'completed'
  if redis.call('HGET', KEYS[1], 'state') == 'cancelling' then
    final = 'cancelled'
  end
  redis.call('HSET', KEYS[1], 'state', final, 'ended_at', tostring(now_s()))
  local seq = seal(segment_prefix, ttl)
  for _, key in ipairs({KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6]}) do
    redis.call('EXPIRE', key, finished_ttl)
  end
  return 1, seq
end
