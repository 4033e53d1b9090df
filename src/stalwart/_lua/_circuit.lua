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
local function record(key, now)
  local h = redis.call('HMGET', key, 'state', 'version', 'until', 'forced')
  local version = tonumber(h[2]) or 0
  if h[1] ~= 'open' then return {'closed', version, 0, 0} end
  if h[4] == '1' then return {'open', version, 0, 1} end
  return {'open', version, (tonumber(h[3]) or 0) - now, 0}
end
local function publish(channel, r)
  redis.call('PUBLISH', channel, r[1] .. ' ' .. int(r[2]) .. ' ' .. int(r[3]) .. ' ' .. r[4])
end
local function change(key, trials, state, until_ms, forced, name, now)
  local current = tonumber(redis.call('HGET', key, 'version')) or 0
  redis.call('HSET', key, 'state', state, 'version', int(math.max(current + 1, now)),
    'until', int(until_ms), 'forced', forced, 'successes', '0', 'name', name)
  redis.call('DEL', trials)
end
