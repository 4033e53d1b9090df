"""What the HTTP integrations (`stalwart.httpx`, `stalwart.asgi`) share.

Nothing here imports httpx or an ASGI framework: each integration needs only
its own extra.
"""

from __future__ import annotations

import re
from typing import Any, Final

__all__ = ["DEADLINE_HEADER", "IDEMPOTENCY_HEADER", "header_name"]

DEADLINE_HEADER: Final = "x-request-timeout-ms"
"""Where a caller's deadline travels: the milliseconds it has left."""

IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
"""The IETF draft's header for a request's idempotency key."""

# Header field names are tokens (RFC 9110, section 5.1).
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def header_name(param: str, value: Any) -> str:
    """A valid HTTP header name, as given (header names ignore case)."""
    if not isinstance(value, str):
        raise TypeError(f"{param} must be a header name (str), not {type(value).__name__}")
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{param} must be a valid HTTP header name, got {value!r}")
    return value
