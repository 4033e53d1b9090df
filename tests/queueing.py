"""A simulated downstream with finite capacity, as a pure model in virtual time.

`Downstream` is a FIFO queue in front of ``capacity`` servers (the service's
worker pool) with room for ``queue`` waiting requests; service times are
lognormal (a median and a sigma) drawn from a seeded `random.Random`. Below
capacity a request takes its service time; above it, requests wait, so the
latency grows with the load (by Little's law, a backlog of n waiting requests
adds about ``n / capacity`` service times); when the queue is full, requests
are turned away at once (the service's 503). Its real capacity, in
concurrent requests, is ``capacity``; in requests per second, ``capacity /
mean service time``.

Nothing runs by itself: `arrive` is told the time and answers when the
request will finish (the order is FIFO, so that is known at once), or None
when it is turned away. A request's server keeps working on it even if its
caller gives up (as most servers do: they do not notice). So it serves a
discrete-event simulation (`tests/test_adaptive_limits.py` keeps a heap of
completions) and an async test alike (``await sleep(finish - now)``), and is
the same queue as the tuner's engine (``[downstream] capacity`` and
``queue``, with ``serves_abandoned = true``), minus the event loop.
"""

from __future__ import annotations

import heapq
import math
import random


class Downstream:
    """``capacity`` servers behind a FIFO queue of ``queue`` places (None: unbounded)."""

    def __init__(
        self,
        *,
        capacity: int,
        queue: int | None,
        median: float,
        sigma: float = 0.0,
        seed: object = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.queue = queue
        self.median = median
        self.sigma = sigma
        self.rng = random.Random(f"downstream:{seed}")
        self._free: list[float] = [-math.inf] * capacity  # when each server is next free (a heap)
        self._starts: list[float] = []  # start times of accepted requests not started yet (a heap)
        self.accepted = 0
        self.rejected = 0

    @property
    def capacity(self) -> int:
        return len(self._free)

    @property
    def mean_service(self) -> float:
        """The mean service time: the lognormal's ``median * exp(sigma**2 / 2)``."""
        return self.median * math.exp(self.sigma**2 / 2)

    def service_time(self) -> float:
        if not self.sigma:
            return self.median
        return self.median * math.exp(self.sigma * self.rng.gauss(0.0, 1.0))

    def waiting(self, now: float) -> int:
        """Requests accepted but not started by ``now``."""
        starts = self._starts
        while starts and starts[0] <= now:
            heapq.heappop(starts)
        return len(starts)

    def arrive(self, now: float) -> float | None:
        """A request arrives at ``now``: the time it will finish, or None if turned away."""
        free = self._free
        start = free[0] if free[0] > now else now
        if start > now and self.queue is not None and self.waiting(now) >= self.queue:
            self.rejected += 1
            return None
        finish = start + self.service_time()
        heapq.heapreplace(free, finish)
        if start > now:
            heapq.heappush(self._starts, start)
        self.accepted += 1
        return finish

    def set_capacity(self, now: float, capacity: int) -> None:
        """Add servers (free at once) or take some away (the busiest, once their work is done)."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        free = sorted(self._free)
        if capacity > len(free):
            free += [now] * (capacity - len(free))
        else:
            del free[capacity:]
        heapq.heapify(free)
        self._free = free

    def set_service(self, *, median: float, sigma: float | None = None) -> None:
        """Change the service time of the requests that arrive from now on."""
        self.median = median
        if sigma is not None:
            self.sigma = sigma
