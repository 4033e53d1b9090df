"""Success and failure paths of the primitives, against a bare ``await f()``."""

from __future__ import annotations

import asyncio
import functools
import itertools
import sys

import anyio

import stalwart as sw

from ._harness import Call, Case


async def f() -> int:
    return 1


async def raising() -> int:
    raise ValueError


def _fails_twice() -> Call:
    """Each logical call fails twice, then succeeds."""
    state = [0]

    async def g() -> int:
        state[0] += 1
        if state[0] % 3:
            raise ValueError
        return 1

    return g


def handwritten_three_tries() -> Call:
    g = _fails_twice()

    async def loop() -> object:
        for attempt in range(3):
            try:
                return await g()
            except ValueError:
                if attempt == 2:
                    raise
        raise AssertionError

    return loop


ZERO = sw.Backoff(initial=0.0, maximum=0.0)


async def keyed(key: str) -> int:
    return 1


def idempotency_replay() -> Call:
    """Every call replays: the harness's warm-up ran the one key once."""
    return functools.partial(sw.Idempotency(key="key")(keyed), "order-1")


def idempotency_first_execution() -> Call:
    """Every call runs and stores: the keys come round again only long after
    the default store (10,000 records) has evicted them."""
    keys = itertools.cycle([f"order-{i}" for i in range(50_000)])
    return sw.Idempotency(key=functools.partial(next, keys))(f)


def cases() -> list[Case]:
    result = [
        Case("bare await f()", lambda: f),
        Case("Retry, success", lambda: sw.Retry()(f), "bare await f()", 3),
        Case("Bulkhead, uncontended", lambda: sw.Bulkhead(8)(f), "bare await f()", 4),
        Case("Timeout", lambda: sw.Timeout(10)(f), "bare await f()", 25),
        Case(
            "Pipeline(Timeout, Retry, Bulkhead)",
            lambda: sw.Pipeline(sw.Timeout(10), sw.Retry(), sw.Bulkhead(8))(f),
            "bare await f()",
            30,
        ),
        Case("hand-written 3-try loop", handwritten_three_tries),
        Case(
            "Retry, fails twice then succeeds (zero backoff)",
            lambda: sw.Retry(attempts=3, backoff=ZERO)(_fails_twice()),
            "hand-written 3-try loop",
            4,
        ),
        Case("Idempotency, replay", idempotency_replay, "bare await f()", 15),
        Case(
            "Idempotency, first execution",
            idempotency_first_execution,
            "bare await f()",
            25,
            note="a fresh key each call; the full store evicts one record per call",
        ),
    ]
    if sys.version_info >= (3, 11):

        def with_asyncio_timeout() -> Call:
            async def call() -> int:
                async with asyncio.timeout(10):
                    return await f()

            return call

        result.append(Case("asyncio.timeout (for scale)", with_asyncio_timeout, "bare await f()"))

    def with_fail_after() -> Call:
        async def call() -> int:
            with anyio.fail_after(10):
                return await f()

        return call

    result.append(Case("anyio.fail_after (for scale)", with_fail_after, "bare await f()"))
    return result
