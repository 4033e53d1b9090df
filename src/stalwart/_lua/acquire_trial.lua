-- KEYS: circuit, trials, void marker of the token. ARGV: version, limit,
-- permit lease ms, token, not_after (server ms; 0: none).
-- Returns {"granted", now}, {"late", now}, or {"refused", now, <the record>}.
--#include _circuit
local now = now_ms()
if given_up(now, ARGV[5], KEYS[3]) then return {'late', now} end
local h = redis.call('HMGET', KEYS[1], 'state', 'version', 'until', 'forced')
if h[1] == 'open' and h[4] ~= '1' and tonumber(h[2]) == tonumber(ARGV[1])
    and now >= (tonumber(h[3]) or 0) then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZSCORE', KEYS[2], ARGV[4])
      or redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[2]) then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
    return {'granted', now}
  end
end
local r = record(KEYS[1], now)
return {'refused', now, r[1], r[2], r[3], r[4], r[5]}
