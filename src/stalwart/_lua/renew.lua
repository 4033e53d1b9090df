-- KEYS: record. ARGV: token, lease ms. Returns 1 if the lease still holds.
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] == 'r' and h[2] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
