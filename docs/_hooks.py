"""MkDocs hooks: fill in what the docs cannot know in advance.

``benchmarks.md`` shows the newest committed results table (the last by name of
``benchmarks/results/*.md``, so date-stamped names sort right), or says there is
none yet. Everything else is plain Markdown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
MARKER = "<!-- latest-benchmark-results -->"


def latest_results() -> str:
    tables = sorted(RESULTS.glob("*.md")) if RESULTS.is_dir() else []
    if not tables:
        return (
            "No results are committed yet: `benchmarks/results/` holds none. "
            "Run the suite as shown above to get the table for your machine."
        )
    newest = tables[-1]
    body = newest.read_text(encoding="utf-8").strip()
    return f"From `benchmarks/results/{newest.name}`:\n\n{body}\n"


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, latest_results())
    return markdown
