-- KEYS: record. Returns nil (free), {"done", fingerprint, value} or
-- {"running", fingerprint, milliseconds left of the lease}.
local h = redis.call('HMGET', KEYS[1], 's', 'f', 'v')
if not h[1] then return false end
if h[1] == 'd' then return {'done', h[2], h[3]} end
return {'running', h[2], redis.call('PTTL', KEYS[1])}
