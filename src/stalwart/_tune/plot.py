"""``--plot FILE.png``: the best and the worst setting over time.

Three panels share the time axis: the share of attempts the downstream
failed, the share of each second the breaker spent open, and the load on the
downstream (attempts per second, with the calls per second for scale). The
timeline's phases are shaded. matplotlib is imported only here, and only when
a plot is asked for (it is in the ``tune`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .engine import BUCKET
from .report import WINDOW, Report, Result
from .scenario import Scenario

__all__ = ["PlotUnavailable", "require_matplotlib", "write_plot"]

_BEST, _WORST, _CALLS = "#1f77b4", "#d62728", "#7f7f7f"
_PHASE_COLOURS = {"brownout": "#ffe9a8", "outage": "#f7c4c4", "recovery": "#d9ecd0"}


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise `PlotUnavailable`, with the fix, if matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib, which is not installed: "
            "pip install 'stalwart[tune]' (or pip install matplotlib)"
        ) from None


def _rolling(values: Sequence[float], width: int) -> list[float]:
    """Sum over the ``width`` buckets ending at each bucket (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total)
    return out


def _rolling_mean(values: Sequence[float], width: int) -> list[float]:
    """Mean per bucket over the ``width`` buckets ending at each one (fewer at the start)."""
    return [s / min(i + 1, width) for i, s in enumerate(_rolling(values, width))]


def _error_rate(result: Result) -> list[float]:
    failed = _rolling(result.run.failed, WINDOW)
    attempts = _rolling(result.run.attempts, WINDOW)
    return [f / a if a else math.nan for f, a in zip(failed, attempts, strict=True)]


def _load(result: Result) -> list[float]:
    return _rolling_mean(result.run.attempts, WINDOW)


def _profile(scenario: Scenario, buckets: int) -> list[float]:
    """The timeline's error rate at the middle of each bucket."""
    out = []
    ds = scenario.downstream
    for b in range(buckets):
        t = (b + 0.5) * BUCKET
        rate = ds.error_rate
        for phase in ds.timeline:
            if phase.start <= t < phase.end:
                share = (t - phase.start) / phase.duration
                rate = phase.error_rate + (phase.end_error_rate - phase.error_rate) * share
                break
        out.append(rate)
    return out


def _span(scenario: Scenario, total: float) -> tuple[float, float]:
    """The seconds to show: the whole run, or the incident and some time around it.

    An incident short next to the run (five minutes of an hour) would be a
    sliver of the plot, and it is all that the plot is about.
    """
    incident = scenario.incident
    if incident is None or incident[1] - incident[0] > total / 3:
        return 0.0, total
    pad = max(60.0, 0.5 * (incident[1] - incident[0]))
    return max(0.0, incident[0] - pad), min(total, incident[1] + 2 * pad)


def write_plot(report: Report, path: str | Path) -> None:
    """Draw ``report``'s best and worst settings into the PNG file ``path``."""
    require_matplotlib()
    from matplotlib.figure import Figure

    scenario = report.scenario
    shown = [(report.best, _BEST, "best")]
    if len(report.results) > 1:
        shown.append((report.worst, _WORST, "worst"))
    buckets = max(len(r.run.attempts) for r, _, _ in shown)
    start, end = _span(scenario, buckets * BUCKET)
    minutes = end - start > 900
    scale = 60.0 if minutes else 1.0

    def times(n: int) -> list[float]:
        return [(b + 1) * BUCKET / scale for b in range(n)]

    figure = Figure(figsize=(11, 8.5), layout="constrained")
    errors, breaker, load = figure.subplots(3, 1, sharex=True)
    zoomed = "" if (start, end) == (0.0, buckets * BUCKET) else ", around the incident"
    figure.suptitle(f"stalwart tune: {scenario.name}, best and worst setting{zoomed}", fontsize=13)

    for axis in (errors, breaker, load):
        for phase in scenario.downstream.timeline:
            colour = _PHASE_COLOURS.get(phase.kind)
            if colour is not None:
                axis.axvspan(phase.start / scale, phase.end / scale, color=colour, lw=0)
        axis.grid(True, alpha=0.3)
    for phase in scenario.downstream.timeline:
        if phase.kind in _PHASE_COLOURS:
            errors.annotate(
                phase.kind,
                xy=(phase.start / scale, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, 3),
                textcoords="offset points",
                fontsize=9,
                color="#555555",
                va="bottom",
            )

    profile = _profile(scenario, buckets)
    errors.plot(
        [b * BUCKET / scale for b in range(buckets)],
        profile,
        color=_CALLS,
        ls="--",
        lw=1,
        drawstyle="steps-post",
        label="the downstream's timeline",
    )
    for result, colour, role in shown:
        errors.plot(
            times(len(result.run.attempts)),
            _error_rate(result),
            color=colour,
            lw=1.2,
            label=f"{role}: {result.label}",
        )
    errors.set_ylabel(f"attempts the downstream\nfailed (share, {WINDOW} s)")
    errors.set_ylim(-0.02, 1.05)
    errors.legend(loc="center right", fontsize=8)

    if any(r.setting.has_breaker for r, _, _ in shown):
        for result, colour, role in shown:
            if not result.setting.has_breaker:
                continue
            x = [b * BUCKET / scale for b in range(len(result.run.open) + 1)]
            opened = [*result.run.open, 0.0]
            run = result.run
            half = [o + h for o, h in zip(run.open, run.half_open, strict=True)] + [0.0]
            breaker.fill_between(x, half, step="post", color=colour, alpha=0.15, lw=0)
            breaker.fill_between(
                x, opened, step="post", color=colour, alpha=0.5, lw=0, label=f"{role}: open"
            )
        breaker.set_ylim(0, 1.05)
        breaker.legend(loc="center right", fontsize=8)
    else:
        breaker.text(
            0.5,
            0.5,
            "no circuit breaker in these settings",
            transform=breaker.transAxes,
            ha="center",
            va="center",
            color="#555555",
        )
        breaker.set_ylim(0, 1)
    breaker.set_ylabel("breaker open\n(share of each second)")

    calls = shown[0][0].run.calls
    load.plot(
        times(len(calls)),
        _rolling_mean(calls, WINDOW),
        color=_CALLS,
        lw=1,
        ls="--",
        label="calls per second",
    )
    for result, colour, role in shown:
        load.plot(
            times(len(result.run.attempts)),
            _load(result),
            color=colour,
            lw=1.2,
            label=f"{role}: attempts per second",
        )
    load.set_ylabel(f"load on the downstream\n(per second, {WINDOW} s mean)")
    load.set_ylim(bottom=0)
    load.legend(loc="upper right", fontsize=8)
    load.set_xlabel("minutes" if minutes else "seconds")
    load.set_xlim(start / scale, end / scale)

    _save(figure, Path(path))


def _save(figure: Any, path: Path) -> None:
    figure.savefig(path, dpi=110, format="png")
