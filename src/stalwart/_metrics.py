"""Metrics, declared by each policy and read at scrape time.

Every policy counts into one small object, its `PolicyMetrics`: plain integer
slots that its wrapper increments (``metrics.success += 1`` is the whole cost
of counting a successful call). Policies of the same kind and name on one
registry share that object, and so their series. The object's class declares
the policy's own metric families (`MetricFamily`); a single custom
``Collector`` per registry turns every metrics object on it into Prometheus
families when scraped. It lists no policy: a class of metrics makes itself
known by being defined.

What is kept is bounded. A metrics object is *live* while some policy holds
it; once none does, it is *retired*: its counters are still exported (and
resume if a policy of that kind and name comes back), its gauges are not. At
most `RETIRED_KEPT` retired objects are kept per registry, the least recently
retired dropped first, so a service that makes a policy per request, or per
upstream host, keeps bounded metric state whatever names it uses.

A keyed policy (`PerKey`) that drops a key's policies goes further: it notes
which metrics objects building them made (`capturing`) and has them
*forgotten* (`Collector.forget`): no longer exported from then on, and once
no policy holds them, dropped instead of retired.
"""

from __future__ import annotations

import gc
import re
import threading
import weakref
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, TypeVar, final

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from . import _clock

__all__ = [
    "DEFAULT_BUCKETS",
    "OUTCOMES",
    "RETIRED_KEPT",
    "MetricFamily",
    "PolicyMetrics",
    "Registration",
    "capturing",
]

M = TypeVar("M", bound="PolicyMetrics")
T = TypeVar("T")

POLICY_ATTRIBUTE: Final = "stalwart.policy"

#: How a call through a policy ended, in ``stalwart_calls_total``'s ``outcome`` label.
OUTCOMES: Final = ("success", "error", "rejected", "timeout", "cancelled")
SUCCESS: Final = 0
ERROR: Final = 1
REJECTED: Final = 2
TIMEOUT: Final = 3
CANCELLED: Final = 4

#: ``Telemetry(latency=True)``'s bucket bounds, in seconds (Prometheus' defaults).
DEFAULT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)

#: Retired metrics objects kept per registry (see the module's documentation).
RETIRED_KEPT: Final = 1000

# Real clashes of one name after which a suspected one is trusted (see `Collector.confirm`).
_TRUSTED: Final = 3

_METRIC_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

Samples = Callable[[Any], Iterable[tuple[Sequence[str], float]]]


@final
@dataclass(frozen=True, slots=True)
class MetricFamily:
    """One Prometheus metric family that a class of `PolicyMetrics` exports.

    Every sample is labelled ``policy`` (the policy's name) first, then
    ``labels``. ``value`` says where the samples come from: the name of an
    ``int`` attribute of the metrics object (one sample per policy, for a
    family without extra labels), or a callable given the metrics object and
    yielding ``(label values, value)`` pairs, one value per name in
    ``labels``.

    A gauge describes a live policy: a policy that no longer exists has no
    gauge samples, only counters.

    Args:
        name: the family's name; a counter's, without ``_total`` (the
            exposition adds it).
        type: ``"counter"`` or ``"gauge"``.
        documentation: the family's ``HELP`` text.
        value: an attribute name, or a callable of the metrics object.
        labels: label names after ``policy``.

    Example::

        MetricFamily("myapp_shed", "counter", "Calls shed.", "shed")
    """

    name: str
    type: Literal["counter", "gauge"]
    documentation: str
    value: str | Samples
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _METRIC_NAME.fullmatch(self.name):
            raise ValueError(f"name must be a Prometheus metric name, got {self.name!r}")
        if self.type not in ("counter", "gauge"):
            raise ValueError(f"type must be 'counter' or 'gauge', got {self.type!r}")
        if self.type == "counter" and self.name.endswith("_total"):
            raise ValueError(
                f"name must not end with '_total' (the exposition adds it), got {self.name!r}"
            )
        if not isinstance(self.documentation, str):
            raise TypeError(f"documentation must be a str, not {type(self.documentation).__name__}")
        if not (isinstance(self.value, str) or callable(self.value)):
            raise TypeError(
                f"value must be an attribute name or a callable, not {type(self.value).__name__}"
            )
        labels = tuple(self.labels)
        for label in labels:
            if not isinstance(label, str) or not _LABEL_NAME.fullmatch(label):
                raise ValueError(f"labels must be Prometheus label names, got {label!r}")
        if "policy" in labels or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct and not include 'policy', got {labels!r}")
        if isinstance(self.value, str) and labels:
            raise ValueError("a family with labels takes a callable value, not an attribute name")
        object.__setattr__(self, "labels", labels)

    def _build(self, members: Iterable[PolicyMetrics]) -> Metric:
        names = ["policy", *self.labels]
        family: Metric
        if self.type == "counter":
            family = CounterMetricFamily(self.name, self.documentation, labels=names)
        else:
            family = GaugeMetricFamily(self.name, self.documentation, labels=names)
        value = self.value
        for metrics in members:
            if isinstance(value, str):
                family.add_metric([metrics.name], getattr(metrics, value))
            else:
                for labels, number in value(metrics):
                    family.add_metric([metrics.name, *labels], number)
        return family


