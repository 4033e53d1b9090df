"""The documentation cannot rot: its examples run, its reference covers the API.

* every ```` ```python ```` block of ``docs/**/*.md`` and ``README.md`` runs,
  page by page (one test id per page; see ``tests/docs_examples.py``);
* every ```` ```py ```` block (shown, not run) at least compiles;
* docstring examples compile and name only things that exist: they are
  fragments around the reader's own code (``fetch(url)``, an httpx client),
  so running them would need stubs that make them worse to read, while the
  mistakes they can really make (a typo, a renamed option or class) are
  caught by compiling them and resolving every ``sw.X`` / ``stalwart.X``;
* every public name has a reference entry, and every page is in the nav
  (``mkdocs build --strict`` checks the nav and links too; these checks run in
  the test suite, so in CI, without the docs toolchain).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import stalwart

from . import docs_examples
from .docs_examples import ROOT, blocks, page_id

PAGES = docs_examples.pages()
README = ROOT / "README.md"


def _page_params() -> list[object]:
    return [pytest.param(p, id=page_id(p)) for p in PAGES]


@pytest.fixture(scope="session")
def page_failures(request: pytest.FixtureRequest) -> dict[str, str | None]:
    """Run the selected pages once, each in a fresh process; page id -> failure."""
    selected = [
        item.callspec.params["page"]
        for item in request.session.items
        if isinstance(item, pytest.Function) and item.originalname == "test_page_examples_run"
    ]
    done = subprocess.run(
        [sys.executable, "-m", "tests.docs_examples", "--json", *map(str, selected)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=5 * docs_examples.PAGE_TIME_LIMIT,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"the docs runner itself failed:\n{done.stderr}", pytrace=False)
    results: dict[str, str | None] = json.loads(done.stdout)
    return results


@pytest.mark.parametrize("page", _page_params())
def test_page_examples_run(page: Path, page_failures: dict[str, str | None]) -> None:
    error = page_failures[page_id(page)]
    if error is not None:
        pytest.fail(error, pytrace=False)


@pytest.mark.parametrize("page", _page_params())
def test_page_examples_not_run_still_compile(page: Path) -> None:
    for block in blocks(page):
        if block.lang == "py":
            block.compile(top_level_await=True)


def test_the_runner_executes_blocks_in_order_and_checks_outputs(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        textwrap.dedent(
            """\
            # A page

            ```python
            greeting = "hello"
            ```

            !!! note
                ```python
                print(greeting, "world")
                ```

                ```text title="Output"
                hello world
                ```

            ```py
            not_run()
            ```
            """
        )
    )
    found = blocks(page)
    assert [(b.lang, b.line, b.output) for b in found] == [
        ("python", 4, None),
        ("python", 9, "hello world\n"),
        ("py", 17, None),
    ]
    docs_examples.run_page(page)


def test_the_runner_reports_a_wrong_output_and_the_failing_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text('```python\nprint("a")\n```\n\n```text title="Output"\nb\n```\n')
    with pytest.raises(docs_examples.ExampleFailed, match="printed"):
        docs_examples.run_page(page)
    page.write_text("Intro.\n\n```python\nx = 1\nraise LookupError(x)\n```\n")
    with pytest.raises(docs_examples.ExampleFailed) as failed:
        docs_examples.run_page(page)
    assert isinstance(failed.value.__cause__, LookupError)
    assert failed.value.__cause__.__traceback__ is not None
    frames = inspect.getinnerframes(failed.value.__cause__.__traceback__)
    assert (frames[-1].filename, frames[-1].lineno) == (str(page), 5)


# -- the reference and the nav ---------------------------------------------------

_DIRECTIVE = re.compile(r"^:::\s+(\S+)", re.MULTILINE)
_OPTIONAL_MODULES = ("httpx", "asgi", "redis", "grpc", "aiohttp")


def _documented_objects() -> set[str]:
    found: set[str] = set()
    for page in (ROOT / "docs" / "reference").glob("*.md"):
        found.update(_DIRECTIVE.findall(page.read_text(encoding="utf-8")))
    return found


@pytest.mark.parametrize("name", [n for n in stalwart.__all__ if n != "__version__"])
def test_every_public_name_has_a_reference_entry(name: str) -> None:
    assert f"stalwart.{name}" in _documented_objects(), (
        f"add `::: stalwart.{name}` to a page of docs/reference/"
    )


def test_the_public_modules_have_a_reference_page() -> None:
    modules = ["stalwart.testing"] + [
        f"stalwart.{m}" for m in _OPTIONAL_MODULES if (ROOT / f"src/stalwart/{m}.py").exists()
    ]
    missing = [m for m in modules if m not in _documented_objects()]
    assert not missing, f"add `::: MODULE` to a page of docs/reference/ for {missing}"


def _nav_pages() -> list[str]:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = config.split("\nnav:\n", 1)[1]
    nav = re.split(r"\n(?=\S)", nav, maxsplit=1)[0]
    return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?(\S+\.md)\s*$", nav, re.MULTILINE)


def test_every_page_is_in_the_nav() -> None:
    on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    missing = sorted(on_disk - set(_nav_pages()))
    assert not missing, f"add these pages to the nav in mkdocs.yml: {missing}"


def test_every_nav_entry_is_a_page() -> None:
    nav = _nav_pages()
    assert len(nav) == len(set(nav)), "a page is listed twice in the nav"
    absent = [p for p in nav if not (ROOT / "docs" / p).is_file()]
    assert not absent, f"the nav in mkdocs.yml lists missing pages: {absent}"


_LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s#]+\.md)(?:#[^)\s]*)?\)")
_ANCHOR_LINK = re.compile(r"\]\((?!https?:|mailto:)([^)\s#]*)#([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def _anchors(page: Path) -> set[str]:
    """Heading ids as Python-Markdown's toc extension makes them (and attr_list ids)."""
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    anchors = set(re.findall(r"\{[^}]*#([\w-]+)[^}]*\}", text))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.MULTILINE):
        heading = re.sub(r"\s*\{[^}]*\}$", "", heading)
        heading = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        slug = re.sub(r"[^\w\s-]", "", heading).strip().lower()
        anchors.add(re.sub(r"[-\s]+", "-", slug))
    return anchors


