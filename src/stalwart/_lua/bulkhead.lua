--[[
A bulkhead shared by a fleet (stalwart/_bulkhead.py): permits leased to
processes, at most `limit` leased at once. A process takes permits in
batches, hands them out to its calls without a round trip, renews its lease
while it holds any, and gives back what it does not need; a process that
dies stops renewing, and its permits lapse with its lease.

KEYS[1]  the permits held: a hash, member -> count.
KEYS[2]  the leases: a sorted set, member scored by when its lease lapses
         (server ms).
KEYS[3]  the processes waiting: a hash, member -> when it last asked for
         permits it did not get (server ms); forgotten after ARGV[7] ms.
         The three names share one hash tag ({prefix}bulkhead:{<h>}...), so
         under Redis Cluster they live in one slot. They expire a lease after
         the last write: an idle bulkhead leaves nothing behind.

ARGV[1]  the member (the process's token).
ARGV[2]  delta: > 0 asks for that many more permits (granted as far as the
         limit allows); < 0 gives that many back; 0 renews the lease.
ARGV[3]  extra: permits to add to a grant of the whole delta while the fleet
         stays at or under `far` permits leased (a batch for the fast path).
ARGV[4]  limit, ARGV[5] far, ARGV[6] the lease in ms, ARGV[7] how long a
         process counts as waiting after it last asked in vain, in ms.

Returns {granted, mine, total, now_ms, contenders, others_waiting}: the
change (negative for a give back), what the member holds now (0 if its
lease had lapsed), the permits leased by the whole fleet, the processes
holding or waiting for permits, and 1 if a process other than this one is
waiting (then each should keep no more than its share, limit / contenders).
]]

local counts, leases, waiting = KEYS[1], KEYS[2], KEYS[3]
local member = ARGV[1]
local delta, extra = tonumber(ARGV[2]), tonumber(ARGV[3])
local limit, far, lease = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local wait_ttl = tonumber(ARGV[7])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

for _, lapsed in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now)) do
  redis.call('HDEL', counts, lapsed)
end
redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)

-- Permits are held under a lease, always written with them: a holder without
-- one, or holding what is not a count (written by something else than
-- stalwart, or damaged), would keep its permits for ever; it holds none.
local total = 0
local flat_counts = redis.call('HGETALL', counts)
for i = 1, #flat_counts, 2 do
  local holder, held = flat_counts[i], tonumber(flat_counts[i + 1])
  if held == nil or held ~= held or held < 0 or not redis.call('ZSCORE', leases, holder) then
    redis.call('HDEL', counts, holder)
  else
    total = total + held
  end
end
local mine = tonumber(redis.call('HGET', counts, member) or '0')

local granted = 0
if delta < 0 then
  granted = -math.min(-delta, mine)
elseif delta > 0 then
  granted = math.max(0, math.min(delta, limit - total))
  if granted == delta and total + granted + extra <= far then
    granted = granted + extra
  end
end
mine = mine + granted
total = total + granted

if mine > 0 then
  redis.call('HSET', counts, member, mine)
  redis.call('ZADD', leases, now + lease, member)
else
  redis.call('HDEL', counts, member)
  redis.call('ZREM', leases, member)
end
if delta > 0 and granted < delta then
  redis.call('HSET', waiting, member, now)
else
  redis.call('HDEL', waiting, member)
end

-- Who contends for the permits: the processes holding some, and those waiting.
local contenders = 0
local others_waiting = 0
local holding = {}
for _, holder in ipairs(redis.call('HKEYS', counts)) do
  holding[holder] = true
  contenders = contenders + 1
end
local flat = redis.call('HGETALL', waiting)
for i = 1, #flat, 2 do
  local who, since = flat[i], tonumber(flat[i + 1])
  if since < now - wait_ttl then
    redis.call('HDEL', waiting, who)
  else
    if who ~= member then others_waiting = 1 end
    if not holding[who] then contenders = contenders + 1 end
  end
end

for _, key in ipairs({counts, leases, waiting}) do
  local ttl = redis.call('PTTL', key)
  if ttl ~= -2 and ttl < lease then redis.call('PEXPIRE', key, lease) end
end
return {granted, mine, total, now, contenders, others_waiting}
