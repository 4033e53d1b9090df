"""The peers: what users would otherwise pick, configured as stalwart's cases are.

Every peer row is the closest equivalent of a stalwart case, found in the
peer's own source (the versions pinned in ``benchmarks/requirements.txt``):

* retries: 3 tries in all, retrying on ``Exception``; on the success path an
  exponential backoff with jitter (never used), on the failure path no wait
  at all. Logging hooks are off (stalwart logs nothing), metric hooks stay on
  (stalwart counts retries too).
* breakers: closed, or open for an hour (so no trial call happens during the
  run); a rejection is caught, as the caller of an open breaker must.
* bulkheads: as many slots and as much queue room as stalwart's.
* timeouts: 10 seconds, never reached.
* rate limiters: a rate no run reaches (every call finds a permit), one key.

The ten libraries from PyPI are optional: each one missing is skipped with
a note (`missing`), so the suite also runs where only stalwart's development
dependencies are installed. ``asyncio``, ``anyio`` and ``trio`` are always
there (stalwart depends on anyio; trio is a development dependency).

Peers are imported as untyped modules (`load`): the type checker runs where
they are not installed, and their calls are checked by running them.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Final

import anyio

from ._harness import Call, Case
from .hot_path import (
    BARE,
    BARE_SYNC,
    BULKHEAD,
    CLOSED,
    CONTENDED,
    HAND_LOOP,
    OPEN,
    PER_TASK,
    PIPELINE,
    RAISE,
    RAISE_SYNC,
    RATE_LIMITER,
    RETRY,
    RETRY_FAILING,
    SLOTS,
    TASKS,
    TIMEOUT,
    UNLIMITED,
    UNREACHED_RATE,
    caught,
    caught_sync,
    contended,
    f,
    f_yielding,
    fails_twice,
    g,
    g_raising,
    per_object,
    raising,
)

# The libraries from PyPI, by import name (each is also its distribution name).
OPTIONAL: Final = (
    "tenacity",
    "stamina",
    "backoff",
    "hyx",
    "aiobreaker",
    "purgatory",
    "circuitbreaker",
    "pybreaker",
    "aiolimiter",
    "limits",
)

OPEN_FOR: Final = 3600  # seconds: no breaker half-opens during a run


# The limiters of anyio and trio checkpoint on every acquire.
CHECKPOINT = (
    "acquiring yields to the scheduler (a checkpoint) even with a slot free; "
    "stalwart's Bulkhead does not"
)


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def missing() -> list[str]:
    return [name for name in OPTIONAL if not installed(name)]


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load(name: str) -> Any:
    """Import an optional peer, typed as ``Any`` (see the module's docstring)."""
    return importlib.import_module(name)


async def open_by_failing(call: Call, times: int = 5) -> None:
    """Make ``times`` failing calls, so that a consecutive-failures breaker opens."""
    for _ in range(times):
        try:  # noqa: SIM105
            await call()
        except ValueError:
            pass


async def rejects(guarded: Call, error: type[Exception]) -> None:
    """Check that ``guarded`` raises ``error``: a row never times something else."""
    try:
        await guarded()
    except error:
        return
    raise AssertionError(f"{guarded!r} did not raise {error.__name__}: the breaker is not open")


# -- retry -----------------------------------------------------------------

Wrap = Callable[[Callable[[], Coroutine[Any, Any, Any]]], Call]
RETRIES: Final = ("tenacity", "stamina", "backoff", "hyx")


def retrying(library: str, *, wait: bool) -> Wrap:
    """``library``'s decorator for 3 tries in all, retrying on ``Exception``.

    With ``wait``, its exponential backoff with jitter (stalwart's default
    kind); without, no wait at all between tries.
    """
    if library == "tenacity":
        tenacity = load("tenacity")
        waits = (
            tenacity.wait_random_exponential(multiplier=0.1, max=10)
            if wait
            else tenacity.wait_none()
        )
        return tenacity.retry(  # type: ignore[no-any-return]
            stop=tenacity.stop_after_attempt(3), wait=waits, reraise=True
        )
    if library == "stamina":
        stamina = load("stamina")
        if wait:
            return stamina.retry(on=Exception, attempts=3, timeout=None)  # type: ignore[no-any-return]
        return stamina.retry(  # type: ignore[no-any-return]
            on=Exception, attempts=3, timeout=None, wait_initial=0, wait_max=0, wait_jitter=0
        )
    if library == "backoff":
        backoff = load("backoff")
        if wait:
            return backoff.on_exception(  # type: ignore[no-any-return]
                backoff.expo, Exception, max_tries=3, factor=0.1, max_value=10, logger=None
            )
        return backoff.on_exception(  # type: ignore[no-any-return]
            backoff.constant, Exception, max_tries=3, interval=0, jitter=None, logger=None
        )
    if library == "hyx":
        retry = load("hyx.retry").retry
        expo = load("hyx.retry.backoffs").expo
        # hyx's ``attempts`` counts retries: attempts=2 is 3 tries in all.
        backoff_ = expo(min_delay_secs=0.1, max_delay_secs=10) if wait else 0
        return retry(on=Exception, attempts=2, backoff=backoff_)  # type: ignore[no-any-return]
    raise ValueError(f"no retry decorator for {library!r}")


RETRY_NAMES: Final = {
    "tenacity": (
        "tenacity: @retry(stop_after_attempt(3))",
        "tenacity: @retry(stop_after_attempt(3), wait_none())",
    ),
    "stamina": (
        "stamina: @retry(on=Exception, attempts=3)",
        "stamina: @retry(..., wait_initial=0, wait_max=0, wait_jitter=0)",
    ),
    "backoff": (
        "backoff: @on_exception(expo, max_tries=3)",
        "backoff: @on_exception(constant, max_tries=3, interval=0)",
    ),
    "hyx": ("hyx: @retry(attempts=2)", "hyx: @retry(attempts=2, backoff=0)"),
}

RETRY_NOTES: Final = {
    "tenacity": ("copies its Retrying object on every call", ""),
    "stamina": ("on tenacity", "Prometheus hook on, logging hook off"),
    "backoff": ("logger=None", "logger=None"),
    "hyx": ("attempts=2: 3 tries", "attempts=2: 3 tries"),
}


def retry_cases(library: str) -> list[Case]:
    success, failing = RETRY_NAMES[library]
    success_note, failing_note = RETRY_NOTES[library]
    zero = "sleeps 0 s between tries: a trip through the event loop"
    return [
        Case(
            success,
            lambda: retrying(library, wait=True)(f),
            BARE,
            group=RETRY,
            library=library,
            note=success_note,
        ),
        Case(
            failing,
            lambda: retrying(library, wait=False)(fails_twice()),
            HAND_LOOP,
            group=RETRY_FAILING,
            library=library,
            note=f"{failing_note}; {zero}" if failing_note else zero,
        ),
    ]


# -- circuit breakers ----------------------------------------------------------


def aiobreaker_cases() -> list[Case]:
    aiobreaker = load("aiobreaker")

    def closed() -> Call:
        return aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=30))(f)  # type: ignore[no-any-return]

    def open_() -> Call:
        breaker = aiobreaker.CircuitBreaker(
            fail_max=5, timeout_duration=timedelta(seconds=OPEN_FOR)
        )
        guarded = breaker(f)
        breaker.open()
        return caught(guarded, aiobreaker.CircuitBreakerError)

    return [
        Case(
            "aiobreaker: CircuitBreaker(fail_max=5)",
            closed,
            BARE,
            group=CLOSED,
            library="aiobreaker",
        ),
        Case(
            "aiobreaker: open, CircuitBreakerError caught",
            open_,
            RAISE,
            group=OPEN,
            library="aiobreaker",
        ),
    ]


