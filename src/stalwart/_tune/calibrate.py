"""``tune --calibrate``: a scenario's ``[downstream]`` from a Prometheus latency histogram.

Reads a Prometheus text exposition (a file, or a ``/metrics`` URL) with
prometheus_client's own parser, picks a latency histogram, and prints the
``[downstream]`` table a scenario starts from: the latency's median and p99,
the error rate and the latency of errors.

* **Which histogram**: ``--metric NAME``, or else OpenTelemetry's
  ``http.client.request.duration`` (which the OpenTelemetry Prometheus
  exporter exposes as ``http_client_request_duration_seconds``), or else the
  only histogram whose name ends in ``_seconds``. A name is matched as
  exposed, with its ``_seconds`` suffix added, or with dots for underscores
  (the OpenTelemetry name).
* **Which requests failed**: a series labelled with a non-empty
  ``error_type`` (OpenTelemetry's ``error.type``), or whose status label
  (``http_response_status_code``, ``status_code``, ``status`` or ``code``)
  is a 5xx. The rest succeeded.
* **Quantiles** are interpolated within buckets as Prometheus's
  ``histogram_quantile`` does (linearly, the first bucket starting at 0; a
  quantile in the ``+Inf`` bucket is the highest finite bound), over the
  buckets of every successful series added up by ``le``. The exposition holds
  counts since each process started: the figures describe that whole time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["Calibration", "CalibrationError", "calibrate", "histogram_quantile", "read_source"]

#: OpenTelemetry's HTTP client duration, as the Prometheus exporter names it.
OTEL_CLIENT_DURATION: Final = "http_client_request_duration_seconds"

_STATUS_LABELS: Final = ("http_response_status_code", "status_code", "status", "code")

#: A larger exposition is refused: a /metrics page is kilobytes, not this.
_MAX_BYTES: Final = 50 * 1024 * 1024


class CalibrationError(Exception):
    """An exposition that cannot be calibrated from, with the reason."""


@dataclass(frozen=True)
class Calibration:
    """What one histogram says about a dependency."""

    source: str
    metric: str
    requests: int
    errors: int
    median: float
    p99: float
    #: p99 fell in the +Inf bucket: it is at least this, maybe more
    p99_capped: bool
    #: median latency of the failed requests (None: no failed request)
    error_latency: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def toml(self) -> str:
        """The ``[downstream]`` table, commented."""
        capped = " (at least: it is in the +Inf bucket)" if self.p99_capped else ""
        lines = [
            f"# From {self.metric} in {self.source}:",
            f"# {self.requests} requests, {self.errors} failed "
            "(error_type set, or a 5xx status); quantiles of the successful ones,",
            "# interpolated within buckets as histogram_quantile does"
            f"{capped}. Add capacity, queue and a timeline.",
            "[downstream]",
            f"latency = {{ median = {_g(self.median)}, p99 = {_g(max(self.p99, self.median))} }}",
            f"error_rate = {_g(self.error_rate)}",
        ]
        if self.error_latency is not None:
            lines.append(f"error_latency = {_g(self.error_latency)}")
        return "\n".join(lines) + "\n"


def _g(value: float) -> str:
    """Three significant digits, written as a TOML float."""
    text = f"{value:.3g}"
    if "e" in text:
        text = f"{float(text):.10f}".rstrip("0")
    return text if "." in text else f"{text}.0"


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """The ``q`` quantile of cumulative ``(upper bound, count)`` buckets, as Prometheus computes it.

    ``buckets`` are sorted by bound and end with ``+Inf``. The rank ``q *
    total`` is found in the first bucket whose count reaches it, and
    interpolated linearly between that bucket's lower and upper bounds (0 for
    the first bucket, unless its bound is at most 0). In the ``+Inf`` bucket,
    the highest finite bound is returned. NaN without observations.
    """
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        return math.nan
    counts = [count for _, count in buckets]
    for i in range(1, len(counts)):  # as Prometheus's ensureMonotonic
        counts[i] = max(counts[i], counts[i - 1])
    total = counts[-1]
    if total == 0:
        return math.nan
    rank = q * total
    b = next((i for i in range(len(buckets) - 1) if counts[i] >= rank), len(buckets) - 1)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, end, count = 0.0, buckets[b][0], counts[b]
    if b > 0:
        start = buckets[b - 1][0]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    if count == 0:
        return end
    return start + (end - start) * (rank / count)


def read_source(source: str, *, timeout: float = 10.0) -> str:
    """The exposition's text: a file, or the body of an ``http(s)://`` URL."""
    if source.startswith(("http://", "https://")):
        import httpx

        try:
            response = httpx.get(
                source, timeout=timeout, headers={"accept": "text/plain;version=0.0.4"}
            )
        except httpx.HTTPError as exc:
            raise CalibrationError(f"cannot read {source}: {exc}") from None
        if response.status_code != 200:
            raise CalibrationError(f"cannot read {source}: HTTP {response.status_code}")
        if len(response.content) > _MAX_BYTES:
            raise CalibrationError(f"{source} is over {_MAX_BYTES // 2**20} MiB: not a /metrics")
        return response.text
    path = Path(source)
    try:
        if path.stat().st_size > _MAX_BYTES:
            raise CalibrationError(f"{source} is over {_MAX_BYTES // 2**20} MiB: not a /metrics")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CalibrationError(f"cannot read {source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CalibrationError(f"cannot read {source}: not UTF-8 text") from None


@dataclass
class _Histogram:
    name: str
    #: per series (its labels but ``le``): bound -> cumulative count
    series: dict[tuple[tuple[str, str], ...], dict[float, float]]


def _histograms(text: str, source: str) -> dict[str, _Histogram]:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, IndexError, KeyError, TypeError) as exc:  # what the parser raises
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CalibrationError(f"{source} is not a Prometheus text exposition: {reason}") from None
    found: dict[str, _Histogram] = {}
    for family in families:
        if family.type != "histogram":
            continue
        histogram = found.setdefault(family.name, _Histogram(family.name, {}))
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                continue
            labels = dict(sample.labels)
            le = labels.pop("le", None)
            bound = _bound(le)
            if bound is None:
                raise CalibrationError(
                    f"{source}: {sample.name} has a bucket with le={le!r}, not a number"
                )
            if not (math.isfinite(sample.value) and sample.value >= 0):
                raise CalibrationError(
                    f"{source}: {sample.name}{{le={le!r}}} counts {sample.value!r}"
                )
            key = tuple(sorted(labels.items()))
            histogram.series.setdefault(key, {})[bound] = sample.value
    return found


