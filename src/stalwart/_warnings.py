"""Warnings that point at the user's line, not at stalwart's."""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Final

from ._errors import StalwartWarning

_PACKAGE: Final = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str) -> None:
    """Emit a `StalwartWarning` attributed to the first caller outside stalwart."""
    level = 1
    frame = inspect.currentframe()
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    warnings.warn(message, StalwartWarning, stacklevel=level)
