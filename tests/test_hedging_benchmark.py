"""The hedging scenario (benchmarks/hedging.py) runs, and says what the docs quote from it."""

from __future__ import annotations

import re

from benchmarks import hedging


def tables(text: str) -> list[dict[str, list[float]]]:
    """Each table's rows by setting: p50, p99, p99.9 (ms), attempts per call, hedged (%)."""
    found: list[dict[str, list[float]]] = []
    for block in text.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("| ")]
        if not rows:
            continue
        table = {}
        for row in rows[1:]:
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            table[cells[0]] = [float(re.sub(r"[^\d.]", "", cell)) for cell in cells[1:]]
        found.append(table)
    return found


def test_hedging_cuts_the_tail_and_a_budget_caps_the_load_of_a_slowdown() -> None:
    tail, slowdown = tables(hedging.report(healthy=10.0, slow=5.0))
    assert list(tail) == [name for name, _ in hedging.settings()]
    unhedged, hedged = tail["no hedging"], tail["`Hedge(delay=0.05)`"]
    assert hedged[1] < unhedged[1] / 4  # p99
    assert hedged[3] < 1.1  # attempts per call
    # Every call slow: a fixed delay hedges them all, a budget only a few.
    assert slowdown["`Hedge(delay=0.05)`"][3] > 1.9
    assert slowdown["`Hedge(delay=0.05, budget=RetryBudget(0.05))`"][3] < 1.3
