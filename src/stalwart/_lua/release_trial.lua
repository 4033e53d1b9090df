-- KEYS: circuit, trials, void marker of the token. ARGV: version, "1" if the
-- trial succeeded, token ("": none held), void until (server ms; 0: none).
-- Gives the permit back (idempotent: a success counts once per token);
-- returns the successes of that version (0 if it is not current).
--#include _circuit
local removed = 0
if ARGV[3] ~= '' then
  removed = redis.call('ZREM', KEYS[2], ARGV[3])
  if removed == 0 and tonumber(ARGV[4]) > 0 then void(KEYS[3], tonumber(ARGV[4]), now_ms()) end
end
local h = redis.call('HMGET', KEYS[1], 'version', 'successes')
if tonumber(h[1]) ~= tonumber(ARGV[1]) then return 0 end
if ARGV[2] == '1' and (removed == 1 or ARGV[3] == '') then
  return redis.call('HINCRBY', KEYS[1], 'successes', 1)
end
return tonumber(h[2]) or 0
