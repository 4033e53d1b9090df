"""LoadShedMiddleware on a real uvicorn server, under load from several client processes.

The app stands for a service with a finite capacity whose latency grows with
its load: ``CAPACITY`` requests are served at once, ``SERVICE`` seconds each,
and the others wait their turn. Three client processes offer twice what it
can serve, open loop, for ``DURATION`` seconds. Without shedding, every
request is admitted and waits: the queue, and latency with it, grows for as
long as the surge lasts. Behind `LoadShedMiddleware` with a
`ConcurrencyLimit`, the excess is refused at once with a 503 and the
requests admitted are served in a bounded time. (The limit starts at 4, under
four times the capacity, so that its first probe of the unloaded latency
finds no queue: see the explanation page on adaptive limits.)

The figures are printed (``pytest -s`` shows them, as does a failure). The
assertions compare the two runs, never a latency with a fixed bound, so that
the test holds on a loaded two-core machine (where the clients and the
server also wait for the CPU, which no middleware can shed): the shedding
server's median must be under half the other's, and its p99 under the
other's.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.asgi import LoadShedMiddleware, Receive, Scope, Send

from .http_support import respond, serve
from .redis_support import WorkerProcess

pytestmark = pytest.mark.realtime

CAPACITY = 2  # requests served at once
SERVICE = 0.05  # seconds each: 40 requests a second at most
RATE = 80.0  # offered, requests a second, in all
CLIENTS = 3  # processes
DURATION = 6.0  # seconds of load
TIMEOUT = 30.0  # a client's patience: longer than any queue here can grow


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


def resource() -> Any:
    """The service: ``CAPACITY`` slots, ``SERVICE`` seconds per request, a FIFO line for them."""
    slots = asyncio.Semaphore(CAPACITY)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        async with slots:
            await asyncio.sleep(SERVICE)
        await respond(send, 200, b"served")

    return app


@dataclass
class Figures:
    """What the clients saw."""

    served: list[float]  # latencies of the 200s, seconds
    refused: int  # 503s
    failed: int  # anything else (no answer in time, an error)

    @property
    def p99(self) -> float:
        ordered = sorted(self.served)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]

    @property
    def p50(self) -> float:
        ordered = sorted(self.served)
        return ordered[max(0, math.ceil(0.5 * len(ordered)) - 1)]

    def describe(self) -> str:
        total = len(self.served) + self.refused + self.failed
        return (
            f"{total} requests: {len(self.served)} served (p50 {self.p50 * 1000:.0f} ms, "
            f"p99 {self.p99 * 1000:.0f} ms), {self.refused} refused with 503, "
            f"{self.failed} failed"
        )


@contextmanager
def clients() -> Iterator[list[WorkerProcess]]:
    """``CLIENTS`` load generator processes (started once: starting Python takes seconds)."""
    workers = [
        WorkerProcess(
            "tests.load_generator",
            str(RATE / CLIENTS),
            str(DURATION),
            str(TIMEOUT),
            timeout=DURATION + TIMEOUT + 30.0,
        )
        for _ in range(CLIENTS)
    ]
    try:
        yield workers
    finally:
        for worker in workers:
            worker.kill()


async def load(workers: list[WorkerProcess], app: Any) -> Figures:
    """Serve ``app`` and offer it the surge from every client process at once."""
    with serve(app) as url:
        for seed, worker in enumerate(workers):
            worker.send(json.dumps({"url": url + "/", "seed": seed}))
        results = [status for worker in workers for status in (await worker.read())["results"]]
    return Figures(
        served=[seconds for status, seconds in results if status == 200],
        refused=sum(1 for status, _ in results if status == 503),
        failed=sum(1 for status, _ in results if status not in (200, 503)),
    )


async def test_shedding_keeps_the_p99_of_admitted_requests_bounded_where_queueing_collapses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    telemetry = sw.Telemetry(registry=CollectorRegistry())
    limit = sw.ConcurrencyLimit(initial=4, name="server", telemetry=telemetry)
    with clients() as workers:
        for worker in workers:
            assert (await worker.read()) == {"ready": True}
        shed = await load(workers, LoadShedMiddleware(resource(), limit=limit))
        queued = await load(workers, resource())
    with capsys.disabled():
        print(f"\n  offered {RATE:g}/s to a service of {CAPACITY / SERVICE:g}/s for {DURATION:g} s")
        print(f"  behind LoadShedMiddleware(ConcurrencyLimit(initial=4)): {shed.describe()}")
        print(f"  without it:                                             {queued.describe()}")
    # Without shedding, everything is admitted and the line only grows.
    assert queued.refused == 0
    assert queued.p99 > 1.5
    # With it, the excess is refused and what is admitted is served in time.
    assert shed.refused > 0.2 * (len(shed.served) + shed.refused)
    assert shed.failed == 0
    assert 2 * shed.p50 < queued.p50
    assert shed.p99 < queued.p99
    assert limit.in_flight == 0
