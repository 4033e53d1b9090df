"""A real Redis for the tests: the shared one at ``REDIS_URL``, or a private server.

Other test suites use the shared server at the same time, so every test here
works under a prefix of its own (`unique_prefix`) and deletes only the keys
under it (`delete_prefix`): never FLUSHDB, never KEYS. Tests that stop, pause
or flush Redis start a private ``redis-server`` on a free port
(`PrivateRedis`), and stop it by its process.

At the start of the session (`bootstrap`, called by ``conftest.py``), if no
Redis answers at ``REDIS_URL`` and ``redis-server`` is on the PATH, the suite
starts one of its own on a free port, points ``REDIS_URL`` at it (for this
process and the ones it starts: the docs' examples, the worker processes),
and stops it at the end of the session. Without Redis and without
``redis-server``, the tests that need Redis are skipped, except under ``CI``,
where that is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.redis import RedisStore

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "redis://127.0.0.1:6379/0"
#: Where the Redis tests connect; `bootstrap` may point it at a server of its own.
REDIS_URL = os.environ.get("REDIS_URL", DEFAULT_URL)

_reachable: bool | None = None
_own_server: PrivateRedis | None = None


def answers(url: str, *, within: float = 2.0) -> bool:
    """Does a Redis answer PING at ``url``?"""
    try:
        with redis.Redis.from_url(
            url, socket_connect_timeout=within, socket_timeout=within
        ) as probe:
            probe.ping()
    except (redis.RedisError, OSError):
        return False
    return True


def bootstrap() -> str:
    """Make sure a Redis answers at `REDIS_URL`, starting one if need be; say which.

    Called once, at the start of the session, before any test module is
    imported (so that what they read of `REDIS_URL` is the final value).
    """
    global REDIS_URL, _reachable, _own_server
    if answers(REDIS_URL):
        _reachable = True
        return f"redis: {REDIS_URL}"
    if shutil.which("redis-server") is None:
        _reachable = False
        return f"redis: nothing answers at {REDIS_URL}, and redis-server is not installed"
    server = PrivateRedis()
    server.start()
    _own_server = server
    REDIS_URL = os.environ["REDIS_URL"] = server.url
    _reachable = True
    return f"redis: started redis-server (pid {server.pid}) at {server.url} for this session"


def shutdown() -> None:
    """Stop the server `bootstrap` started, if it did (by its process)."""
    global _own_server
    server, _own_server = _own_server, None
    if server is not None:
        server.stop()


def require_redis() -> None:
    """Skip the calling test if Redis does not answer (fail it under CI)."""
    global _reachable
    if _reachable is None:
        _reachable = answers(REDIS_URL)
    if not _reachable:
        message = f"no Redis answers at REDIS_URL={REDIS_URL}, and redis-server is not installed"
        if os.environ.get("CI"):
            pytest.fail(message + " (under CI, a missing Redis is a failure)", pytrace=False)
        pytest.skip(message)


async def until(
    check: Callable[[], bool | Awaitable[bool]], *, within: float = 10.0, every: float = 0.005
) -> float:
    """Seconds until ``check()`` holds, polled every ``every`` seconds; fails after ``within``.

    For what happens in the background (a pub/sub message, a task's next
    step): the bound is generous, since a loaded machine is slow, not wrong.
    """
    start = time.monotonic()
    while True:
        held = check()
        if not isinstance(held, bool):
            held = await held
        if held:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"still not true after {within}s")
        await asyncio.sleep(every)


def unique_prefix() -> str:
    return f"stalwart-test:{uuid.uuid4().hex}:"


async def delete_prefix(client: redis.asyncio.Redis, prefix: str) -> None:
    """Delete every key under ``prefix`` (and nothing else)."""
    doomed = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
    if doomed:
        await client.delete(*doomed)


def client(url: str | None = None, **options: Any) -> redis.asyncio.Redis:
    """A client of ``url`` (default: `REDIS_URL`)."""
    return redis.asyncio.Redis.from_url(REDIS_URL if url is None else url, **options)


@contextlib.asynccontextmanager
async def opened_store(url: str | None = None, **options: Any) -> AsyncIterator[RedisStore]:
    """A started store under a fresh prefix, its keys deleted and its client closed after."""
    if url is None:
        require_redis()
    options.setdefault("prefix", unique_prefix())
    connection = client(url)
    try:
        async with RedisStore(connection, **options) as store:
            yield store
    finally:
        await delete_prefix(connection, store.prefix)
        await connection.aclose()


# Ports for servers of our own: below 55535 (the machine's rule), above the
# well-known ones.
_PORTS = (20_000, 55_535)


def free_port() -> int:
    """A TCP port nothing listens on now, in `_PORTS`."""
    for _ in range(200):
        port = random.randrange(*_PORTS)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


class PrivateRedis:
    """A ``redis-server`` of our own, to stop, pause and flush at will (never the shared one).

    Always stopped by its process (`stop`), never by name; `private_redis`
    does it in a ``finally``, whatever the test did to the server.
    """

    def __init__(self, *args: str) -> None:
        """``args``: more options for ``redis-server`` (``--cluster-enabled yes``, ...)."""
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed", pytrace=False)
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.args = args
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until it answers."""
        for _ in range(5):
            if self._spawn():
                self._started = True
                return
            if self._started:
                break  # a restart keeps its port: the clients' URL names it
            self.port = free_port()  # taken between the probe and the start
        raise RuntimeError(f"the private redis-server did not start on port {self.port}")

    def _spawn(self) -> bool:
        process = self.process = subprocess.Popen(
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20.0
        while not answers(self.url, within=0.5):
            if time.monotonic() > deadline or process.poll() is not None:
                self.stop()
                return False
            time.sleep(0.02)
        return True

    def answers(self) -> bool:
        return answers(self.url, within=0.5)

    def pause(self) -> None:
        """SIGSTOP: the server stops answering; connections and queued commands stay."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the server runs again, starting with what was queued meanwhile."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def flushall(self) -> None:
        """Forget every key and script, as a restarted server without persistence would."""
        with redis.Redis(port=self.port, socket_timeout=5.0) as admin:
            admin.flushall()
            admin.script_flush()

    def stop(self) -> None:
        """Kill the server at once (no shutdown, no save): as if its host died."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()  # also ends a paused server
            process.wait()


@contextlib.contextmanager
def private_redis(*args: str) -> Iterator[PrivateRedis]:
    """A started `PrivateRedis`, stopped by its process when the block ends, whatever happens."""
    server = PrivateRedis(*args)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class WorkerProcess:
    """A Python process of the tests (``python -m <module> <args>``), talking JSON lines.

    It prints one JSON object per line on its stdout, and reads commands,
    one per line, on its stdin.
    """

    def __init__(self, module: str, *args: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    async def read(self) -> dict[str, Any]:
        """The next line it prints, decoded; fails after ``timeout`` seconds."""
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(
                asyncio.to_thread(self.process.stdout.readline), self.timeout
            )
        except TimeoutError:
            # The thread reading stays in readline until the worker's stdout
            # closes, and the event loop's shutdown waits for that thread:
            # without the kill, a silent worker would hang the suite instead
            # of failing this test.
            pid = self.process.pid
            self.kill()
            raise AssertionError(f"worker {pid} said nothing for {self.timeout} s") from None
        if not line:
            raise AssertionError(f"worker {self.process.pid} ended without answering")
        message: dict[str, Any] = json.loads(line)
        return message

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        """Kill it (by its process) and close its pipes."""
        if self.alive:
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: a hung Redis."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        listener.close()


def closed_port_url() -> str:
    """A URL where nothing listens: connections are refused."""
    return f"redis://127.0.0.1:{free_port()}/0"


class Boom(Exception):
    pass


def breaker(store: RedisStore, name: str = "dep", **options: Any) -> sw.CircuitBreaker:
    """A replica's breaker: on a registry of its own, as in a process of its own."""
    options = {
        "consecutive_failures": 1,
        "open_for": 0.1,
        "telemetry": sw.Telemetry(registry=CollectorRegistry()),
        **options,
    }
    return sw.CircuitBreaker(name=name, store=store, **options)
