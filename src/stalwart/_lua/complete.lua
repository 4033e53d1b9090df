-- KEYS: record. ARGV: token, value, ttl ms, channel. Returns 1 if stored.
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[2] ~= ARGV[1] then return 0 end
if h[1] == 'd' then return 1 end
redis.call('HSET', KEYS[1], 's', 'd', 'v', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], 'd')
return 1
