--[[
A bulkhead shared by a fleet (stalwart/_bulkhead.py): permits leased to
processes, at most `limit` leased at once. A process takes permits in
batches, hands them out to its calls without a round trip, renews its lease
while it holds any, and gives back what it does not need; a process that
dies stops renewing, and its permits lapse with its lease.

KEYS[1]  the permits held: a hash, member -> count.
KEYS[2]  the leases: a sorted set, member scored by when its lease lapses
         (server ms).
         Both names share one hash tag ({prefix}bulkhead:{<h>}...), so under
         Redis Cluster they live in one slot. Both expire a lease after the
         last write: an idle bulkhead leaves nothing behind.

ARGV[1]  the member (the process's token).
ARGV[2]  delta: > 0 asks for that many more permits (granted as far as the
         limit allows); < 0 gives that many back; 0 renews the lease.
ARGV[3]  extra: permits to add to a grant of the whole delta while the fleet
         stays at or under `far` permits leased (a batch for the fast path).
ARGV[4]  limit, ARGV[5] far, ARGV[6] the lease in ms.

Returns {granted, mine, total, now_ms}: the change (negative for a give
back), what the member holds now (0 if its lease had lapsed), the permits
leased by the whole fleet.
]]

local counts, leases = KEYS[1], KEYS[2]
local member = ARGV[1]
local delta, extra = tonumber(ARGV[2]), tonumber(ARGV[3])
local limit, far, lease = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

for _, lapsed in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now)) do
  redis.call('HDEL', counts, lapsed)
end
redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)

local mine = tonumber(redis.call('HGET', counts, member) or '0')
local total = 0
for _, held in ipairs(redis.call('HVALS', counts)) do
  total = total + tonumber(held)
end

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
  for _, key in ipairs({counts, leases}) do
    if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, lease) end
  end
else
  redis.call('HDEL', counts, member)
  redis.call('ZREM', leases, member)
end
return {granted, mine, total, now}
