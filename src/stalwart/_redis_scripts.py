"""The Lua scripts behind ``stalwart.redis.RedisStore``, and how they are run.

Every change to a record is one script: Redis runs it atomically, so a
compare-and-set, a claim or a trial permit needs no lock and one round trip.
Scripts are sent by their SHA-1 (``EVALSHA``); a server that does not know
one (restarted, failed over, ``SCRIPT FLUSH``) answers ``NOSCRIPT``, and the
script is loaded and run again in one pipelined round trip.

Time is the server's (``TIME``): processes' clocks differ, Redis has one.

**Taking something back.** Every claim and trial permit is named by a token
that the client chooses (128 random bits), so that the client can give it
back whatever happens to its request: a request that timed out, was
cancelled, or lost its connection may still reach Redis and run later (a
stalled server runs what was queued when it resumes). The store then gives
the token back in the background (`RELEASE`, `RELEASE_TRIAL`), which frees
the key or the permit if the late request took it, and otherwise leaves a
*void* marker (``<key>:void:<token>``) that makes the late request do
nothing when it comes. Requests that take something also carry the latest
server time at which they may run (``not_after``, from the client's
estimate of Redis's clock): a request that reaches Redis after that does
nothing and answers ``late``, so that no marker has to live long.

Circuit records, a hash per breaker name: ``state`` ("open" or "closed";
absent: closed), ``version`` (newer for every change: max(old + 1,
milliseconds since the epoch), so that versions keep growing even if Redis
loses its data), ``until`` (end of the open period, server milliseconds),
``forced`` ("1" when forced open), ``successes`` (successful trials of this
version) and ``name`` (the breaker's name, for people reading the database);
next to it, a sorted set of the trial permits held (their tokens), scored by
when each lapses.

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


# Redis's time, in milliseconds since the epoch; and whether a request that
# takes something comes too late to take it (its client gave up: see the
# module's docstring).
_COMMON: Final = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function given_up(now, not_after, marker)
  local limit = tonumber(not_after)
  return (limit > 0 and now > limit) or redis.call('EXISTS', marker) == 1
end
"""

_CIRCUIT_PRELUDE: Final = (
    _COMMON
    + """
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
"""
)

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

#: KEYS: circuit, trials, void marker of the token. ARGV: version, limit,
#: permit lease ms, token, not_after (server ms; 0: none).
#: Returns {"granted", now}, {"late", now}, or {"refused", now, <the record>}.
ACQUIRE_TRIAL: Final = Script(
    "acquire_trial",
    _CIRCUIT_PRELUDE
    + """
local now = now_ms()
if given_up(now, ARGV[5], KEYS[3]) then return {'late', now} end
local h = redis.call('HMGET', KEYS[1], 'state', 'version', 'until', 'forced')
if h[1] == 'open' and h[4] ~= '1' and tonumber(h[2]) == tonumber(ARGV[1])
    and now >= (tonumber(h[3]) or 0) then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZSCORE', KEYS[2], ARGV[4])
      or redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[2]) then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
    return {'granted', now}
  end
end
local r = record(KEYS[1], now)
return {'refused', now, r[1], r[2], r[3], r[4]}
""",
)

#: KEYS: circuit, trials, void marker of the token. ARGV: version, "1" if the
#: trial succeeded, token ("": none held), void until (server ms; 0: none).
#: Gives the permit back (idempotent: a success counts once per token);
#: returns the successes of that version (0 if it is not current).
RELEASE_TRIAL: Final = Script(
    "release_trial",
    _CIRCUIT_PRELUDE
    + """
local removed = 0
if ARGV[3] ~= '' then
  removed = redis.call('ZREM', KEYS[2], ARGV[3])
  if removed == 0 and tonumber(ARGV[4]) > 0 then void(KEYS[3], tonumber(ARGV[4]), now_ms()) end
end
local h = redis.call('HMGET', KEYS[1], 'version', 'successes')
if tonumber(h[1]) ~= tonumber(ARGV[1]) then return 0 end
if ARGV[2] == '1' and (removed == 1 or ARGV[3] == '') then
  return redis.call('HINCRBY', KEYS[1], 'successes', 1)
end
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

#: KEYS: record, void marker of the token. ARGV: token, "1" if there is a
#: fingerprint, fingerprint, lease ms, not_after (server ms; 0: none).
#: Returns {"leased", now}, {"done", now, fingerprint, value},
#: {"running", now, fingerprint} or {"late", now}.
CLAIM: Final = Script(
    "claim",
    _COMMON
    + """
local now = now_ms()
if given_up(now, ARGV[5], KEYS[2]) then return {'late', now} end
local h = redis.call('HMGET', KEYS[1], 's', 'f', 'v', 't')
if not h[1] then
  if ARGV[2] == '1' then
    redis.call('HSET', KEYS[1], 's', 'r', 't', ARGV[1], 'f', ARGV[3])
  else
    redis.call('HSET', KEYS[1], 's', 'r', 't', ARGV[1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {'leased', now}
end
if h[1] == 'd' then return {'done', now, h[2], h[3]} end
if h[4] == ARGV[1] then return {'leased', now} end
return {'running', now, h[2]}
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

#: KEYS: record, void marker of the token. ARGV: token, channel, void until
#: (server ms; 0: none). Frees the key if the token holds it (idempotent);
#: returns 1 if it did.
RELEASE: Final = Script(
    "release",
    _COMMON
    + """
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] == 'r' and h[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'r')
  return 1
end
local until_ms = tonumber(ARGV[3])
if until_ms > 0 then
  local now = now_ms()
  if until_ms > now then
    redis.call('SET', KEYS[2], '1', 'PX', string.format('%.0f', until_ms - now))
  end
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
