"""Highly available Redis for the tests: a Redis Cluster, and a primary watched by Sentinels.

`Cluster` starts three primaries and three replicas (``redis-server
--cluster-enabled yes``, joined by ``redis-cli --cluster create``); `Sentinels`
a primary, its replica and three Sentinels (``redis-server --sentinel``, from
a generated configuration). Each server runs in a temporary directory on
ports of its own below 55535 (a cluster node's bus port is its port +
10000), is stopped by its process (never by name) whatever happens, and can
be killed and started again to play a failover.

``redis-cli --cluster`` comes with ``redis-server``: Debian's
``redis-server`` package depends on ``redis-tools``, which has it.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis

# Every port a test server uses, its cluster bus port included, is below 55535.
_LOW, _HIGH = 20_000, 45_535
_BUS = 10_000
SENTINEL_MASTER = "stalwart-test"
# Generous bounds: a loaded two-core machine is slow, not wrong.
FORM_WITHIN = 30.0
FAILOVER_WITHIN = 30.0


def binaries() -> tuple[str, str]:
    """``redis-server`` and ``redis-cli``: skip the test without them (fail it under CI)."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        message = "redis-server and redis-cli are not installed"
        if os.environ.get("CI"):
            pytest.fail(message + " (under CI, that is a failure)", pytrace=False)
        pytest.skip(message)
    return server, cli


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, bus: bool = False) -> list[int]:
    """``count`` ports nothing listens on (and, with ``bus``, nor on each port + 10000)."""
    chosen: list[int] = []
    for _ in range(2000):
        port = random.randrange(_LOW, _HIGH)
        if port in chosen or (bus and port + _BUS in chosen):
            continue
        if _free(port) and (not bus or _free(port + _BUS)):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError("not enough free ports")