class Durations:
    """A latency histogram per outcome: bucket counts and sums, filled on the hot path."""

    __slots__ = ("bounds", "counts", "sums")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        # One row per outcome; its last cell is the +Inf bucket.
        self.counts = [[0] * (len(bounds) + 1) for _ in OUTCOMES]
        self.sums = [0.0] * len(OUTCOMES)

    def observe(self, outcome: int, seconds: float) -> None:
        self.counts[outcome][bisect_left(self.bounds, seconds)] += 1
        self.sums[outcome] += seconds


class PolicyMetrics:
    """What policies of one kind and name count, on one registry.

    Every policy has one (`Policy.metrics`), with the outcome counters
    behind ``stalwart_calls_total``: ``success``, ``error``, ``rejected``
    (refused by this policy), ``timeout`` (this policy raised
    `DeadlineExceeded`) and ``cancelled`` (cancelled, or interrupted by any
    other `BaseException`). A policy's wrapper counts with plain increments
    (``metrics.success += 1``), or with the methods below, which also time
    the call when the policy's `Telemetry` measures latency (``start`` is
    then the call's start on the event loop's clock, else None).

    A policy with counters of its own subclasses this class: adds
    ``__slots__`` (set them in ``__init__``), and declares their families in
    ``families``. Set ``exclusive`` when the families describe the state of
    one live object (a breaker's state, a bulkhead's occupancy): two such
    policies of one kind and name on one registry would merge their series,
    so constructing the second warns (`StalwartWarning`).

    Counting is an unlocked ``+= 1``: exact on one event loop, the way
    policies are used.
    """

    families: ClassVar[tuple[MetricFamily, ...]] = ()
    exclusive: ClassVar[bool] = False

    __slots__ = (
        "cancelled",
        "error",
        "kind",
        "latency",
        "name",
        "rejected",
        "success",
        "timeout",
    )

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        self.success = 0
        self.error = 0
        self.rejected = 0
        self.timeout = 0
        self.cancelled = 0
        self.latency: Durations | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "families" in cls.__dict__:
            _declare(cls)

    def succeeded(self, start: float | None) -> None:
        """A call returned."""
        self.success += 1
        if start is not None:
            self.took(SUCCESS, start)

    def returned(self, result: T, start: float) -> T:
        """Time a call that returned ``result`` (counted already) and pass the result on.

        The tail of a wrapper: ``metrics.success += 1`` then ``return result
        if start is None else metrics.returned(result, start)``.
        """
        self.took(SUCCESS, start)
        return result

    def failed(self, error: BaseException, start: float | None) -> None:
        """A call raised ``error``, which this policy did not raise itself."""
        if isinstance(error, Exception):
            self.error += 1
            outcome = ERROR
        else:
            self.cancelled += 1
            outcome = CANCELLED
        if start is not None:
            self.took(outcome, start)

    def refused(self, start: float | None) -> None:
        """This policy refused a call (``rejected``)."""
        self.rejected += 1
        if start is not None:
            self.took(REJECTED, start)

    def timed_out(self, start: float | None) -> None:
        """This policy raised `DeadlineExceeded` for a call."""
        self.timeout += 1
        if start is not None:
            self.took(TIMEOUT, start)

    def took(self, outcome: int, start: float) -> None:
        """Time a call that ended in ``outcome`` (an index into `OUTCOMES`), without counting it."""
        latency = self.latency
        if latency is not None:
            latency.observe(outcome, _clock.now() - start)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.name!r}>"


