-- Give the submitter's lease up, if it is still ours. ARGV: 1 our token.
if redis.call('GET', KEYS[7]) == ARGV[1] then
  return redis.call('DEL', KEYS[7])
end
return 0
