"""Requests with an ``Idempotency-Key`` run once, repeats replayed: `IdempotencyMiddleware`."""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from collections.abc import (
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from typing import Any, Final, TypeAlias, final

from .. import _telemetry, _validate
from .._deadline import is_cancellation
from .._errors import StoreUnavailable
from .._http import (
    IDEMPOTENCY_HEADER,
    header_name,
    is_token,
)
from .._idempotency import IdempotencyMetrics, LeaseKeeper, Verdict, decide, record_durations
from .._idempotency_store import (
    Completed,
    IdempotencyStore,
    Lease,
    resolve_store,
)
from .._telemetry import Telemetry, report
from .._transport import collection_option
from ..events import CallRejected, IdempotentReplay
from ._types import ASGIApp, Message, Receive, Scope, Send, _log, _send_problem

Credentials: TypeAlias = str | Sequence[str] | Callable[[Scope], str | bytes | None]
"""Header names, or a callable of the request's scope returning who is calling."""

DEFAULT_CREDENTIALS: Final = ("Authorization", "Cookie")
"""The headers that tell `IdempotencyMiddleware`'s callers apart by default."""

# What sets the values of one header apart from the next one's in a scope's
# hash: no value is this long, so no value's length prefix can pass for it.
_NEXT_HEADER: Final = 1 << 63


_KEY_MAX_LENGTH: Final = 255
# A bare key: printable ASCII, no space at either end (and no leading quote:
# that is the quoted form).
_BARE_KEY: Final = re.compile(rb"[\x21\x23-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?")
# RFC 8941 sf-string: printable ASCII in double quotes, `"` and `\` escaped.
_SF_STRING: Final = re.compile(rb'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\]){1,255})"')
_SF_ESCAPE: Final = re.compile(rb'\\(["\\])')

_REPLAYED_HEADER: Final = (b"idempotent-replayed", b"true")
# Not part of a stored response: they describe one connection, not the answer.
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
# "Try again later" answers: replaying them would refuse the retry they invite.
_TRY_AGAIN_LATER: Final = frozenset({408, 425, 429})
_RECORD_VERSION: Final = 1
# Seconds a 409's client is told to wait: the first request's end cannot be
# known, and a second is long for most requests and short enough for a client.
_CONFLICT_RETRY_AFTER: Final = 1
_LENGTHS: Final = struct.Struct(">4Q")
# A holder whose request failed or was cancelled gets this long, shielded from
# cancellation, to tell a shared store; past it the lease frees the key.


def parse_idempotency_key(value: bytes) -> str | None:
    """The key in an ``Idempotency-Key`` header value, or None if malformed.

    The IETF draft makes the value a Structured Field string: the key in
    double quotes, with ``"`` and ``\\`` escaped by a backslash. Many clients
    send the bare key instead, as Stripe's API accepts; both are read, and
    ``"order-7"`` and ``order-7`` are the same key. A key is 1-255
    characters of printable ASCII (spaces allowed inside). Anything else,
    control characters, line breaks and non-ASCII bytes included, is
    malformed.

    Example::

        parse_idempotency_key(b'"order-7"')  # 'order-7'
        parse_idempotency_key(b"order-7")  # 'order-7'
        parse_idempotency_key(b"order\\r\\n7")  # None
    """
    if len(value) > 2 * _KEY_MAX_LENGTH + 4:  # longer than any key, even quoted and escaped
        return None
    value = value.strip(b" \t")
    if value[:1] == b'"':
        match = _SF_STRING.fullmatch(value)
        if match is None:
            return None
        return _SF_ESCAPE.sub(rb"\1", match.group(1)).decode("ascii")
    if _BARE_KEY.fullmatch(value) is None:
        return None
    return value.decode("ascii")


class _TooLarge(Exception):
    """The request body went over ``max_body_size``."""


@final
class _Recorder:
    """The app's ``send``: passes every message on, keeps a copy to store."""

    __slots__ = ("chunks", "complete", "headers", "limit", "send", "size", "status", "storable")

    def __init__(self, send: Send, limit: int) -> None:
        self.send = send
        self.limit = limit
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False
        self.storable = True

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if self.storable:
                chunk = bytes(message.get("body", b""))
                self.size += len(chunk)
                if self.size > self.limit:
                    self.storable = False
                    self.chunks = []
                else:
                    self.chunks.append(chunk)
            if not message.get("more_body", False):
                self.complete = True
        elif kind == "http.response.start":
            self.status = message["status"]
            self.headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
            if message.get("trailers", False):
                self.storable = False
        else:
            # Trailers, or a server extension (pathsend, zerocopysend): not a
            # plain response that can be stored and replayed.
            self.storable = False
        await self.send(message)

    def record(self) -> dict[str, Any] | None:
        """The response as a JSON-safe record, or None if it must not be stored."""
        status = self.status
        if status is None or not (self.complete and self.storable):
            return None
        if status >= 500 or status in _TRY_AGAIN_LATER:
            return None
        headers: list[list[str]] = []
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"set-cookie":
                # A replay would hand the cookie to whoever presents the key.
                return None
            if lowered not in _HOP_BY_HOP:
                headers.append([lowered.decode("latin-1"), value.decode("latin-1")])
        return {
            "v": _RECORD_VERSION,
            "status": status,
            "headers": headers,
            "body": base64.b64encode(b"".join(self.chunks)).decode("ascii"),
        }


def _read_record(value: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of a stored record (see `_Recorder.record`)."""
    try:
        version, status = value["v"], value["status"]
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in value["headers"]]
        body = base64.b64decode(value["body"], validate=True)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _unreadable(repr(exc)) from exc
    if version != _RECORD_VERSION:
        raise _unreadable(f"version {version!r}")
    if type(status) is not int or not 100 <= status <= 599:
        raise _unreadable(f"status {status!r}")
    return status, headers, body


def _unreadable(reason: str) -> ValueError:
    return ValueError(
        f"the idempotency store returned a record IdempotencyMiddleware cannot read: {reason}"
    )


def _fingerprint(scope: Scope, body: bytes) -> str:
    """SHA-256 of the method, path, query string and body: what makes a request itself."""
    method = scope["method"].encode("utf-8", "surrogatepass")
    path = scope["path"].encode("utf-8", "surrogatepass")
    query = bytes(scope.get("query_string", b""))
    # Lengths first, so that no two requests' parts run together alike.
    lengths = _LENGTHS.pack(len(method), len(path), len(query), len(body))
    return hashlib.sha256(b"".join((lengths, method, path, query, body))).hexdigest()


def _credentials(value: Any) -> tuple[bytes, ...] | Callable[[Scope], str | bytes | None]:
    """Header names (lower case, each once) or the callable, from ``credentials``."""
    if isinstance(value, str):
        value = (value,)
    elif callable(value):
        return value  # type: ignore[no-any-return]
    elif not isinstance(value, (list, tuple)):
        raise TypeError(
            "credentials must be a header name, a sequence of them, or a callable of the "
            f"ASGI scope, not {type(value).__name__}"
        )
    if not value:
        raise ValueError("credentials must name at least one header")
    names = (header_name("credentials", name).lower().encode() for name in value)
    return tuple(dict.fromkeys(names))


def _headers_digest(headers: Iterable[tuple[bytes, bytes]], names: tuple[bytes, ...]) -> str | None:
    """SHA-256 of the values of the headers ``names``, or None if the request has none.

    Every value counts, length-prefixed: a request that adds a second
    Authorization header to someone else's never lands in that one's scope,
    whichever value the app reads. The first header's values are hashed
    alone, as when it was the only one (records stored then stay reachable);
    each other header present follows a mark of its own. Cookies count as a
    set of ``name=value`` pairs, however the client split or ordered them.
    """
    found: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        if name in names:
            found.setdefault(name, []).append(value)
    if not found:
        return None
    digest = hashlib.sha256()
    for index, name in enumerate(names):
        values = found.get(name)
        if values is None:
            continue
        if name == b"cookie":
            values = sorted(_cookie_pairs(values))
        if index:
            digest.update((_NEXT_HEADER + index).to_bytes(8, "big"))
        for value in values:
            digest.update(len(value).to_bytes(8, "big"))
            digest.update(value)
    return digest.hexdigest()


def _cookie_pairs(values: list[bytes]) -> Iterator[bytes]:
    """The ``name=value`` pairs of ``Cookie`` header values (RFC 6265: ``; `` between)."""
    for value in values:
        for pair in value.split(b";"):
            pair = pair.strip(b" \t")
            if pair:
                yield pair


def _methods(value: Any) -> frozenset[str]:
    methods = set()
    for method in collection_option("methods", value, "HTTP method names"):
        if not isinstance(method, str):
            raise TypeError(f"methods must hold str method names, got {type(method).__name__}")
        if not is_token(method):
            raise ValueError(f"methods must hold HTTP method names, got {method!r}")
        methods.add(method.upper())
    if not methods:
        raise ValueError("methods must name at least one HTTP method")
    return frozenset(methods)


@final
class IdempotencyMiddleware:
    """Run each request that carries an ``Idempotency-Key`` once; replay its response.

    The server half of idempotency keys, as the IETF draft "The
    Idempotency-Key HTTP Header Field" and Stripe's API define them. A
    client sends the same unique key with every attempt of one logical
    request (`stalwart.httpx.ResilientTransport` does, with
    ``add_idempotency_keys=True``); for requests whose method is in
    ``methods``:

    * the **first** request with a key runs, and its response is stored for
      ``ttl`` seconds: status, headers and body;
    * a **repeat** (same key, same credentials) gets the stored response
      without running the app, with the extra header ``Idempotent-Replayed:
      true``;
    * a repeat that arrives **while the first is still running** gets ``409
      Conflict`` with ``Retry-After: 1``: the client retries later and then
      gets the replay (`stalwart.httpx.ResilientTransport` does so);
    * a key reused for a **different request** (another method, path, query
      string or body) gets ``422 Unprocessable Content``, also while the
      first is running;
    * a **malformed key** (see `parse_idempotency_key`), several
      ``Idempotency-Key`` headers, or no key when ``required``, get ``400 Bad
      Request``; without ``required``, a request without a key just runs;
    * a request body over ``max_body_size`` bytes gets ``413 Content Too
      Large`` (it is buffered to fingerprint the request, so the limit keeps
      that buffer bounded); requests without a key are not buffered at all.

    Errors are ``application/problem+json`` bodies (RFC 9457).

    **What is stored.** A complete response whose status is below 500 and
    not a "try again later" (408, 425, 429). Not stored, the key freed for
    the next attempt: 5xx and those statuses, responses that set a cookie (a
    replay would hand it to whoever presents the key), responses whose body
    exceeds ``max_response_size`` (passed through as they stream, never
    held back), responses with trailers or sent by a server extension, and
    any request whose app raised, was cancelled, or returned without
    finishing its response. A client that disconnects while the app runs
    does not stop it storing the response: its retry gets the replay.

    **Whose keys.** Records are scoped to the caller's credentials: by
    default all values of the ``Authorization`` and ``Cookie`` headers,
    hashed (SHA-256), so a client that reuses or guesses another's key only
    ever reaches its own records, whether the app authenticates with a
    token or a session cookie, and no credential is written to the store.
    (The cookies count as a set: their order, and whether they come in one
    header or several, do not matter; any cookie that differs makes another
    caller.) Requests with none of these headers share one anonymous scope.
    If your callers authenticate some other way (an API key header, a
    client certificate), say so with ``credentials``: header names, or a
    callable given the ASGI scope and returning a ``str``/``bytes`` that
    identifies the caller, or None for anonymous. Naming only the header
    that really identifies the caller (``credentials="Authorization"``) lets
    a retry that comes back with other cookies still get its replay.

    **Where.** Records live in ``store``, any `stalwart.IdempotencyStore`:
    by default a private in-process `stalwart.MemoryStore` of
    ``max_entries`` records (so at most ``max_entries`` responses of
    ``max_response_size`` bytes, plus a third for their base64 encoding);
    ``stalwart.redis.RedisStore`` shares them between replicas. A claim in
    a shared store is a lease of ``lease`` seconds, renewed while the app
    runs, so that a crashed replica's key frees itself. If the store is
    unavailable when a keyed request arrives (`StoreUnavailable`), the answer
    is a 503 with ``Retry-After: 1`` and the app does not run: running it
    unprotected could do the work twice. Other store errors propagate.

    Metrics: replays count in ``stalwart_idempotency_replays_total`` and
    409s in ``stalwart_idempotency_conflicts_total``, labelled ``policy=name``;
    keyed requests in ``stalwart_calls_total{kind="idempotency"}`` (a run or
    a replay is a ``success``, a 409 or 422 ``rejected``, a store that cannot
    be reached an ``error``). A replay is reported as an `IdempotentReplay`
    event and a 409 as a `CallRejected` (reason ``"idempotency_conflict"``),
    to the telemetry's listeners and to the current span, if one records.

    Args:
        app: the ASGI application to protect.
        store: where records live (default: a private `~stalwart.MemoryStore`).
        header: the request header carrying the key.
        methods: the methods handled (others pass straight through).
        ttl: seconds a response is replayed for, > 0 (default one day).
        required: answer 400 to a request of those methods without a key.
        credentials: what identifies the caller: a header name or a
            sequence of them (default `DEFAULT_CREDENTIALS`, ``Authorization``
            and ``Cookie``; all their values count), or a callable of the
            ASGI scope returning ``str``, ``bytes`` or None.
        max_body_size: the largest request body accepted with a key, in
            bytes (default 1 MiB).
        max_response_size: the largest response body stored, in bytes
            (default 64 KiB).
        max_entries: the size of the default in-process store (default
            10,000); give a ``store`` or this, not both.
        lease: seconds a claim lasts in a shared store without renewal, > 0.
        name: the ``policy`` label of its metrics, and the prefix of its
            records' scope (middlewares sharing a store and a name share
            records).
        telemetry: where it reports (None: the default `stalwart.Telemetry`).

    Example::

        app = IdempotencyMiddleware(app, required=True, ttl=3600.0)
    """

    __slots__ = (
        "_anonymous",
        "_app",
        "_credentials",
        "_header",
        "_header_label",
        "_keeper",
        "_lease",
        "_max_body",
        "_max_response",
        "_methods",
        "_metrics",
        "_name",
        "_registration",
        "_required",
        "_scope_prefix",
        "_store",
        "_telemetry",
        "_ttl",
    )

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: IdempotencyStore | None = None,
        header: str = IDEMPOTENCY_HEADER,
        methods: Iterable[str] = ("POST", "PATCH"),
        ttl: float = 86_400.0,
        required: bool = False,
        credentials: Credentials = DEFAULT_CREDENTIALS,
        max_body_size: int = 1_048_576,
        max_response_size: int = 65_536,
        max_entries: int | None = None,
        lease: float = 30.0,
        name: str = "idempotency",
        telemetry: Telemetry | None = None,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI application, not {type(app).__name__}")
        self._app = app
        self._store = store = resolve_store(store, max_entries)
        self._header_label = header_name("header", header)
        self._header = self._header_label.lower().encode()
        self._methods = _methods(methods)
        self._ttl, self._lease = record_durations(store, ttl=ttl, lease=lease)
        if not isinstance(required, bool):
            raise TypeError(f"required must be a bool, not {type(required).__name__}")
        self._required = required
        self._credentials = _credentials(credentials)
        self._max_body = _validate.count("max_body_size", max_body_size, minimum=0)
        self._max_response = _validate.count("max_response_size", max_response_size, minimum=0)
        self._name = _validate.name(name)
        self._keeper = LeaseKeeper(store, f"IdempotencyMiddleware {self._name!r}", work="request")
        self._telemetry = _telemetry.resolve(telemetry)
        self._registration, _ = self._telemetry.register(
            "idempotency", self._name, IdempotencyMetrics
        )
        metrics = self._registration.metrics
        assert isinstance(metrics, IdempotencyMetrics)
        self._metrics = metrics
        self._scope_prefix = f"{self._name}:asgi:"
        self._anonymous = self._scope_prefix + "anonymous"

    @property
    def app(self) -> ASGIApp:
        """The wrapped application."""
        return self._app

    @property
    def store(self) -> IdempotencyStore:
        return self._store

    @property
    def ttl(self) -> float:
        return self._ttl

    @property
    def methods(self) -> frozenset[str]:
        return self._methods

    @property
    def name(self) -> str:
        return self._name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self._methods:
            await self._app(scope, receive, send)
            return
        wanted = self._header
        values: list[bytes] = []
        length: bytes | None = None
        for name, value in scope["headers"]:
            if name == wanted:
                values.append(value)
            elif name == b"content-length":
                length = value
        if not values:
            if self._required:
                await self._bad_request(send, f"This request needs an {self._header_label} header.")
            else:
                await self._app(scope, receive, send)
            return
        if len(values) > 1:
            await self._bad_request(
                send, f"The request carries more than one {self._header_label} header."
            )
            return
        key = parse_idempotency_key(values[0])
        if key is None:
            await self._bad_request(
                send,
                f"The {self._header_label} header must hold 1-{_KEY_MAX_LENGTH} printable "
                "ASCII characters, bare or as a quoted string.",
            )
            return
        if length is not None and length.isdigit() and int(length) > self._max_body:
            await self._too_large(send)
            return
        try:
            body = await self._read_body(receive)
        except _TooLarge:
            await self._too_large(send)
            return
        if body is None:
            return  # the client went away before sending its whole request
        await self._handle(scope, receive, send, key, body)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, key: str, body: bytes
    ) -> None:
        fingerprint = _fingerprint(scope, body)
        try:
            outcome = await self._store.claim(
                self._record_scope(scope), key, fingerprint=fingerprint, lease=self._lease
            )
        except StoreUnavailable:
            # Running the request without its record could do the work twice:
            # tell the client to come back, as a 503 with Retry-After.
            _log.warning(
                "IdempotencyMiddleware %r: the store is unavailable", self._name, exc_info=True
            )
            await _send_problem(
                send,
                503,
                "Service Unavailable",
                f"Requests with an {self._header_label} cannot be processed right now; "
                "retry later.",
                retry_after=1,
            )
            self._metrics.error += 1
            return
        metrics = self._metrics
        verdict = decide(outcome, fingerprint, self._store)
        if verdict is Verdict.RUN:
            assert isinstance(outcome, Lease)
            try:
                await self._run(scope, receive, send, body, outcome)
            except BaseException as exc:
                metrics.failed(exc, None)
                raise
            metrics.success += 1
        elif verdict is Verdict.REPLAY:
            assert isinstance(outcome, Completed)
            status, headers, content = _read_record(outcome.value)
            metrics.replays += 1
            metrics.success += 1
            report(self._telemetry, IdempotentReplay, self._name, "idempotency")
            headers.append(_REPLAYED_HEADER)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": content, "more_body": False})
        elif verdict is Verdict.REUSED:
            metrics.rejected += 1
            await self._reused(send)
        else:
            metrics.conflicts += 1
            metrics.rejected += 1
            report(
                self._telemetry,
                CallRejected,
                self._name,
                "idempotency",
                reason="idempotency_conflict",
                retry_after=float(_CONFLICT_RETRY_AFTER),
            )
            await _send_problem(
                send,
                409,
                "Conflict",
                f"A request with this {self._header_label} is still being processed; "
                "retry later to get its response.",
                retry_after=_CONFLICT_RETRY_AFTER,
            )

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole request body, or None if the client disconnected first."""
        chunks: list[bytes] = []
        size = 0
        limit = self._max_body
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "http.disconnect":
                return None
            if kind != "http.request":
                continue
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise _TooLarge
                chunks.append(bytes(chunk))
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _record_scope(self, scope: Scope) -> str:
        """Whose records: a hash of the caller's credentials."""
        reader = self._credentials
        if isinstance(reader, tuple):
            digest = _headers_digest(scope["headers"], reader)
            return self._anonymous if digest is None else self._scope_prefix + digest
        identity = reader(scope)
        if identity is None:
            return self._anonymous
        if isinstance(identity, str):
            identity = identity.encode("utf-8", "surrogatepass")
        elif not isinstance(identity, (bytes, bytearray)):
            raise TypeError(
                f"credentials={getattr(reader, '__qualname__', reader)!r} must return str, "
                f"bytes or None, not {type(identity).__name__}"
            )
        return self._scope_prefix + hashlib.sha256(identity).hexdigest()

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, body: bytes, lease: Lease
    ) -> None:
        """Run the app as the key's holder; store its response or free the key."""
        recorder = _Recorder(send, self._max_response)
        delivered = False

        async def receive_body() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: the client's disconnect
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        keeper = self._keeper
        try:
            await keeper.run(lease, self._app, scope, receive_body, recorder)
        except BaseException as exc:
            await keeper.release(lease, cancelled=is_cancellation(type(exc)))
            raise
        record = recorder.record()
        if record is None:
            await keeper.release(lease)
            return
        try:
            stored = await keeper.complete(lease, record, ttl=self._ttl)
        except Exception:  # noqa: BLE001 - logged: the response has gone out already
            _log.warning(
                "IdempotencyMiddleware %r: could not store a response; its key is freed",
                self._name,
                exc_info=True,
            )
            await keeper.release(lease)
            return
        if not stored and not lease.bypassed:  # a bypass: the store logs its outage once
            _log.warning(
                "IdempotencyMiddleware %r: the claim on a key ended before its request did "
                "(lease expired or store unreachable); the response was not stored",
                self._name,
            )

    async def _bad_request(self, send: Send, detail: str) -> None:
        await _send_problem(send, 400, "Bad Request", detail)

    async def _too_large(self, send: Send) -> None:
        await _send_problem(
            send,
            413,
            "Content Too Large",
            f"A request with an {self._header_label} may have a body of at most "
            f"{self._max_body} bytes.",
        )

    async def _reused(self, send: Send) -> None:
        await _send_problem(
            send,
            422,
            "Unprocessable Content",
            f"This {self._header_label} was already used for a different request "
            "(method, path, query or body): use a new key for a new request.",
        )

    def __repr__(self) -> str:
        return (
            f"IdempotencyMiddleware({self._app!r}, store={self._store!r}, "
            f"ttl={self._ttl:g}, name={self._name!r})"
        )
