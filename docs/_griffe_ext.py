"""A griffe extension: render stalwart's docstrings well in the API reference.

stalwart's docstrings are written for ``help()`` as much as for the site, in
the reST habit of ``Example::`` followed by an indented block. Markdown would
show that as "Example::" over an unhighlighted block, so this extension turns

* ``Example::`` + an indented block into an "Example" admonition holding a
  fenced ``python`` block (Material renders it with its example icon);
* any other paragraph ending in ``::`` into the paragraph (ending in ``:``)
  followed by a fenced ``python`` block.

It also shows a parameter whose default is a private module constant
(``backoff=_DEFAULT_BACKOFF``) with the constant's value (``Backoff()``), and
a constant that only marks a number as a default
(``_DEFAULT_FAILURE_RATE = _FloatDefault(0.5)``) with that number (``0.5``).
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_TITLE = re.compile(r"^Examples?$")


def rst_literals_to_markdown(text: str) -> str:
    """Rewrite reST ``::`` literal blocks as Markdown fenced blocks."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.rstrip()
        if not stripped.endswith("::"):
            out.append(line)
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        body: list[str] = []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        code = textwrap.dedent("\n".join(body)).strip("\n").splitlines()
        prose = stripped[:-1].strip()
        pad = " " * indent
        if _TITLE.match(prose.rstrip(":")):
            inner = pad + "    "
            out.append(f"{pad}Example:")
            out.extend([f"{inner}```python", *(inner + c if c else "" for c in code)])
            out.append(f"{inner}```")
        else:
            if prose != ":":
                out.append(f"{pad}{prose}")
            out.extend(["", f"{pad}```python", *(pad + c if c else "" for c in code)])
            out.append(f"{pad}```")
        out.append("")
    return "\n".join(out)


class RestLiterals(griffe.Extension):
    """Markdown for ``::`` blocks, and readable defaults in signatures."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and "::" in obj.docstring.value:
            obj.docstring.value = rst_literals_to_markdown(obj.docstring.value)
        if isinstance(obj, griffe.Function):
            for parameter in obj.parameters:
                default = parameter.default
                if isinstance(default, griffe.ExprName) and default.name.startswith("_"):
                    constant = obj.module.members.get(default.name)
                    if isinstance(constant, griffe.Attribute) and constant.value is not None:
                        parameter.default = _unmarked(constant.value)


def _unmarked(value: str | griffe.Expr) -> str | griffe.Expr:
    """``_Marker(x)`` (a private class marking a default) as ``x``; anything else as is."""
    if (
        isinstance(value, griffe.ExprCall)
        and isinstance(value.function, griffe.ExprName)
        and value.function.name.startswith("_")
        and len(value.arguments) == 1
    ):
        return value.arguments[0]
    return value
