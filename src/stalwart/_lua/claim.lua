-- KEYS: record, void marker of the token. ARGV: token, "1" if there is a
-- fingerprint, fingerprint, lease ms, not_after (server ms; 0: none).
-- Returns {"leased", now}, {"done", now, fingerprint, value},
-- {"running", now, fingerprint} or {"late", now}.
--#include _clock
local now = now_ms()
if given_up(now, ARGV[5], KEYS[2]) then return {'late', now} end
local h = redis.call('HMGET', KEYS[1], 's', 'f', 'v', 't')
if not h[1] then
  if ARGV[2] == '1' then
    redis.call('HSET', KEYS[1], 's', 'r', 't', ARGV[1], 'f', ARGV[3])
  else
    redis.call('HSET', KEYS[1], 's', 'r', 't', ARGV[1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {'leased', now}
end
if h[1] == 'd' then return {'done', now, h[2], h[3]} end
if h[4] == ARGV[1] then return {'leased', now} end
-- A claim always expires with its lease. One that never would (written by
-- hand, or by something else than stalwart) gets this claim's lease: it
-- lapses then, and the key is free again, instead of being held for ever.
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return {'running', now, h[2]}
