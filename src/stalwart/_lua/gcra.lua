--[[
GCRA for a limit shared by a fleet: the computation of stalwart/_gcra.py
(read its docstring for the maths), done by Redis, one round trip per call.

Times are seconds on the server's clock (TIME), so replicas whose clocks
disagree still share one schedule. A test may pass "now" instead, to compare
the script with the Python code on the same sequence of times.

KEYS[1]  the bucket: a string holding the theoretical arrival time (TAT),
         written with '%.17g' so that it reads back exactly. It expires when
         the bucket would be full again: an idle limit leaves no key behind.
         The script touches no other key, so under Redis Cluster any name
         lands in a valid slot. RedisStore names it like its other records
         (<prefix>rate:<limiter>:<key>, the digests a hash tag on a
         cluster: <prefix>rate:{<limiter>:<key>}, spreading one limiter's
         keys over the nodes). A value this script did not write (not a
         finite number, without an expiry, or ahead of its expiry) is read
         as an empty bucket and overwritten: see foreign() below.

ARGV[1]  'reserve' or 'cancel'.

'reserve': ARGV[2] the interval T = per / rate and ARGV[3] the tolerance
  tau = (burst - 1) * T, in seconds; ARGV[4] max_wait in seconds ('inf': no
  limit); ARGV[5] now in seconds, or '' for the server's clock.
  Granted: {1, delay, before, after, now}. delay is '0' (now) or the wait
  for the caller's FIFO turn (<= max_wait); before and after are the TAT
  around the reservation ('' for none), to give the turn back with; now is
  the time the script ran at (the TAT's clock: after - now says how far the
  bucket is from full, for the RateLimit header fields).
  Refused (the turn would come after max_wait; nothing changes):
  {0, retry_after, now}, retry_after being the seconds until a permit is free.

'cancel': ARGV[2] before and ARGV[3] after, as returned by 'reserve';
  ARGV[4] now, or ''. Call it only while the caller still waits (before its
  turn). Gives the turn back when no reservation was made after it (the TAT
  is still `after`): returns 1. Otherwise 0: the turn stays in the schedule
  as lost capacity, which only ever makes the limit stricter. (The Python
  bucket also gives back cancelled turns that later cancelled ones queued
  behind; here that would need a record per waiting turn.)

A server clock that jumps back by d seconds delays the bucket's callers by
up to d (the strict side); one that jumps forward lets at most one extra
burst through.

Floats cross to Redis as strings: Redis truncates Lua numbers to integers.
]]

local function fmt(x)
  return string.format('%.17g', x)
end

local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function store(key, tat, now)
  local ttl = math.ceil((tat - now) * 1000)
  if ttl > 0 then
    redis.call('SET', key, fmt(tat), 'PX', ttl)
  else
    redis.call('DEL', key)
  end
end

-- Is the bucket's TAT one that this script did not write (another program's,
-- or damaged)? Such a value could refuse every call for ever: a TAT that is
-- not a finite number, or, on the server's clock, one without an expiry or
-- further ahead than its expiry (this script always sets one, at the TAT).
-- It is then read as an empty bucket, and overwritten.
local function foreign(key, tat, now, given_now)
  if tat ~= tat or tat == math.huge then return true end
  if given_now ~= nil and given_now ~= '' then return false end
  local left = redis.call('PTTL', key)
  return left < 0 or tat - now > left / 1000 + 1
end

local op = ARGV[1]
local key = KEYS[1]

if op == 'reserve' then
  local interval = tonumber(ARGV[2])
  local tau = tonumber(ARGV[3])
  local max_wait = ARGV[4] == 'inf' and math.huge or tonumber(ARGV[4])
  local now = clock(ARGV[5])
  local stored = redis.call('GET', key)
  local tat = stored and tonumber(stored) or -math.huge
  if stored and foreign(key, tat, now, ARGV[5]) then
    stored = false
    tat = -math.huge
  end
  local turn = tat - tau
  local after
  if turn <= now then
    after = math.max(tat, now) + interval
    store(key, after, now)
    return {1, '0', stored or '', fmt(after), fmt(now)}
  end
  local delay = turn - now
  if delay > max_wait then
    return {0, fmt(delay), fmt(now)}
  end
  after = tat + interval
  store(key, after, now)
  return {1, fmt(delay), stored or '', fmt(after), fmt(now)}
elseif op == 'cancel' then
  local now = clock(ARGV[4])
  if redis.call('GET', key) ~= ARGV[3] then return 0 end
  if ARGV[2] == '' then
    redis.call('DEL', key)
  else
    store(key, tonumber(ARGV[2]), now)
  end
  return 1
end
return redis.error_reply('gcra: unknown operation ' .. tostring(op))
