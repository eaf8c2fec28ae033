"""Soak mode: a long open-loop run at half the capacity, with clients that drop and resume and
clients that stall (issue 15, item 7; ``benchmarks/README.md``, *Soak mode*).

The asgi-events server (one node, memory backend) and N clients, one per user (``user-i``),
all offering the ``asgi-events.v1`` subprotocol: plain frames, and the ``asgi_events.ready``
message after any replay. The server publishes open loop at ``--rate`` ticks/s, one buffered
event per user and tick (``publisher.publish_soak``). Every second ``DROP_FRACTION`` of the
healthy clients (the next ones in a shuffled order) reset their TCP connection and, after an
offline gap, reconnect with ``?lastEventId=<the last id they got>``; each must end with every
event once and in order. ``STALL_FRACTION`` of the clients stall (a small ``SO_RCVBUF``, never
read); one the server closes reconnects and stalls again. Per bucket: the healthy clients' live
latency, the server's RSS and sockets, the hub's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, cast
from urllib.parse import quote

from .clients import BaseClient, Client, Tally, open_connection
from .common import (
    CONNECT_TIMEOUT,
    EVENT_FIELDS,
    READY_TYPE,
    STALL_RCVBUF,
)

SOAK_VARIANT = "asgi-events"  # the raw loop has no resume: it is not a soak variant
SOAK_DURATION, QUICK_SOAK_DURATION = 600.0, 20.0  # seconds of publishing
QUICK_SOAK_SOCKETS = 50
QUICK_SOAK_RATE = 100.0  # ticks/s (--quick does not calibrate): 5,000 deliveries/s at N=50
QUICK_MIN_DROPS, QUICK_MIN_STALLED = 2, 3  # so that a short run still has a few of each
DROP_FRACTION = 0.01  # of the healthy clients, every second (at least one)
OFFLINE_S = (0.1, 0.5)  # a dropped client reconnects after a uniform random gap in this range
RETRY_S = 0.1  # a client the server closed, or whose reconnection failed, retries after this
RECONNECT_ATTEMPTS = 20
LONG_BUCKET_S, SHORT_BUCKET_S = 60, 10  # per minute; per 10 s in runs shorter than 3 minutes
DRAIN_WAIT = 30.0  # after publishing, bound on the wait for every healthy client to be complete
BEHIND = 1.05  # publishing took longer than this x the duration (+1 s): the server fell behind
SEED = 15
STALL_SETTLE_S = 1.0
# The MSS a stalled client offers: an Ethernet path's. On loopback (MSS 65483) Linux sizes each
# server socket's send buffer to tcp_wmem's maximum (4 MB here), which would hold a stalled
# client's events for over ten minutes before the hub sees any back-pressure; with 1460 it is
# about 69 KB, as off loopback.
STALL_MSS = 1460
SUBPROTOCOL_HEADER = b"Sec-WebSocket-Protocol: asgi-events.v1\r\n"
READY_PREFIX = b'{"type":"' + READY_TYPE + b'"'
ID_FIELD = b',"id":"'  # asgi-events adds an event's id last: ...,"id":"<id>"}
TCP_ESTABLISHED = 1


@dataclass
class SoakTally(Tally):
    """``Tally`` plus what resuming clients count."""

    resumes: int = 0  # ready messages on connections that asked to resume
    incomplete: int = 0  # of them, ``recovered: false``
    replayed: int = 0  # events a resuming client got before its ready message
    replay_max_ns: int = 0  # their worst latency (they are not in ``latencies_ns``)

    def take_latencies(self) -> list[int]:
        """The live latencies since the last call (the clients append to a fresh list)."""
        taken, self.latencies_ns = self.latencies_ns, []
        return taken


class SoakClient(Client):
    """One connection of a soak client: ``Client`` with the ``asgi-events.v1`` subprotocol and
    ``lastEventId``; it keeps the id of the last event it got. ``previous``: the connection it
    replaces, whose checks (events seen, next ``seq``) it carries on."""

    def __init__(
        self,
        port: int,
        token: str,
        tally: Tally,
        batch: bool = False,
        *,
        resume_from: str | None = None,
        previous: SoakClient | None = None,
    ) -> None:
        self.port, self.token, self.resume_from = port, token, resume_from
        super().__init__(port, token, tally, batch)
        self._request = self._request.replace(b"\r\n\r\n", b"\r\n" + SUBPROTOCOL_HEADER + b"\r\n")
        self.last_id = resume_from
        self.live = False  # the ready message came: what follows is live
        self.dropped = False  # we cut it (or, stalled, found it closed): not the server's close
        self.on_lost: Callable[[SoakClient], None] | None = None
        if previous is not None:
            self._seen, self._next_seq = previous.progress()

    def progress(self) -> tuple[bytearray, int]:
        return self._seen, self._next_seq

    def target(self, token: str) -> str:
        resume = "" if self.resume_from is None else "&lastEventId=" + quote(self.resume_from)
        return super().target(token) + resume

    def _plain(self, data: bytes, start: int, end: int, now: int) -> None:
        fields = EVENT_FIELDS.search(data, start, end)
        if fields is None:
            if data.startswith(READY_PREFIX, start, end):
                self._ready(data[start:end])
            else:
                self.tally.unexpected += 1
            return
        at = data.rfind(ID_FIELD, start, end)
        if at >= 0:
            self.last_id = data[at + len(ID_FIELD) : end - 2].decode()
        if self.live:
            self._message(fields, now)
            return
        tally = cast(SoakTally, self.tally)  # a replayed event: its latency kept apart
        before = len(tally.latencies_ns)
        self._message(fields, now)
        if len(tally.latencies_ns) > before:
            tally.replayed += 1
            tally.replay_max_ns = max(tally.replay_max_ns, tally.latencies_ns.pop())

    def _ready(self, text: bytes) -> None:
        payload = json.loads(text)["payload"]
        tally = cast(SoakTally, self.tally)
        tally.ready += 1
        self.live, self.last_id = True, payload["position"]
        if self.resume_from is not None:
            tally.resumes += 1
            tally.incomplete += not payload["recovered"]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.on_lost is not None and not self.dropped:
            self.on_lost(self)

    def reset(self) -> None:
        """Drop the connection abruptly: a TCP reset (SO_LINGER 0), no close frame."""
        self.dropped = True
        if self.transport is None or self.transport.is_closing():
            return
        with contextlib.suppress(OSError):
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def established(self) -> bool:
        """Whether the TCP connection is still up (a stalled client reads nothing, so it sees a
        close only in the socket's state: CLOSE_WAIT after the server's FIN, CLOSE after a RST)."""
        if self.transport is None or self.transport.is_closing():
            return False
        try:
            sock = self.transport.get_extra_info("socket")
            return bool(
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == TCP_ESTABLISHED
            )
        except OSError:
            return False


def soak_client(port: int, token: str, tally: Tally, batch: bool = False) -> BaseClient:
    return SoakClient(port, token, tally, batch)


class Churn:
    """The healthy clients that drop and resume, and the stalled ones; ``clients`` and
    ``stalled`` always hold each one's current connection (updated in place)."""

    def __init__(
        self, tally: SoakTally, idle: SoakTally, healthy: list[Any], stalled: list[Any]
    ) -> None:
        self.tally, self.idle = tally, idle
        self.clients: list[SoakClient] = healthy
        self.stalled: list[SoakClient] = stalled
        self.rng = random.Random(SEED)
        self.order = list(range(len(healthy)))
        self.rng.shuffle(self.order)
        self.cursor = 0
        self.closing = False
        self.drops = self.reconnects = self.errors = 0
        self.server_closed: Counter[str] = Counter()  # healthy connections, by close code
        self.stall_closes = 0  # stalled connections found closed (then reset and reopened)
        self.since = [time.monotonic()] * len(stalled)  # when each stalled connection opened
        self._tasks: set[asyncio.Task[None]] = set()
        for i, client in enumerate(healthy):
            client.on_lost = partial(self.lost, i)

    def counts(self) -> dict[str, int]:
        return {
            "drops": self.drops,
            "resumes": self.tally.resumes,
            "replayed": self.tally.replayed,
            "server_closed": sum(self.server_closed.values()),
            "stall_closes": self.stall_closes,
        }

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def drop(self, count: int) -> None:
        """Reset ``count`` live healthy clients, the next ones in the shuffled order."""
        dropped = tried = 0
        while dropped < count and tried < len(self.order):
            i = self.order[self.cursor]
            self.cursor, tried = (self.cursor + 1) % len(self.order), tried + 1
            client = self.clients[i]
            if not client.live or client.transport is None or client.transport.is_closing():
                continue  # still reconnecting
            client.reset()
            self.drops, dropped = self.drops + 1, dropped + 1
            self._spawn(self.reconnect(i, client, self.rng.uniform(*OFFLINE_S)))

    def lost(self, i: int, client: SoakClient) -> None:
        """The server closed (or dropped) a healthy client's connection: it resumes too."""
        if self.closing or client is not self.clients[i]:
            return
        self.server_closed[str(client.close_code or 1006)] += 1
        self._spawn(self.reconnect(i, client, RETRY_S))

    async def reconnect(self, i: int, old: SoakClient, delay: float) -> None:
        for _ in range(RECONNECT_ATTEMPTS):
            await asyncio.sleep(delay)
            if self.closing:
                return
            client = SoakClient(
                old.port, old.token, self.tally, resume_from=old.last_id, previous=old
            )
            try:
                await open_connection(client, old.port)
                await asyncio.wait_for(client.opened, CONNECT_TIMEOUT)
            except (OSError, ConnectionError, asyncio.TimeoutError):
                self.errors += 1
                client.close()
                delay = RETRY_S
                continue
            client.on_lost = partial(self.lost, i)
            self.clients[i], old = client, client
            self.reconnects += 1
            if not client.lost_connection:
                return
            delay = RETRY_S  # lost before we kept it: nobody else will reconnect it
        self.errors += 1

    def check_stalled(self, connections: dict[str, int]) -> None:
        """Reset, reopen and stall again every stalled client the hub or the server closed:
        the hub no longer counts a connection of its user (``connections``, the hub's
        ``connections_per_user``), or its socket is no longer established. A client that reads
        nothing cannot see a close frame; these stand in for the heartbeat timeout with which a
        real client finds a dead connection. One opened less than ``STALL_SETTLE_S`` ago is left
        alone (the hub registers a socket just after its handshake)."""
        settled = time.monotonic() - STALL_SETTLE_S
        for k, client in enumerate(self.stalled):
            if client.dropped or self.since[k] > settled:
                continue
            if not connections.get(client.token) or not client.established():
                self.stall_closes += 1
                client.reset()
                self._spawn(self.restall(k, client))

    async def restall(self, k: int, old: SoakClient) -> None:
        """A new connection for stalled client ``k`` (no resume: it read nothing), stalled."""
        for _ in range(RECONNECT_ATTEMPTS):
            client = SoakClient(old.port, old.token, self.idle)
            client.dropped = True  # not checked until it is open
            try:
                transport = await open_connection(client, old.port, STALL_RCVBUF, STALL_MSS)
                await asyncio.wait_for(client.opened, CONNECT_TIMEOUT)
            except (OSError, ConnectionError, asyncio.TimeoutError):
                self.errors += 1
                client.close()
                await asyncio.sleep(RETRY_S)
                continue
            transport.pause_reading()
            client.dropped = False
            self.stalled[k], self.since[k] = client, time.monotonic()
            return

    async def stop(self) -> None:
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
