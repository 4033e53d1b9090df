"""What sharing state through Redis costs: breakers (nothing), idempotency and rate limits.

python benchmarks/redis_store.py                # full run, against REDIS_URL (default local)
python benchmarks/redis_store.py --quick        # a few seconds, for smoke tests
python benchmarks/redis_store.py --only-fleet   # part 4 alone
python benchmarks/redis_store.py --output /tmp/redis.md   # write the report there

Prints a Markdown report: the run's conditions (the machine, Redis's version
and where it is), then a table per part. A full run also writes it to
``benchmarks/results/redis-YYYY-MM-DD-<machine>.md`` (any run given
``--output``, there).

Part 1 times a breaker's success path and its open rejection with
``store=RedisStore(...)`` against the same breaker with its state in process,
interleaved in one run (``_harness``): a breaker never asks its store to admit
a call, so the budget is 1.5x and the expectation 1.0x.

Part 2 measures idempotency against the real Redis: round trips per call
(counted on the connection), latency of one call at a time, and throughput
with many calls in flight, for replays and first executions.

Part 3 does the same for a rate limiter shared through Redis: a call let
through at once, one that waits for its turn and one refused are each one
round trip (``gcra.lua``).

Part 4 times the fleet-wide limits' success path, ``Retry(budget=
RetryBudget(store=...))`` and ``Bulkhead(store=...)``, against the same
policies in process (budget 1.5x: a call makes no round trip, the store is
talked to from a task of the policy's own), and counts the round trips per
call over a second of calls (the budget's exchanges, the bulkhead's first
batch and renewals). Everything is written under a fresh prefix and deleted
afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stalwart as sw
from benchmarks import _harness, report
from benchmarks._harness import Call, Case
from stalwart._circuit_store import InProcessCircuitStore
from stalwart.redis import RedisStore

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
RESULTS = Path(__file__).resolve().parent / "results"


async def f() -> int:
    return 1


# Each breaker has a name of its own: two live breakers of one name on one
# registry would merge their series (and warn), unless they share a store.


def _success(store: Any, name: str) -> Call:
    breaker = sw.CircuitBreaker(name=name, store=store)
    return breaker(f)


def _rejection(store: Any, name: str) -> Call:
    breaker = sw.CircuitBreaker(name=name, store=store)
    guarded = breaker(f)
    breaker.force_open()

    async def call() -> None:
        try:  # noqa: SIM105 - measure the raise alone
            await guarded()
        except sw.CircuitOpenError:
            pass

    return call


def breaker_cases(store: RedisStore) -> list[Case]:
    return [
        Case("await f()", lambda: f),
        Case("breaker, success, state in process", lambda: _success(None, "bench"), "await f()"),
        Case(
            "breaker, success, InProcessCircuitStore",
            lambda: _success(InProcessCircuitStore(), "bench-in-process-store"),
            "breaker, success, state in process",
            1.5,
        ),
        Case(
            "breaker, success, RedisStore",
            lambda: _success(store, "bench-redis"),
            "breaker, success, state in process",
            1.5,
            "no I/O: the state is read from the breaker's memory",
        ),
        Case("breaker, open rejection, state in process", lambda: _rejection(None, "bench-open")),
        Case(
            "breaker, open rejection, RedisStore",
            lambda: _rejection(store, "bench-open-redis"),
            "breaker, open rejection, state in process",
            1.5,
            "no I/O either",
        ),
    ]


def _with_budget(store: Any) -> Call:
    budget = sw.RetryBudget(store=store, name="bench-budget") if store else sw.RetryBudget()
    return sw.Retry(budget=budget)(f)


def _bulkhead(store: Any) -> Call:
    if store is None:
        return sw.Bulkhead(8, name="bench-bulkhead-local")(f)
    return sw.Bulkhead(8, store=store, name="bench-bulkhead")(f)


def fleet_cases(store: RedisStore) -> list[Case]:
    return [
        Case("await f()", lambda: f),
        Case(
            "Retry(budget=RetryBudget()), success",
            lambda: _with_budget(None),
            "await f()",
        ),
        Case(
            "Retry(budget=RetryBudget(store=RedisStore)), success",
            lambda: _with_budget(store),
            "Retry(budget=RetryBudget()), success",
            1.5,
            "no round trip: counted locally, exchanged every sync_interval",
        ),
        Case("Bulkhead(8), uncontended", lambda: _bulkhead(None), "await f()"),
        Case(
            "Bulkhead(8, store=RedisStore), uncontended",
            lambda: _bulkhead(store),
            "Bulkhead(8), uncontended",
            1.5,
            "no round trip: a permit of the batch the process holds",
        ),
    ]


async def fleet_round_trips(store: RedisStore, *, seconds: float) -> list[tuple[str, int, int]]:
    """(policy, calls, round trips) over ``seconds`` of calls, yielding to the loop between.

    ``store`` must be on a counting client (`_Counting`).
    """
    rows = []
    for label, call in (
        ("Retry(budget=RetryBudget(store=RedisStore)), success", _with_budget(store)),
        ("Bulkhead(8, store=RedisStore), uncontended", _bulkhead(store)),
    ):
        before, calls = _Counting.writes, 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(10):
                await call()
            calls += 10
            await asyncio.sleep(0)  # let the policy's own task run, as a service would
        rows.append((label, calls, _Counting.writes - before))
    return rows


def fleet_report(rows: list[tuple[str, int, int]]) -> str:
    lines = [
        "| fleet-wide limit, success path | calls | round trips | calls per round trip |",
        "|---|---:|---:|---:|",
    ]
    for label, calls, trips in rows:
        per = f"{calls / trips:,.0f}" if trips else "no round trip"
        lines.append(f"| {label} | {calls:,} | {trips} | {per} |")
    return "\n".join(lines)


class _Counting(redis.asyncio.Connection):
    """Counts what is written to Redis: one write per round trip."""

    writes = 0

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        _Counting.writes += 1
        await super().send_packed_command(command, check_health)


async def _round_trips(call: Callable[[], Coroutine[Any, Any, Any]]) -> int:
    before = _Counting.writes
    await call()
    return _Counting.writes - before


async def _latency_us(call: Callable[[int], Coroutine[Any, Any, Any]], n: int) -> float:
    samples = []
    for i in range(n):
        start = time.perf_counter_ns()
        await call(i)
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000.0


async def _throughput(
    call: Callable[[int], Coroutine[Any, Any, Any]], total: int, concurrency: int
) -> float:
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            await call(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - start)


async def idempotency_report(store: RedisStore, *, n: int, concurrency: int) -> str:
    memory = sw.MemoryStore(max_entries=10 * n + 100)

    async def handler(key: str) -> dict[str, int]:
        return {"status": 200}

    on_redis = sw.Idempotency(key="key", store=store)(handler)
    in_memory = sw.Idempotency(key="key", store=memory)(handler)
    run = uuid.uuid4().hex
    await on_redis("replayed")
    await in_memory("replayed")
    rows = [
        "| idempotency, against Redis | round trips | median latency | throughput "
        f"({concurrency} in flight) |",
        "|---|---:|---:|---:|",
    ]
    first = await _round_trips(lambda: on_redis(f"{run}-probe"))
    replay = await _round_trips(lambda: on_redis(f"{run}-probe"))

    async def redis_first(i: int, tag: str = "") -> Any:
        return await on_redis(f"{run}{tag}-{i}")

    async def redis_replay(i: int) -> Any:
        return await on_redis("replayed")

    async def memory_first(i: int) -> Any:
        return await in_memory(f"{run}-{i}")

    async def memory_replay(i: int) -> Any:
        return await in_memory("replayed")

    for label, trips, call, call_many in [
        (
            "first execution (claim, run, store)",
            first,
            redis_first,
            lambda i: redis_first(i, "-many"),
        ),
        ("replay", replay, redis_replay, redis_replay),
    ]:
        latency = await _latency_us(call, n)
        rate = await _throughput(call_many, 5 * n, concurrency)
        rows.append(f"| {label} | {trips} | {latency:,.0f} µs | {rate:,.0f} calls/s |")
    for label, call in [
        ("for scale: MemoryStore, first execution", memory_first),
        ("for scale: MemoryStore, replay", memory_replay),
    ]:
        latency = await _latency_us(call, n)
        rate = await _throughput(call, 5 * n, concurrency)
        rows.append(f"| {label} | 0 | {latency:,.2f} µs | {rate:,.0f} calls/s |")
    return "\n".join(rows)


async def rate_limiter_report(store: RedisStore, *, n: int, concurrency: int) -> str:
    async def body() -> int:
        return 1

    # Names of their own: three limits, one per row.
    at_once = sw.RateLimiter(10**9, name="bench-at-once", store=store)(body)
    waiting = sw.RateLimiter(2000, burst=1, max_wait=1.0, name="bench-waits", store=store)(body)
    refusing = sw.RateLimiter(1, per=3600, name="bench-refused", store=store)(body)
    in_process = sw.RateLimiter(10**9, name="bench-in-process")(body)
    await refusing()  # its one permit in the hour

    async def refused() -> None:
        try:  # noqa: SIM105 - measure the refusal alone
            await refusing()
        except sw.RateLimitExceeded:
            pass

    rows = [
        "| rate limiter, against Redis | round trips | median latency | throughput "
        f"({concurrency} in flight) |",
        "|---|---:|---:|---:|",
    ]

    def indexed(call: Callable[[], Coroutine[Any, Any, Any]]) -> Callable[[int], Any]:
        return lambda i: call()

    calls: list[tuple[str, Callable[[], Coroutine[Any, Any, Any]]]] = [
        ("let through at once", at_once),
        ("waits for its turn (2,000 a second, one at a time)", waiting),
        ("refused", refused),
    ]
    for label, call in calls:
        await call()
        trips = await _round_trips(call)
        latency = await _latency_us(indexed(call), n)
        rate = await _throughput(indexed(call), 5 * n, concurrency)
        rows.append(f"| {label} | {trips} | {latency:,.0f} µs | {rate:,.0f} calls/s |")
    latency = await _latency_us(indexed(in_process), n)
    rate = await _throughput(indexed(in_process), 5 * n, concurrency)
    rows.append(
        f"| for scale: in process, let through | 0 | {latency:,.2f} µs | {rate:,.0f} calls/s |"
    )
    return "\n".join(rows)


def _run_table(server: str, *, rounds: int, calls: int, n: int, concurrency: int) -> str:
    """The run's conditions: where Redis is, the versions, the run's size."""
    url = urlsplit(REDIS_URL)
    where = f"{url.hostname}:{url.port or 6379}"
    if url.hostname in ("127.0.0.1", "localhost", "::1"):
        where += ", on this machine (loopback)"
    return "\n".join(
        [
            "| | |",
            "|---|---|",
            f"| date | {date.today().isoformat()} |",
            f"| machine | {report.cpu_model()}, {os.cpu_count()} cores ({platform.machine()}, "
            f"{platform.system()} {platform.release()}) |",
            f"| Python | {platform.python_version()} ({platform.python_implementation()}) |",
            f"| stalwart | {sw.__version__} |",
            f"| Redis | {server} at {where}; redis-py {redis.__version__} |",
            f"| timed rows | {rounds} interleaved rounds of {calls:,} calls; medians |",
            f"| Redis rows | latency: median of {n:,} calls one at a time; throughput: "
            f"{5 * n:,} calls, {concurrency} in flight |",
        ]
    )


BREAKERS = (
    "A breaker reads its state from its own memory and never asks its store to "
    "admit a call: the success path and the open rejection with the state in "
    "Redis, against the same breaker with its state in process (budget 1.5x, "
    "expected 1.0x)."
)
ROUND_TRIPS = (
    "*round trips*: the commands one call writes to Redis, counted on the "
    "store's connections (after a first call, which loads the scripts), not "
    "estimated. Latency and throughput are those of a Redis on the same "
    "machine: over a network, each round trip adds the network's."
)
RATE_LIMITS = (
    "Each call is one round trip (`gcra.lua`, on Redis's clock), whether it "
    "is let through at once, waits for its turn (the wait is in its latency) "
    "or is refused."
)
FLEET = (
    "`Retry(budget=RetryBudget(store=...))` and `Bulkhead(store=...)` make no "
    "round trip on a call: the budget is counted locally and exchanged every "
    "`sync_interval`, the bulkhead's permits leased in batches and renewed "
    "from a task of the policy's own (budget 1.5x their in-process selves). "
    "Then the round trips over a run of calls, counted as above: a few in "
    "all, whatever the number of calls."
)


async def _fleet_sections(store: RedisStore, rounds: int, calls: int, seconds: float) -> list[str]:
    cases = fleet_cases(store)
    await _harness.measure(cases, rounds=rounds, n=calls)
    trips = fleet_report(await fleet_round_trips(store, seconds=seconds))
    return [
        "### Fleet-wide limits, success path",
        _harness.table(cases),
        trips,
        FLEET,
    ]


async def _delete(client: redis.asyncio.Redis, prefix: str) -> None:
    doomed = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
    for start in range(0, len(doomed), 1000):
        await client.delete(*doomed[start : start + 1000])


async def _main(
    rounds: int, calls: int, n: int, concurrency: int, seconds: float, *, only_fleet: bool
) -> str:
    """The report: the run's conditions, then each part, as Markdown."""
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    # Its own client, whose connections count what they send: the breakers'
    # store follows their state on a connection of its own, not counted.
    counted = redis.asyncio.Redis.from_url(REDIS_URL, connection_class=_Counting)
    prefix = f"stalwart-bench:{uuid.uuid4().hex}:"
    server = (await client.info("server"))["redis_version"]
    out = [
        "### The run",
        _run_table(f"Redis {server}", rounds=rounds, calls=calls, n=n, concurrency=concurrency),
    ]
    try:
        if not only_fleet:
            async with RedisStore(client, prefix=prefix) as store:
                cases = breaker_cases(store)
                await _harness.measure(cases, rounds=rounds, n=calls)
            out += ["### Breakers, state in Redis", _harness.table(cases), BREAKERS]
            idempotency = RedisStore(counted, prefix=prefix)
            table = await idempotency_report(idempotency, n=n, concurrency=concurrency)
            await idempotency.aclose()
            out += ["### Idempotency against Redis", table, ROUND_TRIPS]
            limits = RedisStore(counted, prefix=prefix)
            table = await rate_limiter_report(limits, n=n, concurrency=concurrency)
            await limits.aclose()
            out += ["### Rate limiter against Redis", table, RATE_LIMITS]
        fleet = RedisStore(counted, prefix=prefix)
        out += await _fleet_sections(fleet, rounds, calls, seconds)
        await fleet.aclose()
    finally:
        await _delete(client, prefix)
        await client.aclose()
        await counted.aclose()
    return "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, to check it works")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight")
    parser.add_argument(
        "--only-fleet", action="store_true", help="only part 4: the fleet-wide limits"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="write the report here (a full run: benchmarks/results/redis-<date>-<machine>.md)",
    )
    args = parser.parse_args(argv)
    rounds, calls, n, seconds = (3, 200, 50, 0.2) if args.quick else (15, 20_000, 2_000, 1.0)
    text = asyncio.run(
        _main(rounds, calls, n, args.concurrency, seconds, only_fleet=args.only_fleet)
    )
    print(text, end="")
    output: Path | None = args.output
    if output is None and not (args.quick or args.only_fleet):
        # Not date-first: the docs show the newest ``[0-9]*.md`` as the suite's report.
        output = RESULTS / f"redis-{report.result_stem()}.md"
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        print(f"written: {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
