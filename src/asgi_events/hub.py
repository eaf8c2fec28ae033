"""EventHub: the public API, wiring the replay log, the registry and delivery together."""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel

from . import codec
from .buffer import ReplayLog, Resume
from .connection import Connection
from .delivery import FULL, DurableMessage, Outbox, SendSlots, TransientMessage, text_message
from .limits import Refusal, Settings
from .registry import Registry
from .stats import Counters
from .types import ClientMessageHook, Clock, Event, Message, VerifyToken

READY = "asgi_events.ready"
PRESSURE_ROUNDS = 16


class EventHub:
    """Per-user fan-out with a replay buffer; shared by every socket the middleware serves.

    :param verify_token: ``(token) -> user id | Principal | None``, sync (run in a worker
        thread) or async. A ``Principal`` with ``expires_at`` has its sockets closed with 4001
        at that time.
    :param transient_types: event types delivered live but never buffered for replay.
    :param buffer_size: events kept per user for replay.
    :param buffer_max_age: seconds an event is kept for replay, from when it was buffered.
    :param max_buffered_users: users whose events are kept at most; the least recently used
        user's buffer goes first (a later resume of that user reports ``evicted``).
    :param on_client_message: ``(user_id, message) -> None``, sync or async, for each JSON
        object a client sends. A sync hook runs on the event loop: keep it quick.
    :param backend: ``None`` for the in-memory, one-process hub (the only one so far).
    :param send_queue_size: messages queued per socket; past half of it transient events are
        shed, and when it is full the socket is closed with 1013. Independently, a socket with
        more than ``buffer_size // 2`` buffered events queued is closed with 1013 while it can
        still resume without a gap. A replay on connect counts against neither.
    :param verify_timeout: seconds ``verify_token`` may take before the socket is refused (1011).
    :param max_message_size: bytes a client message may have (1009 beyond).
    :param rate_limit: ``(burst, per_second)`` client messages allowed per socket (1008 beyond),
        or None for no limit.
    :param max_connections_per_user: open sockets a user may have; a new one closes the
        user's oldest with 1008 "Too many connections".
    :param idle_timeout: seconds without a client message after which a socket is closed with
        4002 "Idle timeout" (clients send ``ping`` to stay), or None to keep idle sockets.
    :param refusal: ``"close"`` to refuse a socket by accepting it and closing it with its code
        (browser JavaScript can read that), ``"http"`` to refuse it in the handshake with an
        HTTP status (401 with ``WWW-Authenticate: Bearer`` for bad tokens), where the server
        supports the ``websocket.http.response`` extension, else 403.
    :param shutdown_timeout: seconds ``shutdown()`` waits for sockets to close before it
        cancels them.
    :param send_slots: how many sockets may be mid-send at once.
    :param stall_timeout: seconds a send may make no progress before its socket gives up its
        send slot.
    :param clock: a monotonic clock in seconds, for the buffer's age bound (tests inject one).
    """

    def __init__(
        self,
        verify_token: VerifyToken,
        *,
        transient_types: Iterable[str] = ("JOB_PROGRESS", "CUSTOMER_UPDATE_PROGRESS"),
        buffer_size: int = 200,
        buffer_max_age: float = 300.0,
        max_buffered_users: int | None = 10_000,
        on_client_message: ClientMessageHook | None = None,
        backend: None = None,
        send_queue_size: int = 1024,
        verify_timeout: float = 10.0,
        max_message_size: int = 64 * 1024,
        rate_limit: tuple[float, float] | None = (60.0, 10.0),
        max_connections_per_user: int = 100,
        idle_timeout: float | None = None,
        refusal: Refusal = "close",
        shutdown_timeout: float = 5.0,
        send_slots: int = 8,
        stall_timeout: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if backend is not None:
            raise TypeError("only the in-memory backend (backend=None) is available")
        self._settings = Settings(
            send_queue_size=send_queue_size,
            durable_limit=buffer_size // 2 if buffer_size >= 2 else send_queue_size,
            verify_timeout=verify_timeout,
            max_message_size=max_message_size,
            rate_limit=rate_limit,
            max_connections_per_user=max_connections_per_user,
            idle_timeout=idle_timeout,
            refusal=refusal,
        )
        self._verify_token = verify_token
        self._transient = frozenset(transient_types)
        self._on_client_message = on_client_message
        self._shutdown_timeout = shutdown_timeout
        self._clock = clock
        self._log = ReplayLog(
            size=buffer_size, max_age=buffer_max_age, max_users=max_buffered_users
        )
        self._registry: Registry[Connection] = Registry()
        self._counters = Counters()
        self._slots = SendSlots(send_slots, stall_timeout)
        self._started = clock()
        self._accepting = True
        self._emptied: anyio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None

    async def broadcast(self, user_id: str, event: Event) -> None:
        """Send ``event`` to every socket of ``user_id`` and buffer it for replay.

        Transient types are not buffered. A user with no socket is no error: the event is still
        buffered. Never waits for a socket; returns once the event is queued everywhere.

        :raises InvalidEventError: ``event`` is not a mapping with a string ``type``, or not JSON.
        """
        fields = codec.prepare(event)
        if fields["type"] in self._transient:
            message = text_message(codec.encode(fields), TransientMessage)
        else:
            seq, fields["id"] = self._log.assign()
            text = codec.encode(fields)
            timestamp = codec.parse_timestamp(fields["timestamp"])
            self._log.append(user_id, seq, text, timestamp, self._clock())
            message = text_message(text, DurableMessage)
        self._counters.events_published += 1
        await self._fan_out(self._registry.of(user_id), message)

    async def broadcast_to_all(self, event: Event) -> None:
        """Send ``event`` to every open socket; it is not buffered.

        :raises InvalidEventError: ``event`` is not a mapping with a string ``type``, or not JSON.
        """
        message = text_message(codec.encode(codec.prepare(event)))
        self._counters.events_published += 1
        await self._fan_out(self._registry.all(), message)

    async def _fan_out(self, conns: Iterable[Connection], message: Message) -> None:
        full: list[Connection] = []
        pressed: list[Outbox] = []
        for conn in conns:
            status = conn.outbox.push(message)
            if status:  # the rare path
                if status == FULL:
                    full.append(conn)
                else:
                    pressed.append(conn.outbox)
        for conn in full:
            self._counters.slow_consumer_closes += 1
            conn.close(1013, "Slow consumer")
            self._detach(conn)
        # Queues are filling up: let their writers run before the caller publishes more, for a
        # few scheduling rounds at most, so that a stalled socket cannot hold the caller up.
        for _ in range(PRESSURE_ROUNDS if pressed else 0):
            await anyio.lowlevel.checkpoint()
            if not any(box.pressed for box in pressed):
                break

    def stats(self) -> dict[str, Any]:
        """Counters and gauges, as a JSON-ready dict."""
        buffered_events, buffered_users = self._log.stats()
        return {
            "total_connections": len(self._registry),
            "active_users": self._registry.user_count(),
            "uptime": self._clock() - self._started,
            "connections_per_user": self._registry.counts(),
            "buffered_events": buffered_events,
            "buffered_users": buffered_users,
            **self._counters.as_dict(),
        }

    async def shutdown(self) -> None:
        """Close every socket with 1001 "Server shutdown" and clear the registry and buffers.

        Waits up to ``shutdown_timeout`` for the sockets to close, then cancels the rest. New
        sockets are refused with 1001 until the hub is entered again (``async with hub``).
        """
        self._accepting = False
        if len(self._registry):
            if self._emptied is None or self._emptied.is_set():
                self._emptied = anyio.Event()
            emptied = self._emptied
            for conn in list(self._registry.all()):
                conn.close(1001, "Server shutdown")
            with anyio.move_on_after(self._shutdown_timeout):
                await emptied.wait()
            for conn in list(self._registry.all()):
                conn.cancel_scope.cancel()
        self._registry.clear()
        # A new epoch: ids handed out before the buffers were cleared are foreign from now on.
        log = self._log
        self._log = ReplayLog(size=log.size, max_age=log.max_age, max_users=log.max_users)

    async def __aenter__(self) -> EventHub:
        """Start the hub's background work (buffer expiry); the middleware does this on startup.

        :raises RuntimeError: the hub is running already (one lifespan per hub).
        """
        if self._task_group is not None:
            raise RuntimeError("this EventHub is running already: give each app its own hub")
        self._accepting = True
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._expire_buffers)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Shut down (see ``shutdown``) and stop the background work."""
        task_group, self._task_group = self._task_group, None
        assert task_group is not None, "the hub was not entered"
        with anyio.CancelScope(shield=True):
            await self.shutdown()
        # Only background work runs in this group: stop it, and let the body's error (if any)
        # propagate as it is rather than wrapped in an exception group.
        task_group.cancel_scope.cancel()
        await task_group.__aexit__(None, None, None)
        return None

    async def _expire_buffers(self) -> None:
        interval = max(min(self._log.max_age / 10, 30.0), 0.05)
        while True:
            await anyio.sleep(interval)
            self._log.prune(self._clock())

    # -- for connection.py -------------------------------------------------------------

    def _attach(self, conn: Connection) -> None:
        """Queue the replay and the ready message, then join live delivery: all synchronous, so
        no broadcast can fall between reading the replay and joining (nothing lost or doubled).
        """
        handshake, outbox = conn.handshake, conn.outbox
        now = self._clock()
        resume: Resume | None = None
        if handshake.last_event_id is not None:
            resume = self._log.since_id(conn.user_id, handshake.last_event_id, now)
        elif handshake.last_event_ts is not None:
            since = codec.parse_timestamp(handshake.last_event_ts)
            if since is None:
                resume = Resume([], recovered=False, reason="unknown")
            else:
                resume = self._log.since_timestamp(conn.user_id, since, now)
        if resume is not None:
            self._counters.reconnection_count += 1
            self._counters.replayed_events += len(resume.frames)
            self._counters.replays_incomplete += not resume.recovered
            outbox.preload([text_message(frame) for frame in resume.frames])
        if handshake.subprotocol is not None:
            outbox.preload([self._ready_message(conn.user_id, resume)])
        others = self._registry.of(conn.user_id)
        if len(others) >= self._settings.max_connections_per_user:
            oldest = next(iter(others))
            self._counters.connections_displaced += 1
            oldest.close(1008, "Too many connections")
            self._detach(oldest)
        self._registry.add(conn.user_id, conn)

    def _ready_message(self, user_id: str, resume: Resume | None) -> Message:
        payload: dict[str, Any] = {
            "position": self._log.position(user_id),
            "recovered": resume is None or resume.recovered,
            "replayed": len(resume.frames) if resume else 0,
        }
        if resume is not None and not resume.recovered:
            payload["reason"] = resume.reason
            payload["oldest"] = resume.oldest
        return text_message(codec.encode({"type": READY, "payload": payload}))

    def _detach(self, conn: Connection) -> None:
        self._registry.remove(conn.user_id, conn)
        if self._emptied is not None and not len(self._registry):
            self._emptied.set()
