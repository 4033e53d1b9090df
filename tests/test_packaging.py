"""What ships: the sdist can run its own test suite, the wheel carries the license,
and a missing extra says how to install it.

The distributions are built here with hatchling (the project's build backend)
from this tree, into a temporary directory, in about a second.
"""

from __future__ import annotations

import importlib
import re
import sys
import tarfile
import tomllib
import zipfile

import pytest
from hatchling.builders.sdist import SdistBuilder
from hatchling.builders.wheel import WheelBuilder

from .docs_examples import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# What the test suite reads besides its own files (the docs tests read the
# pages, the README and mkdocs.yml's nav; the benchmark tests import benchmarks/).
READ_BY_THE_TESTS = ("src", "tests", "docs", "benchmarks")
TOP_LEVEL = ("pyproject.toml", "mkdocs.yml", "README.md", "CHANGELOG.md", "LICENSE", "noxfile.py")


def _tree_files(folder: str) -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / folder).rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and path.suffix not in (".pyc", ".tmp")
    }


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    out = tmp_path_factory.mktemp("sdist")
    (built,) = SdistBuilder(str(ROOT)).build(directory=str(out), versions=["standard"])
    with tarfile.open(built) as archive:
        names = archive.getnames()
    prefix = names[0].split("/")[0] + "/"
    return {name[len(prefix) :] for name in names if name.startswith(prefix)}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    (built,) = WheelBuilder(str(ROOT)).build(directory=str(out), versions=["standard"])
    return zipfile.ZipFile(built)


def test_the_license_is_mit_by_the_stalwart_developers() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "The stalwart developers" in text
    assert PYPROJECT["project"]["license"] == "MIT"


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_the_sdist_holds_the_top_level_files_the_tests_read(sdist: set[str], name: str) -> None:
    assert name in sdist


@pytest.mark.parametrize("folder", READ_BY_THE_TESTS)
def test_the_sdist_holds_every_file_of_the_folders_the_tests_read(
    sdist: set[str], folder: str
) -> None:
    missing = _tree_files(folder) - sdist
    assert not missing


def test_the_wheel_carries_the_license(wheel: zipfile.ZipFile) -> None:
    (license_file,) = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert wheel.read(license_file).decode() == (ROOT / "LICENSE").read_text(encoding="utf-8")
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    headers = wheel.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: MIT" in headers
    assert "License-File: LICENSE" in headers
    assert "Requires-Python: >=3.11" in headers


def test_the_wheel_carries_the_lua_scripts_and_the_redis_package(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    scripts = {f"stalwart/_lua/{p.name}" for p in (ROOT / "src/stalwart/_lua").glob("*.lua")}
    assert {
        "stalwart/_lua/gcra.lua",
        "stalwart/_lua/claim.lua",
        "stalwart/_lua/_clock.lua",
    } <= scripts
    assert scripts <= names
    modules = {f"stalwart/redis/{p.name}" for p in (ROOT / "src/stalwart/redis").glob("*.py")}
    assert "stalwart/redis/__init__.py" in modules
    assert modules <= names
    assert "stalwart/redis.py" not in names


def test_python_3_11_is_the_oldest_supported_everywhere() -> None:
    project = PYPROJECT["project"]
    assert project["requires-python"] == ">=3.11"
    versions = [
        c.rsplit(" :: ", 1)[1]
        for c in project["classifiers"]
        if c.startswith("Programming Language :: Python :: 3.")
    ]
    assert versions[0] == "3.11"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"
    assert PYPROJECT["tool"]["mypy"]["python_version"] == "3.11"
    for page in ("README.md", "docs/tutorial.md", "noxfile.py"):
        assert "3.10" not in (ROOT / page).read_text(encoding="utf-8"), page


def test_no_license_classifier_beside_the_license_expression() -> None:
    # PEP 639: `license = "MIT"` (License-Expression) replaces the classifiers.
    assert not [c for c in PYPROJECT["project"]["classifiers"] if c.startswith("License ::")]


# -- installing extras -------------------------------------------------------------------

# An unquoted `pip install stalwart[httpx]` fails under zsh (a glob that matches nothing).
_UNQUOTED_EXTRA = re.compile(r"pip install [^'\"\s`]*\[")


@pytest.mark.parametrize(
    ("module", "needs", "extra"),
    [("stalwart.httpx", "httpx", "httpx"), ("stalwart.redis", "redis", "redis")],
)
def test_a_missing_extra_says_how_to_install_it_quoted(
    monkeypatch: pytest.MonkeyPatch, module: str, needs: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, needs, None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=re.escape(f"pip install 'stalwart[{extra}]'")):
        importlib.import_module(module)


def test_every_install_command_quotes_its_extras() -> None:
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "src").rglob("*.py")]
    unquoted = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in files
        for match in _UNQUOTED_EXTRA.finditer(path.read_text(encoding="utf-8"))
    ]
    assert not unquoted
