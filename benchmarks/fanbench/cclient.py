"""The compiled load client (``cload/fanload.c``): built on first use, driven over a pipe.

The C process opens the N WebSockets and reads every frame (epoll, one thread, on the load
process's core: it inherits the pinning); this process only starts it, waits for its lines on
stdout (``extensions``, ``open``, ``first``, ``done``) and reads its results back after the
measured window (counts, bytes on the wire, each socket's received count and closed flag, and
every new event's latency).

``--deflate``: the C client offers permessage-deflate as Chromium does and inflates what the
server compresses (it is linked with zlib, ``-lz``; where that build fails it is built without,
``-DFANLOAD_NO_ZLIB``, and ``--deflate`` then stops the benchmark instead of measuring
uncompressed frames).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
from array import array
from functools import cache
from pathlib import Path
from typing import NamedTuple

from .clients import Tally
from .common import (
    BATCH_SUBPROTOCOL,
    BATCH_VARIANT,
    CONNECT_TIMEOUT,
    HTTP_TIMEOUT,
    SOCKETIO_VARIANT,
    SSE_VARIANT,
    load_cpu_seconds,
)

SOURCE = Path(__file__).resolve().parent / "cload" / "fanload.c"
CFLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra"]
ZLIB = ["-lz"]  # linked after the source
NO_ZLIB = ["-DFANLOAD_NO_ZLIB"]  # the fallback where the build with zlib fails
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"  # as Chromium offers it
LOAD_CLIENTS = ("c", "uvloop")  # uvloop: the Python clients, on --load-loop (uvloop by default)
C_MODES = ("burst", "steady")  # stalled, idle and routing keep the Python clients


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "asgi-events-fanbench"


class Build(NamedTuple):
    binary: Path | None  # None: it could not be built (``how`` says why)
    how: str
    deflate: bool = False  # linked with zlib: --deflate works


@cache
def build() -> Build:
    """The binary, built with the system's ``cc`` (and zlib, else without it) unless a build of
    this very source (and flags) is cached."""
    with_zlib = build_with(ZLIB, [])
    if with_zlib.binary is not None:
        return with_zlib._replace(deflate=True)
    without = build_with([], NO_ZLIB)
    if without.binary is None:
        return without
    print(f"C load client: no zlib build ({with_zlib.how}); --deflate unavailable", flush=True)
    return without._replace(how=f"{without.how} (without zlib: --deflate unavailable)")


def build_with(libs: list[str], defines: list[str]) -> Build:
    compiler = os.environ.get("CC", "cc")
    source = SOURCE.read_bytes()
    flags = [compiler, *CFLAGS, *defines, *libs]
    digest = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:12]
    binary = cache_dir() / f"fanload-{digest}"
    if binary.exists():
        return Build(binary, f"cached build {binary}")
    if shutil.which(compiler) is None:
        return Build(None, f"no C compiler ({compiler!r} not on the PATH)")
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    command = [compiler, *CFLAGS, *defines, "-o", str(partial), str(SOURCE), *libs]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Build(None, f"`{' '.join(command)}`: {exc}")
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        print(done.stderr, file=sys.stderr, flush=True)
        first = (done.stderr.strip().splitlines() or ["no output"])[0]
        return Build(None, f"`{' '.join(command)}` failed (exit {done.returncode}): {first}")
    partial.replace(binary)  # atomic: a concurrent run sees the whole binary or none
    return Build(binary, f"built {binary}")


def choose_load_client(args: argparse.Namespace) -> None:
    """``--load-client c``: build the C client now (if a run will use it); on failure, fall
    back to the Python clients, loudly. Sets ``args.load_client_note`` for the report."""
    args.load_client_note = ""
    if args.load_client != "c" or args.mode not in C_MODES:
        return
    if not any(c_variant(v) for v in args.variants):
        return
    binary, how, deflate = build()
    if args.deflate and not deflate:  # never measure uncompressed frames as compressed ones
        sys.exit(f"--deflate needs the C load client built with zlib: {how}")
    if binary is None:
        args.load_client = "uvloop"
        args.load_client_note = (
            f"**The C load client could not be built; the Python clients ({args.load_loop}) "
            f"were used instead**: {how}"
        )
        bar = "!" * 78
        print(f"{bar}\n{args.load_client_note}\n{bar}", file=sys.stderr, flush=True)
    else:
        print(f"C load client: {how}", flush=True)


def deflate_error(args: argparse.Namespace) -> str | None:
    """Why ``--deflate`` cannot apply to this invocation, or None: only the C client offers it."""
    if not args.deflate:
        return None
    if args.load_client != "c" or args.mode not in C_MODES:
        modes = " or ".join(C_MODES)
        return f"--deflate needs the C load client (--load-client c), in {modes} mode"
    if not any(c_variant(v) for v in args.variants):
        return "--deflate: none of these variants is read by the C load client"
    return None


def c_variant(variant: str) -> bool:
    """The variants the C client speaks for: plain WebSockets (batch frames included)."""
    return variant not in (SOCKETIO_VARIANT, SSE_VARIANT)


def uses_c(args: argparse.Namespace, variant: str, stall: bool = False) -> bool:
    return args.load_client == "c" and args.mode in C_MODES and c_variant(variant) and not stall


def load_client_description(args: argparse.Namespace) -> str:
    if args.load_client_note:
        return args.load_client_note
    if args.load_client == "c" and args.mode in C_MODES:
        deflate = ""
        if args.deflate:
            deflate = (
                f"; **the C client offers permessage-deflate** (`Sec-WebSocket-Extensions: "
                f"{DEFLATE_OFFER}`, as Chromium does) and inflates; the Python clients "
                "(Socket.IO, SSE) do not offer it"
            )
        return (
            f"load client: the C one (`fanbench/cload/fanload.c`, epoll, one thread) for the "
            f"WebSocket variants, the Python ones ({args.load_loop}) for the others{deflate}"
        )
    return f"load client: the Python ones ({args.load_loop})"


def child_cpu_seconds(pid: int) -> float:
    """CPU time of a (single-threaded) child so far: /proc/<pid>/schedstat, in ns."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class CSocket:
    """One of the C client's sockets, as the runs see a client: counts filled in after the run."""

    def __init__(self, load: CLoad) -> None:
        self.load = load
        self.received = 0
        self.closed = False

    def close(self) -> None:
        self.load.close()


