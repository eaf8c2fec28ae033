"""Child processes seen from the load side: server processes and redis-server; HTTP to them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from .common import (
    ENTRY_SCRIPT,
    HOST,
    HTTP_TIMEOUT,
    PROJECT_DIR,
    REDIS_CLUSTER_START_TIMEOUT,
    REDIS_START_TIMEOUT,
    REDIS_VARIANT,
    SERVER_CPU,
    SERVER_START_TIMEOUT,
    SERVER_STOP_TIMEOUT,
    die_with_parent,
)


async def http_request(
    port: int, method: str, path: str, body: dict[str, Any] | None, timeout: float
) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 request with ``Connection: close``; the JSON answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        data = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode() + data)
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload) if payload else {}


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU time so far of the main thread of process ``pid`` (ns resolution where available)."""
    try:
        with open(f"/proc/{pid}/schedstat") as schedstat:
            return int(schedstat.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):  # no schedstat: clock ticks of the process
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ProcStats:
    """CPU time and peak RSS of a child process, read from ``/proc``."""

    proc: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        """CPU time of the process's main thread so far (ns resolution where available)."""
        return main_thread_cpu_seconds(self.proc.pid)

    def status(self, key: str) -> str:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return line.split(":", 1)[1].strip()
        return "?"

    def peak_rss_mb(self) -> float:
        return int(self.status("VmHWM").split()[0]) / 1024  # kB

    def rss_kb(self) -> int:
        """The resident set now (``VmRSS``), in kB."""
        return int(self.status("VmRSS").split()[0])


class ServerProcess(ProcStats):
    """A server process on an ephemeral port of 127.0.0.1 (the socket is bound here)."""

    live: ClassVar[set[ServerProcess]] = set()  # for the cleanup on exit

    def __init__(
        self,
        server: str,
        variant: str,
        profile_path: Path | None,
        redis: tuple[str, str] | None = None,
        uvicorn_ws: str = "auto",
        *,
        cluster: bool = False,
        cpu: int = SERVER_CPU,
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        self.port: int = sock.getsockname()[1]
        fd = sock.detach()
        self.log = tempfile.TemporaryFile(mode="w+b", prefix="fanout-server-")
        command = [sys.executable, str(ENTRY_SCRIPT), "--serve", server, variant, str(fd)]
        command += ["--uvicorn-ws", uvicorn_ws]
        if profile_path is not None:
            command += ["--profile-to", str(profile_path)]
        if redis is not None:
            command += ["--redis-url", redis[0], "--redis-prefix", redis[1]]
            if cluster:
                command += ["--redis-cluster"]
        if cpu != SERVER_CPU:
            command += ["--pin-cpu", str(cpu)]
        try:
            self.proc = subprocess.Popen(
                command, pass_fds=(fd,), stdout=self.log, stderr=subprocess.STDOUT
            )
        finally:
            os.close(fd)
        ServerProcess.live.add(self)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError):
                status, _ = await http_request(self.port, "GET", "/ready", None, timeout=1.0)
                if status == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {SERVER_START_TIMEOUT} s")
            await asyncio.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        self.log.seek(0)
        return "\n".join(self.log.read().decode(errors="replace").splitlines()[-lines:])

    def log_problems(self) -> str:
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        return self.log_tail() if ("Traceback" in text or "Error" in text) else ""

    async def stop(self) -> None:
        """Graceful shutdown (``POST /shutdown``), then SIGTERM, then SIGKILL; all bounded."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError):
                await http_request(self.port, "POST", "/shutdown", {}, timeout=HTTP_TIMEOUT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.proc.wait, SERVER_STOP_TIMEOUT)
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3.0)
        ServerProcess.live.discard(self)

    def close(self) -> None:
        self.kill()
        self.log.close()


def redis_server_binary() -> str:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"{REDIS_VARIANT} needs redis-server (apt-get install redis-server)")
    return binary


def redis_server_version() -> str:
    try:
        out = subprocess.run(
            [redis_server_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    found = re.search(r"v=(\S+)", out)
    return found[1] if found else "?"


def _redis_child_setup() -> None:  # pragma: no cover - runs in the forked child
    """Before exec: pin to the server CPU and die with this process."""
    with contextlib.suppress(OSError):
        if (os.cpu_count() or 1) > SERVER_CPU:
            os.sched_setaffinity(0, {SERVER_CPU})
    die_with_parent()


class RedisProcess(ProcStats):
    """A ``redis-server`` on a free port of 127.0.0.1, without persistence, on the server CPU."""

    live: ClassVar[set[RedisProcess]] = set()  # for the cleanup on exit

    def __init__(self) -> None:
        with socket.socket() as sock:  # a free port (freed again: redis-server binds it)
            sock.bind((HOST, 0))
            self.port: int = sock.getsockname()[1]
        self.url = f"redis://{HOST}:{self.port}/0"
        self.dir = tempfile.TemporaryDirectory(prefix="fanout-redis-")
        self.log = tempfile.TemporaryFile(mode="w+b", prefix="fanout-redis-")
        command = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", self.dir.name,
            "--daemonize", "no",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=_redis_child_setup
        )
        RedisProcess.live.add(self)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, self.port), 1.0
                )
                try:
                    writer.write(b"PING\r\n")
                    if (await asyncio.wait_for(reader.readline(), 1.0)).startswith(b"+PONG"):
                        return
                finally:
                    writer.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server not ready after {REDIS_START_TIMEOUT} s")
            await asyncio.sleep(0.02)

    cluster = False

    def redis_cpu(self) -> RedisCpu:
        return RedisCpu((self.cpu_seconds(),))

    def close(self) -> None:
        """SIGTERM (it saves nothing, so it exits at once), then SIGKILL; bounded."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3.0)
        RedisProcess.live.discard(self)
        self.log.close()
        self.dir.cleanup()