def _bound(le: str | None) -> float | None:
    if le is None:
        return None
    try:
        return float(le)
    except ValueError:
        return None


def _choose(histograms: Mapping[str, _Histogram], metric: str | None, source: str) -> _Histogram:
    if not histograms:
        raise CalibrationError(
            f"{source} holds no histogram (no `# TYPE NAME histogram` with _bucket samples)"
        )
    names = sorted(histograms)
    if metric is not None:
        candidates = [metric, f"{metric}_seconds", metric.replace(".", "_")]
        candidates.append(f"{candidates[-1]}_seconds")
        for candidate in candidates:
            if candidate in histograms:
                return histograms[candidate]
        raise CalibrationError(
            f"{source} has no histogram {metric!r}; its histograms: {', '.join(names)}"
        )
    if OTEL_CLIENT_DURATION in histograms:
        return histograms[OTEL_CLIENT_DURATION]
    seconds = [name for name in names if name.endswith("_seconds")]
    if len(seconds) == 1:
        return histograms[seconds[0]]
    if not seconds:
        raise CalibrationError(
            f"{source} has no latency histogram (a name ending in _seconds); "
            f"its histograms: {', '.join(names)}; name one with --metric"
        )
    raise CalibrationError(
        f"{source} has {len(seconds)} latency histograms: {', '.join(seconds)}; "
        "name one with --metric"
    )


def _failed(labels: Iterable[tuple[str, str]]) -> bool:
    values = dict(labels)
    if values.get("error_type"):
        return True
    for name in _STATUS_LABELS:
        status = values.get(name, "")
        if len(status) == 3 and status.isdigit():
            return status.startswith("5")
    return False


def _summed(
    series: Iterable[dict[float, float]], name: str, source: str
) -> list[tuple[float, float]]:
    """Buckets of several series added up by bound (``sum by (le)``)."""
    total: dict[float, float] = {}
    for buckets in series:
        if math.inf not in buckets:
            raise CalibrationError(f"{source}: {name} has a series without a +Inf bucket")
        for bound, count in buckets.items():
            total[bound] = total.get(bound, 0.0) + count
    return sorted(total.items())


def calibrate(text: str, *, source: str, metric: str | None = None) -> Calibration:
    """What the chosen histogram of exposition ``text`` says (`CalibrationError` if nothing)."""
    histogram = _choose(_histograms(text, source), metric, source)
    name = histogram.name
    good = [b for labels, b in histogram.series.items() if not _failed(labels)]
    bad = [b for labels, b in histogram.series.items() if _failed(labels)]
    ok_buckets = _summed(good, name, source)
    bad_buckets = _summed(bad, name, source)
    successes = int(ok_buckets[-1][1]) if ok_buckets else 0
    errors = int(bad_buckets[-1][1]) if bad_buckets else 0
    if successes == 0:
        raise CalibrationError(
            f"{source}: {name} holds no successful request "
            f"({errors} failed): no latency to calibrate from"
        )
    median = histogram_quantile(0.5, ok_buckets)
    p99 = histogram_quantile(0.99, ok_buckets)
    finite = [bound for bound, _ in ok_buckets if math.isfinite(bound)]
    capped = bool(finite) and p99 >= finite[-1] and ok_buckets[-2][1] < 0.99 * successes
    if not (median > 0 and math.isfinite(median)):
        raise CalibrationError(
            f"{source}: {name}'s median is {median:g} s: a scenario's latency must be > 0 "
            "(are its buckets in seconds?)"
        )
    error_latency = histogram_quantile(0.5, bad_buckets) if errors else None
    return Calibration(
        source=source,
        metric=name,
        requests=successes + errors,
        errors=errors,
        median=median,
        p99=p99,
        p99_capped=capped,
        error_latency=error_latency,
    )
