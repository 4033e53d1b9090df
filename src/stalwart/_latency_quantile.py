"""A streaming latency quantile that forgets: fixed memory, O(1) per sample, a stated error.

`Hedge`'s adaptive delay (a high quantile such as p95 of recent latencies,
between bounds) and `LoadShedMiddleware`'s "recent typical service time"
(p50) read one of these. It does no I/O and reads no clock: each sample comes
with ``now`` (seconds).

The options, and the choice
---------------------------
* An exact sliding window (the last N samples, sorted): exact, but O(N)
  memory and O(log N) per sample.
* P-square (Jain and Chlamtac, CACM 1985): five markers, O(1), but it never
  forgets: it estimates the quantile of everything it has seen, and adding
  decay to it is ad hoc.
* Stochastic approximation (x += step * (q - [sample < x]); "Frugal
  Streaming", Ma, Muthukrishnan and Sandler 2013): one number, forgets by
  itself, but the step trades noise against speed, it must know the scale,
  a p95 moves up on only 5 % of the samples, and there is no error bound.
* A ring of K histograms over sub-windows (Prometheus summaries' age
  buckets, HdrHistogram's interval histograms): a sharp window, but K
  times the memory, and the estimate jumps each time a sub-window expires.
* **A log-bucket histogram with exponential decay** (DDSketch's buckets,
  Masson, Rim and Lee, VLDB 2019; forward decay, Cormode, Shkapenyuk,
  Srivastava and Xu, ICDE 2009): fixed memory set by the range and the
  accuracy, O(1) per sample, a proven relative error, and smooth forgetting
  with a half-life in seconds. This is the one used.

Buckets. Samples are clamped to ``[low, high]`` (the bounds the policy would
clamp its answer to anyway) and counted in bucket ``i = ceil(log(x / low) /
log(g))`` with ``g = (1 + a) / (1 - a)`` for a relative accuracy ``a``:
bucket i holds ``(low * g**(i-1), low * g**i]``, and its value ``2 * low *
g**i / (g + 1)`` is within ``a`` (relatively) of every value in it. That
makes ``ceil(log(high / low) / log(g)) + 1`` buckets: 334 for 0.1 ms to
60 s at 2 %, two arrays of doubles (weights and values), 5.3 KB.

Decay. A sample at time t weighs ``2 ** ((t - t0) / half_life)`` for a
fixed landmark t0 ("forward decay"): relative to each other, samples lose
half their weight every ``half_life`` seconds, and nothing needs to be
touched as time passes. When the newest weights grow past 2**64 every count
is scaled back down and t0 moves (O(buckets), once every 64 half-lives).
``half_life=None`` weighs every sample alike (no forgetting).

The quantile. The estimate is the value of the lowest bucket whose
cumulative weight reaches ``q`` times the total weight. A pointer to that
bucket and the weight below it are kept and moved as samples arrive: a
sample moves it by the buckets it must cross, which for a steady
distribution is almost always none or one (at worst every bucket, after a
shift: still bounded by the bucket count, whatever the number of samples).

Error, exactly. Let x be the exact weighted q-quantile of the samples seen
(the smallest sample whose weight at or below it is at least q times the
total), clamped to ``[low, high]``. Then the estimate e satisfies
``|e - x| <= a * x``: x's bucket is the pointer's bucket, since the buckets
below it hold only smaller samples.

Forgetting. After a shift of the distribution, the old samples' share of
the weight halves every half-life: after n half-lives it is 2**-n of what it
was (at a steady rate of samples, about 2**-n itself). A p95 is moved by
the old samples once their share falls below the quantile's margin: for a
shift to slower calls, about 5 % (a bit over 4 half-lives); for a shift to
faster calls, the old calls are the tail and must fall well below 5 % of
the weight (about 8 half-lives for 1 %). The tests state these.
"""

from __future__ import annotations

import math
from array import array
from typing import Final, final