REDIS_KINDS = ("single", "cluster")


@dataclass(frozen=True)
class RedisCpu:
    """CPU seconds so far of a Redis's processes (main threads): ``parts`` are what a run
    reports as its redis CPU (the one redis-server, or each master of a cluster, by first
    slot), ``replicas`` the cluster's replicas, summed (not reported as redis CPU; counted so
    that they do not show as other processes' CPU)."""

    parts: tuple[float, ...] = ()
    replicas: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.parts)

    def __sub__(self, before: RedisCpu) -> RedisCpu:
        parts = tuple(a - b for a, b in zip(self.parts, before.parts, strict=True))
        return RedisCpu(parts, self.replicas - before.replicas)


class RedisService(Protocol):
    """What a run needs of its Redis, one server or a cluster: where the nodes connect, and
    the CPU time of its processes."""

    url: str
    cluster: bool  # the nodes pass cluster=True to RedisBackend

    async def wait_ready(self) -> None: ...
    def redis_cpu(self) -> RedisCpu: ...
    def close(self) -> None: ...


class ClusterRedis:
    """A Redis Cluster for one run: three masters and a replica each, started by the tests'
    harness (``tests/support/redis_cluster.py``), every thread of its six processes pinned to
    the server CPU like the single redis-server. Its redis CPU is the masters' main threads
    (the replicas' apart, see ``RedisCpu``)."""

    live: ClassVar[set[ClusterRedis]] = set()  # for the cleanup on exit
    cluster = True

    def __init__(self) -> None:
        redis_server_binary()  # fails early, saying what to install
        if str(PROJECT_DIR) not in sys.path:
            sys.path.insert(0, str(PROJECT_DIR))  # for ``tests.support``
        from tests.support.redis_cluster import RedisCluster

        self.harness = RedisCluster()
        self.url = ""
        self.masters: list[int] = []  # main process ids, by first slot
        self.replicas: list[int] = []
        ClusterRedis.live.add(self)

    async def wait_ready(self) -> None:
        """Start the cluster (the harness returns once every node agrees on the slot map and
        every replica is in sync), then pin its processes and note their ids."""
        await asyncio.to_thread(self.harness.start, REDIS_CLUSTER_START_TIMEOUT)
        from tests.support.redis_cluster import command

        def pid(port: int) -> int:
            found = re.search(r"^process_id:(\d+)", str(command(port, "INFO", "server")), re.M)
            assert found, f"no process_id in INFO server of {port}"
            return int(found[1])

        masters = self.harness.masters()
        self.masters = [pid(node.port) for node in masters]
        self.replicas = [pid(port) for node in masters for port in node.replicas]
        for process in self.masters + self.replicas:
            pin_process(process, SERVER_CPU)
        self.url = self.harness.url

    def redis_cpu(self) -> RedisCpu:
        return RedisCpu(
            tuple(main_thread_cpu_seconds(pid) for pid in self.masters),
            sum(main_thread_cpu_seconds(pid) for pid in self.replicas),
        )

    def close(self) -> None:
        """Kill the six processes (nothing to save) and remove their temp dirs."""
        self.harness.stop()
        ClusterRedis.live.discard(self)


def pin_process(pid: int, cpu: int) -> None:
    """Pin every thread of process ``pid`` to ``cpu`` if the machine has it."""
    if (os.cpu_count() or 1) <= cpu:
        return
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(task), {cpu})


def redis_description(kind: str) -> str:
    """For the report header."""
    if kind == "single":
        return f"one redis-server {redis_server_version()}"
    return (
        f"a Redis Cluster of redis-server {redis_server_version()} (3 masters, 3 replicas; "
        "redis CPU: the masters' main threads, summed)"
    )


def start_redis(kind: str) -> RedisService:
    """A fresh Redis for one run: ``single`` is one redis-server, ``cluster`` three masters
    and three replicas."""
    return RedisProcess() if kind == "single" else ClusterRedis()


@contextlib.contextmanager
def cleanup_on_exit() -> Iterator[None]:
    """Kill any server or redis-server process left behind, also on SIGTERM/SIGINT."""

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    finally:
        for proc in list(ServerProcess.live):
            proc.close()
        for redis in list(RedisProcess.live):
            redis.close()
        for cluster in list(ClusterRedis.live):
            cluster.close()
        signal.signal(signal.SIGTERM, previous)
