"""EventHub: the public API and the lifecycle; the node's streams live in ``streams.py``."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from . import codec, idempotency, latest, protocol
from .auth import Authenticator
from .backends.base import Backend
from .backends.memory import MemoryBackend
from .history import History, read_history
from .hooks import ConnectHook, DisconnectHook, Hooks
from .limits import Refusal, Settings
from .request import Authenticate
from .senders import Senders
from .stats import Histogram
from .streams import Streams
from .types import ClientMessageHook, Clock, Event, VerifyToken


class EventHub:
    """Per-user fan-out with a replay buffer; shared by every socket the middleware serves.

    :param verify_token: ``(token) -> user id | Principal | None``, sync (run in a worker
        thread) or async. A ``Principal`` with ``expires_at`` has its sockets closed with 4001
        at that time. A request without a token is refused without calling it.
    :param authenticate: instead of ``verify_token`` (give exactly one),
        ``(request: HandshakeRequest) -> user id | Principal | None``, sync (run in a worker
        thread) or async: it sees the headers, cookies, query, address and token, so it can
        authenticate by a session cookie or a header a proxy sets (``asgi_events.jwt`` makes
        one for JWTs). Reading cookies needs ``EventsMiddleware(allowed_origins=...)``.
    :param transient_types: event types delivered live but never buffered for replay.
    :param latest_types: event types delivered live only (no id, never replayed) whose latest
        value the hub keeps per user, type and key, where the key is the value at a dotted
        path of the event (``{"JOB_PROGRESS": "payload.jobId"}``; ``None`` where the path does
        not resolve). A connecting client gets the values kept after its replay and before
        the ready message, oldest first, each with ``"latest": true``. Kept for
        ``buffer_max_age`` seconds, at most ``latest.LATEST_PER_USER`` keys per user.
    :param on_connect: ``(info: ConnectionInfo) -> None``, sync or async, once a connection is
        open (its replay queued); runs before its messages are read.
    :param on_disconnect: ``(info, code) -> None``, sync or async, once a connection whose
        ``on_connect`` ran has ended, with the close code (the server's, else the client's;
        1006 if there was none); it gets ``hooks.HOOK_TIMEOUT`` seconds at shutdown. A hook that
        raises is logged and counted in ``hook_errors``; the connection goes on.
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
    :param sse_keepalive: seconds between comment lines on an idle Server-Sent Events stream
        (they keep proxies from cutting it and find dead peers).
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
        verify_token: VerifyToken | None = None,
        *,
        authenticate: Authenticate | None = None,
        transient_types: Iterable[str] = ("JOB_PROGRESS", "CUSTOMER_UPDATE_PROGRESS"),
        latest_types: Mapping[str, str] | None = None,
        on_connect: ConnectHook | None = None,
        on_disconnect: DisconnectHook | None = None,
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
        sse_keepalive: float = 15.0,
        shutdown_timeout: float = 5.0,
        send_slots: int = 8,
        stall_timeout: float = 0.1,
        clock: Clock = time.monotonic,
    ) -> None:
        settings = Settings(
            send_queue_size=send_queue_size,
            durable_limit=buffer_size // 2 if buffer_size >= 2 else send_queue_size,
            verify_timeout=verify_timeout,
            max_message_size=max_message_size,
            rate_limit=rate_limit,
            max_connections_per_user=max_connections_per_user,
            idle_timeout=idle_timeout,
            refusal=refusal,
            sse_keepalive=sse_keepalive,
        )
        self._transient = frozenset(transient_types)
        self._latest = dict(latest_types or {})
        self._shutdown_timeout = shutdown_timeout
        self._clock = clock
        self._backend: Backend = backend if backend is not None else MemoryBackend(clock)
        self.streams = Streams(
            self._backend,
            settings,
            Authenticator(verify_token, authenticate),
            Hooks(on_connect, on_disconnect, on_client_message),
            latest=bool(self._latest),
        )
        """The node's streams, which transports feed (``streams.py``); not for applications."""
        self._backend.bind(
            self.streams.deliver,
            self.streams.lost,
            disconnect=self.streams.disconnect,
            size=buffer_size,
            max_age=buffer_max_age,
            max_users=max_buffered_users,
        )
        self._latency = Histogram()  # seconds a broadcast call takes (metrics only)
        self._send_slots = send_slots
        self._stall_timeout = stall_timeout
        if send_slots < 1:
            raise ValueError("send_slots must be at least 1")
        self._started = clock()
        self._task_group: anyio.abc.TaskGroup | None = None

    @property
    def backend(self) -> Backend:
        """Where events are buffered and how they reach every node."""
        return self._backend

    @property
    def broadcast_latency(self) -> Histogram:
        """Seconds each ``broadcast`` and ``broadcast_to_all`` call took (for metrics)."""
        return self._latency

    async def broadcast(
        self, user_id: str, event: Event, *, idempotency_key: str | None = None
    ) -> str | None:
        """Send ``event`` to every socket of ``user_id`` and buffer it for replay; its id (as
        clients receive it), or None for a transient or latest-value type (never buffered).

        A user with no socket is no error: the event is still buffered. Never waits for a
        socket: with the memory backend it returns once the event is queued for every socket;
        with Redis, once Redis has it (sockets on every node, this one included, get it
        through the subscription).

        With ``idempotency_key`` (a non-empty str of at most 200 characters, e.g. the
        application's own id of the event), the event is published at most once per user and
        key within ``buffer_max_age`` seconds: a later call with the same user and key, on any
        node, returns what the first one returned (its id, or None) and publishes nothing,
        whatever its event. Two calls racing with one key publish once. So a call that raised
        ``BackendUnavailableError`` (which may have published all the same) can be retried
        with its key and never delivers twice. The memory backend keeps at most
        ``idempotency.MAX_KEYS`` keys (the oldest goes first); Redis keeps each ``buffer_max_age``.

        :raises InvalidEventError: ``event`` is not a mapping with a string ``type``, or not JSON.
        :raises ValueError: ``idempotency_key`` is not a non-empty str of at most 200 characters
            (valid Unicode).
        :raises BackendUnavailableError: the backend could not take it.
        """
        started = time.perf_counter()
        fields = codec.prepare(event)
        kind = fields["type"]
        path = self._latest.get(kind)
        slot = None if path is None else latest.slot(kind, fields, path)
        transient, backend = kind in self._transient, self._backend
        if idempotency_key is None:  # (as before keys: a backend of the older contract works)
            event_id = await backend.publish(user_id, fields, transient, slot)
        else:
            key = idempotency.check_key(idempotency_key)
            event_id = await backend.publish(user_id, fields, transient, slot, idempotency_key=key)
        self.streams.counters.events_published += 1
        self._latency.observe(time.perf_counter() - started)
        return event_id

    async def broadcast_to_all(self, event: Event) -> None:
        """Send ``event`` to every open socket; it is not buffered.

        :raises InvalidEventError: ``event`` is not a mapping with a string ``type``, or not JSON.
        :raises BackendUnavailableError: the backend could not take it.
        """
        started = time.perf_counter()
        await self._backend.publish_to_all(codec.encode(codec.prepare(event)))
        self.streams.counters.events_published += 1
        self._latency.observe(time.perf_counter() - started)

    async def position(self, user_id: str) -> str:
        """The id a client may resume from (``lastEventId``) to get exactly the events of
        ``user_id`` published after this call: the user's newest id, or the epoch's origin.

        Read it *before* the application's own state to load a snapshot and go live without
        a gap (see "Using it from your app" in the README).

        :raises BackendUnavailableError: the backend could not be read.
        """
        return (await self._backend.replay(user_id, None)).position

    async def history(
        self, user_id: str, after: str | None = None, limit: int | None = None
    ) -> History:
        """The buffered events of ``user_id`` after the id ``after`` (everything buffered if
        None), oldest first, at most ``limit`` of them (the oldest ones: page on with
        ``after=events[-1]["id"]``); see ``History``. Transient events are never in it.

        :raises ValueError: ``limit`` is negative.
        :raises BackendUnavailableError: the backend could not be read.
        """
        return await read_history(self._backend, user_id, after, limit)

    async def disconnect(
        self,
        user_id: str,
        *,
        code: int = protocol.DISCONNECTED.code,
        reason: str = protocol.DISCONNECTED.reason,
    ) -> None:
        """Close every connection of ``user_id`` on every node with ``code`` and ``reason``
        (logout, ban, password change). Clients follow the close table: 4003, 1000 and codes
        it does not list are final (no reconnect); a listed code keeps its meaning, so
        ``code=4001, reason="Token expired"`` makes them fetch a fresh token and come back.
        Connections of the user being admitted right now are closed too. This node's are
        closing when it returns; other nodes' as soon as the backend reaches them. Revoke the user's
        credentials first, or it may simply connect again.

        :raises ValueError: ``code`` is not 1000, 1008 or 4000-4999, or ``reason`` is longer
            than 123 bytes.
        :raises BackendUnavailableError: the backend could not take it.
        """
        close = protocol.disconnect_close(code, reason)
        # This node's sockets at once (a shared backend reaches them again: a no-op), and
        # those of every node through the backend.
        await self.streams.disconnect(user_id, close.code, close.reason)
        await self._backend.disconnect(user_id, close.code, close.reason)

    async def presence(self, user_id: str) -> int:
        """Open connections of ``user_id`` on every node (0 for an unknown user).

        :raises BackendUnavailableError: the backend could not be read.
        """
        return (await self._backend.presence([user_id]))[user_id]

    async def online(self, user_ids: Iterable[str]) -> set[str]:
        """Which of ``user_ids`` have at least one open connection on any node.

        :raises BackendUnavailableError: the backend could not be read.
        """
        counts = await self._backend.presence(list(dict.fromkeys(user_ids)))
        return {user_id for user_id, count in counts.items() if count}

    def stats(self) -> dict[str, Any]:
        """Counters and gauges, as a JSON-ready dict."""
        return {
            "uptime": self._clock() - self._started,
            **self.streams.stats(),
            **self._backend.stats(),
        }

    @property
    def running(self) -> bool:
        """Whether the hub's background work runs (between ``__aenter__`` and ``__aexit__``)."""
        return self._task_group is not None

    async def shutdown(self) -> None:
        """Close every socket with 1001 "Server shutdown" and clear the registry and buffers.

        Waits up to ``shutdown_timeout`` for every socket's close frame to go out (also that
        of a socket closed just before, say displaced or too slow), then cancels the rest. New
        sockets are refused with 1001 until the hub is entered again (``async with hub``).
        """
        self.streams.accepting = False
        await self.streams.close_all(protocol.SHUTDOWN, self._shutdown_timeout)
        await self._backend.clear()

    async def __aenter__(self) -> EventHub:
        """Start the hub's background work (buffer expiry); the middleware does this on startup.

        :raises RuntimeError: the hub is running already (one lifespan per hub).
        """
        if self._task_group is not None:
            raise RuntimeError("this EventHub is running already: give each app its own hub")
        self.streams.accepting = True
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        try:
            senders = Senders(self._send_slots, self._stall_timeout, self.streams.counters)
            await self._task_group.start(senders.run)
            self.streams.senders = senders
            await self._backend.start(self._task_group)
        except BaseException:
            self.streams.senders = None
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
        self.streams.senders = None
        # Only background work runs in this group: stop it, and let the body's error (if any)
        # propagate as it is rather than wrapped in an exception group.
        task_group.cancel_scope.cancel()
        await task_group.__aexit__(None, None, None)
        return None
