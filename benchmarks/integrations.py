"""What the integrations add to a request, against the same request without them.

python benchmarks/integrations.py            # full run
python benchmarks/integrations.py --quick    # a few seconds, for smoke tests

For httpx and ASGI the network is a ``MockTransport`` (outbound) or a direct
ASGI call (inbound), so the numbers are the integrations' own cost, not I/O.
gRPC and aiohttp have no such seam: their rows make real calls to a server
in the same process over loopback, so each ratio is the interceptor's (or the
middleware's) cost on top of a real round trip, the way a service pays it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stalwart as sw
from benchmarks import _harness
from benchmarks._harness import Call, Case
from stalwart.aiohttp import ResilientMiddleware
from stalwart.asgi import DeadlineMiddleware, ErrorMiddleware, IdempotencyMiddleware
from stalwart.grpc import ClientInterceptor
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


def _errors_by_hand(app: Any) -> Any:
    """What a hand-written ErrorMiddleware does at least: know whether the response started."""

    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        started = False

        async def watched(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await app(scope, receive, watched)
        except sw.StalwartError:
            if started:
                raise
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    return middleware


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


_KEYED = [(b"host", b"service"), (b"authorization", b"Bearer 0123456789abcdef")]


def _post(app: Any, *, key: str | None = None, fresh: bool = False) -> Call:
    """A POST with a small JSON body; ``fresh``: a new key every time."""
    count = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"sku": 42, "quantity": 3}'}

    async def call() -> Any:
        nonlocal count
        headers = list(_KEYED)
        if key is not None:
            count += 1
            value = f"{key}-{count}" if fresh else key
            headers.append((b"idempotency-key", value.encode()))
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/orders",
            "query_string": b"",
            "headers": headers,
        }
        await app(scope, receive, _send)

    return call


def _by_hand(app: Any) -> Any:
    """The least a hand-written equivalent does: key -> response in a dict, body hashed.

    No credentials, no in-flight tracking, no TTL, no bounds, no validation.
    """
    stored: dict[str, tuple[str, list[Any]]] = {}

    async def idempotent(scope: Any, receive: Any, send: Any) -> None:
        key = None
        for name, value in scope["headers"]:
            if name == b"idempotency-key":
                key = value.decode()
        if key is None:
            await app(scope, receive, send)
            return
        message = await receive()
        digest = hashlib.sha256(message["body"]).hexdigest()
        found = stored.get(key)
        if found is not None and found[0] == digest:
            for sent in found[1]:
                await send(sent)
            return
        messages: list[Any] = []

        async def keep(sent: Any) -> None:
            messages.append(sent)
            await send(sent)

        async def body() -> Any:
            return message

        await app(scope, body, keep)
        stored[key] = (digest, messages)

    return idempotent


def _idempotent() -> IdempotencyMiddleware:
    # A store as large as the fresh-key case needs: no eviction in the way.
    return IdempotencyMiddleware(_app, store=sw.MemoryStore(max_entries=10_000_000))


# -- gRPC and aiohttp: real calls over loopback -------------------------------------------

_servers: list[Any] = []  # kept alive for the run (one of each per event loop)


async def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _grpc_target() -> str:
    server = grpc.aio.server()
    handler: Any = grpc.unary_unary_rpc_method_handler(_echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Call": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _servers.append(server)
    return f"127.0.0.1:{port}"


class _PassThrough(grpc.aio.UnaryUnaryClientInterceptor):
    """The least an interceptor does: grpc's own cost of intercepting a call."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details, request)


async def _grpc_call(
    *interceptors: Any, deadline: float | None = None, timeout: float | None = None
) -> Call:
    channel = grpc.aio.insecure_channel(await _grpc_target(), interceptors=list(interceptors))
    _servers.append(channel)
    method: Any = channel.unary_unary("/bench.Echo/Call")
    await method(b"warm up")

    if deadline is None:

        async def call() -> Any:
            return await method(b"ping", timeout=timeout)

    else:

        async def call() -> Any:
            with sw.deadline(deadline):
                return await method(b"ping")

    return call


