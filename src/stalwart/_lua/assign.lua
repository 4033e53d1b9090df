-- KEYS: circuit, trials. ARGV: "open" (forced) or "closed", channel, name.
-- Returns the new record, published.
--#include _circuit
local now = now_ms()
if ARGV[1] == 'open' then
  change(KEYS[1], KEYS[2], 'open', 0, '1', ARGV[3], now, 0)
else
  change(KEYS[1], KEYS[2], 'closed', 0, '0', ARGV[3], now, 0)
end
local r = record(KEYS[1], now)
publish(ARGV[2], r)
return r
