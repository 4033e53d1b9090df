-- KEYS: circuit, trials. ARGV: expected version, "open"/"closed", open_for ms,
-- channel, name. Returns the record (new, or current if the version differs).
--#include _circuit
local now = now_ms()
local current = tonumber(redis.call('HGET', KEYS[1], 'version')) or 0
if current ~= tonumber(ARGV[1]) then return record(KEYS[1], now) end
change(KEYS[1], KEYS[2], ARGV[2], now + tonumber(ARGV[3]), '0', ARGV[5], now)
local r = record(KEYS[1], now)
publish(ARGV[4], r)
return r
