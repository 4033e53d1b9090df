"""Conformance suite for the `IdempotencyStore` protocol: every store must pass it.

Each test runs against every entry of `HARNESSES`, on asyncio and trio. To
put a new store through it (``stalwart.redis.RedisStore``), add a `Harness`:

* ``open``: an async context manager yielding a fresh, empty store (for a
  shared store: a unique prefix or a flushed database, closed afterwards);
* ``leases_expire``: True if a claim lapses unless renewed (a holder may die
  without a word), False if it lasts until completed or released;
* ``copies_values``: True if values cross a codec (equal, not identical);
* ``unit``: the seconds that one unit of time in these tests stands for.
  In-process stores run in virtual time (1.0: free); a store with its own
  clock (Redis expires keys on the server's) runs in real time, with a
  small unit (say 0.1) so the suite stays quick. Checks that something
  has not happened yet keep two units or more of margin, for a loaded
  machine;
* ``backends``: the anyio backends the store runs on: ``"asyncio"`` and
  ``"trio"`` in virtual time, ``"asyncio-realtime"`` on a plain asyncio loop;
* ``slack``: units by which a real-time store may be late, on a loaded
  machine, where the suite checks how soon something happens (0 in virtual
  time, where every bound is exact).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
import trio.testing

import stalwart as sw
from stalwart import Completed, IdempotencyStore, InFlight, Lease
from stalwart.testing import VirtualClockEventLoop

from . import redis_support
from .shared_store import SharedStore


@dataclass(frozen=True)
class Harness:
    open: Callable[[], AbstractAsyncContextManager[IdempotencyStore]]
    leases_expire: bool
    copies_values: bool
    unit: float = 1.0
    backends: tuple[str, ...] = ("asyncio", "trio")
    slack: float = 0.0


def _opener(
    factory: Callable[[], IdempotencyStore],
) -> Callable[[], AbstractAsyncContextManager[IdempotencyStore]]:
    @asynccontextmanager
    async def open_store() -> AsyncIterator[IdempotencyStore]:
        yield factory()

    return open_store


@asynccontextmanager
async def _open_redis() -> AsyncIterator[IdempotencyStore]:
    async with redis_support.opened_store() as store:
        yield store


HARNESSES: dict[str, Harness] = {
    "memory": Harness(_opener(sw.MemoryStore), leases_expire=False, copies_values=False),
    "memory-json": Harness(
        _opener(lambda: sw.MemoryStore(codec=sw.JSONCodec())),
        leases_expire=False,
        copies_values=True,
    ),
    "shared": Harness(_opener(SharedStore), leases_expire=True, copies_values=True),
    "redis": Harness(
        _open_redis,
        leases_expire=True,
        copies_values=True,
        unit=0.1,
        backends=("asyncio-realtime",),
        slack=20.0,  # two seconds
    ),
}

SCOPE = "conformance:tests.fn"
FP = "fp-1"


_BACKENDS: dict[str, Callable[[], tuple[str, dict[str, Any]]]] = {
    "asyncio": lambda: ("asyncio", {"loop_factory": VirtualClockEventLoop}),
    "trio": lambda: ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}),
    "asyncio-realtime": lambda: ("asyncio", {}),
}


@pytest.fixture(
    params=[
        pytest.param(
            (name, backend),
            id=f"{name}-{backend}",
            marks=[pytest.mark.redis, pytest.mark.realtime] if name == "redis" else [],
        )
        for name, chosen in HARNESSES.items()
        for backend in chosen.backends
    ]
)
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    name, backend = request.param
    if name == "redis":
        redis_support.require_redis()
    return name, backend


@pytest.fixture
def anyio_backend(case: tuple[str, str]) -> tuple[str, dict[str, Any]]:
    """Each harness on its own backends (overrides the conftest's)."""
    return _BACKENDS[case[1]]()


@pytest.fixture
def harness(case: tuple[str, str]) -> Harness:
    return HARNESSES[case[0]]


@pytest.fixture
async def store(harness: Harness) -> AsyncIterator[IdempotencyStore]:
    async with harness.open() as opened:
        yield opened


class Clock:
    """Time in the suite's units."""

    def __init__(self, harness: Harness) -> None:
        self.unit = harness.unit
        self.start = anyio.current_time()

    def __call__(self) -> float:
        return (anyio.current_time() - self.start) / self.unit

    async def elapse(self, units: float) -> None:
        await anyio.sleep(units * self.unit)


@pytest.fixture
async def clock(harness: Harness) -> Clock:
    return Clock(harness)


async def claim(
    store: IdempotencyStore,
    key: str = "k",
    *,
    fingerprint: str | None = FP,
    lease: float = 10.0,
    scope: str = SCOPE,
    unit: float = 1.0,
) -> Lease | Completed | InFlight:
    return await store.claim(scope, key, fingerprint=fingerprint, lease=lease * unit)


async def hold(store: IdempotencyStore, key: str = "k", **options: Any) -> Lease:
    outcome = await claim(store, key, **options)
    assert isinstance(outcome, Lease), outcome
    return outcome


# -- claim -------------------------------------------------------------------


async def test_a_free_key_is_claimed_with_a_lease(store: IdempotencyStore) -> None:
    lease = await hold(store, "order-1")
    assert (lease.scope, lease.key, lease.fingerprint) == (SCOPE, "order-1", FP)


async def test_a_claimed_key_is_in_flight_with_the_holders_fingerprint(
    store: IdempotencyStore,
) -> None:
    await hold(store, fingerprint="holder's")
    assert await claim(store, fingerprint="another") == InFlight("holder's")


async def test_a_claim_without_a_fingerprint_reports_none(store: IdempotencyStore) -> None:
    await hold(store, fingerprint=None)
    assert await claim(store) == InFlight(None)


async def test_only_one_of_many_concurrent_claims_gets_the_lease(
    store: IdempotencyStore,
) -> None:
    outcomes: list[object] = []

    async def one() -> None:
        outcomes.append(await claim(store))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)
    assert sum(isinstance(o, Lease) for o in outcomes) == 1
    assert sum(isinstance(o, InFlight) for o in outcomes) == 19


