"""Several Python processes sharing one rate limit through Redis, their clocks skewed or not.

The module starts three worker processes once (``python -m
tests.test_rate_limit_processes URL``). Each test gives them a prefix of
its own and a skew for their event loop's clock; on ``go`` they all call
one limiter (the same ``name``, rate and burst) as fast as it lets them for
two seconds, and report when each turn they were granted came, on Redis's
clock. Together, the turns must keep to the one limit: the bound of
``stalwart._gcra`` between any two of them, and at most ``burst + rate``
calls in any second.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio

import stalwart as sw
from stalwart.redis import RedisStore

from . import redis_support
from .test_rate_limit_redis import Recording

pytestmark = [pytest.mark.redis, pytest.mark.realtime]

RATE = 20
BURST = 5
SECONDS = 2.0
WORKERS = 3


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


class Worker(redis_support.WorkerProcess):
    def __init__(self) -> None:
        super().__init__("tests.test_rate_limit_processes", redis_support.REDIS_URL, timeout=30.0)


@pytest.fixture(scope="module")
def workers() -> Iterator[list[Worker]]:
    redis_support.require_redis()
    started = [Worker() for _ in range(WORKERS)]
    yield started
    for worker in started:
        worker.kill()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    chosen = redis_support.unique_prefix()
    yield chosen
    client = redis_support.client()
    await redis_support.delete_prefix(client, chosen)
    await client.aclose()


@pytest.mark.parametrize(
    "skews",
    [(0.0, 0.0, 0.0), (-7200.0, 0.0, 7200.0)],
    ids=["same clocks", "clocks hours apart"],
)
async def test_processes_keep_to_one_limit_together(
    workers: list[Worker], prefix: str, skews: tuple[float, ...]
) -> None:
    for worker, skew in zip(workers, skews, strict=True):
        worker.send(json.dumps({"prefix": prefix, "skew": skew}))
    for worker in workers:
        assert await worker.read() == {"ready": True}
    for worker in workers:
        worker.send("go")
    reports = [await worker.read() for worker in workers]
    turns = sorted(turn for report in reports for turn in report["turns"])
    interval = 1.0 / RATE
    # Every process was granted turns, and kept asking (it was refused too).
    assert all(report["turns"] and report["refused"] for report in reports), reports
    assert all(report["store_unavailable"] == 0 for report in reports), reports
    # The bound, between any two turns of the fleet. The turns are Redis's
    # clock in seconds since the epoch (about 1.8e9), where a float is exact
    # to 2.4e-7 s only: a difference of two may be off by 5e-7 s, which is
    # 1e-5 of a turn here. Hence a slack of 10 µs, a five-thousandth of a turn.
    for a in range(len(turns)):
        for b in range(a, len(turns)):
            assert b - a + 1 <= BURST + (turns[b] - turns[a] + 1e-5) / interval
    # What passed per second: never more than one limit's worth.
    first = turns[0]
    per_second = [0] * (int(turns[-1] - first) + 1)
    for turn in turns:
        per_second[int(turn - first)] += 1
    assert max(per_second) <= BURST + RATE, per_second
    # One limit, not one per process: about burst + rate * seconds in all.
    span = turns[-1] - first
    assert len(turns) <= BURST + span * RATE + 1e-6
    assert len(turns) >= RATE * (SECONDS - 0.5), (len(turns), per_second)


# -- the worker --------------------------------------------------------------------------------


class Skewed(asyncio.SelectorEventLoop):
    """An event loop whose clock is ``skew`` seconds off the others'."""

    def __init__(self, skew: float) -> None:
        super().__init__()
        self.skew = skew

    def time(self) -> float:
        return super().time() + self.skew


async def _call(url: str, prefix: str) -> dict[str, Any]:
    client = redis.asyncio.Redis.from_url(url)
    store = RedisStore(client, prefix=prefix)
    recording = Recording(store)
    limiter = sw.RateLimiter(RATE, burst=BURST, name="fleet", store=recording)

    @limiter
    async def call() -> None:
        pass

    print(json.dumps({"ready": True}), flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    assert line.strip() == "go"
    loop = asyncio.get_running_loop()
    end = loop.time() + SECONDS
    refused = 0
    while loop.time() < end:
        try:
            await call()
        except sw.RateLimitExceeded as exc:
            refused += 1
            await asyncio.sleep(min(exc.retry_after or 0.0, 0.01))
    await store.aclose()
    await client.aclose()
    return {
        "turns": recording.turns,
        "refused": refused,
        "store_unavailable": limiter.metrics.store_unavailable,  # type: ignore[attr-defined]
    }


def main(url: str) -> None:
    for line in sys.stdin:
        command = json.loads(line)
        with asyncio.Runner(loop_factory=functools.partial(Skewed, command["skew"])) as runner:
            report = runner.run(_call(url, command["prefix"]))
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
