"""MkDocs hooks: fill in what the docs cannot know in advance.

``benchmarks.md`` shows the newest committed results (the last by name of
``benchmarks/results/YYYY-MM-DD-*.md``, so date-stamped names sort right), or says there
is none yet. The report's chart, a PNG of the same name next to it, is added
to the site as a generated file and the report's link pointed at it (a
report whose chart is missing is shown without one). Everything else is
plain Markdown.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
MARKER = "<!-- latest-benchmark-results -->"
CHARTS = "assets/benchmarks"  # where the site serves the charts, from the docs root


def newest_results() -> Path | None:
    # Date-stamped reports only: validation.md (`nox -s validate`) sorts after them.
    tables = sorted(RESULTS.glob("[0-9]*.md")) if RESULTS.is_dir() else []
    return tables[-1] if tables else None


def latest_results() -> str:
    newest = newest_results()
    if newest is None:
        return (
            "No results are committed yet: `benchmarks/results/` holds none. "
            "Run the suite as shown above to get the report for your machine."
        )
    body = newest.read_text(encoding="utf-8").strip()
    chart = newest.with_suffix(".png")
    link = re.compile(r"^!\[([^\]]*)\]\(" + re.escape(chart.name) + r"\)$", re.MULTILINE)
    if chart.is_file():
        body = link.sub(rf"![\1]({CHARTS}/{chart.name})", body)
    else:
        body = link.sub("", body)
    return f"From `benchmarks/results/{newest.name}`:\n\n{body}\n"


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    newest = newest_results()
    if newest is not None:
        chart = newest.with_suffix(".png")
        if chart.is_file():
            files.append(File.generated(config, f"{CHARTS}/{chart.name}", abs_src_path=str(chart)))
    return files


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, latest_results())
    return markdown