def purgatory_cases() -> list[Case]:
    purgatory = load("purgatory")
    opened = load("purgatory.domain.model").OpenedState

    def closed() -> Call:
        factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
        return factory("closed")(f)  # type: ignore[no-any-return]

    async def closed_prefetched() -> Call:
        factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
        breaker = await factory.get_breaker("closed")

        async def call() -> int:
            async with breaker:
                return await f()

        return call

    def forget_traceback(call: Call) -> Call:
        # purgatory raises one shared exception object for every rejection, so
        # its traceback grows by a few frames each time (and keeps them alive)
        # unless the caller drops it: a long-running caller has to.
        async def forgetting() -> None:
            try:
                await call()
            except opened as exc:
                exc.__traceback__ = None

        return forgetting

    async def open_() -> Call:
        factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=OPEN_FOR)
        guarded = factory("open")(raising)
        await open_by_failing(guarded)
        await rejects(guarded, opened)
        return forget_traceback(guarded)

    async def open_prefetched() -> Call:
        factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=OPEN_FOR)
        breaker = await factory.get_breaker("open")

        async def guarded() -> int:
            async with breaker:
                return await raising()

        await open_by_failing(guarded)
        await rejects(guarded, opened)
        return forget_traceback(guarded)

    return [
        Case(
            "purgatory: @factory('name')",
            closed,
            BARE,
            group=CLOSED,
            library="purgatory",
            note="looks the breaker up in its unit of work on every call",
        ),
        Case(
            "purgatory: breaker fetched once, `async with breaker`",
            closed_prefetched,
            BARE,
            group=CLOSED,
            library="purgatory",
        ),
        Case(
            "purgatory: @factory('name'), open, caught",
            open_,
            RAISE,
            group=OPEN,
            library="purgatory",
            note="the caller drops the rejection's traceback (purgatory re-raises one object)",
        ),
        Case(
            "purgatory: breaker fetched once, open, caught",
            open_prefetched,
            RAISE,
            group=OPEN,
            library="purgatory",
            note="the caller drops the rejection's traceback",
        ),
    ]


