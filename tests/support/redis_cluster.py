"""A real Redis Cluster (3 masters, 3 replicas) on free loopback ports, for the tests and the
benchmarks (never skipped: without ``redis-server`` or ``redis-cli`` it fails, saying so).

Every node runs in a temp dir of its own, without persistence. Start-up creates the cluster
with ``redis-cli --cluster create`` and returns once every node agrees on the slot map and
every replica is in sync; ``kill`` and ``wait_failover`` make and watch a failover.

``python -m tests.support.redis_cluster`` runs one until Ctrl-C, for benchmarks and humans.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SLOTS = 16384
Reply = str | int | None | list["Reply"]


class ReplyError(Exception):
    """An error reply (``-ERR ...``) from a node."""


@dataclass(frozen=True)
class Node:
    """A master as the cluster sees it: its slot ranges (inclusive) and live replicas."""

    port: int
    node_id: str
    slots: tuple[tuple[int, int], ...]
    replicas: tuple[int, ...]

    def serves(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


def hash_slot(key: str | bytes) -> int:
    """The cluster slot of ``key``: CRC16/XMODEM of it (or of its ``{hashtag}``) mod 16384."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc % SLOTS


def command(port: int, *args: str, timeout: float = 1.0) -> Reply:
    """Run one command on the node at ``port`` (a minimal RESP2 client, blocking)."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(payload.encode())
        with conn.makefile("rb") as reader:
            return _read_reply(reader.readline)


def _read_reply(readline: Callable[[], bytes]) -> Reply:
    line = readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("the connection closed mid-reply")
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise ReplyError(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        if int(rest) < 0:
            return None
        chunks = b""
        while len(chunks) < int(rest) + 2:
            chunk = readline()
            if not chunk:
                raise ConnectionError("the connection closed mid-reply")
            chunks += chunk
        return chunks[:-2].decode()
    if kind == b"*":
        return None if int(rest) < 0 else [_read_reply(readline) for _ in range(int(rest))]
    raise ValueError(f"not a RESP2 reply: {line!r}")


def _info(port: int, *args: str) -> dict[str, str]:
    """``CLUSTER INFO`` or ``INFO <section>`` as a dict."""
    text = command(port, *args)
    assert isinstance(text, str)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value for key, value in pairs}


def _masters(port: int) -> tuple[list[Node], bool]:
    """The masters holding slots, as the node at ``port`` sees them (sorted by first slot),
    and whether that view is settled: no node in handshake and no slot migrating."""
    text = command(port, "CLUSTER", "NODES")
    assert isinstance(text, str)
    rows = [line.split() for line in text.splitlines() if line.strip()]
    port_of = {row[0]: int(row[1].split("@")[0].rsplit(":", 1)[1]) for row in rows}
    settled = True
    masters: list[Node] = []
    for row in rows:
        node_id, flags, slot_fields = row[0], row[2].split(","), row[8:]
        settled &= "handshake" not in flags and "noaddr" not in flags
        settled &= not any(f.startswith("[") for f in slot_fields)
        if "master" not in flags or "fail" in flags:
            continue
        slots = tuple(
            (int(f.split("-")[0]), int(f.split("-")[-1]))
            for f in slot_fields
            if not f.startswith("[")
        )
        replicas = tuple(
            sorted(port_of[r[0]] for r in rows if r[3] == node_id and "fail" not in r[2].split(","))
        )
        if slots:
            masters.append(Node(port_of[node_id], node_id, slots, replicas))
    return sorted(masters, key=lambda node: node.slots[0]), settled


@dataclass
class RedisCluster:
    """Six ``redis-server`` processes made one cluster: three masters, a replica each.

    ``node_timeout`` (ms) is the cluster's ``cluster-node-timeout``: how long a node may be
    silent before it is failed over (a failover takes about twice that, and a little more).
    """

    node_timeout: int = 1000
    ports: list[int] = field(default_factory=list)
    root: Path | None = None
    _bus_ports: dict[int, int] = field(default_factory=dict)
    _processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    _killed_slots: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The URL of the first node still running (a client finds the others from it)."""
        return f"redis://127.0.0.1:{self.live_ports()[0]}"

    def live_ports(self) -> list[int]:
        return [port for port in self.ports if self._running(port)]

    def start(self, timeout: float = 30) -> None:
        """Start the nodes, create the cluster, and return once it is usable everywhere."""
        for tool in ("redis-server", "redis-cli"):
            assert shutil.which(tool), f"{tool} is not installed: apt-get install redis-server"
        self.root = Path(tempfile.mkdtemp(prefix="redis-cluster-"))
        both = _free_ports(12)
        self.ports, self._bus_ports = both[:6], dict(zip(both[:6], both[6:], strict=True))
        deadline = time.monotonic() + timeout
        for port in self.ports:
            self._spawn(port)
        for port in self.ports:
            self._wait_ping(port, deadline)
        cli = shutil.which("redis-cli")
        assert cli is not None
        created = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=max(deadline - time.monotonic(), 1),
            check=False,
        )
        assert created.returncode == 0, f"redis-cli --cluster create failed:\n{created.stdout}"
        self._wait_until(self._settled, deadline, "the new cluster did not settle")

    def masters(self) -> list[Node]:
        """The masters holding slots, sorted by first slot, as a running node sees them."""
        return _masters(self.live_ports()[0])[0]

    def master_for_slot(self, slot: int) -> Node:
        for node in self.masters():
            if node.serves(slot):
                return node
        raise LookupError(f"no master serves slot {slot}")

    def master_for_key(self, key: str | bytes) -> Node:
        return self.master_for_slot(hash_slot(key))

    def wait_replicated(self, timeout: float = 10) -> None:
        """Wait until every live replica has all its master had written when this was called."""
        wanted = {
            replica: int(_info(node.port, "INFO", "replication")["master_repl_offset"])
            for node in self.masters()
            for replica in node.replicas
        }

        def caught_up() -> str | None:
            for replica, offset in wanted.items():
                have = int(_info(replica, "INFO", "replication").get("slave_repl_offset", -1))
                if have < offset:
                    return f"{replica} is at offset {have} of {offset}"
            return None

        self._wait_until(caught_up, time.monotonic() + timeout, "the replicas did not catch up")

    def kill(self, port: int) -> None:
        """SIGKILL the node at ``port`` (no goodbye: the cluster finds out by timeout)."""
        for node in self.masters():
            if node.port == port:
                self._killed_slots[port] = node.slots
        process = self._processes.pop(port)
        process.kill()
        process.wait(10)

    def wait_failover(self, old_master: int, timeout: float = 30) -> Node:
        """Wait until a replica serves every slot of the killed master ``old_master`` and every
        running node reports ``cluster_state:ok`` and the same slot map; return the new master.
        """
        slots = self._killed_slots[old_master]
        promoted: list[Node] = []

        def done() -> str | None:
            reason = self._settled(replicated=False)
            if reason is not None:
                return reason
            node = self.master_for_slot(slots[0][0])
            if node.port == old_master or not all(s in node.slots for s in slots):
                return f"slots {slots} are still with {old_master}, or split"
            promoted.append(node)
            return None

        self._wait_until(done, time.monotonic() + timeout, f"{old_master} was not failed over")
        return promoted[-1]

    def restart(self, port: int, timeout: float = 30) -> None:
        """Start a killed node again, with its ``nodes.conf``: it rejoins, as a replica if it was
        failed over; return once it is in sync and every node agrees."""
        assert not self._running(port), f"{port} is running"
        deadline = time.monotonic() + timeout
        self._spawn(port)
        self._wait_ping(port, deadline)
        self._wait_until(self._settled, deadline, f"{port} did not rejoin")
        self._killed_slots.pop(port, None)

    def stop(self) -> None:
        """Kill every node (nothing to save) and remove the temp dirs."""
        for process in self._processes.values():
            process.kill()
        for process in self._processes.values():
            process.wait(10)
        self._processes.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _running(self, port: int) -> bool:
        process = self._processes.get(port)
        return process is not None and process.poll() is None

    def _spawn(self, port: int) -> None:
        assert self.root is not None
        binary = shutil.which("redis-server")
        assert binary is not None
        home = self.root / str(port)
        home.mkdir(exist_ok=True)
        args = {
            "port": str(port),
            "bind": "127.0.0.1",
            "cluster-enabled": "yes",
            "cluster-port": str(self._bus_ports[port]),
            "cluster-config-file": str(home / "nodes.conf"),
            "cluster-node-timeout": str(self.node_timeout),
            # A replica may always be promoted, however long it was cut off from its master.
            "cluster-replica-validity-factor": "0",
            # The other shards keep serving while one has no primary (by default the whole
            # cluster refuses every command until a replica took over): as docs/deployment.md
            # recommends for asgi-events.
            "cluster-require-full-coverage": "no",
            # A replica's full sync starts at once (by default the master waits 5 s for more).
            "repl-diskless-sync-delay": "0",
            "save": "",
            "appendonly": "no",
            "dir": str(home),
            "logfile": str(home / "redis.log"),
        }
        self._processes[port] = subprocess.Popen(
            [binary, *(part for key, value in args.items() for part in (f"--{key}", value))],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    def _wait_ping(self, port: int, deadline: float) -> None:
        def pong() -> str | None:
            assert self._running(port), f"redis-server {port} exited: see {self._log(port)}"
            try:
                return None if command(port, "PING") == "PONG" else "no PONG"
            except OSError as exc:
                return str(exc)

        self._wait_until(pong, deadline, f"redis-server {port} did not start")

    def _settled(self, replicated: bool = True) -> str | None:
        """None if every running node reports ``cluster_state:ok`` and the same settled map
        of all 16384 slots (with ``replicated``: every master has a replica, in sync); else why
        not."""
        views = []
        for port in self.live_ports():
            try:
                state = _info(port, "CLUSTER", "INFO")["cluster_state"]
                view, settled = _masters(port)
                role = _info(port, "INFO", "replication")
            except (OSError, ReplyError) as exc:
                return f"{port}: {exc}"
            if state != "ok" or not settled:
                return f"{port}: cluster_state:{state}, settled: {settled}"
            if role["role"] == "slave" and role.get("master_link_status") != "up":
                return f"{port}: its master link is {role.get('master_link_status')}"
            views.append(view)
        if any(view != views[0] for view in views):
            return "the nodes do not agree on the slot map yet"
        if sum(last - first + 1 for node in views[0] for first, last in node.slots) != SLOTS:
            return "not every slot is served"
        if replicated and not all(node.replicas for node in views[0]):
            return "a master has no replica yet"
        return None

    def _wait_until(self, ready: Callable[[], str | None], deadline: float, what: str) -> None:
        """Poll ``ready`` (None: ready; else why not) until ``deadline``, then fail, saying why."""
        while (reason := ready()) is not None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {reason} (logs in {self.root})")
            time.sleep(0.02)

    def _log(self, port: int) -> Path:
        assert self.root is not None
        return self.root / str(port) / "redis.log"


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held together while chosen, so all differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextmanager
def running_cluster(node_timeout: int = 1000) -> Iterator[RedisCluster]:
    cluster = RedisCluster(node_timeout)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def main() -> None:
    """Run a cluster until Ctrl-C (or SIGTERM), printing its URL."""
    stop = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    started = time.monotonic()
    with running_cluster() as cluster:
        print(f"{cluster.url}  (started in {time.monotonic() - started:.1f} s)")
        for node in cluster.masters():
            ranges = " ".join(f"{first}-{last}" for first, last in node.slots)
            print(f"  master {node.port} ({ranges}), replicas {list(node.replicas)}")
        print("Ctrl-C to stop", flush=True)
        while not stop:
            signal.pause()  # (until a signal: SIGINT or SIGTERM sets ``stop``)


if __name__ == "__main__":
    main()
