"""The built-in scenarios: TOML files shipped in ``scenarios/``, in the order ``--list`` shows.

They are ordinary scenario files, read by the same parser as the user's, so
``python -m stalwart tune --scenario NAME --print-scenario`` is a starting
point for a scenario of your own.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from . import schema

__all__ = ["NAMES", "description", "text"]

#: The built-in scenarios; ``tune`` with no scenario runs the first.
NAMES: Final = (
    "outage",
    "hang",
    "brownout",
    "retry-storm",
    "contention",
    "overload",
    "quota",
    "long-tail",
)


def text(name: str) -> str:
    """The TOML source of built-in scenario ``name``."""
    if name not in NAMES:
        raise KeyError(name)
    return (resources.files(__package__) / "scenarios" / f"{name}.toml").read_text("utf-8")


def description(name: str) -> str:
    """The one-line description of built-in scenario ``name``."""
    return str(schema.loads_toml(text(name), name).get("description", ""))