def circuitbreaker_cases() -> list[Case]:
    circuitbreaker = load("circuitbreaker")

    def closed() -> Call:
        return circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=30)(f)  # type: ignore[no-any-return]

    async def open_() -> Call:
        guarded = circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=OPEN_FOR)(
            raising
        )
        await open_by_failing(guarded)
        await rejects(guarded, circuitbreaker.CircuitBreakerError)
        return caught(guarded, circuitbreaker.CircuitBreakerError)

    return [
        Case(
            "circuitbreaker: @CircuitBreaker(failure_threshold=5)",
            closed,
            BARE,
            group=CLOSED,
            library="circuitbreaker",
        ),
        Case(
            "circuitbreaker: open, CircuitBreakerError caught",
            open_,
            RAISE,
            group=OPEN,
            library="circuitbreaker",
        ),
    ]


def pybreaker_cases() -> list[Case]:
    pybreaker = load("pybreaker")
    sync_note = "sync path, vs a sync baseline: its async decorator never sees failures"

    def closed() -> Callable[[], Any]:
        return pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)(g)  # type: ignore[no-any-return]

    def open_() -> Callable[[], Any]:
        breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=OPEN_FOR)
        guarded = breaker(g_raising)
        breaker.open()
        return caught_sync(guarded, pybreaker.CircuitBreakerError)

    return [
        Case(
            "pybreaker: CircuitBreaker(fail_max=5), sync call",
            closed,
            BARE_SYNC,
            group=CLOSED,
            library="pybreaker",
            sync=True,
            note=sync_note,
        ),
        Case(
            "pybreaker: open, CircuitBreakerError caught, sync call",
            open_,
            RAISE_SYNC,
            group=OPEN,
            library="pybreaker",
            sync=True,
            note=sync_note,
        ),
    ]


# -- hyx: retry, breaker, bulkhead, timeout -------------------------------------


