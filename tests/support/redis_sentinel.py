"""A Sentinel-managed Redis for the tests: a primary, one replica, three sentinels (quorum 2),
all on free loopback ports, without persistence, in a temporary directory.

Each sentinel's config names the primary, the replica and the other sentinels (with the ids
they are given), so none has to discover the others (which takes seconds of hello messages)
before a failover can be agreed. ``kill_primary()`` ends the primary with SIGKILL;
``wait_failover()`` returns once every sentinel names the replica as the primary.
"""

from __future__ import annotations

import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .redis_server import RedisServer, free_port

SERVICE = "mymaster"
DOWN_AFTER_MS = 500  # the primary counts as down (to a sentinel) after this long unanswered
FAILOVER_TIMEOUT_MS = 5000
READY = 10.0  # seconds any start-up or failover wait may take


def command(port: int, *args: str, timeout: float = 1.0) -> object:
    """One command to 127.0.0.1:``port`` and its reply (RESP2: str, int, None, list)."""
    request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request.encode())
        return _reply(conn.makefile("rb"))


def _reply(stream: object) -> object:
    line = stream.readline()  # type: ignore[attr-defined]
    kind, rest = line[:1], line[1:-2].decode()
    if kind in (b"+", b"-"):
        return rest if kind == b"+" else RuntimeError(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        return None if rest == "-1" else stream.read(int(rest) + 2)[:-2].decode()  # type: ignore[attr-defined]
    if kind == b"*":
        return None if rest == "-1" else [_reply(stream) for _ in range(int(rest))]
    raise AssertionError(f"unexpected reply {line!r}")


def wait_for(what: str, check: object, timeout: float = READY) -> None:
    """Poll ``check()`` (bounded) until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def pairs(reply: object) -> dict[str, str]:
    """A flat [key, value, ...] reply as a dict."""
    assert isinstance(reply, list)
    return dict(zip(reply[::2], reply[1::2], strict=True))


@dataclass
class SentinelSetup:
    primary: RedisServer
    replica: RedisServer
    sentinels: list[RedisServer] = field(default_factory=list)
    service: str = SERVICE

    @property
    def url(self) -> str:
        """The sentinels, as ``RedisBackend(url, sentinel=service)`` takes them."""
        return "redis://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + "/0"

    def named_primary(self, sentinel: RedisServer) -> int | None:
        """The primary's port, as ``sentinel`` names it now."""
        reply = command(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(reply[1]) if isinstance(reply, list) else None

    def kill_primary(self) -> None:
        """SIGKILL the primary: its connections drop, whatever it had not replicated is gone."""
        self.primary.kill()

    def failover(self) -> None:
        """A manual failover (``SENTINEL FAILOVER``): the old primary stays up, still a primary
        to its clients until the sentinels demote it (some ten seconds later)."""
        assert command(self.sentinels[0].port, "SENTINEL", "FAILOVER", self.service) == "OK"

    def role(self, server: RedisServer) -> str:
        """What ``server`` says it is: "master" or "slave"."""
        role = command(server.port, "ROLE")
        assert isinstance(role, list)
        return str(role[0])

    def wait_failover(self, timeout: float = READY) -> float:
        """Wait (bounded) until every sentinel names the replica as the primary and it says it
        is one; return how long that took."""
        start, port = time.monotonic(), self.replica.port

        wait_for(
            "the failover",
            lambda: all(self.named_primary(s) == port for s in self.sentinels),
            timeout,
        )
        wait_for("the promotion", lambda: self.role(self.replica) == "master", timeout)
        return time.monotonic() - start

    def wait_ready(self) -> None:
        """Wait (bounded) until the replica is in sync and every sentinel sees it healthy."""

        def in_sync() -> bool:
            info = str(command(self.replica.port, "INFO", "replication"))
            return "master_link_status:up" in info

        def seen(sentinel: RedisServer) -> bool:
            replicas = command(sentinel.port, "SENTINEL", "REPLICAS", self.service)
            assert isinstance(replicas, list)
            return any(
                pairs(r).get("flags") == "slave"
                and pairs(r).get("master-link-status") == "ok"
                and pairs(r).get("port") == str(self.replica.port)
                for r in replicas
            )

        wait_for("the replica's sync", in_sync)
        for sentinel in self.sentinels:
            wait_for("a sentinel to see the replica", lambda s=sentinel: seen(s))


def sentinel_config(
    directory: Path, port: int, ids: dict[int, str], primary: int, replica: int, quorum: int
) -> str:
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        f"dir {directory}",
        f"sentinel myid {ids[port]}",
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary} {quorum}",
        f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
        f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
        f"sentinel known-replica {SERVICE} 127.0.0.1 {replica}",
    ]
    lines += [
        f"sentinel known-sentinel {SERVICE} 127.0.0.1 {other} {ids[other]}"
        for other in ids
        if other != port
    ]
    path = directory / f"sentinel-{port}.conf"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@contextmanager
def running_sentinels(count: int = 3, quorum: int = 2) -> Iterator[SentinelSetup]:
    """A primary, a replica of it and ``count`` sentinels watching it, ready for a failover."""
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sentinel-")))
        quick_sync = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")
        primary = RedisServer(free_port(), args=quick_sync)
        primary.start()
        stack.callback(primary.stop)
        replica_of = ("--replicaof", "127.0.0.1", str(primary.port))
        replica = RedisServer(free_port(), args=(*quick_sync, *replica_of))
        replica.start()
        stack.callback(replica.stop)
        setup = SentinelSetup(primary, replica)
        ids = {free_port(): secrets.token_hex(20) for _ in range(count)}
        for port in ids:
            config = sentinel_config(directory, port, ids, primary.port, replica.port, quorum)
            sentinel = RedisServer(port, config=config, args=("--sentinel",))
            sentinel.start()
            stack.callback(sentinel.stop)
            setup.sentinels.append(sentinel)
        setup.wait_ready()
        yield setup
