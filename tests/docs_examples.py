"""Find and run the code examples of the documentation (used by ``test_docs.py``).

The rules, for everyone who writes a page:

* A block fenced ```` ```python ```` is executed. The blocks of one page run in
  order, in one namespace whose ``__name__`` is ``"__main__"``, so a page can
  build an example up step by step. Async examples run themselves
  (``anyio.run(main)``, ``asyncio.run(main())``).
* A block fenced ```` ```py ```` is shown but not executed (it needs a server,
  say); it must still compile.
* A ```` ```text title="Output" ```` block right after a ```` ```python ````
  block is what that block prints: the run fails if the output differs
  (trailing whitespace aside).

Each page runs in a process of its own, forked from one that has already
imported the heavy modules: pages cannot see each other's global state (the
OpenTelemetry tracer provider can be set once per process, Prometheus'
global registry keeps every series) nor the test suite's, and a page costs a
fork instead of an interpreter start. Tracebacks point at lines of the
Markdown file itself.

Run by hand: ``python -m tests.docs_examples docs/tutorial.md``.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: Seconds a page may run before it is killed: the examples must stay fast.
PAGE_TIME_LIMIT = 60

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")
_OUTPUT_TITLE = re.compile(r"""\btitle=(["'])Output\1""")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown page."""

    path: Path
    #: the fence's language: ``python`` (executed), ``py`` (compiled), ...
    lang: str
    info: str
    code: str
    #: line of the page on which the code starts (1-based)
    line: int
    #: for a ``python`` block: what it must print, if the page says
    output: str | None = None

    @property
    def executed(self) -> bool:
        return self.lang == "python"

    def compile(self, *, top_level_await: bool = False) -> Any:
        """Compile the code so that tracebacks show the page's own line numbers."""
        flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT if top_level_await else 0
        padded = "\n" * (self.line - 1) + self.code
        return compile(padded, str(self.path), "exec", flags=flags, dont_inherit=True)


def pages() -> list[Path]:
    """Every page whose ``python`` blocks are executed: the docs and the README."""
    return [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]


def page_id(path: Path) -> str:
    """The page's path from the repository root (its test id)."""
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a page, outputs attached to their blocks."""
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"].strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        else:
            raise ValueError(f"{page_id(path)}:{i + 1}: code fence never closed")
        lang = info.split(maxsplit=1)[0].lstrip(".{").rstrip("}") if info else ""
        code = textwrap.dedent("\n".join(body)) + "\n"
        if (
            lang == "text"
            and _OUTPUT_TITLE.search(info)
            and found
            and found[-1].executed
            and found[-1].output is None
            and _only_blank_between(lines, found[-1], i)
        ):
            previous = found.pop()
            found.append(
                Block(
                    previous.path,
                    previous.lang,
                    previous.info,
                    previous.code,
                    previous.line,
                    output=code,
                )
            )
        else:
            found.append(Block(path, lang, info, code, i + 2))
        i = j + 1
    return found


def _only_blank_between(lines: list[str], block: Block, fence_line: int) -> bool:
    end = block.line - 1 + block.code.count("\n")  # the closing fence of `block`
    return all(not line.strip() for line in lines[end + 1 : fence_line])


def _same_output(printed: str, expected: str) -> bool:
    def norm(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip().splitlines()]

    return norm(printed) == norm(expected)


class ExampleFailed(Exception):
    """A block raised, or printed something other than its page says."""


def run_page(path: Path) -> None:
    """Execute the ``python`` blocks of one page in this process."""
    namespace: dict[str, Any] = {"__name__": "__main__", "__file__": str(path)}
    for block in blocks(path):
        if not block.executed:
            continue
        code = block.compile()
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                exec(code, namespace)
        except BaseException as exc:
            shown = printed.getvalue()
            raise ExampleFailed(
                f"the block at {page_id(path)}:{block.line} failed"
                + (f"; it printed:\n{shown}" if shown else "")
            ) from exc
        if block.output is not None and not _same_output(printed.getvalue(), block.output):
            raise ExampleFailed(
                f"the block at {page_id(path)}:{block.line} printed:\n"
                f"{printed.getvalue()}\nbut the page says it prints:\n{block.output}"
            )


def _outcome_of(path: Path) -> str | None:
    """Run a page; None if it passed, else what went wrong."""
    try:
        run_page(path)
    except ExampleFailed as failed:
        cause = failed.__cause__
        detail = ""
        if cause is not None:
            # Start the traceback at the page's code, not at this runner's exec().
            tb = cause.__traceback__
            tb = tb.tb_next if tb is not None else None
            detail = "".join(traceback.format_exception(type(cause), cause, tb))
        return f"{failed}\n{detail}".rstrip()
    except BaseException:
        return traceback.format_exc()
    return None


def _preload() -> None:
    """Import what most pages import, once, before forking."""
    import anyio  # noqa: F401
    import opentelemetry.sdk.trace  # noqa: F401
    import prometheus_client  # noqa: F401
    import trio  # noqa: F401

    import stalwart
    import stalwart.testing  # noqa: F401


def _forked(paths: Sequence[Path]) -> Iterator[tuple[Path, str | None]]:
    """Run each page in a child forked from this process, a few at a time."""
    _preload()
    sys.stdout.flush()
    sys.stderr.flush()
    limit = max(2, os.cpu_count() or 1)
    waiting = list(paths)
    running: dict[int, tuple[Path, int]] = {}
    while waiting or running:
        while waiting and len(running) < limit:
            path = waiting.pop(0)
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                os.close(read_end)
                # Output a page sends around sys.stdout must not garble the report.
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                signal.alarm(PAGE_TIME_LIMIT)
                outcome = _outcome_of(path)
                with os.fdopen(write_end, "w", encoding="utf-8") as report:
                    json.dump({"error": outcome}, report)
                sys.stdout.flush()
                os._exit(0)
            os.close(write_end)
            running[pid] = (path, read_end)
        pid, status = os.wait()
        path, read_end = running.pop(pid)
        with os.fdopen(read_end, encoding="utf-8") as report:
            text = report.read()
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
            yield path, f"{page_id(path)} ran longer than {PAGE_TIME_LIMIT}s and was killed"
        elif not text:
            yield path, f"{page_id(path)}: the page's process died (status {status})"
        else:
            yield path, json.loads(text)["error"]


def _spawned(paths: Sequence[Path]) -> Iterator[tuple[Path, str | None]]:
    """Without fork (Windows): one fresh interpreter per page."""
    for path in paths:
        done = subprocess.run(
            [sys.executable, "-m", "tests.docs_examples", "--in-process", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=PAGE_TIME_LIMIT,
            check=False,
        )
        yield path, None if done.returncode == 0 else done.stderr


def run_isolated(paths: Sequence[Path]) -> dict[str, str | None]:
    """Run pages, each in a process of its own: page id -> None or the failure."""
    runner = _forked if hasattr(os, "fork") else _spawned
    return {page_id(path): error for path, error in runner(paths)}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--in-process"]:
        failures = {page_id(Path(p)): _outcome_of(Path(p).resolve()) for p in args[1:]}
    elif args[:1] == ["--json"]:
        results = run_isolated([Path(p).resolve() for p in args[1:]])
        print(json.dumps(results))
        return 0
    else:
        failures = run_isolated([Path(p).resolve() for p in args] or pages())
    for page, error in failures.items():
        print(f"{'FAILED' if error else 'ok    '} {page}", file=sys.stderr)
        if error:
            print(textwrap.indent(error, "    "), file=sys.stderr)
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
