"""The Lua scripts behind `RedisStore`, what they keep in Redis, and how they are run.

Every change to a record is one script: Redis runs it atomically, so a
compare-and-set, a claim or a trial permit needs no lock and one round trip.
The scripts are ``.lua`` files in ``stalwart/_lua/`` (their shared clock,
"given up" check and circuit helpers are fragments they include, see
`stalwart._lua`), read once, when this module is imported. They are sent by
their SHA-1 (``EVALSHA``); a server that does not know one (restarted, failed
over, ``SCRIPT FLUSH``) answers ``NOSCRIPT``, and the script is loaded and run
again in one pipelined round trip (on a Redis Cluster, sent whole with
``EVAL`` to the node serving the keys: see `Script.run`).

Not redis-py's ``register_script``: measured against the same scripts on
redis-py 8.1, its ``Script`` recovers from ``NOSCRIPT`` in three round trips
(``EVALSHA``, ``SCRIPT LOAD``, ``EVALSHA``) instead of two, and it cannot
ask for raw replies: on a client with ``decode_responses=True`` every reply
comes back as text, so the codec's bytes are decoded (a non-UTF-8 result
raises ``UnicodeDecodeError``) and the scripts' statuses no longer compare.
The steady state is one ``EVALSHA`` either way.

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
from collections.abc import Iterable, Sequence
from typing import Any, Final, final

from redis import exceptions as _rx

from .._circuit_store import CircuitRecord, CircuitState
from .._lua import source

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
    "circuit_record",
]

# Replies as bytes whatever the client's ``decode_responses``: results are
# the codec's bytes, and must reach it untouched.
_RAW: Final[dict[str, Any]] = {"NEVER_DECODE": True}


@final
class Script:
    """A Lua script of ``stalwart/_lua/``, known by its SHA-1."""

    __slots__ = ("body", "name", "sha")

    def __init__(self, name: str) -> None:
        self.name = name
        self.body = source(name)
        self.sha = hashlib.sha1(self.body.encode("utf-8"), usedforsecurity=False).hexdigest()

    async def run(
        self, client: Any, keys: Sequence[str], args: Iterable[Any], *, cluster: bool = False
    ) -> Any:
        """Run the script on ``client`` by its SHA; on NOSCRIPT, load and run it in one round trip.

        The reply is raw (bytes), whatever the client's ``decode_responses``.
        On a cluster (``cluster``: ``client`` is a ``RedisCluster``) the
        client sends the script to the node serving its keys' slot; a node
        that does not know it (each node has its own script cache: a node
        new to the cluster, a replica just promoted) answers NOSCRIPT, and
        the script is sent whole (``EVAL``, which also caches it there) to
        that same slot: a pipeline's commands could go to other nodes.
        """
        argv = (self.sha, len(keys), *keys, *args)
        try:
            return await client.execute_command("EVALSHA", *argv, **_RAW)
        except _rx.NoScriptError:
            if cluster:
                return await client.execute_command(
                    "EVAL", self.body, len(keys), *keys, *args, **_RAW
                )
            pipe = client.pipeline(transaction=False)
            pipe.script_load(self.body)
            pipe.execute_command("EVALSHA", *argv, **_RAW)
            return (await pipe.execute())[1]

    def __repr__(self) -> str:
        return f"<Script {self.name} {self.sha[:8]}>"


def circuit_record(
    state: Any, version: Any, left_ms: Any, forced: Any, openings: Any = 0
) -> CircuitRecord:
    """A circuit record from a script's reply or a pub/sub message (see ``_circuit.lua``).

    ``openings`` may be missing: a replica of an older stalwart publishes
    four fields.
    """
    if isinstance(state, str):
        state = state.encode()
    if state == b"open":
        if int(forced):
            return CircuitRecord(CircuitState.OPEN, int(version), forced=True)
        return CircuitRecord(
            CircuitState.OPEN, int(version), int(left_ms) / 1000.0, openings=int(openings)
        )
    return CircuitRecord(CircuitState.CLOSED, int(version))


#: KEYS: circuit, trials. ARGV: expected version, "open"/"closed", open_for ms,
#: channel, name. Returns the record (new, or current if the version differs).
TRANSITION: Final = Script("transition")
#: KEYS: circuit, trials. ARGV: "open" (forced) or "closed", channel, name.
ASSIGN: Final = Script("assign")
#: Takes a half-open trial permit for a token (see ``acquire_trial.lua``).
ACQUIRE_TRIAL: Final = Script("acquire_trial")
#: Gives a trial permit back, counting its success once (see ``release_trial.lua``).
RELEASE_TRIAL: Final = Script("release_trial")
#: KEYS: circuits. Returns their records, flattened ("foreign" for a key that
#: holds something else than a record).
READ_CIRCUITS: Final = Script("read_circuits")
#: Claims an idempotency key for a token (see ``claim.lua``).
CLAIM: Final = Script("claim")
#: KEYS: record. ARGV: token, value, ttl ms, channel. Returns 1 if stored.
COMPLETE: Final = Script("complete")
#: Frees a key the token holds, or voids the token (see ``release.lua``).
RELEASE: Final = Script("release")
#: KEYS: record. ARGV: token, lease ms. Returns 1 if the lease still holds.
RENEW: Final = Script("renew")
#: KEYS: record. Returns nil (free), {"done", fingerprint, value} or
#: {"running", fingerprint, milliseconds left of the lease}.
PEEK: Final = Script("peek")
