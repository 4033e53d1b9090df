"""The idempotency how-to's ```python examples run, in order, in one namespace."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "how-to" / "idempotency.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def test_the_page_has_examples() -> None:
    assert len(BLOCK.findall(PAGE.read_text(encoding="utf-8"))) >= 5


def test_the_examples_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real module, as a reader's script would be (dataclasses look it up).
    module = types.ModuleType("idempotency_how_to")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for number, block in enumerate(BLOCK.findall(PAGE.read_text(encoding="utf-8")), 1):
        code = compile(block, f"{PAGE.name} (example {number})", "exec", dont_inherit=True)
        exec(code, module.__dict__)
    printed = capsys.readouterr().out
    assert "printable characters" in printed
    assert "job-2 is in flight" in printed
    assert "pay-42 was used for another refund" in printed
    assert "o-1 already names another order" in printed