async def _ok_handler(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _aiohttp_url() -> str:
    app = web.Application()
    app.router.add_get("/", _ok_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    _servers.append(runner)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/"


async def _aiohttp_get(*middlewares: Any, deadline: float | None = None) -> Call:
    url = await _aiohttp_url()
    session = aiohttp.ClientSession(middlewares=middlewares)
    _servers.append(session)

    async def get() -> Any:
        async with session.get(url) as response:
            return await response.read()

    await get()
    if deadline is None:
        return get

    async def call() -> Any:
        with sw.deadline(deadline):
            return await get()

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
        Case("ASGI app, bare", lambda: _asgi(_app)),
        Case(
            "ASGI app, its stalwart errors answered by hand",
            lambda: _asgi(_errors_by_hand(_app)),
            "ASGI app, bare",
            None,
            "the least such a middleware does: a coroutine around the app, the "
            "messages watched for the response's start",
        ),
        Case(
            "ASGI app behind ErrorMiddleware",
            lambda: _asgi(ErrorMiddleware(_app)),
            "ASGI app, its stalwart errors answered by hand",
            1.2,
            "a coroutine and a watched send (a call per message, no coroutine) around "
            "an app that does nothing; the table read only when an error escapes",
        ),
        Case(
            "client.get, ResilientTransport with a per-host breaker",
            lambda: _get(
                ResilientTransport(
                    transport=mock, per_host=lambda origin: sw.CircuitBreaker(name=origin)
                )
            ),
            "client.get, ResilientTransport (default policy)",
            1.1,
            "origin looked up, breaker inside the retry",
        ),
        Case("ASGI POST, bare app", lambda: _post(_app)),
        Case(
            "ASGI POST without a key, IdempotencyMiddleware",
            lambda: _post(_idempotent()),
            "ASGI POST, bare app",
            1.8,
            "headers scanned, passed through",
        ),
        Case(
            "ASGI POST with a new key, by hand", lambda: _post(_by_hand(_app), key="o", fresh=True)
        ),
        Case(
            "ASGI POST with a new key, IdempotencyMiddleware",
            lambda: _post(_idempotent(), key="order", fresh=True),
            "ASGI POST with a new key, by hand",
            5.0,
            "key validated, credentials and fingerprint hashed, claimed, recorded, stored",
        ),
        Case("ASGI POST replayed, by hand", lambda: _post(_by_hand(_app), key="order")),
        Case(
            "ASGI POST replayed, IdempotencyMiddleware",
            lambda: _post(_idempotent(), key="order"),
            "ASGI POST replayed, by hand",
            5.0,
            "key validated, credentials and fingerprint hashed, the record decoded and sent",
        ),
        Case("grpc.aio unary call, bare channel", lambda: _grpc_call()),
        Case(
            "grpc.aio unary call, a pass-through interceptor",
            lambda: _grpc_call(_PassThrough()),
            "grpc.aio unary call, bare channel",
            reference=True,
            note="grpc's own cost of running an interceptor (a task per call)",
        ),
        Case(
            "grpc.aio unary call, ClientInterceptor (default policy)",
            lambda: _grpc_call(ClientInterceptor()),
            "grpc.aio unary call, bare channel",
            1.5,
            "the policy, the call awaited inside it, its status checked",
        ),
        Case("grpc.aio unary call with a timeout, bare channel", lambda: _grpc_call(timeout=10.0)),
        Case(
            "grpc.aio unary call under a deadline, ClientInterceptor",
            lambda: _grpc_call(ClientInterceptor(), deadline=10.0),
            "grpc.aio unary call with a timeout, bare channel",
            1.5,
            "the deadline as the call's timeout (new call details), against a timeout by hand",
        ),
        Case("aiohttp GET, bare session", lambda: _aiohttp_get()),
        Case(
            "aiohttp GET, ResilientMiddleware (default policy)",
            lambda: _aiohttp_get(ResilientMiddleware()),
            "aiohttp GET, bare session",
            1.2,
            "the policy around the round trip, the response checked",
        ),
        Case(
            "aiohttp GET under a deadline, ResilientMiddleware",
            lambda: _aiohttp_get(ResilientMiddleware(), deadline=10.0),
            "aiohttp GET, bare session",
            1.3,
            "the deadline header set on the request",
        ),
    ]


async def _close() -> None:
    """Stop the servers and close the clients the gRPC and aiohttp rows made."""
    for thing in reversed(_servers):
        if isinstance(thing, grpc.aio.Server):
            await thing.stop(None)
        elif isinstance(thing, web.AppRunner):
            await thing.cleanup()
        else:
            await thing.close()
    _servers.clear()


async def _measure(cases: list[Case], *, rounds: int, calls: int) -> None:
    try:
        await _harness.measure(cases, rounds=rounds, n=calls)
    finally:
        await _close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, to check it works")
    args = parser.parse_args(argv)
    rounds, calls = (3, 200) if args.quick else (15, 2_000)
    cases_ = cases()
    asyncio.run(_measure(cases_, rounds=rounds, calls=calls))
    print(_harness.table(cases_))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