class Counted:
    """A block whose outcome counts as one call's: ``with Counted(metrics, start):``.

    Success when the block ends, else `PolicyMetrics.failed` with what it
    raised. `stalwart.Timeout`'s deadline scope is one, which also counts its
    own expiry as a ``timeout``. ``metrics`` None: nothing is counted (a bare
    `stalwart.deadline`).
    """

    __slots__ = ("metrics", "start")

    def __init__(self, metrics: PolicyMetrics | None, start: float | None = None) -> None:
        self.metrics = metrics
        self.start = start

    def __enter__(self) -> Counted:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> bool | None:
        self.ended(exc)
        return None

    def ended(self, error: BaseException | None) -> None:
        """The block ended, raising ``error`` (None: it did not)."""
        metrics = self.metrics
        if metrics is not None:
            if error is not None:
                metrics.failed(error, self.start)
            else:
                metrics.success += 1
                if self.start is not None:
                    metrics.took(SUCCESS, self.start)


# The classes of metrics, in the order they were defined: each exports its
# families once, with the samples of its instances and its subclasses'.
_declared: list[type[PolicyMetrics]] = []
_family_names: dict[str, type[PolicyMetrics]] = {}
_declared_lock = threading.Lock()

_CALLS: Final = "stalwart_calls"
_DURATION: Final = "stalwart_call_duration_seconds"


def _declare(cls: type[PolicyMetrics]) -> None:
    families = cls.__dict__["families"]
    if not isinstance(families, tuple) or not all(isinstance(f, MetricFamily) for f in families):
        raise TypeError(f"{cls.__qualname__}.families must be a tuple of MetricFamily")
    with _declared_lock:
        for family in families:
            owner = _family_names.get(family.name)
            if family.name in (_CALLS, _DURATION) or (
                owner is not None and _identity(owner) != _identity(cls)
            ):
                raise ValueError(
                    f"{cls.__qualname__} declares the metric family {family.name!r}, "
                    f"which {'stalwart' if owner is None else owner.__qualname__} exports already"
                )
        for family in families:
            _family_names[family.name] = cls
        # A class redefined under the same name (a reloaded module) replaces its first self.
        _declared[:] = [c for c in _declared if _identity(c) != _identity(cls)]
        _declared.append(cls)


def _identity(cls: type) -> tuple[str, str]:
    return (cls.__module__, cls.__qualname__)


def _declaring(cls: type[PolicyMetrics]) -> type[PolicyMetrics] | None:
    for klass in cls.__mro__:
        if "families" in klass.__dict__ and klass is not PolicyMetrics:
            return klass
    return None


@final
class Registration:
    """A policy's hold on its metrics: while one exists, they are live.

    Shared by the policies of one kind and name on one registry, and held by
    each of them; when the last goes, the metrics are retired. Also carries
    the span name and attributes those policies share.
    """

    __slots__ = ("__weakref__", "metrics", "span_attributes", "span_name", "state")

    def __init__(self, metrics: PolicyMetrics, state: object) -> None:
        self.metrics = metrics
        self.state = state  # what the holders share their state through (None: nothing)
        self.span_name = f"stalwart.{metrics.kind} {metrics.name}"
        self.span_attributes = {POLICY_ATTRIBUTE: metrics.name}