def hyx_cases() -> list[Case]:
    consecutive_breaker = load("hyx.circuitbreaker").consecutive_breaker
    breaker_failing = load("hyx.circuitbreaker.exceptions").BreakerFailing
    bulkhead = load("hyx.bulkhead").bulkhead
    timeout = load("hyx.timeout").timeout

    async def open_() -> Call:
        guarded = consecutive_breaker(failure_threshold=5, recovery_time_secs=OPEN_FOR)(raising)
        await open_by_failing(guarded)
        await rejects(guarded, breaker_failing)
        return caught(guarded, breaker_failing)

    def pipeline() -> Call:
        guarded = bulkhead(8, 8)(f)
        guarded = consecutive_breaker(failure_threshold=5, recovery_time_secs=30)(guarded)
        guarded = retrying("hyx", wait=True)(guarded)
        return timeout(10)(guarded)  # type: ignore[no-any-return]

    return [
        *retry_cases("hyx"),
        Case(
            "hyx: @consecutive_breaker(failure_threshold=5)",
            lambda: consecutive_breaker(failure_threshold=5, recovery_time_secs=30)(f),
            BARE,
            group=CLOSED,
            library="hyx",
        ),
        Case("hyx: open, BreakerFailing caught", open_, RAISE, group=OPEN, library="hyx"),
        Case(
            "hyx: @bulkhead(8, max_capacity=8)",
            lambda: bulkhead(8, 8)(f),
            BARE,
            group=BULKHEAD,
            library="hyx",
        ),
        Case(
            f"hyx: @bulkhead({SLOTS}, max_capacity={TASKS})",
            lambda: contended(bulkhead(SLOTS, TASKS)(f_yielding)),
            UNLIMITED,
            batch=TASKS * PER_TASK,
            group=CONTENDED,
            library="hyx",
        ),
        Case(
            "hyx: @timeout(10)",
            lambda: timeout(10)(f),
            BARE,
            group=TIMEOUT,
            library="hyx",
            note="runs each call in a new task",
        ),
        Case(
            "hyx: timeout, retry, consecutive_breaker, bulkhead",
            pipeline,
            BARE,
            group=PIPELINE,
            library="hyx",
            note="its four decorators stacked, outermost first",
        ),
    ]


# -- rate limiters --------------------------------------------------------------


def aiolimiter_cases() -> list[Case]:
    limiter = load("aiolimiter").AsyncLimiter
    return [
        Case(
            "aiolimiter: `async with AsyncLimiter(rate, 1)`",
            lambda: _limited(limiter(UNREACHED_RATE, 1), f),
            BARE,
            group=RATE_LIMITER,
            library="aiolimiter",
            note="a leaky bucket; waits for capacity, never refuses",
        ),
    ]


def limits_cases() -> list[Case]:
    strategies = load("limits.aio.strategies")
    memory = load("limits.aio.storage").MemoryStorage
    per_second = load("limits").RateLimitItemPerSecond(UNREACHED_RATE)

    def hitting(strategy: Any) -> Call:
        limiter = strategy(memory())

        async def call() -> int:
            if not await limiter.hit(per_second, "user-1"):
                raise RuntimeError("limits refused a call under an unreachable rate")
            return await f()

        return call

    return [
        Case(
            "limits: `await FixedWindowRateLimiter(MemoryStorage()).hit(...)`",
            lambda: hitting(strategies.FixedWindowRateLimiter),
            BARE,
            group=RATE_LIMITER,
            library="limits",
            note="a fixed window: lets 2x the rate through across a boundary; never waits",
        ),
        Case(
            "limits: `await SlidingWindowCounterRateLimiter(MemoryStorage()).hit(...)`",
            lambda: hitting(strategies.SlidingWindowCounterRateLimiter),
            BARE,
            group=RATE_LIMITER,
            library="limits",
            note="two fixed windows, weighted; never waits",
        ),
    ]


# -- asyncio and anyio: timeouts and limiters ---------------------------------


def _limited(limiter: Any, fn: Callable[[], Coroutine[Any, Any, int]]) -> Call:
    async def call() -> int:
        async with limiter:
            return await fn()

    return call


