"""Run every setting of a scenario: in this process, or on a pool of processes.

Settings are independent simulations, each fully determined by the scenario
and its seed (see `engine`), so spreading them over processes changes how
long a run takes and nothing else: results are put back in grid order.
Workers report how far they are through a shared array, which the parent
turns into the progress bar.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from typing import IO, Any

from .engine import Run, simulate
from .scenario import Scenario

__all__ = ["ProgressBar", "default_workers", "run_all"]


def default_workers() -> int:
    """The CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


class ProgressBar:
    """A one-line progress bar, redrawn at most ten times a second.

    It measures wall time to show the elapsed time and an estimate of what is
    left: that is the user's time, not the simulation's.
    """

    def __init__(self, stream: IO[str], settings: int, title: str) -> None:
        self._stream = stream
        self._settings = settings
        self._title = title
        self._started = time.perf_counter()
        self._drawn = -1.0

    def update(self, shares: Sequence[float], *, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        done = sum(shares) / max(1, len(shares))
        finished = sum(1 for share in shares if share >= 1.0)
        elapsed = now - self._started
        width = 24
        filled = int(done * width)
        bar = "#" * filled + "-" * (width - filled)
        eta = ""
        if 0.02 < done < 1.0:
            eta = f", about {_clock(elapsed / done - elapsed)} left"
        self._stream.write(
            f"\r{self._title} [{bar}] {done:4.0%}  {finished}/{self._settings} settings  "
            f"{_clock(elapsed)}{eta}\x1b[K"
        )
        self._stream.flush()

    def close(self) -> None:
        self._stream.write("\r\x1b[K")
        self._stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def run_all(
    scenario: Scenario, *, workers: int = 1, progress: ProgressBar | None = None
) -> list[Run]:
    """Simulate every setting; ``workers`` > 1 uses that many processes."""
    count = len(scenario.settings)
    workers = max(1, min(workers, count))
    shares = [0.0] * count
    if workers == 1:
        runs = []
        for i in range(count):

            def report(share: float, i: int = i) -> None:
                shares[i] = share
                if progress is not None:
                    progress.update(shares)

            runs.append(simulate(scenario, i, report))
        if progress is not None:
            progress.update(shares, force=True)
        return runs
    return _pooled(scenario, workers, progress)


_shared: Any = None


def _start_worker(shared: Any) -> None:
    global _shared
    _shared = shared
    # Ctrl-C is the parent's to handle: it stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _simulate_in_worker(scenario: Scenario, index: int) -> Run:
    def report(share: float) -> None:
        _shared[index] = share

    return simulate(scenario, index, report)


def _pooled(scenario: Scenario, workers: int, progress: ProgressBar | None) -> list[Run]:
    count = len(scenario.settings)
    # "spawn": a fresh interpreter per worker, the same on every platform and
    # safe whatever threads the parent runs.
    context = multiprocessing.get_context("spawn")
    shared = context.Array("d", count, lock=False)
    with context.Pool(workers, initializer=_start_worker, initargs=(shared,)) as pool:
        pending = [pool.apply_async(_simulate_in_worker, (scenario, i)) for i in range(count)]
        for job in pending:
            while not job.ready():
                job.wait(0.1)
                if progress is not None:
                    progress.update(list(shared))
        runs = [job.get() for job in pending]
    if progress is not None:
        progress.update([1.0] * count, force=True)
    return runs
