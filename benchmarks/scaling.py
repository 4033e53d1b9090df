"""What grows, and what must not: cost per call and memory as sizes grow.

* a circuit breaker's window, 10 to 1,000,000 calls (and a `TimeWindow` cut
  into 10 to 100,000 buckets): cost per call flat, memory per breaker in
  proportion to the window (one bit per call);
* a bulkhead's queue, 10 to 100,000 parked waiters: the cost of a call that
  queues behind K others and is handed its slot, against ``asyncio.Semaphore``
  with the same K waiters;
* the idempotency store, 1,000 to 1,000,000 distinct keys: cost per call flat,
  and memory bounded by ``MemoryStore(max_entries=...)``;
* a per-key rate limiter, 1,000 to 1,000,000 keys held: cost per call flat
  (the key's bucket found in its table), memory in proportion to the keys.
"""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from prometheus_client import CollectorRegistry

import stalwart as sw

from ._harness import Call, Case, measure
from .hot_path import (
    UNREACHED_RATE,
    f,
    f_yielding,
    keyed,
    one_in_ten_fails,
    per_object,
    unique,
)

# -- circuit breaker: window size ---------------------------------------------


@dataclass
class WindowRow:
    window: str
    success: Case
    one_in_ten: Case
    bytes_per_breaker: float


def _window_label(window: sw.CountWindow | sw.TimeWindow) -> str:
    if isinstance(window, sw.CountWindow):
        return f"CountWindow({window.size:,})"
    return f"TimeWindow({window.seconds:g}, buckets={window.buckets:,})"


def breaker_windows(quick: bool) -> list[sw.CountWindow | sw.TimeWindow]:
    sizes = (10, 1_000) if quick else (10, 1_000, 100_000, 1_000_000)
    buckets = (10, 1_000) if quick else (10, 1_000, 100_000)
    windows: list[sw.CountWindow | sw.TimeWindow] = [sw.CountWindow(n) for n in sizes]
    windows += [sw.TimeWindow(60, buckets=b) for b in buckets]
    return windows


def breaker_scaling(*, quick: bool, rounds: int, calls: int, sample_ns: float) -> list[WindowRow]:
    telemetry = sw.Telemetry(registry=CollectorRegistry())
    rows = []
    for window in breaker_windows(quick):
        label = _window_label(window)

        def closed(window: sw.CountWindow | sw.TimeWindow = window) -> Call:
            return sw.CircuitBreaker(window=window, name=unique("breaker"), telemetry=telemetry)(f)

        def sometimes(window: sw.CountWindow | sw.TimeWindow = window) -> Call:
            return one_in_ten_fails(
                sw.CircuitBreaker(window=window, name=unique("breaker"), telemetry=telemetry)
            )

        size = window.size if isinstance(window, sw.CountWindow) else window.buckets * 24
        count = max(10, min(1000, 2_000_000 // size))

        def make(i: int, window: sw.CountWindow | sw.TimeWindow = window) -> object:
            return sw.CircuitBreaker(window=window, name=unique("breaker"), telemetry=telemetry)

        rows.append(
            WindowRow(
                label,
                Case(f"{label}: closed, success", closed),
                Case(f"{label}: 1 in 10 fails", sometimes),
                per_object(make, count),
            )
        )
    cases = [row.success for row in rows] + [row.one_in_ten for row in rows]
    asyncio.run(measure(cases, rounds=rounds, calls=calls, sample_ns=sample_ns))
    return rows


# -- bulkhead: parked waiters --------------------------------------------------


async def _with_waiters(
    guarded: Callable[[], Coroutine[Any, Any, Any]], waiting: int, calls: int
) -> float:
    """ns per call through one slot while ``waiting`` other calls are queued.

    ``waiting + 1`` tasks call ``guarded`` in a loop: one holds the slot (its
    call yields once), the others wait in line; each finished call hands the
    slot to the longest waiter and queues again at the back. Timing starts
    once every task has queued, so every timed call waits behind ``waiting``
    others.
    """
    done = 0
    started = ended = 0
    first = waiting + 1
    last = first + calls

    async def worker() -> None:
        nonlocal done, started, ended
        while done < last:
            await guarded()
            done += 1
            if done == first:
                started = time.perf_counter_ns()
            elif done == last:
                ended = time.perf_counter_ns()

    tasks = [asyncio.ensure_future(worker()) for _ in range(waiting + 1)]
    await asyncio.gather(*tasks)
    return (ended - started) / calls


def _semaphore_guard() -> Call:
    semaphore = asyncio.Semaphore(1)

    async def call() -> int:
        async with semaphore:
            return await f_yielding()

    return call


def _bulkhead_guard() -> Call:
    telemetry = sw.Telemetry(registry=CollectorRegistry())
    return sw.Bulkhead(1, max_queued=None, name=unique("bulkhead"), telemetry=telemetry)(f_yielding)


@dataclass
class QueueRow:
    waiting: int
    bulkhead_ns: float
    semaphore_ns: float


async def _queue_samples(waiting: int, rounds: int, calls: int) -> QueueRow:
    samples: dict[str, list[float]] = {"bulkhead": [], "semaphore": []}
    # Filling and draining the queue costs ~2 calls per waiter: one round is
    # plenty for the big queues (each still times `calls` calls).
    for _ in range(rounds if waiting <= 1_000 else 1):
        for name, make in (("bulkhead", _bulkhead_guard), ("semaphore", _semaphore_guard)):
            gc.collect()
            gc.disable()
            try:
                samples[name].append(await _with_waiters(make(), waiting, calls))
            finally:
                gc.enable()
    return QueueRow(
        waiting, statistics.median(samples["bulkhead"]), statistics.median(samples["semaphore"])
    )


def bulkhead_scaling(*, quick: bool, rounds: int, calls: int) -> list[QueueRow]:
    sizes = (10, 1_000) if quick else (10, 100, 1_000, 10_000, 100_000)
    return [asyncio.run(_queue_samples(waiting, rounds, calls)) for waiting in sizes]


# -- idempotency: distinct keys ------------------------------------------------


@dataclass
class KeysRow:
    keys: int
    first_ns: float  # first execution of each key, through a store bounded at BOUND
    bounded_bytes: int  # memory the bounded store holds after every key went through
    replay_ns: float  # replay of a stored key, from a store holding every key
    holding_bytes: int  # memory that store holds


BOUND = 10_000  # MemoryStore's default max_entries


def held_bytes(root: object) -> int:
    """Memory an object holds: ``sys.getsizeof`` summed over what it reaches.

    Each object is counted once; classes, modules and callables are shared
    by every instance rather than held, so the walk does not follow them.
    (On these stores this agrees with tracemalloc within 0.2%, and costs a
    fraction of tracing a million calls.)
    """
    seen = {id(root)}
    stack = list(gc.get_referents(root))
    total = sys.getsizeof(root)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, ModuleType)) or callable(obj):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def _idempotent(store: sw.MemoryStore) -> Callable[[str], Coroutine[Any, Any, int]]:
    telemetry = sw.Telemetry(registry=CollectorRegistry())
    return sw.Idempotency(key="key", store=store, telemetry=telemetry)(keyed)


