-- KEYS: record, void marker of the token. ARGV: token, channel, void until
-- (server ms; 0: none). Frees the key if the token holds it (idempotent);
-- returns 1 if it did.
--#include _clock
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] == 'r' and h[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'r')
  return 1
end
local until_ms = tonumber(ARGV[3])
if until_ms > 0 then
  local now = now_ms()
  if until_ms > now then
    redis.call('SET', KEYS[2], '1', 'PX', string.format('%.0f', until_ms - now))
  end
end
return 0
