"""RedisStore: options, keys, idempotency through a real Redis, round trips, lifecycle.

The protocol's behaviour, method by method, is checked by the conformance
suite (``test_idempotency_store.py``, harness "redis"); here, what is
particular to Redis. Real time on a plain asyncio loop (Redis keeps its own
clock), so waits are kept tiny.
"""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import re
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

import stalwart as sw
import stalwart.redis._idempotency
from stalwart import Completed, InFlight, Lease
from stalwart._circuit_store import CircuitStore
from stalwart.redis import RedisStore
from stalwart.redis import _scripts as _redis_scripts
from stalwart.redis._client import _digest

from . import redis_support
from .redis_support import opened_store, unique_prefix

pytestmark = [pytest.mark.redis, pytest.mark.realtime]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Redis runs on asyncio, in real time (overrides the conftest's backends)."""
    return ("asyncio", {})


@pytest.fixture
async def store() -> AsyncIterator[RedisStore]:
    async with opened_store() as opened:
        yield opened


async def _channels(store: RedisStore, count: int) -> bool:
    """Has the store ``count`` pub/sub channels subscribed in Redis?"""
    return len(await store.client.pubsub_channels(f"{store.prefix}*")) == count


def tasks_left() -> set[asyncio.Task[Any]]:
    """The store's background tasks still alive (the test runner has tasks of its own)."""
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("stalwart.redis")}


# -- options ------------------------------------------------------------------------


def test_the_client_must_be_an_asyncio_client() -> None:
    with pytest.raises(TypeError, match=r"redis\.asyncio\.Redis"):
        RedisStore(redis.Redis())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"timeout": 0}, ValueError, "timeout must be > 0"),
        ({"timeout": float("inf")}, ValueError, "timeout must be finite"),
        ({"reconcile_interval": -1}, ValueError, "reconcile_interval"),
        ({"trial_lease": 0}, ValueError, "trial_lease"),
        ({"on_unavailable": "ignore"}, ValueError, "on_unavailable must be"),
        ({"prefix": b"x:"}, TypeError, "prefix must be a str"),
        ({"codec": object()}, TypeError, "codec must have encode"),
        ({"name": ""}, ValueError, "name must be"),
    ],
)
def test_options_are_validated_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        RedisStore(redis.asyncio.Redis(), **options)


def test_a_store_serves_breakers_and_idempotency() -> None:
    store = RedisStore(redis.asyncio.Redis())
    assert isinstance(store, CircuitStore)
    assert isinstance(store, sw.IdempotencyStore)
    assert (store.prefix, store.timeout, store.on_unavailable, store.name) == (
        "stalwart:",
        1.0,
        "raise",
        "redis",
    )
    assert isinstance(store.codec, sw.JSONCodec)
    assert "prefix='stalwart:'" in repr(store)


# -- keys ---------------------------------------------------------------------------


async def test_user_text_never_reaches_a_key_name(store: RedisStore) -> None:
    hostile = "x\r\n*3\r\n$3\r\nDEL\r\n* {tag} stalwart:circuit:"
    lease = await store.claim(hostile, hostile, fingerprint=None, lease=5.0)
    assert isinstance(lease, Lease)
    await store.transition(hostile, 0, sw.CircuitState.OPEN, 1.0)
    keys = sorted([k.decode() async for k in store.client.scan_iter(match=store.prefix + "*")])
    hexed = re.escape(store.prefix) + r"(idem|circuit):[0-9a-f]{32}(:trials)?"
    assert len(keys) == 2
    assert all(re.fullmatch(hexed, k) for k in keys), keys


async def test_stores_with_other_prefixes_share_nothing(store: RedisStore) -> None:
    async with opened_store() as other:
        lease = await store.claim("scope", "k", fingerprint=None, lease=5.0)
        assert isinstance(lease, Lease)
        assert isinstance(await other.claim("scope", "k", fingerprint=None, lease=5.0), Lease)


# -- idempotency ------------------------------------------------------------------


_SCRIPTS = {
    script.sha.encode(): script.name
    for script in vars(_redis_scripts).values()
    if isinstance(script, _redis_scripts.Script)
}


