"""What the HTTP integrations add to a request, against the same request without them.

python benchmarks/integrations.py            # full run
python benchmarks/integrations.py --quick    # a few seconds, for smoke tests

The network is a ``MockTransport`` (outbound) or a direct ASGI call (inbound),
so the numbers are the integrations' own cost, not I/O.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stalwart as sw
from benchmarks import _harness
from benchmarks._harness import Call, Case
from stalwart.asgi import DeadlineMiddleware
from stalwart.httpx import ResilientTransport


def _ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200)


def _get(transport: httpx.AsyncBaseTransport, *, deadline: float | None = None) -> Call:
    client = httpx.AsyncClient(transport=transport, base_url="http://upstream")

    if deadline is None:

        async def call() -> Any:
            return await client.get("/items")

    else:

        async def call() -> Any:
            with sw.deadline(deadline):
                return await client.get("/items")

    return call


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def _send(message: Any) -> None:
    return None


_HEADERS = [(b"host", b"service"), (b"accept", b"*/*"), (b"x-request-timeout-ms", b"2000")]


def _asgi(app: Any, *, by_hand: bool = False) -> Call:
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/", "headers": _HEADERS}

    if by_hand:
        # The least a hand-written equivalent does: find the header, trust it.
        async def call() -> Any:
            seconds = 60.0
            for name, value in scope["headers"]:
                if name == b"x-request-timeout-ms":
                    seconds = min(seconds, int(value) / 1000.0)
                    break
            with sw.deadline(seconds):
                await app(scope, _receive, _send)

    else:

        async def call() -> Any:
            await app(scope, _receive, _send)

    return call


def cases() -> list[Case]:
    mock = httpx.MockTransport(_ok)
    return [
        Case("client.get, MockTransport", lambda: _get(mock)),
        Case(
            "client.get, ResilientTransport (default policy)",
            lambda: _get(ResilientTransport(transport=mock)),
            "client.get, MockTransport",
            1.3,
        ),
        Case("client.get under a deadline, MockTransport", lambda: _get(mock, deadline=10.0)),
        Case(
            "client.get under a deadline, ResilientTransport",
            lambda: _get(ResilientTransport(transport=mock), deadline=10.0),
            "client.get under a deadline, MockTransport",
            1.5,
            "header, narrowed timeouts, a copy of the request",
        ),
        Case("ASGI app under the header's deadline, by hand", lambda: _asgi(_app, by_hand=True)),
        Case(
            "ASGI app behind DeadlineMiddleware",
            lambda: _asgi(DeadlineMiddleware(_app)),
            "ASGI app under the header's deadline, by hand",
            1.5,
            "header validated, response watched for a 504",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, to check it works")
    args = parser.parse_args(argv)
    rounds, calls = (3, 200) if args.quick else (15, 2_000)
    cases_ = cases()
    _harness.run(cases_, rounds=rounds, n=calls)
    print(_harness.table(cases_))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
