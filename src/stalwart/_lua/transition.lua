-- KEYS: circuit, trials. ARGV: expected version, "open"/"closed", open_for ms,
-- channel, name. Returns the record (new, or current if the version differs).
-- An opening counts one more opening in a row than the record it replaces.
--#include _circuit
local now = now_ms()
local r = record(KEYS[1], now)
if r[2] ~= tonumber(ARGV[1]) then return r end
local openings = 0
if ARGV[2] == 'open' then openings = r[5] + 1 end
change(KEYS[1], KEYS[2], ARGV[2], now + tonumber(ARGV[3]), '0', ARGV[5], now, openings)
r = record(KEYS[1], now)
publish(ARGV[4], r)
return r