class Sent:
    """What a client wrote to Redis: one entry per round trip, with its commands.

    Each write is kept with the task that made it, so that a test can tell
    its own round trips from those of the store's background task.
    """

    def __init__(self, writes: list[tuple[asyncio.Task[Any] | None, bytes]] | None = None) -> None:
        self.writes = [] if writes is None else writes

    def clear(self) -> None:
        self.writes.clear()

    def record(self, blob: bytes) -> None:
        self.writes.append((asyncio.current_task(), blob))

    def of(self, task: asyncio.Task[Any] | None) -> Sent:
        """The writes ``task`` made."""
        return Sent([(t, blob) for t, blob in self.writes if t is task])

    def mine(self) -> Sent:
        """The writes of the calling task."""
        return self.of(asyncio.current_task())

    @property
    def round_trips(self) -> int:
        return len(self.writes)

    @property
    def commands(self) -> list[str]:
        found: list[str] = []
        for _, blob in self.writes:
            found += [m.decode().upper() for m in re.findall(rb"\*\d+\r\n\$\d+\r\n(\w+)", blob)]
        return found

    @property
    def scripts(self) -> list[str]:
        """The names of the scripts run (by EVALSHA), in order."""
        pattern = re.compile(rb"EVALSHA\r\n\$40\r\n([0-9a-f]{40})", re.IGNORECASE)
        return [
            _SCRIPTS.get(sha, sha.decode())
            for _, blob in self.writes
            for sha in pattern.findall(blob)
        ]


def counting_client(url: str | None = None) -> tuple[redis.asyncio.Redis, Sent]:
    sent = Sent()

    class Counting(redis.asyncio.Connection):
        async def send_packed_command(
            self, command: bytes | str | Iterable[bytes], check_health: bool = True
        ) -> None:
            if isinstance(command, str):
                command = command.encode()
            sent.record(command if isinstance(command, bytes) else b"".join(command))
            await super().send_packed_command(command, check_health)

    return redis_support.client(url, connection_class=Counting), sent


async def test_a_replay_takes_one_round_trip_and_a_first_run_two() -> None:
    redis_support.require_redis()
    client, sent = counting_client()
    prefix = unique_prefix()
    try:
        # A generous timeout: a loaded machine makes round trips slow, not more.
        store = RedisStore(client, prefix=prefix, timeout=30.0)
        runs: list[int] = []

        @sw.Idempotency(key="order", store=store, fingerprint="args")
        async def place(order: str, amount: int) -> dict[str, int]:
            runs.append(amount)
            return {"amount": amount}

        # Connect, and have Redis load the scripts, first: the handshake and
        # a fresh server's NOSCRIPT (one extra round trip per script, once)
        # are not what this counts.
        assert await place("warm-up", 1) == {"amount": 1}
        sent.clear()
        assert await place("o-1", 5) == {"amount": 5}
        # Counted by script: a connection the pool opens anew says HELLO first.
        assert sent.scripts == ["claim", "complete"]
        assert sent.mine().scripts == ["claim", "complete"]
        sent.clear()
        assert await place("o-1", 5) == {"amount": 5}
        assert sent.scripts == ["claim"]
        assert runs == [1, 5]
        await store.aclose()
        assert not tasks_left()  # claims and completions need no background task
    finally:
        await redis_support.delete_prefix(client, prefix)
        await client.aclose()


async def test_a_first_run_under_contention_still_runs_once() -> None:
    async with opened_store() as one, opened_store(prefix=one.prefix) as two:
        runs: list[str] = []

        async def charge(payment: str) -> str:
            runs.append(payment)
            await asyncio.sleep(0.05)
            return f"charged {payment}"

        # As two replicas would: the same function, a store each.
        first = sw.Idempotency(key="payment", store=one)(charge)
        second = sw.Idempotency(key="payment", store=two)(charge)
        results = await asyncio.gather(*(f("p-1") for f in (first, second) * 5))
        assert results == ["charged p-1"] * 10
        assert runs == ["p-1"]


async def work(k: str) -> str:
    return "done by the waiter"


async def test_a_waiter_takes_over_from_a_holder_that_died(store: RedisStore) -> None:
    scope = f"idempotency:{__name__}.work"  # where Idempotency keeps the records of `work`
    dead = await store.claim(scope, "k", fingerprint=None, lease=0.15)  # never completed
    assert isinstance(dead, Lease)
    guarded = sw.Idempotency(key="k", store=store, lease=0.15)(work)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await guarded("k") == "done by the waiter"
    assert 0.1 <= loop.time() - start < 0.5
    assert await store.complete(dead, "too late", ttl=10.0) is False


