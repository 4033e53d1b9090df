"""The Lua scripts behind ``stalwart.redis.RedisStore``, and how they are run.

Every change to a record is one script: Redis runs it atomically, so a
compare-and-set, a claim or a trial permit needs no lock and one round trip.
Scripts are sent by their SHA-1 (``EVALSHA``); a server that does not know
one (restarted, failed over, ``SCRIPT FLUSH``) answers ``NOSCRIPT``, and the
script is loaded and run again in one pipelined round trip.

Time is the server's (``TIME``): processes' clocks differ, Redis has one.

Circuit records, a hash per breaker name: ``state`` ("open" or "closed";
absent: closed), ``version`` (newer for every change: max(old + 1,
milliseconds since the epoch), so that versions keep growing even if Redis
loses its data), ``until`` (end of the open period, server milliseconds),
``forced`` ("1" when forced open), ``successes`` (successful trials of this
version), ``permits`` (a counter naming trial permits) and ``name`` (the
breaker's name, for people reading the database); next to it, a sorted set of
the trial permits held, scored by when each lapses.

Idempotency records, a hash per scope and key, expiring with the lease or the
TTL: ``s`` ("r" running, i.e. claimed, or "d" done), ``t`` (the holder's
token), ``f`` (the fingerprint; absent: None), ``v`` (the encoded result, once
done).
"""

from __future__ import annotations

import hashlib
from typing import Final, final

__all__ = [
    "ACQUIRE_TRIAL",
    "ASSIGN",
    "CLAIM",
    "COMPLETE",
    "PEEK",
    "READ_CIRCUITS",
    "RELEASE",
    "RELEASE_TRIAL",
    "RENEW",
    "TRANSITION",
    "Script",
]


@final
class Script:
    """A Lua script known by its SHA-1."""

    __slots__ = ("body", "name", "sha")

    def __init__(self, name: str, body: str) -> None:
        self.name = name
        self.body = body
        self.sha = hashlib.sha1(body.encode("utf-8"), usedforsecurity=False).hexdigest()

    def __repr__(self) -> str:
        return f"<Script {self.name} {self.sha[:8]}>"


_CIRCUIT_PRELUDE: Final = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(n)
  return string.format('%.0f', n)
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
"""

#: KEYS: circuit, trials. ARGV: expected version, "open"/"closed", open_for ms,
#: channel, name. Returns the record (new, or current if the version differs).
TRANSITION: Final = Script(
    "transition",
    _CIRCUIT_PRELUDE
    + """
local now = now_ms()
local current = tonumber(redis.call('HGET', KEYS[1], 'version')) or 0
if current ~= tonumber(ARGV[1]) then return record(KEYS[1], now) end
change(KEYS[1], KEYS[2], ARGV[2], now + tonumber(ARGV[3]), '0', ARGV[5], now)
local r = record(KEYS[1], now)
publish(ARGV[4], r)
return r
""",
)

#: KEYS: circuit, trials. ARGV: "open" (forced) or "closed", channel, name.
ASSIGN: Final = Script(
    "assign",
    _CIRCUIT_PRELUDE
    + """
local now = now_ms()
if ARGV[1] == 'open' then
  change(KEYS[1], KEYS[2], 'open', 0, '1', ARGV[3], now)
else
  change(KEYS[1], KEYS[2], 'closed', 0, '0', ARGV[3], now)
end
local r = record(KEYS[1], now)
publish(ARGV[2], r)
return r
""",
)

#: KEYS: circuit, trials. ARGV: version, limit, permit lease ms.
#: Returns nil when a permit is granted, else the current record.
ACQUIRE_TRIAL: Final = Script(
    "acquire_trial",
    _CIRCUIT_PRELUDE
    + """
local now = now_ms()
local h = redis.call('HMGET', KEYS[1], 'state', 'version', 'until', 'forced')
if h[1] == 'open' and h[4] ~= '1' and tonumber(h[2]) == tonumber(ARGV[1])
    and now >= (tonumber(h[3]) or 0) then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[2]) then
    local id = redis.call('HINCRBY', KEYS[1], 'permits', 1)
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), id)
    return false
  end
end
return record(KEYS[1], now)
""",
)

#: KEYS: circuit, trials. ARGV: version, "1" if the trial succeeded.
#: Returns the successes of that version (0 if it is not current).
RELEASE_TRIAL: Final = Script(
    "release_trial",
    """
local h = redis.call('HMGET', KEYS[1], 'version', 'successes')
if tonumber(h[1]) ~= tonumber(ARGV[1]) then return 0 end
local first = redis.call('ZRANGE', KEYS[2], 0, 0)
if first[1] then redis.call('ZREM', KEYS[2], first[1]) end
if ARGV[2] == '1' then return redis.call('HINCRBY', KEYS[1], 'successes', 1) end
return tonumber(h[2]) or 0
""",
)

#: KEYS: circuits. Returns their records, flattened.
READ_CIRCUITS: Final = Script(
    "read_circuits",
    _CIRCUIT_PRELUDE
    + """
local now = now_ms()
local out = {}
for i, key in ipairs(KEYS) do
  local r = record(key, now)
  for j = 1, 4 do out[#out + 1] = r[j] end
end
return out
""",
)

#: KEYS: record. ARGV: token, "1" if there is a fingerprint, fingerprint, lease ms.
#: Returns {"leased"}, {"done", fingerprint, value} or {"running", fingerprint}.
CLAIM: Final = Script(
    "claim",
    """
local h = redis.call('HMGET', KEYS[1], 's', 'f', 'v', 't')
if not h[1] then
  if ARGV[2] == '1' then
    redis.call('HSET', KEYS[1], 's', 'r', 't', ARGV[1], 'f', ARGV[3])
  else
    redis.call('HSET', KEYS[1], 's', 'r', 't', ARGV[1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {'leased'}
end
if h[1] == 'd' then return {'done', h[2], h[3]} end
if h[4] == ARGV[1] then return {'leased'} end
return {'running', h[2]}
""",
)

#: KEYS: record. ARGV: token, value, ttl ms, channel. Returns 1 if stored.
COMPLETE: Final = Script(
    "complete",
    """
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[2] ~= ARGV[1] then return 0 end
if h[1] == 'd' then return 1 end
redis.call('HSET', KEYS[1], 's', 'd', 'v', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], 'd')
return 1
""",
)

#: KEYS: record. ARGV: token, channel.
RELEASE: Final = Script(
    "release",
    """
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] == 'r' and h[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'r')
end
return 0
""",
)

#: KEYS: record. ARGV: token, lease ms. Returns 1 if the lease still holds.
RENEW: Final = Script(
    "renew",
    """
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] == 'r' and h[2] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
""",
)

#: KEYS: record. Returns nil (free), {"done", fingerprint, value} or
#: {"running", fingerprint, milliseconds left of the lease}.
PEEK: Final = Script(
    "peek",
    """
local h = redis.call('HMGET', KEYS[1], 's', 'f', 'v')
if not h[1] then return false end
if h[1] == 'd' then return {'done', h[2], h[3]} end
return {'running', h[2], redis.call('PTTL', KEYS[1])}
""",
)
