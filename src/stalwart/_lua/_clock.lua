-- Shared by the scripts that take something (included with "--#include _clock").
-- Redis's time, in milliseconds since the epoch; and whether a request that
-- takes something comes too late to take it (its client gave up: see
-- stalwart/redis/_scripts.py).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function given_up(now, not_after, marker)
  local limit = tonumber(not_after)
  return (limit > 0 and now > limit) or redis.call('EXISTS', marker) == 1
end