def poll(check: Callable[[], bool], *, within: float, what: str) -> None:
    """Wait until ``check()`` holds (errors count as "not yet"); fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            if check():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not true after {within}s")
        time.sleep(0.05)


def admin(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=5.0, socket_connect_timeout=5.0)


def _info(port: int, section: str) -> dict[str, str]:
    with admin(port) as client:
        text = client.execute_command("INFO", section)
    if isinstance(text, dict):
        return {k: str(v) for k, v in text.items()}
    raw = text.decode() if isinstance(text, bytes) else str(text)
    pairs = (line.split(":", 1) for line in raw.splitlines() if ":" in line)
    return dict(pairs)


class PortTaken(RuntimeError):
    """A server exited as it started: another process took its port since it was chosen."""


class Server:
    """One ``redis-server`` process on a port of its own, in a directory of its own."""

    def __init__(self, binary: str, port: int, directory: Path, *args: str) -> None:
        self.binary = binary
        self.port = port
        self.directory = directory
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start it (again: a restarted cluster node reads its ``nodes.conf``)."""
        assert not self.alive
        self.process = subprocess.Popen(
            [self.binary, *self.args],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_up(self) -> None:
        def answers() -> bool:
            if not self.alive:  # its port was taken meanwhile, say: no use waiting
                raise PortTaken(f"redis-server on port {self.port} exited")
            with admin(self.port) as client:
                return bool(client.ping())

        poll(answers, within=FORM_WITHIN, what=f"redis-server on port {self.port} answers")

    def kill(self) -> None:
        """SIGKILL, by its process: as if its host died."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait()


class _Group:
    """Servers stopped together, each by its process, whatever happened."""

    def __init__(self) -> None:
        self.servers: list[Server] = []

    def stop(self) -> None:
        for server in self.servers:
            server.kill()


class Cluster(_Group):
    """Three primaries with a replica each: a Redis Cluster of six nodes."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        binary, self.cli = binaries()
        for port in free_ports(6, bus=True):
            self.servers.append(
                Server(
                    binary,
                    port,
                    directory / str(port),
                    *("--port", str(port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no"),
                    *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                    # A dead primary is noticed within a second, and any of its
                    # replicas may replace it however long it was cut off.
                    *("--cluster-node-timeout", "1000"),
                    *("--cluster-replica-validity-factor", "0"),
                )
            )

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    @property
    def url(self) -> str:
        """A startup node for ``RedisCluster.from_url`` (the client finds the others)."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        for server in self.servers:
            server.start()
        for server in self.servers:
            server.wait_up()
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                *("--cluster-replicas", "1", "--cluster-yes"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=FORM_WITHIN,
        )
        self.wait_healthy()

    def wait_healthy(self) -> None:
        """Until every live node says ``cluster_state:ok`` and every replica is in sync."""

        def healthy() -> bool:
            for server in self.servers:
                if not server.alive:
                    continue
                with admin(server.port) as client:
                    info = client.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
                replication = _info(server.port, "replication")
                if replication.get("role") == "slave" and (
                    replication.get("master_link_status") != "up"
                ):
                    return False
            return len(self.primaries()) == 3

        poll(healthy, within=FORM_WITHIN, what="the cluster is healthy")

    def nodes(self) -> list[tuple[int, str, int | None]]:
        """(port, "master" or "slave", its primary's port) for each live node."""
        live = [server for server in self.servers if server.alive]
        with admin(live[0].port) as client:
            raw = client.execute_command("CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        by_id: dict[str, int] = {}
        rows: list[tuple[int, str, str]] = []
        for line in text.splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            by_id[fields[0]] = port
            if "fail" in fields[2] or "noaddr" in fields[2]:
                continue
            role = "master" if "master" in fields[2] else "slave"
            rows.append((port, role, fields[3]))
        return [(port, role, by_id.get(primary)) for port, role, primary in rows]

    def primaries(self) -> list[int]:
        return [port for port, role, _ in self.nodes() if role == "master"]

    def server(self, port: int) -> Server:
        return next(server for server in self.servers if server.port == port)

    def primary_of(self, key: str) -> int:
        """The port of the primary serving ``key``'s slot now."""
        with admin(self.servers[0].port) as client:
            slot = client.execute_command("CLUSTER", "KEYSLOT", key)
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= int(slot) <= int(end):
                    return int(primary[1])
        raise AssertionError(f"no node serves {key!r}")

    def node_id(self, port: int) -> str:
        with admin(port) as client:
            raw = client.execute_command("CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def move_slot(self, key: str, target: int) -> None:
        """Move ``key``'s slot, with its keys, to the primary at port ``target`` (a resharding)."""
        source = self.primary_of(key)
        with admin(source) as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
        source_id, target_id = self.node_id(source), self.node_id(target)
        with admin(source) as src, admin(target) as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for port in self.primaries():
            if port not in (source, target):
                with admin(port) as other:
                    other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        poll(
            lambda: all(
                self._owner(server.port, slot) == target for server in self.servers if server.alive
            ),
            within=FORM_WITHIN,
            what=f"every node knows slot {slot} moved",
        )

    def _owner(self, port: int, slot: int) -> int | None:
        with admin(port) as client:
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(primary[1])
        return None

    def replica_of(self, primary: int) -> int:
        return next(port for port, role, of in self.nodes() if role == "slave" and of == primary)

    def fail_over(self, primary: int) -> int:
        """Kill ``primary`` (SIGKILL); wait for its replica to take over; return that replica.

        The killed node is started again afterwards, empty: it rejoins as a
        replica of the node that replaced it.
        """
        replica = self.replica_of(primary)
        self.server(primary).kill()

        def promoted() -> bool:
            with admin(replica) as client:
                return _info(replica, "replication").get("role") == "master" and (
                    b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO")
                )

        poll(promoted, within=FAILOVER_WITHIN, what=f"node {replica} replaced {primary}")
        return replica

    def restart(self, port: int) -> None:
        """Start a killed node again, and wait until the cluster is whole."""
        server = self.server(port)
        server.start()
        server.wait_up()
        self.wait_healthy()


class Sentinels(_Group):
    """A primary, its replica, and three Sentinels watching them."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        binary, _ = binaries()
        primary, replica, *sentinels = free_ports(5)
        common = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
        self.primary = Server(binary, primary, directory / "a", "--port", str(primary), *common)
        self.replica = Server(
            binary,
            replica,
            directory / "b",
            *("--port", str(replica), *common),
            *("--replicaof", "127.0.0.1", str(primary)),
        )
        self.servers += [self.primary, self.replica]
        self.sentinel_ports = sentinels
        for port in sentinels:
            where = directory / f"sentinel-{port}"
            where.mkdir(parents=True)
            config = where / "sentinel.conf"
            config.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n"
                f"sentinel failover-timeout {SENTINEL_MASTER} 10000\n"
                f"sentinel parallel-syncs {SENTINEL_MASTER} 1\n"
            )
            self.servers.append(Server(binary, port, where, str(config), "--sentinel"))

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", port) for port in self.sentinel_ports]

    def start(self) -> None:
        for server in self.servers:
            server.start()
        for server in self.servers:
            server.wait_up()
        self.wait_healthy()

    def master(self) -> int:
        """The primary's port, as a majority of Sentinels name it."""
        named: list[int] = []
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError, OSError), admin(port) as client:
                _, master = client.execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER
                )
                named.append(int(master))
        winner = max(set(named), key=named.count, default=0)
        if named.count(winner) < 2:
            raise AssertionError("the Sentinels do not agree on a primary")
        return winner

    def wait_healthy(self) -> None:
        """Until the Sentinels agree on a primary that has a replica in sync, and see it."""

        def healthy() -> bool:
            master = self.master()
            replication = _info(master, "replication")
            if replication.get("role") != "master" or replication.get("connected_slaves") != "1":
                return False
            replica = self.replica if master == self.primary.port else self.primary
            if _info(replica.port, "replication").get("master_link_status") != "up":
                return False
            for port in self.sentinel_ports:
                with admin(port) as client:
                    [state] = [
                        m
                        for m in client.execute_command("SENTINEL", "MASTERS")
                        if _field(m, "name") == SENTINEL_MASTER
                    ]
                    if (
                        _field(state, "num-slaves") != "1"
                        or _field(state, "num-other-sentinels") != "2"
                    ):
                        return False
            return True

        poll(healthy, within=FORM_WITHIN, what="the Sentinels watch a primary and its replica")

    def fail_over(self) -> Server:
        """Kill the primary (SIGKILL); wait until the Sentinels promote the replica.

        Returns the killed server; `restart` brings it back as the replica.
        """
        old = self.master()
        dead = self.primary if old == self.primary.port else self.replica
        dead.kill()
        poll(
            lambda: (
                self.master() != old and _info(self.master(), "replication").get("role") == "master"
            ),
            within=FAILOVER_WITHIN,
            what="the Sentinels promoted the replica",
        )
        return dead

    def restart(self, server: Server) -> None:
        server.start()
        server.wait_up()
        self.wait_healthy()


_G = TypeVar("_G", Cluster, Sentinels)


def _field(entry: object, name: str) -> str | None:
    """A field of a ``SENTINEL MASTERS`` entry (a dict, or a flat list of names and values)."""
    if isinstance(entry, dict):
        value = entry.get(name, entry.get(name.encode()))
    else:
        items = list(entry)  # type: ignore[call-overload]
        value = None
        for key, item in zip(items[::2], items[1::2], strict=True):
            if key in (name, name.encode()):
                value = item
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


@contextlib.contextmanager
def started(make: Callable[[Path], _G], directory: Path) -> Iterator[_G]:
    """A group made by ``make`` and started, stopped (each server by its process) whatever happens.

    Started again on other ports (at most three times) if one was taken
    between choosing it and starting its server.
    """
    for attempt in range(3):
        group = make(directory / str(attempt))
        try:
            group.start()
        except PortTaken:
            group.stop()
            continue
        except BaseException:
            group.stop()
            raise
        try:
            yield group
        finally:
            group.stop()
        return
    raise RuntimeError("could not start the servers: their ports kept being taken")