async def test_the_lease_duration_says_whether_the_claim_must_be_renewed(
    store: IdempotencyStore, harness: Harness
) -> None:
    lease = await hold(store, lease=6.0, unit=harness.unit)
    if harness.leases_expire:
        assert lease.duration == pytest.approx(6.0 * harness.unit)
    else:
        assert lease.duration is None


# -- complete ----------------------------------------------------------------


async def test_a_completed_key_returns_the_value_and_fingerprint(
    store: IdempotencyStore,
) -> None:
    lease = await hold(store)
    assert await store.complete(lease, {"id": 7}, ttl=60.0) is True
    assert await claim(store, fingerprint="any") == Completed({"id": 7}, FP)


async def test_values_come_back_unchanged(store: IdempotencyStore, harness: Harness) -> None:
    value = {
        "text": 'héllo 🙂 "quoted" \\ \n',
        "numbers": [0, -1, 2**62, 1.5, -0.0, 1e-300],
        "flags": [True, False, None],
        "nested": {"a": [{"b": []}], "": {}},
    }
    lease = await hold(store)
    await store.complete(lease, value, ttl=60.0)
    outcome = await claim(store)
    assert isinstance(outcome, Completed)
    assert outcome.value == value
    assert (outcome.value is not value) == harness.copies_values


async def test_complete_by_a_released_lease_stores_nothing(store: IdempotencyStore) -> None:
    lease = await hold(store)
    await store.release(lease)
    assert await store.complete(lease, "late", ttl=60.0) is False
    assert isinstance(await claim(store), Lease)


async def test_a_stale_lease_cannot_touch_the_next_holders_claim(
    store: IdempotencyStore,
) -> None:
    first = await hold(store, fingerprint="first")
    await store.release(first)
    second = await hold(store, fingerprint="second")
    await store.release(first)
    assert await store.complete(first, "stale", ttl=60.0) is False
    assert await store.renew(first) is False
    assert await claim(store) == InFlight("second")
    assert await store.complete(second, "fresh", ttl=60.0) is True
    assert await claim(store) == Completed("fresh", "second")


async def test_a_record_lasts_its_ttl_then_the_key_is_free(
    store: IdempotencyStore, clock: Clock, harness: Harness
) -> None:
    lease = await hold(store)
    await store.complete(lease, "v", ttl=10.0 * harness.unit)
    await clock.elapse(5.0)
    assert await claim(store) == Completed("v", FP)
    await clock.elapse(6.0)
    assert isinstance(await claim(store), Lease)


async def test_a_value_the_codec_cannot_encode_is_refused_and_the_claim_kept(
    store: IdempotencyStore, harness: Harness
) -> None:
    if not harness.copies_values:
        pytest.skip("this store keeps objects: every value can be stored")
    lease = await hold(store)
    with pytest.raises(TypeError, match="set"):
        await store.complete(lease, {"tags": {"a", "b"}}, ttl=60.0)
    assert isinstance(await claim(store), InFlight)
    await store.release(lease)
    assert isinstance(await claim(store), Lease)


# -- release and renew ---------------------------------------------------------


async def test_release_frees_the_key(store: IdempotencyStore) -> None:
    lease = await hold(store)
    await store.release(lease)
    assert isinstance(await claim(store), Lease)


async def test_release_of_a_lease_no_longer_held_does_nothing(store: IdempotencyStore) -> None:
    lease = await hold(store)
    await store.complete(lease, "v", ttl=60.0)
    await store.release(lease)
    assert await claim(store) == Completed("v", FP)


async def test_renew_is_true_while_the_lease_holds_the_key(store: IdempotencyStore) -> None:
    lease = await hold(store)
    assert await store.renew(lease) is True
    await store.complete(lease, "v", ttl=60.0)
    assert await store.renew(lease) is False


