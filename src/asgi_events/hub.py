"""EventHub: the public API, wiring the replay log, the registry and delivery together."""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel

from . import codec
from .backends.base import Backend, Replay
from .backends.memory import MemoryBackend
from .connection import Connection
from .delivery import FULL, Outbox, Senders, text_message
from .limits import Refusal, Settings
from .registry import Registry
from .stats import Counters, Histogram
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
    :param backend: where events are buffered and how they reach every node: ``None`` for
        memory (one process), ``RedisBackend(url)`` for several.
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
    :param send_slots: how many sender tasks send for all the sockets (how many sockets may be
        mid-send at once).
    :param stall_timeout: seconds a send may make no progress before its sender is replaced
        (it finishes that socket's queue alone, then ends).
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
        backend: Backend | None = None,
        send_queue_size: int = 1024,
        verify_timeout: float = 10.0,
        max_message_size: int = 64 * 1024,
        rate_limit: tuple[float, float] | None = (60.0, 10.0),
        max_connections_per_user: int = 100,
        idle_timeout: float | None = None,
        refusal: Refusal = "close",
        shutdown_timeout: float = 5.0,
        send_slots: int = 8,
        stall_timeout: float = 0.1,
        clock: Clock = time.monotonic,
    ) -> None:
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
        self._backend: Backend = backend if backend is not None else MemoryBackend(clock)
        self._backend.bind(
            self._deliver,
            self._backend_lost,
            size=buffer_size,
            max_age=buffer_max_age,
            max_users=max_buffered_users,
        )
        self._registry: Registry[Connection] = Registry()
        self._counters = Counters()
        self._latency = Histogram()  # seconds a broadcast call takes (metrics only)
        self._send_slots = send_slots
        self._stall_timeout = stall_timeout
        if send_slots < 1:
            raise ValueError("send_slots must be at least 1")
        self._senders: Senders | None = None  # while the hub runs
        self._started = clock()
        self._accepting = True
        # Every socket from joining until its close frame is out (or it is gone): registered
        # ones, and closing ones no longer registered (displaced, slow), their close queued.
        self._live: set[Connection] = set()
        self._emptied: anyio.Event | None = None  # set once ``_live`` is empty, during shutdown
        self._task_group: anyio.abc.TaskGroup | None = None

    async def broadcast(self, user_id: str, event: Event) -> None:
        """Send ``event`` to every socket of ``user_id`` and buffer it for replay.

        Transient types are not buffered. A user with no socket is no error: the event is still
        buffered. Never waits for a socket: with the memory backend it returns once the event
        is queued for every socket; with Redis, once Redis has it (sockets on every node,
        this one included, get it through the subscription).

        :raises InvalidEventError: ``event`` is not a mapping with a string ``type``, or not JSON.
        :raises BackendUnavailableError: the backend could not take it.
        """
        started = time.perf_counter()
        fields = codec.prepare(event)
        await self._backend.publish(user_id, fields, fields["type"] in self._transient)
        self._counters.events_published += 1
        self._latency.observe(time.perf_counter() - started)

    async def broadcast_to_all(self, event: Event) -> None:
        """Send ``event`` to every open socket; it is not buffered.

        :raises InvalidEventError: ``event`` is not a mapping with a string ``type``, or not JSON.
        :raises BackendUnavailableError: the backend could not take it.
        """
        started = time.perf_counter()
        await self._backend.publish_to_all(codec.encode(codec.prepare(event)))
        self._counters.events_published += 1
        self._latency.observe(time.perf_counter() - started)

    async def _backend_lost(self) -> None:
        """Delivery was interrupted: this node's sockets may have missed events. Close them
        with 1012 so that their clients resume (here or on another node) without a gap."""
        for conn in list(self._registry.all()):
            conn.close(1012, "Service restart")
            self._detach(conn)

    async def _deliver(self, user_id: str | None, message: Message) -> None:
        conns = self._registry.all() if user_id is None else self._registry.of(user_id)
        await self._fan_out(conns, message)

    async def _fan_out(self, conns: Iterable[Connection], message: Message) -> None:
        full: list[Connection] = []
        pressed: list[Outbox] = []
        for conn in conns:
            status = conn.outbox.push(message)
            if status:  # the rare path
                if status == FULL:
                    full.append(conn)
                elif not conn.outbox.stalled:  # (waiting would not help a stuck send)
                    pressed.append(conn.outbox)
        for conn in full:
            self._slow_consumer(conn)
        # Queues are filling up: let the senders run before the caller publishes more, for a
        # few scheduling rounds at most, so that a stalled socket cannot hold the caller up.
        for _ in range(PRESSURE_ROUNDS if pressed else 0):
            await anyio.lowlevel.checkpoint()
            if not any(box.pressed and not box.stalled for box in pressed):
                break

    def stats(self) -> dict[str, Any]:
        """Counters and gauges, as a JSON-ready dict."""
        return {
            "total_connections": len(self._registry),
            "active_users": self._registry.user_count(),
            "uptime": self._clock() - self._started,
            "connections_per_user": self._registry.counts(),
            **self._backend.stats(),
            **self._counters.as_dict(),
        }

    async def shutdown(self) -> None:
        """Close every socket with 1001 "Server shutdown" and clear the registry and buffers.

        Waits up to ``shutdown_timeout`` for every socket's close frame to go out (also that
        of a socket closed just before, say displaced or too slow), then cancels the rest. New
        sockets are refused with 1001 until the hub is entered again (``async with hub``).
        """
        self._accepting = False
        if self._live:
            if self._emptied is None or self._emptied.is_set():
                self._emptied = anyio.Event()
            emptied = self._emptied
            for conn in list(self._registry.all()):
                conn.close(1001, "Server shutdown")
            with anyio.move_on_after(self._shutdown_timeout):
                await emptied.wait()
            for conn in list(self._live):
                conn.cancel_scope.cancel()
        self._registry.clear()
        await self._backend.clear()

    async def __aenter__(self) -> EventHub:
        """Start the hub's background work (buffer expiry); the middleware does this on startup.

        :raises RuntimeError: the hub is running already (one lifespan per hub).
        """
        if self._task_group is not None:
            raise RuntimeError("this EventHub is running already: give each app its own hub")
        self._accepting = True
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        try:
            senders = Senders(self._send_slots, self._stall_timeout, self._counters)
            await self._task_group.start(senders.run)
            self._senders = senders
            await self._backend.start(self._task_group)
        except BaseException:
            self._senders = None
            self._task_group.cancel_scope.cancel()
            await self._task_group.__aexit__(None, None, None)
            self._task_group = None
            raise
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
            await self._backend.stop()
        self._senders = None
        # Only background work runs in this group: stop it, and let the body's error (if any)
        # propagate as it is rather than wrapped in an exception group.
        task_group.cancel_scope.cancel()
        await task_group.__aexit__(None, None, None)
        return None

    # -- for connection.py -------------------------------------------------------------

    async def _attach(self, conn: Connection) -> None:
        """Join live delivery and queue the replay and the ready message, so that nothing is
        lost or doubled at the switch: live messages are held while the replay is read, then
        those the replay covers are dropped (with the memory backend nothing can even arrive
        in between: reading it does not suspend).
        """
        handshake, outbox = conn.handshake, conn.outbox
        others = self._registry.of(conn.user_id)
        if len(others) >= self._settings.max_connections_per_user:
            oldest = next(iter(others))
            self._counters.connections_displaced += 1
            oldest.close(1008, "Too many connections")
            self._detach(oldest)
        self._registry.add(conn.user_id, conn)
        self._live.add(conn)
        resuming = handshake.last_event_id is not None or handshake.last_event_ts is not None
        if not resuming and handshake.subprotocol is None:
            return
        outbox.hold()
        replay = await self._backend.replay(conn.user_id, handshake)
        if resuming:
            self._counters.reconnection_count += 1
            self._counters.replayed_events += len(replay.frames)
            self._counters.replays_incomplete += not replay.recovered
            outbox.preload([text_message(frame) for frame in replay.frames])
        if handshake.subprotocol is not None:
            outbox.preload([self._ready_message(replay, resuming)])
        if outbox.release(replay.key) == FULL:
            self._slow_consumer(conn)

    def _ready_message(self, replay: Replay, resuming: bool) -> Message:
        recovered = replay.recovered or not resuming
        payload: dict[str, Any] = {
            "position": replay.position,
            "recovered": recovered,
            "replayed": len(replay.frames) if resuming else 0,
        }
        if not recovered:
            payload["reason"] = replay.reason
            payload["oldest"] = replay.oldest
        return text_message(codec.encode({"type": READY, "payload": payload}))

    def _slow_consumer(self, conn: Connection) -> None:
        self._counters.slow_consumer_closes += 1
        conn.close(1013, "Slow consumer")
        self._detach(conn)

    def _detach(self, conn: Connection) -> None:
        """No more live events for ``conn`` (it is closing or gone)."""
        self._registry.remove(conn.user_id, conn)

    def _sent_all(self, conn: Connection) -> None:
        """``conn``'s close frame is out, or its peer is gone: nothing more will be sent."""
        self._detach(conn)
        self._live.discard(conn)
        if self._emptied is not None and not self._live:
            self._emptied.set()
