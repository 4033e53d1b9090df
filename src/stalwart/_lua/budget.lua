--[[
A retry budget shared by a fleet (stalwart/_retry_budget.py). Every sync
interval each process sends its running totals of first attempts and
retries, gives back the retries it reserved last time, and reserves its
share of what the fleet has left for the next interval: the fleet's
retries, made or reserved, never exceed the budget, whatever the order in
which the processes come.

KEYS[1]  the budget: a hash, its name hash-tagged ({prefix}budget:{<h>}) so
         that under Redis Cluster it lives in one slot. Fields:
           q:<slot>, r:<slot>  first attempts, and retries made or reserved,
                               that arrived in that slot of the window
                               (slot = server milliseconds // slot_ms);
           c:<member>          a process's running totals "requests retries"
                               as last seen, so that a request sent twice
                               counts once;
           h:<member>          its reservation "slot count";
           t:<member>          when it was last seen (server ms): it counts
                               among the processes for the members' TTL,
                               and its fields are kept for a window more.
         The key expires when nobody has written it for a window (plus the
         members' TTL): an idle budget leaves nothing behind.

ARGV[1]  the member (the process's token), ARGV[2] and ARGV[3] its running
         totals of requests and retries, ARGV[4] and ARGV[5] what it has not
         had acknowledged (added instead when the member is not known: it
         was quiet for longer than the window), ARGV[6] slot_ms, ARGV[7] slots
         in the window, ARGV[8] the members' TTL in ms, ARGV[9] ratio,
         ARGV[10] the floor (retries allowed per window), ARGV[11] the
         retries the process wants to reserve.

The reservation granted is at most what is left (ratio * requests + floor
- retries, over the window), and at most its share: left / processes,
rounded up.

Returns {requests, retries, processes, granted, now_ms}: the fleet's totals
over the window (retries made or reserved, the new reservation included),
the processes seen within the members' TTL (this one included), and the
retries reserved for this process.
]]

local key = KEYS[1]
local member = ARGV[1]
local requests, retries = tonumber(ARGV[2]), tonumber(ARGV[3])
local unsent_q, unsent_r = tonumber(ARGV[4]), tonumber(ARGV[5])
local slot_ms, slots, member_ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ratio, floor, want = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local current = math.floor(now / slot_ms)
local oldest = current - slots + 1

-- What the process did since it was last seen.
local add_q, add_r = unsent_q, unsent_r
local seen = redis.call('HGET', key, 'c:' .. member)
if seen then
  local seen_q, seen_r = string.match(seen, '^(%d+) (%d+)$')
  add_q = math.max(0, requests - tonumber(seen_q))
  add_r = math.max(0, retries - tonumber(seen_r))
end
-- Its last reservation is replaced by the retries it made (if that slot is
-- still in the window).
local held = redis.call('HGET', key, 'h:' .. member)
if held then
  local held_slot, held_count = string.match(held, '^(%-?%d+) (%d+)$')
  held_slot, held_count = tonumber(held_slot), tonumber(held_count)
  if held_slot >= oldest and held_count > 0 then
    redis.call('HINCRBY', key, 'r:' .. held_slot, -held_count)
  end
end
if add_q > 0 then redis.call('HINCRBY', key, 'q:' .. current, add_q) end
if add_r > 0 then redis.call('HINCRBY', key, 'r:' .. current, add_r) end
redis.call('HSET', key, 'c:' .. member, string.format('%d %d', requests, retries),
  't:' .. member, now)

local total_q, total_r, processes = 0, 0, 0
local flat = redis.call('HGETALL', key)
for i = 1, #flat, 2 do
  local field, value = flat[i], flat[i + 1]
  local kind, rest = string.sub(field, 1, 2), string.sub(field, 3)
  if kind == 'q:' or kind == 'r:' then
    if tonumber(rest) < oldest then
      redis.call('HDEL', key, field)
    elseif kind == 'q:' then
      total_q = total_q + tonumber(value)
    else
      total_r = total_r + tonumber(value)
    end
  elseif kind == 't:' then
    local quiet = now - tonumber(value)
    if quiet > slots * slot_ms + member_ttl then
      -- Gone for longer than the window: its counts and reservation left it.
      redis.call('HDEL', key, field, 'c:' .. rest, 'h:' .. rest)
    elseif quiet <= member_ttl then
      processes = processes + 1
    end
  end
end

local left = math.max(0, ratio * total_q + floor - total_r)
local granted = math.min(want, math.floor(left), math.ceil(left / math.max(1, processes)))
granted = math.max(0, granted)
if granted > 0 then
  redis.call('HINCRBY', key, 'r:' .. current, granted)
  total_r = total_r + granted
end
redis.call('HSET', key, 'h:' .. member, string.format('%d %d', current, granted))
redis.call('PEXPIRE', key, slots * slot_ms + member_ttl)
return {total_q, total_r, processes, granted, now}