async def _timed(guarded: Callable[[str], Coroutine[Any, Any, int]], names: list[str]) -> float:
    """ns per call of ``guarded(name)`` for each of ``names``."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for name in names:
            await guarded(name)
        return (time.perf_counter_ns() - start) / len(names)
    finally:
        gc.enable()


async def _one_size(keys: int, calls: int, rng: random.Random) -> KeysRow:
    names = [f"order-{i}" for i in range(keys)]
    # First executions through the default bound (a short run is repeated on
    # fresh stores, for a steadier median).
    repeats = max(1, min(5, 20_000 // keys))
    stores = [sw.MemoryStore(max_entries=BOUND) for _ in range(repeats)]
    first = statistics.median([await _timed(_idempotent(store), names) for store in stores])
    bounded_bytes = held_bytes(stores[-1])
    del stores
    # A store big enough for every key: replays, in random order.
    holding = sw.MemoryStore(max_entries=keys)
    guarded = _idempotent(holding)
    for name in names:
        await guarded(name)
    del names
    sample = [f"order-{rng.randrange(keys)}" for _ in range(min(calls, 20_000))]
    await _timed(guarded, sample[:100])
    replay = statistics.median([await _timed(guarded, sample) for _ in range(3)])
    return KeysRow(keys, first, bounded_bytes, replay, held_bytes(holding))


def idempotency_scaling(*, quick: bool, calls: int) -> list[KeysRow]:
    """Per number of distinct keys: first executions, replays, memory held."""
    sizes = (1_000, 10_000) if quick else (1_000, 10_000, 100_000, 1_000_000)
    rng = random.Random(0)
    return [asyncio.run(_one_size(keys, calls, rng)) for keys in sizes]


# -- rate limiter: keys held ---------------------------------------------------


@dataclass
class LimiterKeysRow:
    keys: int
    random_ns: float  # a call on a random key of those held
    same_ns: float  # a call on one key, over and over: the work without cache misses
    held_bytes: int  # memory the limiter's key table holds


async def _one_limiter(keys: int, calls: int, rng: random.Random) -> LimiterKeysRow:
    telemetry = sw.Telemetry(registry=CollectorRegistry())
    limiter = sw.RateLimiter(
        UNREACHED_RATE, key="key", max_keys=keys, name=unique("rate_limiter"), telemetry=telemetry
    )
    guarded = limiter(keyed)
    names = [f"user-{i}" for i in range(keys)]
    gc.disable()  # a million buckets made in a row: no collection needed, none wanted
    try:
        for name in names:
            await guarded(name)
    finally:
        gc.enable()
    # The key table (no public view of it): every key held, none dropped.
    table = limiter._keyed
    assert len(table) == keys, (len(table), keys)
    sample = [names[rng.randrange(keys)] for _ in range(min(calls, 20_000))]
    same = [names[0]] * len(sample)
    del names
    await _timed(guarded, sample[:100])
    random_ns = statistics.median([await _timed(guarded, sample) for _ in range(3)])
    same_ns = statistics.median([await _timed(guarded, same) for _ in range(3)])
    return LimiterKeysRow(keys, random_ns, same_ns, held_bytes(table))


def rate_limiter_scaling(*, quick: bool, calls: int) -> list[LimiterKeysRow]:
    """Per number of keys held by a ``RateLimiter(key=...)``, every call finding a permit."""
    sizes = (1_000, 10_000) if quick else (1_000, 10_000, 100_000, 1_000_000)
    rng = random.Random(0)
    return [asyncio.run(_one_limiter(keys, calls, rng)) for keys in sizes]