from . import _validate

__all__ = ["LatencyQuantile"]

# Weights are 2 ** (age in half-lives) up to this exponent; then everything is
# scaled back down (a double holds 2 ** 1023, so sums of many such weights
# stay far from overflow).
_RESCALE_EXPONENT: Final = 64.0

_ceil = math.ceil
_log = math.log


@final
class LatencyQuantile:
    """The ``quantile`` of recent latencies (seconds), clamped to ``[low, high]``.

    Args:
        quantile: which quantile, strictly between 0 and 1 (0.95: p95).
        low, high: the range kept, 0 < low < high; samples outside it count
            at its edge, and the estimate never leaves it.
        half_life: seconds after which a sample weighs half as much as a new
            one, > 0; None: every sample weighs the same (no forgetting).
        relative_accuracy: the estimate's largest relative error against
            the exact quantile, in (0, 0.5].

    Memory is fixed by ``low``, ``high`` and ``relative_accuracy`` (see the
    module docstring); ``add`` is O(1) and `estimate` is O(1).

    Example::

        p95 = LatencyQuantile(0.95, low=0.001, high=2.0, half_life=30.0)
        p95.add(now, elapsed)
        delay = p95.estimate if p95.weight(now) >= 20 else 0.05
    """

    __slots__ = (
        "_below",
        "_ceiling",
        "_ceiling_index",
        "_counts",
        "_half_life",
        "_index",
        "_inverse_log_gamma",
        "_landmark",
        "_last",
        "_log_low",
        "_rate",
        "_seen",
        "_total",
        "_values",
        "gamma",
        "high",
        "low",
        "q",
        "relative_accuracy",
    )

    def __init__(
        self,
        quantile: float,
        *,
        low: float,
        high: float,
        half_life: float | None = 30.0,
        relative_accuracy: float = 0.02,
    ) -> None:
        q = _validate.number("quantile", quantile)
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile must be strictly between 0 and 1, got {quantile!r}")
        self.q = q
        self.low = _validate.duration("low", low, positive=True)
        self.high = _validate.duration("high", high, positive=True)
        if self.high <= self.low:
            raise ValueError(f"high must be > low, got high={high!r}, low={low!r}")
        self._half_life = _validate.optional_duration("half_life", half_life, positive=True)
        accuracy = _validate.number("relative_accuracy", relative_accuracy)
        if not 0.0 < accuracy <= 0.5:
            raise ValueError(f"relative_accuracy must be in (0, 0.5], got {relative_accuracy!r}")
        self.relative_accuracy = accuracy
        self.gamma = (1.0 + accuracy) / (1.0 - accuracy)
        self._inverse_log_gamma = 1.0 / math.log(self.gamma)
        self._log_low = math.log(self.low)
        self._last = math.ceil((math.log(self.high) - self._log_low) * self._inverse_log_gamma)
        # Half-lives per second, for the weights' exponent of 2 (0.0: no decay).
        self._rate = 0.0 if self._half_life is None else 1.0 / self._half_life
        self._counts = array("d", bytes(8 * (self._last + 1)))
        # What each bucket stands for: within `relative_accuracy` of all it holds.
        self._values = array("d", (self._value(i) for i in range(self._last + 1)))
        self._reset()

    def _reset(self) -> None:
        counts = self._counts
        for i in range(len(counts)):
            counts[i] = 0.0
        self._total = 0.0
        self._below = 0.0  # the weight in buckets below `_index`
        self._ceiling_index = -1  # `ceiling`'s bucket, and its upper edge
        self._ceiling = math.nan
        self._index = 0
        self._landmark = -math.inf  # t0; set by the first sample
        self._seen = -math.inf

    @property
    def half_life(self) -> float | None:
        return self._half_life

    @property
    def estimate(self) -> float | None:
        """The tracked quantile of the samples so far (None before the first one)."""
        return self._values[self._index] if self._total else None

    @property
    def ceiling(self) -> float | None:
        """The upper edge of the estimate's bucket (None before the first sample).

        Never below the exact quantile, and at most ``gamma`` times it (about
        ``2 * relative_accuracy`` above): what a threshold that must not be
        crossed by calls as fast as the quantile reads (`Hedge`'s delay).
        `estimate` may sit just under the quantile: a steady latency L is
        estimated up to ``relative_accuracy * L`` below L, and a hedge
        delayed that long would start on every call.
        """
        if not self._total:
            return None
        i = self._index
        if i != self._ceiling_index:
            edge = math.exp(self._log_low + i / self._inverse_log_gamma)
            self._ceiling = min(self.high, max(self.low, edge))
            self._ceiling_index = i
        return self._ceiling

    def add(self, now: float, seconds: float) -> None:
        """Count a latency of ``seconds`` observed at ``now``.

        A ``now`` earlier than one seen before means a new clock: the
        estimator starts again empty. NaN is ignored.
        """
        if now < self._seen:
            self._reset()
        self._seen = now
        rate = self._rate
        if rate:
            exponent = (now - self._landmark) * rate
            if exponent > _RESCALE_EXPONENT:
                self._rescale(now)
                exponent = 0.0
            weight: float = 2.0**exponent
        else:
            weight = 1.0
        last = self._last
        if seconds <= self.low:
            i = 0
        elif seconds < self.high:
            i = _ceil((_log(seconds) - self._log_low) * self._inverse_log_gamma)
            if i > last:  # rounding at the top edge
                i = last
        elif seconds >= self.high:
            i = last
        else:
            return  # NaN
        counts = self._counts
        counts[i] += weight
        total = self._total = self._total + weight
        p = self._index
        below = self._below + weight if i < p else self._below
        target = self.q * total
        if below + counts[p] < target:
            while True:
                below += counts[p]
                p += 1
                if p == last or below + counts[p] >= target:
                    break
        elif below >= target:
            while p > 0:
                p -= 1
                below -= counts[p]
                if below < target:
                    break
        self._index = p
        self._below = below

    def _value(self, i: int) -> float:
        """The value bucket ``i`` stands for, within the range."""
        value = 2.0 * math.exp(self._log_low + i / self._inverse_log_gamma) / (self.gamma + 1.0)
        return min(self.high, max(self.low, value))

    def _rescale(self, now: float) -> None:
        """Move the landmark to ``now``, scaling every weight to match (O(buckets))."""
        if self._landmark == -math.inf:
            self._landmark = now
            return
        factor = math.pow(2.0, -(now - self._landmark) * self._rate)
        counts = self._counts
        below = 0.0
        for i in range(len(counts)):
            counts[i] *= factor
            if i < self._index:
                below += counts[i]
        self._total *= factor
        self._below = below
        self._landmark = now

    def weight(self, now: float) -> float:
        """The samples' total weight at ``now``, in new samples: their number, decayed.

        With a steady ``r`` samples per second it tends to ``r * half_life /
        ln 2``; without decay it is the number of samples.
        """
        if not self._rate:
            return self._total
        if now < self._seen:
            return 0.0
        return self._total * math.pow(2.0, -(now - self._landmark) * self._rate)

    def quantile(self, q: float) -> float | None:
        """Any quantile ``q`` (0 < q < 1) of the same samples, with the same error bound.

        O(buckets): for reports and tests, not for every call.
        """
        if not self._total:
            return None
        target = q * self._total
        cumulative = 0.0
        counts = self._counts
        for i in range(self._last + 1):
            cumulative += counts[i]
            if cumulative >= target:
                return self._values[i]
        return self._values[self._last]

    def __repr__(self) -> str:
        return (
            f"LatencyQuantile({self.q:g}, low={self.low:g}, high={self.high:g}, "
            f"half_life={self._half_life!r}, relative_accuracy={self.relative_accuracy:g})"
        )
