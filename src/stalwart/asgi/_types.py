"""What the middlewares share: the ASGI types, a problem answer, a watched ``send``."""

from __future__ import annotations

import logging
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    MutableMapping,
)
from typing import Any

from .._http import (
    PROBLEM_JSON,
    problem_json,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _send_problem(
    send: Send,
    status: int,
    title: str,
    detail: str,
    *,
    retry_after: int | None = None,
    extensions: Mapping[str, str] | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send a complete ``application/problem+json`` response (RFC 9457), with ``headers`` too."""
    body = problem_json(status, title, detail, extensions).encode()
    fields = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    if retry_after is not None:
        fields.append((b"retry-after", str(retry_after).encode()))
    fields.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body, "more_body": False})


_log = logging.getLogger("stalwart.asgi")
