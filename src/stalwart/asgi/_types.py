"""What the middlewares share: the ASGI types, reading a header, a problem answer."""

from __future__ import annotations

import json
import logging
from collections.abc import (
    Awaitable,
    Callable,
    Mapping,
    MutableMapping,
)
from typing import Any, final

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _header_value(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) in an HTTP scope."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


async def _send_problem(
    send: Send,
    status: int,
    title: str,
    detail: str,
    *,
    retry_after: int | None = None,
    extensions: Mapping[str, str] | None = None,
) -> None:
    """Send a complete ``application/problem+json`` response (RFC 9457)."""
    problem = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if extensions:
        problem.update(extensions)
    body = json.dumps(problem).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


_log = logging.getLogger("stalwart.asgi")


@final
class _Watched:
    """The app's ``send``: passes every message on, notes when the response starts."""

    __slots__ = ("send", "started")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)