class Collector:
    """The metrics of every policy on one registry, as Prometheus families."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[tuple[str, str], PolicyMetrics] = {}
        self._holds: dict[tuple[str, str], weakref.ref[Registration]] = {}
        self._retired: OrderedDict[tuple[str, str], PolicyMetrics] = OrderedDict()
        # Keys whose registration died: appended by weakref callbacks (which
        # may run in any thread, at any allocation), handled under the lock.
        self._released: list[tuple[str, str]] = []
        self._confirmed: dict[tuple[str, str], int] = {}  # real clashes, by key
        # Keys to drop rather than retire once released (see `forget`).
        self._forgotten: set[tuple[str, str]] = set()
        self.buckets: tuple[float, ...] | None = None

    def register(
        self,
        kind: str,
        name: str,
        cls: type[M],
        buckets: tuple[float, ...] | None,
        state: object = None,
    ) -> tuple[Registration, bool]:
        """The registration of ``kind`` and ``name``, made or revived as needed.

        Also says whether it is a suspected clash: ``cls`` is exclusive and
        another policy holds the registration without sharing ``state``
        (what the policy shares its state through, if anything: a breaker's
        store). `confirm` tells a real clash from garbage.
        """
        key = (kind, name)
        with self._lock:
            self._settle()
            forgotten = key in self._forgotten
            self._forgotten.discard(key)  # in use again
            if buckets is not None:
                if self.buckets is None:
                    self.buckets = buckets
                elif self.buckets != buckets:
                    raise ValueError(
                        f"latency must be the buckets already used on this registry "
                        f"({self.buckets!r}), got {buckets!r}"
                    )
            hold = self._holds.get(key)
            registration = None if hold is None else hold()
            if registration is not None and forgotten:
                # A key a PerKey dropped, back while its old policy lives on (a
                # call still running through it): the new policy is no clash and
                # shares nothing with it; the old one counts on, unexported.
                registration = None
                del self._metrics[key]
            suspect = False
            if registration is None:
                metrics = self._metrics.get(key)
                if metrics is None:
                    metrics = self._metrics[key] = cls(kind, name)
                else:
                    self._retired.pop(key, None)
                registration = Registration(metrics, state)
                self._holds[key] = weakref.ref(registration, self._callback(key))
                made = getattr(_capture, "made", None)
                if made is not None:
                    made.append((self, key))
            else:
                suspect = cls.exclusive and (state is None or state is not registration.state)
            metrics = registration.metrics
            if type(metrics) is not cls:
                raise TypeError(
                    f"policies of kind {kind!r} count into {type(metrics).__qualname__}, "
                    f"not {cls.__qualname__}: one kind, one class of metrics"
                )
            if buckets is not None and metrics.latency is None:
                metrics.latency = Durations(buckets)
        return registration, suspect

    def confirm(self, kind: str, name: str, state: object) -> bool:
        """Is a suspected clash real? Call it holding no reference to the registration.

        A policy that is unreachable but not yet collected (in a reference
        cycle, as a caught exception's traceback makes) still holds its
        registration: a suspected clash is confirmed by collecting garbage.
        A name that really clashed `_TRUSTED` times is trusted to clash
        without collecting (a service making policies of one name per
        request would otherwise collect garbage per request).
        """
        key = (kind, name)
        if self._confirmed.get(key, 0) < _TRUSTED:
            gc.collect()
        with self._lock:
            self._settle()
            hold = self._holds.get(key)
            registration = None if hold is None else hold()
            clash = registration is not None and (state is None or state is not registration.state)
            if clash:
                if key not in self._confirmed and len(self._confirmed) >= RETIRED_KEPT:
                    self._confirmed.clear()
                self._confirmed[key] = self._confirmed.get(key, 0) + 1
        return clash

    def _callback(self, key: tuple[str, str]) -> Callable[[weakref.ref[Registration]], None]:
        released = self._released

        def release(_: weakref.ref[Registration]) -> None:
            released.append(key)

        return release

    def _settle(self) -> None:
        """Retire the metrics of registrations that died (under the lock)."""
        released = self._released
        while released:
            key = released.pop()
            hold = self._holds.get(key)
            if hold is not None and hold() is None:
                del self._holds[key]
                if key in self._forgotten:
                    self._forgotten.discard(key)
                    self._metrics.pop(key, None)
                    self._retired.pop(key, None)
                    continue
                metrics = self._metrics.get(key)
                if metrics is not None:
                    self._retired[key] = metrics
                    self._retired.move_to_end(key)
        while len(self._retired) > RETIRED_KEPT:
            key, _ = self._retired.popitem(last=False)
            del self._metrics[key]

    def forget(self, key: tuple[str, str]) -> None:
        """Stop exporting ``key``'s metrics (``(kind, name)``) now.

        Held still (a call that was running, a traceback that keeps the
        policy): no longer exported, and dropped when released instead of
        retired. A policy of that kind and name that registers before then
        gets metrics of its own, exported, and no clash is suspected. Retired
        already: dropped now.
        """
        with self._lock:
            self._settle()
            hold = self._holds.get(key)
            if hold is not None and hold() is not None:
                self._forgotten.add(key)
            elif self._retired.pop(key, None) is not None:
                del self._metrics[key]

    def retired(self) -> int:
        """How many retired metrics objects are kept now."""
        with self._lock:
            self._settle()
            return len(self._retired)

    def describe(self) -> Iterator[Metric]:
        yield from self._families(fill=False)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(fill=True)

    def _families(self, *, fill: bool) -> Iterator[Metric]:
        with self._lock:
            self._settle()
            forgotten = self._forgotten
            everything = [item for item in self._metrics.items() if item[0] not in forgotten]
            retired = set(self._retired)
            buckets = self.buckets
        with _declared_lock:
            # By the name of their first family: an order that does not hang on imports.
            classes = sorted(
                _declared,
                key=lambda c: c.__dict__["families"][0].name if c.__dict__["families"] else "",
            )
        by_class: dict[type[PolicyMetrics], list[tuple[PolicyMetrics, bool]]] = {}
        if fill:
            for key, metrics in everything:
                declaring = _declaring(type(metrics))
                if declaring is not None:
                    by_class.setdefault(declaring, []).append((metrics, key not in retired))
        for cls in classes:
            members = by_class.get(cls, [])
            for family in cls.__dict__["families"]:
                live = family.type == "counter"
                yield family._build(m for m, alive in members if live or alive)
        calls = CounterMetricFamily(
            _CALLS,
            "Calls through a policy, by how they ended.",
            labels=["policy", "kind", "outcome"],
        )
        durations = HistogramMetricFamily(
            _DURATION,
            "Durations of calls through a policy, by how they ended.",
            labels=["policy", "kind", "outcome"],
        )
        if fill:
            for _, metrics in everything:
                labels = (metrics.name, metrics.kind)
                for outcome, count in zip(
                    OUTCOMES,
                    (
                        metrics.success,
                        metrics.error,
                        metrics.rejected,
                        metrics.timeout,
                        metrics.cancelled,
                    ),
                    strict=True,
                ):
                    calls.add_metric([*labels, outcome], count)
                latency = metrics.latency
                if latency is not None:
                    _histogram(durations, labels, latency)
        yield calls
        if buckets is not None:
            yield durations


def _histogram(family: HistogramMetricFamily, labels: tuple[str, str], latency: Durations) -> None:
    bounds = [*(floatToGoString(b) for b in latency.bounds), "+Inf"]  # type: ignore[no-untyped-call]
    for outcome, row, total in zip(OUTCOMES, latency.counts, latency.sums, strict=True):
        running = 0
        cumulative = []
        for bound, count in zip(bounds, row, strict=True):
            running += count
            cumulative.append((bound, running))
        family.add_metric([*labels, outcome], cumulative, total)


_capture = threading.local()


@contextmanager
def capturing() -> Iterator[list[tuple[Collector, tuple[str, str]]]]:
    """Note the metrics objects registered anew in this thread in the block.

    Yields a list of ``(collector, (kind, name))``, filled as policies are
    made in the block (a policy joining another live one of its name is not
    noted: its metrics are not the block's). Blocks nest: an inner block's
    notes are the outer's too.
    """
    made: list[tuple[Collector, tuple[str, str]]] = []
    outer = getattr(_capture, "made", None)
    _capture.made = made
    try:
        yield made
    finally:
        _capture.made = outer
        if outer is not None:
            outer.extend(made)


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, Collector] = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def collector_for(registry: CollectorRegistry) -> Collector:
    """The registry's collector, registered with it on first use."""
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = Collector()
            registry.register(collector)
            _collectors[registry] = collector
        return collector


def buckets(value: object) -> tuple[float, ...] | None:
    """``Telemetry(latency=...)``, validated: None (off) or ascending bucket bounds."""
    if value is False or value is None:
        return None
    if value is True:
        return DEFAULT_BUCKETS
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"latency must be a bool or a tuple of bucket bounds, not {type(value).__name__}"
        )
    bounds = tuple(value)
    if not bounds:
        raise ValueError("latency must hold at least one bucket bound")
    for bound in bounds:
        if not isinstance(bound, (int, float)) or isinstance(bound, bool):
            raise TypeError(f"latency must hold numbers, got {type(bound).__name__}")
        if not 0.0 < bound < float("inf"):
            raise ValueError(f"latency must hold finite bounds > 0, got {bound!r}")
    if any(b >= a for a, b in zip(bounds[1:], bounds, strict=False)):
        raise ValueError(f"latency must hold strictly increasing bounds, got {bounds!r}")
    return tuple(float(b) for b in bounds)
