"""Lua scripts that Redis runs for stalwart, kept as ``.lua`` files (read, never executed here)."""

from __future__ import annotations

from importlib.resources import files

__all__ = ["source"]


def source(name: str) -> str:
    """The text of the script ``name`` (``"gcra"`` reads ``gcra.lua``)."""
    return files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
