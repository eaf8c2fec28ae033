"""The load process's WebSocket clients: the upgrade by hand and a minimal frame parser.

A server's frames are unmasked, so the client side needs no more; a regex reads ``seq`` and
``t`` out of each frame instead of ``json.loads``, so the load side stays cheap.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from .common import (
    BATCH_MESSAGE,
    BATCH_SUBPROTOCOL,
    BATCH_VARIANT,
    CONNECT_TIMEOUT,
    EVENT_FIELDS,
    HOST,
    READY_TYPE,
    SOCKETIO_PATH,
    SOCKETIO_VARIANT,
    SSE_CLOSE,
    SSE_FIRST,
    SSE_NEXT,
    SSE_VARIANT,
    STALL_RCVBUF,
    WS_GUID,
    WS_PATH,
    load_cpu_seconds,
)


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (clients must mask)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


@dataclass
class Tally:
    """What all clients of one run received."""

    sockets: int
    events: int
    done: asyncio.Event
    received: int = 0
    out_of_order: int = 0
    duplicates: int = 0
    unexpected: int = 0  # frames (batch: messages; SSE: blocks) that are not one of our events
    frames: int = 0  # frames (SSE: body chunks) that carried at least one of our events
    ready: int = 0  # asgi_events.ready control messages (batch and SSE clients get one each)
    last_ns: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    # perf_counter() and the load process's CPU time at the first delivery: the load CPU while
    # delivering (the window also holds the server's queueing, when the clients are idle).
    first_perf: float = 0.0
    first_cpu: float = 0.0
    # Batch frames and SSE chunks: (receive time, the events' "t" fields), turned into latencies
    # after the run.
    pending: list[tuple[int, tuple[bytes, ...]]] = field(default_factory=list)

    expected: int = 0

    # The seq fields a batch frame holds in the regular case, as text: checked without int().
    seq_texts: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        self.expected = self.sockets * self.events
        self.seq_texts = tuple(b"%d" % seq for seq in range(self.events))

    def mark_first(self) -> None:
        self.first_perf, self.first_cpu = time.perf_counter(), self.cpu_seconds()

    def cpu_seconds(self) -> float:
        """The load CPU so far (the C client's tally adds its process)."""
        return load_cpu_seconds()

    async def finish(self) -> None:
        """After the measured window: nothing to collect (the C client's tally reads its)."""

    def settle(self) -> None:
        """Compute the latencies deferred by batch frames and SSE chunks (after the measured
        window)."""
        for now, t_texts in self.pending:
            self.latencies_ns.extend(now - int(t) for t in t_texts)
        self.pending.clear()


class BaseClient(asyncio.Protocol):
    """What every load client shares: the request written once connected, and the checks of
    what arrives (every event exactly once and in order, its latency)."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None
        self.lost_connection = False
        self._next_seq = 0
        self._seen = bytearray(tally.events)
        self._request = b""

    @property
    def received(self) -> int:
        return sum(self._seen)

    @property
    def closed(self) -> bool:
        """The server closed or dropped the connection (or we did, at the end)."""
        return self.close_code is not None or self.lost_connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)
        transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_connection = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during the handshake: {exc}"))

    def _refuse(self, problem: str) -> None:
        """The server did not open the stream as asked: the client fails."""
        self.opened.set_exception(ConnectionError(problem))
        assert self.transport is not None
        self.transport.close()

    def _message(self, fields: re.Match[bytes] | None, now: int) -> None:
        """A frame of one message (no subprotocol): one event."""
        tally = self.tally
        if fields is None:
            tally.unexpected += 1
            return
        tally.frames += 1
        seq = int(fields[1])
        if seq != self._next_seq:
            tally.out_of_order += 1
        self._next_seq = seq + 1
        if seq >= tally.events or self._seen[seq]:
            tally.duplicates += 1
            return
        self._seen[seq] = 1
        tally.latencies_ns.append(now - int(fields[2]))
        tally.last_ns = now
        if not tally.received:
            tally.mark_first()
        tally.received += 1
        if tally.received == tally.expected:
            tally.done.set()

    def _events(self, seq_texts: tuple[bytes, ...], t_texts: tuple[bytes, ...], now: int) -> None:
        """Several events that arrived together (a batch frame, an SSE body chunk), as the
        ``seq`` and ``t`` texts the regex found, in the order they came.

        In the regular case (the next events in order, none seen before) no Python code runs per
        event: the checks compare tuples and search a bytearray, and the latencies are computed
        after the run (``Tally.settle``), outside the measured window.
        """
        tally = self.tally
        first, n = int(seq_texts[0]), len(seq_texts)
        seen = self._seen
        if (
            first == self._next_seq
            and seq_texts == tally.seq_texts[first : first + n]
            and seen.find(1, first, first + n) == -1
        ):
            seen[first : first + n] = bytes([1]) * n
            self._next_seq = first + n
            tally.pending.append((now, t_texts))
            new = n
        else:
            new = self._irregular(list(map(int, seq_texts)), t_texts, now)
        if new:
            tally.last_ns = now
            if not tally.received:
                tally.mark_first()
            tally.received += new
            if tally.received == tally.expected:
                tally.done.set()

    def _irregular(self, seqs: list[int], t_texts: tuple[bytes, ...], now: int) -> int:
        """Events with a gap, a repeat or a reordering: count them event by event."""
        tally = self.tally
        seen, expect, events = self._seen, self._next_seq, tally.events
        latencies = tally.latencies_ns
        new = 0
        for seq, t_text in zip(seqs, t_texts, strict=True):
            if seq != expect:
                tally.out_of_order += 1
            expect = seq + 1
            if seq >= events or seen[seq]:
                tally.duplicates += 1
                continue
            seen[seq] = 1
            latencies.append(now - int(t_text))
            new += 1
        self._next_seq = expect
        return new

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Client(BaseClient):
    """One WebSocket client: the upgrade by hand, then a minimal parser for unmasked frames.

    With ``batch`` it offers the ``asgi-events.v1.batch`` subprotocol (and insists the server
    selects it): every frame is then a JSON array of messages, read with the same regex.
    """

    def __init__(self, port: int, token: str, tally: Tally, batch: bool = False) -> None:
        super().__init__(tally)
        self.batch = batch
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._open = False
        key = base64.b64encode(os.urandom(16))
        self._accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        protocol = f"Sec-WebSocket-Protocol: {BATCH_SUBPROTOCOL.decode()}\r\n" if batch else ""
        self._request = (
            f"GET {self.target(token)} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
            f"{protocol}\r\n"
        ).encode()

    def target(self, token: str) -> str:
        return f"{WS_PATH}?token={token}"

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()  # every frame in this chunk arrived by now
        if self._buffer or not self._open:
            self._buffer += data
            if not self._open and not self._handshake():
                return
            data = bytes(self._buffer)
            self._buffer.clear()
        pos, size = 0, len(data)
        while size - pos >= 2:
            first, second = data[pos], data[pos + 1]
            length, header = second & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, header = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, header = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
            start = pos + header
            end = start + length
            if second & 0x80:  # servers do not mask, but be lenient
                end += 4
            if end > size:
                break
            if first == 0x81 and not second & 0x80:  # the common case: a whole, unmasked text
                if self.batch:
                    self._array(data, start, end, now)
                else:
                    self._plain(data, start, end, now)
            else:
                payload = data[start:end]
                if second & 0x80:
                    mask, payload = payload[:4], payload[4:]
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                self._frame(first & 0x0F, bool(first & 0x80), payload, now)
            pos = end
        if pos < size:
            self._buffer += data[pos:]

    def _handshake(self) -> bool:
        head, sep, rest = bytes(self._buffer).partition(b"\r\n\r\n")
        if not sep:
            return False
        lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines)}
        problem = ""
        if b" 101 " not in lines[0] + b" " or headers.get(b"sec-websocket-accept") != self._accept:
            problem = f"upgrade refused: {lines[0]!r}"
        elif self.batch and headers.get(b"sec-websocket-protocol") != BATCH_SUBPROTOCOL:
            selected = headers.get(b"sec-websocket-protocol")
            problem = f"{BATCH_SUBPROTOCOL.decode()} not selected (got {selected!r})"
        if problem:
            self._refuse(problem)
            return False
        self._buffer[:] = rest
        self._open = True
        self._upgraded()
        return True

    def _upgraded(self) -> None:
        """The 101 arrived: the client is open (a Socket.IO client waits for more)."""
        self.opened.set_result(None)

    def _frame(self, opcode: int, fin: bool, payload: bytes, now: int) -> None:
        if opcode == 0x0:  # continuation
            self._fragments.append(payload)
            if fin:
                payload, self._fragments = b"".join(self._fragments), []
                self._text(payload, now)
        elif opcode in (0x1, 0x2):
            if fin:
                self._text(payload, now)
            else:
                self._fragments = [payload]
        elif opcode == 0x8:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close()
        elif opcode == 0x9 and self.transport is not None:
            self.transport.write(masked_frame(0xA, payload))

    def _text(self, payload: bytes, now: int) -> None:
        """A whole message that did not take the fast path (masked, fragmented or binary)."""
        if self.batch:
            self._array(payload, 0, len(payload), now)
        else:
            self._plain(payload, 0, len(payload), now)

    def _plain(self, data: bytes, start: int, end: int, now: int) -> None:
        """A text message ``data[start:end]`` of one event (no batching)."""
        self._message(EVENT_FIELDS.search(data, start, end), now)

    def _array(self, data: bytes, start: int, end: int, now: int) -> None:
        """A batch frame ``data[start:end]``: a JSON array of messages, each event a delivery.

        No JSON parsing: one regex pass finds every message (``BATCH_MESSAGE``); the events
        are checked together (``_events``).
        """
        tally = self.tally
        found = None
        if end > start and data[start] == 0x5B:  # "[": a batch frame must be an array
            found = BATCH_MESSAGE.findall(data, start, end)
        if not found:
            tally.unexpected += 1
            return
        seq_texts, t_texts, readies = zip(*found, strict=True)
        if b"" in seq_texts:  # not only events: the ready message, or something unexpected
            ready = readies.count(READY_TYPE)
            events = [(seq, t) for seq, t, _ in found if seq]
            tally.ready += ready
            tally.unexpected += len(found) - ready - len(events)
            if not events:
                return
            seq_texts, t_texts = zip(*events, strict=True)
        tally.frames += 1
        self._events(seq_texts, t_texts, now)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.transport.write(masked_frame(0x8, (1000).to_bytes(2, "big")))
            self.transport.close()


class SocketIOClient(Client):
    """A Socket.IO client over a plain WebSocket (Engine.IO v4, no long-polling first).

    After the 101: the server's open packet ``0{...}``, the client's ``40`` (connect to the
    default namespace), the server's ``40{...}``; then it is open. Events arrive as
    ``42["bench.tick",{...}]``, read with the same regex; the server's pings (``2``) are
    answered (``3``) so that it does not drop the client.
    """

    def target(self, token: str) -> str:
        return f"{SOCKETIO_PATH}?EIO=4&transport=websocket"

    def _upgraded(self) -> None:
        pass  # open once the namespace is connected (``40{...}``)

    def _plain(self, data: bytes, start: int, end: int, now: int) -> None:
        if data.startswith(b"42", start, end):
            self._message(EVENT_FIELDS.search(data, start, end), now)
        elif data[start:end] == b"2":
            self._send_text(b"3")
        elif data.startswith(b"40", start, end):
            if not self.opened.done():
                self.opened.set_result(None)
        elif data.startswith(b"0{", start, end):
            self._send_text(b"40")
        else:
            self.tally.unexpected += 1

    def _send_text(self, text: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(masked_frame(0x1, text))


class SSEClient(BaseClient):
    """A Server-Sent Events client: ``GET /ws?token=…`` with ``Accept: text/event-stream``, the
    body de-chunked incrementally, and each chunk's complete blocks read in one regex pass.

    The server writes everything queued for a stream as one ``http.response.body`` message, and
    hypercorn and uvicorn (h11) send each as one HTTP/1.1 chunk, so a chunk is a batch of whole
    blocks (``id: …``/``data: …`` lines, then a blank line): it counts as one frame. A block cut
    between chunks (not what these servers do) is carried over to the next chunk, so the count
    stays right anyway. No JSON parsing: ``SSE_NEXT`` reads the start of every block of a chunk
    in one pass (``SSE_FIRST`` the first one), and the events are checked together, as a batch
    frame's are. Other blocks (the first chunk's ``retry:``, the ready event, comments, a close
    event) are told apart only when a chunk has any; anything else is unexpected.
    """

    def __init__(self, port: int, token: str, tally: Tally, batch: bool = False) -> None:
        super().__init__(tally)
        self._request = (
            f"GET {WS_PATH}?token={token} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
        ).encode()
        self._head = bytearray()  # the response head, until it is complete
        self._open = False
        self._chunked = False
        self._size_line = b""  # a chunk-size line cut between reads
        self._left = 0  # bytes of the current chunk's payload still to come
        self._crlf = 0  # bytes of the CRLF after a chunk's payload still to skip
        self._parts: list[bytes] = []  # the current chunk's payload so far, if cut between reads
        self._carry = b""  # an incomplete block at the end of a chunk
        self.ended = False  # the response ended (the last chunk)

    @property
    def closed(self) -> bool:
        return super().closed or self.ended

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()  # every chunk completed by this read arrived by now
        if not self._open:
            self._head += data
            head, sep, rest = bytes(self._head).partition(b"\r\n\r\n")
            if not sep or not self._response(head):
                return
            data = rest
        if self.ended:  # the trailer section after the last chunk: nothing for us
            return
        if self._chunked:
            self._dechunk(data, now)
        elif data:  # not chunked: the body runs to the end of the connection, a read a chunk
            self._chunk(data, 0, len(data), now)

    def _response(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines)}
        if b" 200 " not in lines[0] + b" ":
            self._refuse(f"the stream was refused: {lines[0]!r}")
            return False
        if not headers.get(b"content-type", b"").startswith(b"text/event-stream"):
            self._refuse(f"not an event stream: {headers.get(b'content-type')!r}")
            return False
        self._chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        self._head.clear()
        self._open = True
        self.opened.set_result(None)
        return True

    def _dechunk(self, data: bytes, now: int) -> None:
        """The chunked body: ``<hex size>[;ext]\\r\\n<payload>\\r\\n`` …, ``0\\r\\n\\r\\n``."""
        pos, size = 0, len(data)
        while pos < size:
            if self._left:  # inside a chunk's payload
                end = min(size, pos + self._left)
                self._left -= end - pos
                if self._left:  # the rest comes in a later read
                    self._parts.append(data[pos:end])
                    return
                if self._parts:
                    self._parts.append(data[pos:end])
                    chunk = b"".join(self._parts)
                    self._parts.clear()
                    self._chunk(chunk, 0, len(chunk), now)
                else:  # the regular case: the whole chunk in this read, read in place
                    self._chunk(data, pos, end, now)
                pos, self._crlf = end, 2
            elif self._crlf:
                skip = min(self._crlf, size - pos)
                self._crlf -= skip
                pos += skip
            else:  # a chunk-size line
                eol = data.find(b"\n", pos)
                if eol < 0:
                    self._size_line += data[pos:]
                    return
                line, self._size_line = self._size_line + data[pos:eol], b""
                pos = eol + 1
                self._left = int(line.split(b";", 1)[0], 16)
                if not self._left:  # the last chunk: the server ended the response
                    self.ended = True
                    return

    def _chunk(self, data: bytes, start: int, end: int, now: int) -> None:
        """One body chunk ``data[start:end]``: its complete blocks, read together."""
        if self._carry:
            data, self._carry = self._carry + data[start:end], b""
            start, end = 0, len(data)
        if not data.endswith(b"\n\n", start, end):  # a block cut off: keep it for the next
            last = data.rfind(b"\n\n", start, end)
            cut = last + 2 if last >= 0 else start
            self._carry, end = data[cut:end], cut
            if end == start:
                return
        # One tuple per block, in order: the first block's, then the one after each blank line
        # (the last blank line ends the chunk: nothing after it).
        found = SSE_NEXT.findall(data, start, end)
        found.pop()
        found.insert(0, SSE_FIRST.match(data, start, end).groups(b""))  # type: ignore[union-attr]
        seq_texts, t_texts, readies = zip(*found, strict=True)
        if b"" in seq_texts:  # not only events: the ready event, or other blocks
            events = [(seq, t) for seq, t, _ in found if seq]
            self._other_blocks(data, start, end, readies, len(found) - len(events))
            if not events:
                return
            seq_texts, t_texts = zip(*events, strict=True)
        self.tally.frames += 1
        self._events(seq_texts, t_texts, now)

    def _other_blocks(
        self, data: bytes, start: int, end: int, readies: tuple[bytes, ...], others: int
    ) -> None:
        """``others`` blocks of ``data[start:end]`` are not our events: tell them apart."""
        tally = self.tally
        ready = readies.count(READY_TYPE)
        close = data.count(SSE_CLOSE, start, end)
        retry = data.startswith(b"retry: ", start, end) + data.count(b"\n\nretry: ", start, end)
        comments = data.startswith(b":", start, end) + data.count(b"\n\n:", start, end)
        tally.ready += ready
        tally.unexpected += others - ready - close - retry - comments
        if close:
            at = data.find(SSE_CLOSE, start, end)
            code = re.search(rb'"code":(\d+)', data[at:end])
            self.close_code = int(code[1]) if code else 0


def client_class(variant: str) -> Callable[[int, str, Tally, bool], BaseClient]:
    """The load client of a variant: (port, token, tally, batch) -> a protocol."""
    if variant == SSE_VARIANT:
        return SSEClient
    return SocketIOClient if variant == SOCKETIO_VARIANT else Client


def load_client(variant: str, loop: str) -> str:
    """The load client a variant's runs use, and the load process's loop (or ``c``, the C
    client): e.g. ``sse/uvloop``, ``ws/c``."""
    kinds = {SSE_VARIANT: "sse", SOCKETIO_VARIANT: "socketio", BATCH_VARIANT: "ws-batch"}
    return f"{kinds.get(variant, 'ws')}/{loop}"


async def open_connection(
    client: BaseClient, port: int, rcvbuf: int | None = None, mss: int | None = None
) -> asyncio.Transport:
    """Connect ``client`` to ``port``; with ``rcvbuf``, SO_RCVBUF is set before connecting (the
    TCP window is agreed on then); with ``mss``, TCP_MAXSEG too (the MSS the client offers)."""
    loop = asyncio.get_running_loop()
    if rcvbuf is None and mss is None:
        transport, _ = await loop.create_connection(lambda: client, HOST, port)
        return transport
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if mss is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        sock.setblocking(False)
        await loop.sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    transport, _ = await loop.create_connection(lambda: client, sock=sock)
    return transport


def stalled_indices(sockets: int, fraction: float) -> frozenset[int]:
    """Which clients stall: ``fraction`` of them (at least one), spread evenly."""
    count = max(1, round(sockets * fraction))
    return frozenset(i * sockets // count for i in range(count))


async def connect_all(
    ports: list[int],
    tally: Tally,
    variant: str,
    concurrency: int = 64,
    stalled: frozenset[int] = frozenset(),
    stalled_tally: Tally | None = None,
    kind: Callable[[int, str, Tally, bool], BaseClient] | None = None,
    stall_mss: int | None = None,
) -> tuple[list[BaseClient], list[BaseClient]]:
    """Client ``i`` connects to ``ports[i % len(ports)]`` (round robin over the nodes).

    ``tally.sockets`` healthy clients and ``len(stalled)`` stalled ones: the clients numbered in
    ``stalled`` get a small SO_RCVBUF and stop reading once open (their deliveries go to
    ``stalled_tally``, which nothing waits for). Returns (healthy, stalled) clients. ``kind``:
    the client class (default: the variant's, ``client_class``); ``stall_mss``: the MSS the
    stalled clients offer (default: the loopback's).
    """
    batch = variant == BATCH_VARIANT
    kind = kind or client_class(variant)
    healthy: list[BaseClient] = []
    stopped: list[BaseClient] = []
    gate = asyncio.Semaphore(concurrency)
    idle_tally = stalled_tally or Tally(0, tally.events, asyncio.Event())

    async def connect(i: int) -> None:
        port = ports[i % len(ports)]
        stall = i in stalled
        async with gate:
            client = kind(port, f"user-{i}", idle_tally if stall else tally, batch)
            (stopped if stall else healthy).append(client)
            transport = await open_connection(
                client, port, STALL_RCVBUF if stall else None, stall_mss if stall else None
            )
            await client.opened
            if stall:
                transport.pause_reading()

    total = tally.sockets + len(stalled)
    tasks = [asyncio.ensure_future(connect(i)) for i in range(total)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), CONNECT_TIMEOUT)
    except BaseException:
        for task in tasks:
            task.cancel()
        for client in healthy + stopped:
            client.close()
        raise
    return healthy, stopped
