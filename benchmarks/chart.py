"""The report's chart: ratios to baseline, log scale, stalwart against its peers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ._harness import Case

STALWART = "#3f51b5"
PEER = "#b0b0b0"
REFERENCE = "#e0e0e0"
BUDGET = "#d32f2f"


def draw(groups: Sequence[tuple[str, Sequence[Case]]], path: Path) -> None:
    """A horizontal bar per non-baseline case, grouped, with budget marks.

    ``groups``: (title, the cases of the run the group's rows are in).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: list[str] = []
    values: list[float] = []
    colours: list[str] = []
    budgets: list[tuple[int, float]] = []
    headings: list[tuple[int, str]] = []
    for title, cases in groups:
        by_name = {case.name: case for case in cases}
        members = [case for case in cases if case.group == title and case.baseline is not None]
        if not members:
            continue
        members.sort(key=lambda case: (not case.reference, case.is_peer, case.median_ns))
        headings.append((len(labels), title))
        labels.append("")
        values.append(0.0)
        colours.append(PEER)
        for case in members:
            assert case.baseline is not None
            if case.budget is not None:
                budgets.append((len(labels), case.budget))
            label = case.name if len(case.name) <= 58 else case.name[:57] + "…"
            labels.append(label)
            values.append(case.median_ns / by_name[case.baseline].median_ns)
            colours.append(STALWART if case.is_ours else REFERENCE if case.reference else PEER)

    height = 1.2 + 0.22 * len(labels)
    figure, axes = plt.subplots(figsize=(11, height))
    rows = list(range(len(labels)))
    shown = [value if value > 0 else float("nan") for value in values]
    axes.barh(rows, shown, color=colours, height=0.7)
    for row, budget in budgets:
        axes.plot([budget, budget], [row - 0.45, row + 0.45], color=BUDGET, linewidth=2)
    for row, title in headings:
        axes.text(1.0, row, title, fontweight="bold", fontsize=8, va="center")
    axes.set_yticks(rows)
    axes.set_yticklabels(labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xlabel("ratio to the row's baseline (log scale; 1 = the baseline itself)")
    axes.set_title("stalwart (blue), its peers (grey), references (light grey); red marks: budgets")
    axes.grid(axis="x", which="both", linewidth=0.3, alpha=0.6)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
