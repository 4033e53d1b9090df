"""A short trio section: the same policies on trio, in one ``trio.run``.

Each against a bare ``await f()`` on trio, and against trio's own
equivalents (and the peers that run on trio: tenacity and stamina).
"""

from __future__ import annotations

import functools
from typing import Any, Final

import anyio
import trio

import stalwart as sw

from ._harness import Call, Case, measure
from .hot_path import f, unique
from .peer_cases import CHECKPOINT, RETRY_NAMES, installed, retrying

BARE_TRIO: Final = "bare await f() (trio)"
RETRY: Final = "trio: Retry, success"
TIMEOUT: Final = "trio: Timeout"
BULKHEAD: Final = "trio: Bulkhead, uncontended"
CLOSED: Final = "trio: CircuitBreaker closed, success"
GROUPS: Final = (RETRY, CLOSED, BULKHEAD, TIMEOUT)


def _limited(limiter: Any) -> Call:
    async def call() -> int:
        async with limiter:
            return await f()

    return call


def _trio_fail_after() -> Call:
    async def call() -> int:
        with trio.fail_after(10):
            return await f()

    return call


def _anyio_fail_after() -> Call:
    async def call() -> int:
        with anyio.fail_after(10):
            return await f()

    return call


def _retried(library: str) -> Call:
    return retrying(library, wait=True)(f)


def cases() -> list[Case]:
    result = [
        Case(BARE_TRIO, lambda: f),
        Case("Retry, success (trio)", lambda: sw.Retry()(f), BARE_TRIO, group=RETRY),
        Case(
            "CircuitBreaker closed, success (trio)",
            lambda: sw.CircuitBreaker(name=unique("breaker"))(f),
            BARE_TRIO,
            group=CLOSED,
        ),
        Case(
            "Bulkhead, uncontended (trio)",
            lambda: sw.Bulkhead(8, name=unique("bulkhead"))(f),
            BARE_TRIO,
            group=BULKHEAD,
        ),
        Case(
            "trio.CapacityLimiter(8)",
            lambda: _limited(trio.CapacityLimiter(8)),
            BARE_TRIO,
            group=BULKHEAD,
            library="trio",
            note=CHECKPOINT,
        ),
        Case(
            "trio.Semaphore(8)",
            lambda: _limited(trio.Semaphore(8)),
            BARE_TRIO,
            group=BULKHEAD,
            library="trio",
            note=CHECKPOINT,
        ),
        Case(
            "anyio.CapacityLimiter(8) (trio)",
            lambda: _limited(anyio.CapacityLimiter(8)),
            BARE_TRIO,
            group=BULKHEAD,
            library="anyio",
            note=CHECKPOINT,
        ),
        Case("Timeout (trio)", lambda: sw.Timeout(10)(f), BARE_TRIO, group=TIMEOUT),
        Case("trio.fail_after(10)", _trio_fail_after, BARE_TRIO, group=TIMEOUT, library="trio"),
        Case(
            "anyio.fail_after(10) (trio)",
            _anyio_fail_after,
            BARE_TRIO,
            group=TIMEOUT,
            library="anyio",
        ),
    ]
    result += [
        Case(
            f"{RETRY_NAMES[library][0]} (trio)",
            functools.partial(_retried, library),
            BARE_TRIO,
            group=RETRY,
            library=library,
        )
        for library in ("tenacity", "stamina")  # the retrying peers that run on trio
        if installed(library)
    ]
    return result


def run(built: list[Case], *, rounds: int, calls: int, sample_ns: float) -> None:
    async def main() -> None:
        await measure(built, rounds=rounds, calls=calls, sample_ns=sample_ns)

    trio.run(main)