async def test_waiters_are_woken_when_the_holder_finishes(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without notifications waiters would look again only every minute (and
    # the lease is 30 s): finishing well within that shows they were woken.
    monkeypatch.setattr(stalwart.redis._idempotency, "_SAFETY_POLL", 60.0)
    runs = 0

    @sw.Idempotency(key="k", store=store, lease=30.0)
    async def slow(k: str) -> int:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.1)
        return runs

    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await asyncio.gather(*(slow("k") for _ in range(5))) == [1] * 5
    assert loop.time() - start < 10.0  # notified, not polled


async def test_results_cross_through_the_codec_not_pickle(store: RedisStore) -> None:
    lease = await store.claim("scope", "k", fingerprint=None, lease=5.0)
    assert isinstance(lease, Lease)
    with pytest.raises(TypeError, match="tuple"):
        await store.complete(lease, (1, 2), ttl=10.0)
    assert await store.complete(lease, [1, 2], ttl=10.0)
    assert await store.claim("scope", "k", fingerprint=None, lease=5.0) == Completed([1, 2], None)


class Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(os.environ["STALWART_PWNED"]),))


async def test_a_stored_value_that_does_not_decode_is_an_error_never_run(
    store: RedisStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("STALWART_PWNED", str(marker))
    lease = await store.claim("scope", "k", fingerprint=None, lease=5.0)
    assert isinstance(lease, Lease)
    await store.complete(lease, "fine", ttl=10.0)
    # Someone with write access to Redis plants a pickle in the record.
    [name] = [k async for k in store.client.scan_iter(match=store.prefix + "idem:*")]
    await store.client.hset(name, "v", pickle.dumps(Exploit()))
    with pytest.raises(ValueError, match="cannot be decoded"):
        await store.claim("scope", "k", fingerprint=None, lease=5.0)
    assert not marker.exists()


async def test_a_client_that_decodes_responses_works_the_same() -> None:
    async with opened_store() as plain:
        decoding = redis_support.client(decode_responses=True)
        try:
            store = RedisStore(decoding, prefix=plain.prefix)
            lease = await store.claim("scope", "k", fingerprint="fp", lease=5.0)
            assert isinstance(lease, Lease)
            assert await store.claim("scope", "k", fingerprint="x", lease=5.0) == InFlight("fp")
            assert await store.complete(lease, {"é": "🙂"}, ttl=10.0)
            assert await store.wait("scope", "k", timeout=1.0) == Completed({"é": "🙂"}, "fp")
            await store.aclose()
        finally:
            await decoding.aclose()


async def test_a_resp2_client_works_the_same() -> None:
    async with opened_store() as plain:
        old = redis_support.client(protocol=2)
        try:
            async with RedisStore(old, prefix=plain.prefix) as store:
                cb = redis_support.breaker(store)
                await store.sync()
                lease = await store.claim("scope", "k", fingerprint=None, lease=5.0)
                assert isinstance(lease, Lease)
                assert await store.complete(lease, [1, "two"], ttl=10.0)
                assert await store.wait("scope", "k", timeout=1.0) == Completed([1, "two"], None)
                await plain.transition("dep", 0, sw.CircuitState.OPEN, 10.0)  # another replica
                await redis_support.until(lambda: cb.state is sw.CircuitState.OPEN)
        finally:
            await old.aclose()


async def test_a_store_forgets_the_breakers_that_are_gone() -> None:
    async with opened_store() as store:
        kept = redis_support.breaker(store, "kept")
        gone = redis_support.breaker(store, "gone")
        await store.sync()
        del gone
        gc.collect()
        store._kick()
        await redis_support.until(lambda: _channels(store, 1))
        channels = await store.client.pubsub_channels(f"{store.prefix}*")
        assert channels == [f"{store.prefix}circuit:{_digest('kept')}".encode()]
        assert kept.state is sw.CircuitState.CLOSED


async def test_scripts_are_loaded_again_when_redis_forgets_them() -> None:
    with redis_support.private_redis() as server:
        client, sent = counting_client(server.url)
        try:
            store = RedisStore(client)
            assert isinstance(await store.claim("s", "a", fingerprint=None, lease=5.0), Lease)
            await client.script_flush()
            sent.clear()
            assert isinstance(await store.claim("s", "b", fingerprint=None, lease=5.0), Lease)
            # NOSCRIPT, then SCRIPT LOAD and EVALSHA pipelined in one round trip.
            assert (sent.round_trips, sent.commands) == (2, ["EVALSHA", "SCRIPT", "EVALSHA"])
            sent.clear()
            assert isinstance(await store.claim("s", "c", fingerprint=None, lease=5.0), Lease)
            assert sent.commands == ["EVALSHA"]
        finally:
            await client.aclose()


# -- lifecycle -------------------------------------------------------------------------


async def pubsub_connections(client: redis.asyncio.Redis, name: str) -> int:
    clients = await client.client_list(_type="pubsub")
    return sum(1 for c in clients if c.get("name") == name)


async def test_async_with_leaves_no_task_connection_or_subscription() -> None:
    redis_support.require_redis()
    name = f"stalwart-test-{os.getpid()}-{id(object())}"
    client = redis_support.client(client_name=name)
    prefix = unique_prefix()
    try:
        async with RedisStore(client, prefix=prefix) as store:
            cb = redis_support.breaker(store, "dep")
            await store.sync()
            channel = f"{prefix}circuit:{_digest('dep')}"
            assert await client.pubsub_numsub(channel) == [(channel.encode(), 1)]
            assert await pubsub_connections(client, name) == 1
            assert tasks_left()
            assert cb.state is sw.CircuitState.CLOSED
        assert not tasks_left()
        assert await client.pubsub_numsub(channel) == [(channel.encode(), 0)]
        assert await pubsub_connections(client, name) == 0
    finally:
        await redis_support.delete_prefix(client, prefix)
        await client.aclose()


async def test_a_store_starts_itself_when_needed_and_aclose_stops_it() -> None:
    redis_support.require_redis()
    client = redis_support.client()
    prefix = unique_prefix()
    try:
        store = RedisStore(client, prefix=prefix)
        assert not tasks_left()
        cb = redis_support.breaker(store)  # built inside the loop: starts following
        await store.sync()
        assert tasks_left()
        await store.aclose()
        await store.aclose()  # idempotent
        assert not tasks_left()
        assert await client.pubsub_channels(f"{prefix}*") == []
        with pytest.raises(RuntimeError, match="Redis store 'redis' is closed"):
            await store.sync()  # closing is final: nothing starts again
        assert not tasks_left()
        assert cb.state is sw.CircuitState.CLOSED
    finally:
        await redis_support.delete_prefix(client, prefix)
        await client.aclose()


async def test_a_wait_subscribes_only_while_it_waits(store: RedisStore) -> None:
    lease = await store.claim("scope", "k", fingerprint=None, lease=5.0)
    assert isinstance(lease, Lease)

    async def finish() -> None:
        # The key's channel, while someone waits on it.
        await redis_support.until(lambda: _channels(store, 1))
        await store.complete(lease, "v", ttl=10.0)

    finisher = asyncio.create_task(finish())
    assert await store.wait("scope", "k", timeout=30.0) == Completed("v", None)
    await finisher
    # The follower unsubscribes, then closes the connection.
    await redis_support.until(lambda: _channels(store, 0))


async def test_a_wait_in_flight_when_the_store_closes_raises_at_once(store: RedisStore) -> None:
    lease = await store.claim("scope", "k", fingerprint=None, lease=5.0)
    assert isinstance(lease, Lease)
    waiter = asyncio.create_task(store.wait("scope", "k", timeout=30.0))
    await redis_support.until(lambda: _channels(store, 1))  # it waits, subscribed
    await store.aclose()
    with pytest.raises(RuntimeError, match="Redis store 'redis' is closed"):
        async with asyncio.timeout(5.0):  # not its 30 s: woken by the close
            await waiter
    assert not tasks_left()


def test_on_trio_the_store_says_it_needs_asyncio() -> None:
    import trio

    store = RedisStore(redis.asyncio.Redis())

    async def main() -> None:
        with pytest.raises(RuntimeError, match="runs on asyncio"):
            await store.claim("scope", "k", fingerprint=None, lease=5.0)
        with pytest.raises(RuntimeError, match="runs on asyncio"):
            sw.CircuitBreaker(name="dep", store=store)

    trio.run(main)


# -- what needs no Redis ------------------------------------------------------------


def test_records_are_read_from_script_replies_and_messages() -> None:
    from stalwart._circuit_store import CircuitRecord
    from stalwart.redis._scripts import circuit_record as _record

    closed, opened, forced = sw.CircuitState.CLOSED, sw.CircuitState.OPEN, True
    assert _record(b"closed", 7, 0, 0) == CircuitRecord(closed, 7)
    assert _record(b"open", 8, 1500, 0) == CircuitRecord(opened, 8, 1.5)
    assert _record(b"open", b"9", b"-20", b"1") == CircuitRecord(opened, 9, forced=forced)
    assert _record("open", "10", "-250", "0") == CircuitRecord(opened, 10, -0.25)
    # Five fields from this version, four from an older replica's message.
    assert _record(b"open", 11, 500, 0, 3) == CircuitRecord(opened, 11, 0.5, openings=3)
    assert _record(b"closed", 12, 0, 0, 0) == CircuitRecord(closed, 12)


def test_a_cached_open_period_counts_down_from_when_it_was_learned() -> None:
    from stalwart._circuit_store import CircuitRecord
    from stalwart.redis._circuit import _Circuit

    circuit = _Circuit("dep", "k")
    circuit.record = CircuitRecord(sw.CircuitState.OPEN, 3, 10.0)
    circuit.learned_at = 100.0
    assert circuit.cached(104.0) == CircuitRecord(sw.CircuitState.OPEN, 3, 6.0)
    # Without a clock, the period is taken as over: Redis refuses trials until it is.
    assert circuit.cached(None) == CircuitRecord(sw.CircuitState.OPEN, 3, 0.0)


def test_only_connection_failures_make_the_store_unavailable() -> None:
    from stalwart.redis._client import _is_unavailable

    down = redis.ConnectionError("refused")
    assert _is_unavailable(down)
    assert _is_unavailable(TimeoutError())
    assert _is_unavailable(ExceptionGroup("task group", [down, redis.TimeoutError()]))
    assert not _is_unavailable(redis.ResponseError("ERR a bug in a script"))
    assert not _is_unavailable(ExceptionGroup("task group", [down, KeyError()]))


# -- giving back: tokens, late requests, void markers -------------------------------


async def test_a_request_that_reaches_redis_too_late_does_nothing(store: RedisStore) -> None:
    name = store._record_key("scope", "k")
    past = (await store.client.time())[0] * 1000 - 1  # Redis's clock, a moment ago
    reply = await store._eval(
        _redis_scripts.CLAIM, (name, f"{name}:void:t1"), ("t1", "0", b"", 5000, past)
    )
    assert reply[0] == b"late"
    assert not await store.client.exists(name)  # nothing claimed


async def test_a_claim_given_back_before_it_runs_does_nothing_when_it_comes(
    store: RedisStore,
) -> None:
    name = store._record_key("scope", "k")
    void = f"{name}:void:t1"
    soon = (await store.client.time())[0] * 1000 + 60_000
    # The give-back overtakes its claim (another connection, a stalled Redis).
    assert await store._eval(_redis_scripts.RELEASE, (name, void), ("t1", name, soon)) == 0
    assert 0 < await store.client.pttl(void) <= 60_000  # the marker lapses on its own
    reply = await store._eval(_redis_scripts.CLAIM, (name, void), ("t1", "0", b"", 5000, soon))
    assert reply[0] == b"late"
    assert not await store.client.exists(name)
    assert isinstance(await store.claim("scope", "k", fingerprint=None, lease=5.0), Lease)


async def test_a_store_whose_idea_of_redis_clock_is_wrong_learns_and_asks_again(
    store: RedisStore,
) -> None:
    loop = asyncio.get_running_loop()
    truth = (time.time() - loop.time()) * 1000.0  # Redis's clock (ms) minus the loop's
    store._skew = truth - 3600_000.0  # it believes Redis an hour behind: every limit is past
    lease = await store.claim("scope", "k", fingerprint=None, lease=5.0)
    assert isinstance(lease, Lease)  # refused as late once, then asked again
    assert store._skew is not None
    assert abs(store._skew - truth) < 10_000.0


async def test_a_trial_success_given_back_twice_counts_once(store: RedisStore) -> None:
    record = await store.transition("dep", 0, sw.CircuitState.OPEN, 0.0)
    assert await store.acquire_trial("dep", record.version, 1) is None
    [(version, token)] = store._circuits["dep"].permits
    circuit = store._circuits["dep"]
    keys = (circuit.key, circuit.trials, f"{circuit.key}:void:{token}")
    args = (version, "1", token, 0)
    # The first reply was lost; the background sends it again.
    assert await store._eval(_redis_scripts.RELEASE_TRIAL, keys, args) == 1
    assert await store._eval(_redis_scripts.RELEASE_TRIAL, keys, args) == 1
    assert await store.client.zcard(circuit.trials) == 0