class CLoad(Tally):
    """The tally of a run whose clients are the C process's sockets.

    Its CPU (``cpu_seconds``) is this process's and the C process's, summed: both run on the
    load core. ``finish`` (after the measured window) reads the C process's results.
    """

    process: asyncio.subprocess.Process | None = None
    sockets_list: list[CSocket]
    deflate = False  # permessage-deflate offered
    # What the server answered: sockets that agreed to permessage-deflate, whether their answers
    # differed, the first answer ("" if none did).
    extension_sockets = 0
    extensions_mixed = False
    extensions = ""
    wire_bytes = 0  # every frame received, header and payload as received (compressed or not)
    message_bytes = 0  # the data messages' payloads, inflated
    messages = 0  # data messages received
    compressed = 0  # of which compressed (RSV1)

    async def start(self, ports: list[int], variant: str, deflate: bool = False) -> list[CSocket]:
        binary, how, can_deflate = build()
        if binary is None:
            raise RuntimeError(f"the C load client is not built: {how}")
        if deflate and not can_deflate:
            raise RuntimeError(f"the C load client has no zlib, no --deflate: {how}")
        self.deflate = deflate
        batch = variant == BATCH_VARIANT
        command = [
            str(binary),
            *(["--deflate"] if deflate else []),
            ",".join(map(str, ports)),
            str(self.sockets),
            str(self.events),
            "batch" if batch else "plain",
        ]
        if batch:
            command.append(BATCH_SUBPROTOCOL.decode())
        self.process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        self.sockets_list = [CSocket(self) for _ in range(self.sockets)]
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._results: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read())
        try:
            await asyncio.wait_for(asyncio.shield(self._opened), CONNECT_TIMEOUT)
        except BaseException:
            self.close()
            raise
        return self.sockets_list

    def cpu_seconds(self) -> float:
        pid = self.process.pid if self.process is not None else 0
        return load_cpu_seconds() + (child_cpu_seconds(pid) if pid else 0.0)

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        out = self.process.stdout
        try:
            while line := await out.readline():
                word, _, rest = line.decode().strip().partition(" ")
                if word == "extensions":
                    count, mixed, answer = rest.split(" ", 2)
                    self.extension_sockets, self.extensions_mixed = int(count), mixed == "1"
                    self.extensions = "" if answer == "-" else answer
                elif word == "open":
                    self._opened.set_result(None)
                elif word == "first":
                    self.mark_first()
                elif word == "done":
                    self.done.set()
                elif word == "result":
                    await self._read_results(out, [int(x) for x in rest.split()])
                elif word == "error":
                    raise ConnectionError(f"C load client: {rest}")
            raise ConnectionError(f"C load client exited ({await self.process.wait()})")
        except Exception as exc:
            self.done.set()  # the run stops waiting; finish() raises
            for future in (self._opened, self._results):
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved: whoever waits gets it anyway

    async def _read_results(self, out: asyncio.StreamReader, fields: list[int]) -> None:
        received, ooo, dups, unexpected, frames, ready, last_ns, nlat, _closed = fields[:9]
        self.wire_bytes, self.message_bytes, self.messages, self.compressed = fields[9:]
        self.received, self.out_of_order, self.duplicates = received, ooo, dups
        self.unexpected, self.frames, self.ready, self.last_ns = unexpected, frames, ready, last_ns
        latencies = array("q")
        latencies.frombytes(await out.readexactly(8 * nlat))
        self.latencies_ns = latencies.tolist()
        counts = array("I")
        counts.frombytes(await out.readexactly(4 * self.sockets))
        flags = await out.readexactly(self.sockets)
        for sock, count, flag in zip(self.sockets_list, counts, flags, strict=True):
            sock.received, sock.closed = count, bool(flag)
        self._results.set_result(None)

    async def finish(self) -> None:
        """After the window: the counts and latencies, from the C process (``stop``)."""
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(b"stop\n")
        await asyncio.wait_for(asyncio.shield(self._results), HTTP_TIMEOUT)

    def close(self) -> None:
        """Close frames on every socket, then the C process exits (it also does on EOF)."""
        process = self.process
        if process is None or process.returncode is not None or process.stdin is None:
            return
        if not process.stdin.is_closing():
            process.stdin.write(b"close\n")
            process.stdin.close()

    async def wait_closed(self) -> None:
        process = self.process
        if process is None:
            return
        try:
            await asyncio.wait_for(process.wait(), HTTP_TIMEOUT)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
        self._reader.cancel()
