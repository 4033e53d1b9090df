-- Shared by the circuit scripts (included with "--#include _circuit"): reading,
-- publishing and changing a breaker's record, and voiding a late request.
--#include _clock
local function int(n)
  return string.format('%.0f', n)
end
local function void(key, until_ms, now)
  -- a late request naming this token must not take anything: see the module
  if until_ms > now then redis.call('SET', key, '1', 'PX', int(until_ms - now)) end
end
-- The record: state, version, ms left of the open period, forced, openings in
-- a row. "openings" is kept with the version it was written at ("ov"): a
-- replica of an older stalwart changes the record without it, and then it
-- counts as 0.
local function record(key, now)
  local h = redis.call('HMGET', key, 'state', 'version', 'until', 'forced', 'openings', 'ov')
  local version = tonumber(h[2]) or 0
  if h[1] ~= 'open' then return {'closed', version, 0, 0, 0} end
  if h[4] == '1' then return {'open', version, 0, 1, 0} end
  local openings = 0
  if tonumber(h[6]) == version then openings = tonumber(h[5]) or 0 end
  return {'open', version, (tonumber(h[3]) or 0) - now, 0, openings}
end
local function publish(channel, r)
  redis.call('PUBLISH', channel,
    r[1] .. ' ' .. int(r[2]) .. ' ' .. int(r[3]) .. ' ' .. r[4] .. ' ' .. int(r[5]))
end
local function change(key, trials, state, until_ms, forced, name, now, openings)
  local current = tonumber(redis.call('HGET', key, 'version')) or 0
  local version = int(math.max(current + 1, now))
  redis.call('HSET', key, 'state', state, 'version', version,
    'until', int(until_ms), 'forced', forced, 'successes', '0', 'name', name,
    'openings', int(openings), 'ov', version)
  redis.call('DEL', trials)
end