def builtin_cases() -> list[Case]:
    """asyncio and anyio, which every user has."""

    def with_fail_after() -> Call:
        async def call() -> int:
            with anyio.fail_after(10):
                return await f()

        return call

    def with_wait_for() -> Call:
        async def call() -> int:
            return await asyncio.wait_for(f(), 10)

        return call

    result = [
        Case(
            "asyncio.Semaphore(8)",
            lambda: _limited(asyncio.Semaphore(8), f),
            BARE,
            group=BULKHEAD,
            library="asyncio",
        ),
        Case(
            "anyio.CapacityLimiter(8)",
            lambda: _limited(anyio.CapacityLimiter(8), f),
            BARE,
            group=BULKHEAD,
            library="anyio",
            note=CHECKPOINT,
        ),
        Case(
            f"asyncio.Semaphore({SLOTS})",
            lambda: contended(_limited(asyncio.Semaphore(SLOTS), f_yielding)),
            UNLIMITED,
            batch=TASKS * PER_TASK,
            group=CONTENDED,
            library="asyncio",
        ),
        Case(
            f"anyio.CapacityLimiter({SLOTS})",
            lambda: contended(_limited(anyio.CapacityLimiter(SLOTS), f_yielding)),
            UNLIMITED,
            batch=TASKS * PER_TASK,
            group=CONTENDED,
            library="anyio",
            note=CHECKPOINT,
        ),
        Case("anyio.fail_after(10)", with_fail_after, BARE, group=TIMEOUT, library="anyio"),
        Case(
            "asyncio.wait_for(f(), 10)",
            with_wait_for,
            BARE,
            group=TIMEOUT,
            library="asyncio",
            note="a new task per call before Python 3.12",
        ),
    ]

    def with_asyncio_timeout() -> Call:
        async def call() -> int:
            async with asyncio.timeout(10):
                return await f()

        return call

    result.append(
        Case("asyncio.timeout(10)", with_asyncio_timeout, BARE, group=TIMEOUT, library="asyncio")
    )
    return result


BUILDERS: Final[dict[str, Callable[[], list[Case]]]] = {
    "tenacity": lambda: retry_cases("tenacity"),
    "stamina": lambda: retry_cases("stamina"),
    "backoff": lambda: retry_cases("backoff"),
    "hyx": hyx_cases,
    "aiobreaker": aiobreaker_cases,
    "purgatory": purgatory_cases,
    "circuitbreaker": circuitbreaker_cases,
    "pybreaker": pybreaker_cases,
    "aiolimiter": aiolimiter_cases,
    "limits": limits_cases,
}


def cases() -> list[Case]:
    """Every installed peer's cases, and the built-in equivalents."""
    result = builtin_cases()
    for name in OPTIONAL:
        if installed(name):
            result += BUILDERS[name]()
    return result


def breaker_memory(quick: bool = False) -> list[tuple[str, str, float, float | None]]:
    """Bytes per breaker of each installed peer (tracemalloc), as stalwart's."""
    n = 100 if quick else 1000
    makers: dict[str, tuple[str, Callable[[int], object]]] = {}
    if installed("aiobreaker"):
        aiobreaker = load("aiobreaker")
        makers["aiobreaker"] = (
            "CircuitBreaker(fail_max=5)",
            lambda i: aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=30)),
        )
    if installed("circuitbreaker"):
        circuitbreaker = load("circuitbreaker")
        makers["circuitbreaker"] = (
            "CircuitBreaker(failure_threshold=5)",
            lambda i: circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=30),
        )
    if installed("hyx"):
        consecutive_breaker = load("hyx.circuitbreaker").consecutive_breaker
        makers["hyx"] = (
            "consecutive_breaker(failure_threshold=5)",
            lambda i: consecutive_breaker(failure_threshold=5, recovery_time_secs=30),
        )
    if installed("purgatory"):
        context = load("purgatory.domain.model").Context
        makers["purgatory"] = (
            "a breaker's Context (what its in-memory unit of work keeps per name)",
            lambda i: context(f"cb{i}", 5, 30),
        )
    if installed("pybreaker"):
        pybreaker = load("pybreaker")
        makers["pybreaker"] = (
            "CircuitBreaker(fail_max=5)",
            lambda i: pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30),
        )
    return [(item, library, per_object(make, n), None) for library, (item, make) in makers.items()]


@contextmanager
def configured() -> Iterator[None]:
    """Peers' global settings for the run, restored afterwards.

    stamina logs every retry through ``logging`` by default (with no handler
    configured, Python prints each one on stderr); stalwart logs nothing, so
    stamina keeps only its Prometheus hook.
    """
    if not installed("stamina"):
        yield
        return
    instrumentation = load("stamina.instrumentation")
    instrumentation.set_on_retry_hooks([instrumentation.PrometheusOnRetryHook])
    try:
        yield
    finally:
        instrumentation.set_on_retry_hooks(None)
