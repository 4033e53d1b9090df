"""Lua scripts that Redis runs for stalwart, kept as ``.lua`` files (read, never executed here).

A script shares code with others through fragments: a line ``--#include
<name>`` (a Lua comment, so every file stays valid Lua) stands for the text of
``<name>.lua``, its own includes expanded in turn. A fragment is written once
into a script however many times it is named (the first time), so that two
fragments may each include a third. Fragments' names begin with ``_``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib.resources import files
from typing import Final

__all__ = ["expand", "source"]

_INCLUDE: Final = re.compile(r"^--#include (\w+)$")


def source(name: str) -> str:
    """The text of the script ``name`` (``"gcra"`` reads ``gcra.lua``), its includes expanded."""
    return expand(name, _read)


def _read(name: str) -> str:
    return files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def expand(name: str, read: Callable[[str], str]) -> str:
    """The text ``read(name)``, each ``--#include`` line replaced by its fragment, once."""
    included: set[str] = set()

    def text(name: str) -> str:
        included.add(name)
        lines = []
        for line in read(name).splitlines(keepends=True):
            match = _INCLUDE.fullmatch(line.rstrip("\n"))
            if match is None:
                lines.append(line)
            elif match[1] not in included:
                lines.append(text(match[1]))
        return "".join(lines)

    return text(name)