def test_the_errors_page_has_a_row_for_every_error() -> None:
    text = (ROOT / "docs" / "reference" / "errors.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(\w+)` \|", text, re.MULTILINE))
    exported = [getattr(stalwart, name) for name in stalwart.__all__]
    errors = {
        obj.__name__
        for obj in exported
        if inspect.isclass(obj) and issubclass(obj, stalwart.StalwartError)
    }
    assert errors <= rows
    assert "StalwartWarning" in text


# Packages a page's examples may use that `pip install stalwart` does not bring
# (stalwart depends on the OpenTelemetry API only), with what the page must say.
_NOT_INSTALLED_WITH_STALWART = {"opentelemetry.sdk": "pip install opentelemetry-sdk"}


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_a_page_whose_examples_need_another_package_says_how_to_install_it(page: Path) -> None:
    code = "\n".join(b.code for b in blocks(page) if b.lang in ("python", "py"))
    text = page.read_text(encoding="utf-8")
    for module, install in _NOT_INSTALLED_WITH_STALWART.items():
        if re.search(rf"^\s*(from|import) {re.escape(module)}\b", code, re.MULTILINE):
            assert install in text, f"{page_id(page)} uses {module}: say `{install}`"


@pytest.mark.parametrize("page", [p for p in PAGES if p != README], ids=page_id)
def test_links_between_pages_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    broken = [t for t in _LINK.findall(text) if not (page.parent / t).resolve().is_file()]
    assert not broken, f"{page_id(page)} links to missing pages: {broken}"


@pytest.mark.parametrize("page", [p for p in PAGES if p != README], ids=page_id)
def test_links_to_headings_resolve(page: Path) -> None:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for target, anchor in _ANCHOR_LINK.findall(text):
        linked = page if not target else (page.parent / target).resolve()
        if linked.suffix != ".md" or not linked.is_file():
            continue  # reference anchors (mkdocstrings) and missing pages are checked elsewhere
        if anchor not in _anchors(linked):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{page_id(page)} links to missing headings: {broken}"


# -- docstrings ------------------------------------------------------------------


def _modules() -> Iterator[ModuleType]:
    yield stalwart
    for info in pkgutil.walk_packages(stalwart.__path__, "stalwart."):
        yield importlib.import_module(info.name)


def _docstrings() -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of every module, class, function and member."""
    seen: set[int] = set()
    for module in _modules():
        if module.__doc__:
            yield module.__name__, module.__doc__
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != module.__name__ or id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.__doc__:
                yield f"{module.__name__}.{name}", obj.__doc__
            if inspect.isclass(obj):
                for member_name, member in vars(obj).items():
                    doc = getattr(member, "__doc__", None)
                    if isinstance(member, (staticmethod, classmethod)):
                        doc = member.__func__.__doc__
                    if doc and (inspect.isroutine(member) or isinstance(member, property)):
                        yield f"{module.__name__}.{name}.{member_name}", doc


def _literal_blocks(doc: str) -> Iterator[str]:
    """The ``::`` literal blocks and fenced blocks of a docstring."""
    lines = inspect.cleandoc(doc).splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            indent = len(line) - len(line.lstrip())
            body: list[str] = []
            i += 1
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                body.append(lines[i])
                i += 1
            yield textwrap.dedent("\n".join(body)).strip("\n") + "\n"
            continue
        if line.strip().startswith("```python"):
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            yield textwrap.dedent("\n".join(body)) + "\n"
        i += 1


def _docstring_examples() -> list[tuple[str, str]]:
    return [(where, code) for where, doc in _docstrings() for code in _literal_blocks(doc)]


def _names_used(tree: ast.AST) -> set[tuple[str, ...]]:
    """Dotted paths like ("stalwart", "testing", "set_testing") used in the code."""
    found: set[tuple[str, ...]] = set()
    for node in ast.walk(tree):
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in {"sw", "stalwart"} and parts:
            found.add(("stalwart", *reversed(parts)))
    return found


def _assert_names_exist(paths: set[tuple[str, ...]], where: str) -> None:
    for path in sorted(paths):
        obj: object = stalwart
        for depth, part in enumerate(path[1:], start=1):
            if not hasattr(obj, part) and isinstance(obj, ModuleType):
                with contextlib.suppress(ImportError):
                    importlib.import_module(".".join(path[: depth + 1]))
            assert hasattr(obj, part), f"{where}: {'.'.join(path[: depth + 1])} does not exist"
            obj = getattr(obj, part)


def test_docstrings_have_examples() -> None:
    assert len(_docstring_examples()) >= 5


@pytest.mark.parametrize(
    ("where", "code"), _docstring_examples(), ids=[w for w, _ in _docstring_examples()]
)
def test_docstring_examples_compile_and_name_real_things(where: str, code: str) -> None:
    tree = compile(code, where, "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    _assert_names_exist(_names_used(tree), where)