async def test_an_unrenewed_lease_lapses_and_frees_the_key(
    store: IdempotencyStore, clock: Clock, harness: Harness
) -> None:
    lease = await hold(store, lease=3.0, unit=harness.unit)
    await clock.elapse(1.0)
    if not harness.leases_expire:
        await clock.elapse(100.0)
        assert isinstance(await claim(store), InFlight)  # held until released
        return
    assert isinstance(await claim(store), InFlight)
    await clock.elapse(3.0)
    successor = await hold(store)
    assert await store.complete(lease, "from the dead", ttl=60.0) is False
    assert await store.complete(successor, "alive", ttl=60.0) is True


async def test_renewing_extends_the_lease_by_its_duration(
    store: IdempotencyStore, clock: Clock, harness: Harness
) -> None:
    lease = await hold(store, lease=3.0, unit=harness.unit)
    for _ in range(5):  # 5 units in all: past the first lease
        await clock.elapse(1.0)
        assert await store.renew(lease) is True
    await clock.elapse(1.0)
    assert isinstance(await claim(store), InFlight)
    assert await store.complete(lease, "v", ttl=60.0) is True


# -- scopes and keys -------------------------------------------------------------


TRICKY = [
    ("a:b", "c"),
    ("a", "b:c"),
    ("a", "b c"),
    ("a", "b\\c"),
    ("a", 'b"c'),
    ("a", "*"),
    ("a", "é" * 255),
    ("a", "🙂"),
    ("a ", "b"),
    ("a", "b "),
]


async def test_scopes_and_keys_never_collide(store: IdempotencyStore) -> None:
    leases = [await hold(store, key, scope=scope) for scope, key in TRICKY]
    for i, lease in enumerate(leases):
        assert await store.complete(lease, i, ttl=60.0)
    for i, (scope, key) in enumerate(TRICKY):
        assert await claim(store, key, scope=scope) == Completed(i, FP)
    assert isinstance(await claim(store, "c", scope="a"), Lease)


# -- wait -------------------------------------------------------------------------


async def test_wait_returns_at_once_for_a_key_not_in_flight(
    store: IdempotencyStore, clock: Clock, harness: Harness
) -> None:
    assert await store.wait(SCOPE, "free", timeout=5.0) is None
    lease = await hold(store)
    await store.complete(lease, "v", ttl=60.0)
    assert await store.wait(SCOPE, "k", timeout=5.0) == Completed("v", FP)
    assert clock() < 0.5 + harness.slack


async def test_wait_returns_the_record_when_the_holder_completes(
    store: IdempotencyStore, clock: Clock, harness: Harness
) -> None:
    lease = await hold(store)
    waited: list[tuple[object, float]] = []

    async def waiter() -> None:
        waited.append((await store.wait(SCOPE, "k", timeout=100.0 * harness.unit), clock()))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(waiter)
        await clock.elapse(5.0)
        await store.complete(lease, "done", ttl=60.0)
    assert [outcome for outcome, _ in waited] == [Completed("done", FP)] * 3
    assert all(5.0 <= at < 6.0 + harness.slack for _, at in waited), waited


async def test_wait_returns_none_when_the_holder_releases(
    store: IdempotencyStore, clock: Clock, harness: Harness
) -> None:
    lease = await hold(store)
    waited: list[tuple[object, float]] = []

    async def waiter() -> None:
        waited.append((await store.wait(SCOPE, "k", timeout=100.0 * harness.unit), clock()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await clock.elapse(5.0)
        await store.release(lease)
    ((outcome, at),) = waited
    assert outcome is None
    assert 5.0 <= at < 6.0 + harness.slack


async def test_wait_gives_up_after_its_timeout(
    store: IdempotencyStore, clock: Clock, harness: Harness
) -> None:
    lease = await hold(store, lease=100.0, unit=harness.unit)
    assert await store.wait(SCOPE, "k", timeout=3.0 * harness.unit) is None
    assert 3.0 <= clock() < 4.0 + harness.slack
    assert await store.renew(lease) is True


async def test_wait_notices_a_lease_that_lapses(
    store: IdempotencyStore, clock: Clock, harness: Harness
) -> None:
    if not harness.leases_expire:
        pytest.skip("claims on this store last until released")
    await hold(store, lease=3.0, unit=harness.unit)  # and its holder dies
    assert await store.wait(SCOPE, "k", timeout=100.0 * harness.unit) is None
    assert 3.0 <= clock() < 4.0 + harness.slack
    assert isinstance(await claim(store), Lease)


async def test_after_a_release_exactly_one_waiter_claims_the_key(
    store: IdempotencyStore, clock: Clock, harness: Harness
) -> None:
    lease = await hold(store)
    winners: list[Lease] = []

    async def waiter() -> None:
        while True:
            await store.wait(SCOPE, "k", timeout=100.0 * harness.unit)
            outcome = await claim(store)
            if isinstance(outcome, Lease):
                winners.append(outcome)
                return
            if isinstance(outcome, Completed):
                return

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(waiter)
        await clock.elapse(1.0)
        await store.release(lease)
        await clock.elapse(1.0)
        for _ in range(int(harness.slack * 10)):  # a real-time store may be late
            if winners:
                break
            await clock.elapse(0.1)
        assert len(winners) == 1
        await store.complete(winners[0], "v", ttl=60.0)
    assert len(winners) == 1
