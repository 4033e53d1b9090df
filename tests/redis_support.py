"""A real Redis for the tests: the shared one at ``REDIS_URL``, or a private server.

Other test suites use the shared server at the same time, so every test here
works under a prefix of its own (`unique_prefix`) and deletes only the keys
under it (`delete_prefix`): never FLUSHDB, never KEYS. Tests that stop Redis
start a private ``redis-server`` on a free port (`PrivateRedis`).

When Redis cannot be reached, the tests that need it are skipped, except
under ``CI``, where that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.redis import RedisStore

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

_reachable: bool | None = None


def require_redis() -> None:
    """Skip the calling test if Redis does not answer (fail it under CI)."""
    global _reachable
    if _reachable is None:
        try:
            with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2.0) as probe:
                probe.ping()
            _reachable = True
        except (redis.RedisError, OSError):
            _reachable = False
    if not _reachable:
        message = f"no Redis answers at REDIS_URL={REDIS_URL}"
        if os.environ.get("CI"):
            pytest.fail(message + " (under CI, a missing Redis is a failure)", pytrace=False)
        pytest.skip(message)


def unique_prefix() -> str:
    return f"stalwart-test:{uuid.uuid4().hex}:"


async def delete_prefix(client: redis.asyncio.Redis, prefix: str) -> None:
    """Delete every key under ``prefix`` (and nothing else)."""
    doomed = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
    if doomed:
        await client.delete(*doomed)


def client(url: str = REDIS_URL, **options: Any) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(url, **options)


@contextlib.asynccontextmanager
async def opened_store(url: str = REDIS_URL, **options: Any) -> AsyncIterator[RedisStore]:
    """A started store under a fresh prefix, its keys deleted and its client closed after."""
    require_redis()
    options.setdefault("prefix", unique_prefix())
    connection = client(url)
    try:
        async with RedisStore(connection, **options) as store:
            yield store
    finally:
        await delete_prefix(connection, store.prefix)
        await connection.aclose()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrivateRedis:
    """A ``redis-server`` of our own, to stop and start at will (never the shared one)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed", pytrace=False)
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10.0
        while not self.answers():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("the private redis-server did not start")
            time.sleep(0.02)

    def answers(self) -> bool:
        try:
            with redis.Redis(port=self.port, socket_connect_timeout=0.2) as probe:
                probe.ping()
        except (redis.RedisError, OSError):
            return False
        return True

    def stop(self) -> None:
        """Kill the server at once (no shutdown, no save): as if its host died."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@contextlib.contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


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
