from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import pytest

import stalwart as sw
from stalwart.testing import VirtualClockEventLoop, instant_retries, is_testing, set_testing


def test_set_testing_switches_the_mode_on_and_off() -> None:
    assert not is_testing()
    set_testing(True)
    try:
        assert is_testing()
    finally:
        set_testing(False)
    assert not is_testing()


def test_instant_retries_restores_the_previous_mode() -> None:
    set_testing(True, attempts=5)
    try:
        with instant_retries(attempts=1):
            assert is_testing()
        assert is_testing()
    finally:
        set_testing(False)
    with instant_retries():
        pass
    assert not is_testing()


def test_set_testing_validates_its_arguments() -> None:
    with pytest.raises(TypeError, match="enabled"):
        set_testing(1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attempts"):
        set_testing(True, attempts=0)
    assert not is_testing()


async def test_set_testing_turns_off_backoff_for_existing_policies() -> None:
    calls = 0

    @sw.Retry(attempts=3, backoff=sw.Backoff(initial=30.0, maximum=30.0))
    async def fn() -> None:
        nonlocal calls
        calls += 1
        raise ValueError

    set_testing(True, attempts=2)
    try:
        start = anyio.current_time()
        with pytest.raises(ValueError):
            await fn()
        assert anyio.current_time() == start
        assert calls == 2
    finally:
        set_testing(False)


T = TypeVar("T")


def run_virtual(main: Callable[[], Coroutine[Any, Any, T]], **loop_options: float) -> T:
    def factory() -> VirtualClockEventLoop:
        return VirtualClockEventLoop(**loop_options)

    return anyio.run(main, backend="asyncio", backend_options={"loop_factory": factory})


def test_virtual_time_starts_at_zero_and_jumps_over_sleeps() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(3600)
        return start, loop.time()

    real = time.monotonic()
    assert run_virtual(main) == (0.0, 3600.0)
    assert time.monotonic() - real < 5


def test_virtual_time_runs_timeouts_exactly() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        try:
            with sw.deadline(2.5):
                await asyncio.sleep(100)
        except sw.DeadlineExceeded:
            return loop.time()
        raise AssertionError("not cancelled")

    assert run_virtual(main) == 2.5


def test_real_io_still_works_under_virtual_time() -> None:
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        with a, b:
            await loop.sock_sendall(a, b"ping")
            return await asyncio.wait_for(loop.sock_recv(b, 4), 10)

    assert run_virtual(main, autojump_threshold=0.05) == b"ping"


def test_advance_moves_the_clock() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualClockEventLoop)
        loop.advance(12.5)
        return loop.time()

    assert run_virtual(main) == 12.5


def test_the_loop_validates_its_threshold() -> None:
    with pytest.raises(ValueError, match="autojump_threshold"):
        VirtualClockEventLoop(autojump_threshold=-1)
