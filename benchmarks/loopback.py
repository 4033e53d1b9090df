"""A uvicorn server on loopback, as the benchmarks and the tests run one."""

from __future__ import annotations

import socket
from typing import Any

import uvicorn


def listening_socket() -> socket.socket:
    """A socket bound to a free loopback port, for uvicorn to serve on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Inherited by accepted connections: without it, uvicorn's separate writes
    # of head and body meet delayed ACKs, 40 ms per response.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def config(app: Any, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for ``app``: HTTP/1.1 by h11, no lifespan, websockets or logs."""
    return uvicorn.Config(
        app,
        http="h11",
        ws="none",
        lifespan="off",
        log_config=None,
        access_log=False,
        **options,
    )
