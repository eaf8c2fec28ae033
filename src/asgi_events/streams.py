"""The node's core: its users' streams, whatever transport feeds them.

A stream is one client of one user (a WebSocket today). ``Streams`` owns every stream of the
node: who may open one (``admit``), the registry by user, joining live delivery with the replay
(``attach``), fan-out of what the backend delivers, slow-consumer and displacement closes,
leaving (``detach``), and the counters. It knows no ASGI message: a transport hands it a ``Wire``
(how to frame messages) and a ``send``, and runs the stream's lifecycle around ``attach``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from typing import Any

import anyio
import anyio.lowlevel

from . import codec, protocol
from .auth import Authenticator
from .backends.base import Backend, Published
from .hooks import Hooks, Transport
from .limits import Settings
from .outbox import FULL, Outbox
from .protocol import Close, ResumePoint
from .registry import Registry
from .request import HandshakeRequest
from .revocations import Revocations
from .senders import Senders
from .stats import Counters
from .stream import Stream
from .types import Message, Principal, Send
from .wire import Wire

logger = logging.getLogger("asgi_events")

PRESSURE_ROUNDS = 16  # scheduling rounds a publisher yields at most while queues fill up


class Streams:
    """Every stream of this node, and how events reach them.

    :param backend: where events are buffered and how they reach every node; ``Streams``
        binds itself to it.
    :param settings: the limits every stream gets.
    :param authenticator: the application's check of connection requests.
    :param hooks: the application's hooks.
    :param latest: whether connecting streams get the user's latest values.
    """

    def __init__(
        self,
        backend: Backend,
        settings: Settings,
        authenticator: Authenticator,
        hooks: Hooks | None = None,
        latest: bool = False,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.authenticator = authenticator
        self.hooks = hooks or Hooks()
        self.latest = latest
        self.counters = Counters()
        self.senders: Senders | None = None  # while the hub runs
        self.accepting = True  # False after shutdown: new streams are refused with 1001
        self._registry: Registry[Stream] = Registry()
        # Every stream from joining until its close is out (or it is gone): registered ones,
        # and closing ones no longer registered (displaced, slow), their close queued.
        self._live: set[Stream] = set()
        self._emptied: anyio.Event | None = None  # set once ``_live`` is empty, while waited on
        self._wires: dict[Wire, int] = {}  # the transports' wires in use, with their streams
        self._revoked = Revocations(settings.verify_timeout + 1.0)

    # -- opening and closing -------------------------------------------------------------

    async def admit(self, request: HandshakeRequest) -> Principal | Close:
        """Who ``request`` is from, or why a stream for it is refused (counted)."""
        result = await self.authenticator(request, self.settings.verify_timeout)
        if not self.accepting:  # the hub is shut down (perhaps while the check ran)
            result = protocol.SHUTDOWN
        elif not self.backend.healthy:  # live events could not reach the stream
            result = protocol.SERVICE_RESTART
        if isinstance(result, Close):
            self.counters.refused(result)
        return result

    def create(
        self,
        principal: Principal,
        wire: Wire,
        send: Send,
        resume: ResumePoint | None = None,
        control: bool = False,
        batch: bool = False,
        *,
        transport: Transport = "websocket",
        subprotocol: str | None = None,
        client: tuple[str, int] | None = None,
        admitted_at: float | None = None,
    ) -> Stream:
        """A new stream of an admitted ``principal``; ``attach`` it next.

        :param admitted_at: ``anyio.current_time()`` before its request was checked (a
            ``disconnect`` of its user after that closes it).
        """
        stream = Stream(
            principal,
            wire,
            self.counters,
            resume,
            control,
            transport=transport,
            subprotocol=subprotocol,
            client=client,
        )
        stream.admitted_at = anyio.current_time() if admitted_at is None else admitted_at
        self._wires[wire] = self._wires.get(wire, 0) + 1
        stream.outbox = Outbox(
            self.settings.send_queue_size,
            self.settings.durable_limit,
            self.counters,
            wire,
            send,
            lambda error: self._finished(stream, error),
        )
        stream.outbox.batch = batch
        return stream

    async def attach(self, stream: Stream) -> None:
        """Join live delivery and queue the replay and the ready message, so that nothing is
        lost or doubled at the switch: the backend is asked to deliver the user's events here
        (``follow``) before the replay is read; live messages are held meanwhile, then those
        the replay covers are dropped (with the memory backend nothing can even arrive in
        between: neither call suspends).

        :raises BackendUnavailableError: the user's events could not be followed, or the
            replay could not be read.
        """
        others = self._registry.of(stream.user_id)
        if len(others) >= self.settings.max_connections_per_user:
            oldest = next(iter(others))
            oldest.close(protocol.TOO_MANY_CONNECTIONS)
            self.detach(oldest)
        self._registry.add(stream.user_id, stream)
        self._live.add(stream)
        self._present(stream.user_id)
        revoked = self._revoked.of(stream.user_id, stream.admitted_at)
        if revoked is not None:
            stream.close(revoked)
            self.detach(stream)
            return
        resume, outbox, wire = stream.resume, stream.outbox, stream.wire
        replaying = resume is not None or stream.control or self.latest
        if replaying:
            outbox.hold()  # (before following: what arrives from then on may be replayed too)
        await self.backend.follow(stream.user_id)
        if not replaying:
            return
        replay = await self.backend.replay(stream.user_id, resume, self.latest)
        if resume is not None:
            self.counters.reconnection_count += 1
            self.counters.replayed_events += len(replay.events)
            self.counters.replays_incomplete += not replay.recovered
            outbox.preload([wire.event(e.text, e.id, None, False) for e in replay.events])
        if replay.latest:
            values = [codec.with_latest(e.text) for e in replay.latest]
            outbox.preload([wire.event(text, None, None, True) for text in values])
        if stream.control:
            payload = replay.ready_payload(resume is not None)
            ready = codec.encode({"type": protocol.READY, "payload": payload})
            outbox.preload([wire.control(protocol.READY, ready, replay.position)])
        if outbox.release(replay.key) == FULL:
            self._slow_consumer(stream)

    def start(self, stream: Stream) -> bool:
        """The stream is open: its queue may be sent from now on. False if no sender runs (the
        hub is not running): then the transport runs ``stream.outbox.run`` itself."""
        senders = self.senders
        stream.outbox.start(None if senders is None else senders.ready)
        return senders is not None

    def detach(self, stream: Stream) -> None:
        """No more live events for ``stream`` (it is closing or gone)."""
        if stream in self._registry.of(stream.user_id):
            self._registry.remove(stream.user_id, stream)
            self._present(stream.user_id)

    def _present(self, user_id: str) -> None:
        self.backend.present(user_id, len(self._registry.of(user_id)))

    async def opened(self, stream: Stream) -> None:
        """The stream is open: run ``on_connect`` (then ``on_disconnect`` will run too)."""
        stream.announced = True
        await self.hooks.connected(stream.info, self.counters)

    async def ended(self, stream: Stream) -> None:
        """The stream has ended: run ``on_disconnect`` if ``on_connect`` ran."""
        if stream.announced:
            stream.announced = False
            code = stream.code if stream.code is not None else protocol.ABNORMAL.code
            await self.hooks.disconnected(stream.info, code, self.counters)

    def _finished(self, stream: Stream, error: Exception | None) -> None:
        # Its close is out (or the peer is gone): it no longer counts as open. A WebSocket
        # transport waits (within the close deadline) for the peer's answer: closing TCP first
        # could reset unread data; a transport with no closing handshake is done.
        self.detach(stream)
        self._live.discard(stream)
        left = self._wires.pop(stream.wire, 1) - 1
        if left:
            self._wires[stream.wire] = left
        if self._emptied is not None and not self._live:
            self._emptied.set()
        if error is not None:
            logger.error("send raised %s: the stream is dropped", type(error).__name__)
        if error is not None or not stream.wire.closing_handshake:
            stream.cancel_scope.cancel()

    def _slow_consumer(self, stream: Stream) -> None:
        stream.close(protocol.SLOW_CONSUMER)
        self.detach(stream)

    async def close_all(self, close: Close, wait: float) -> None:
        """Close every stream with ``close``; wait up to ``wait`` seconds for every close to be out
        (also that of a stream closed just before, say displaced or too slow), then cancel the
        rest, and forget them."""
        if self._live:
            if self._emptied is None or self._emptied.is_set():
                self._emptied = anyio.Event()
            emptied = self._emptied
            for stream in list(self._registry.all()):
                stream.close(close)
            with anyio.move_on_after(wait):
                await emptied.wait()
            for stream in list(self._live):
                stream.cancel_scope.cancel()
        for stream in list(self._registry.all()):
            self.detach(stream)

    async def disconnect(self, user_id: str, code: int, reason: str) -> None:
        """Close every stream of ``user_id`` on this node (``hub.disconnect``; the backend's
        ``Disconnect``), and those of its requests being admitted now."""
        close = protocol.disconnect_close(code, reason)
        self._revoked.add(user_id, close, anyio.current_time())
        for stream in list(self._registry.of(user_id)):
            stream.close(close)
            self.detach(stream)

    async def lost(self, affected: Callable[[str], bool] | None = None) -> None:
        """Delivery was interrupted: this node's streams (of the users ``affected`` says, or
        all) may have missed events. Close them with 1012 so that their clients resume (here
        or on another node) without a gap."""
        registry = self._registry
        for stream in list(registry.all()) if affected is None else registry.where(affected):
            stream.close(protocol.SERVICE_RESTART)
            self.detach(stream)

    # -- fan-out -------------------------------------------------------------------------

    async def deliver(self, event: Published, only: Callable[[str], bool] | None = None) -> None:
        """Queue ``event`` for this node's streams it is for (the backend's ``Deliver``): a
        user's, or every stream (of the users ``only`` is true of, if given)."""
        user_id, registry = event.user_id, self._registry
        if user_id is not None:
            streams: Collection[Stream] = registry.of(user_id)
        else:
            streams = registry.all() if only is None else registry.where(only)
        if streams:
            await self.fan_out(streams, event)

    async def fan_out(self, streams: Iterable[Stream], event: Published) -> None:
        """Push ``event`` to each of ``streams``: one message per transport, built once."""
        full: list[Stream] = []
        pressed: list[Outbox] = []
        text, event_id, key, transient = event.text, event.id, event.key, event.transient
        messages = {wire: wire.event(text, event_id, key, transient) for wire in self._wires}
        # One transport in use (the common case): no lookup per stream.
        single = len(messages) == 1
        message = next(iter(messages.values())) if single else {}
        for stream in streams:
            if not single:
                message = messages.get(stream.wire) or _build(messages, stream.wire, event)
            status = stream.outbox.push(message)
            if status:  # the rare path
                if status == FULL:
                    full.append(stream)
                elif not stream.outbox.stalled:  # (waiting would not help a stuck send)
                    pressed.append(stream.outbox)
        for stream in full:
            self._slow_consumer(stream)
        # Queues are filling up: let the senders run before the caller publishes more, for a
        # few scheduling rounds at most, so that a stalled stream cannot hold the caller up.
        for _ in range(PRESSURE_ROUNDS if pressed else 0):
            await anyio.lowlevel.checkpoint()
            if not any(box.pressed and not box.stalled for box in pressed):
                break

    # -- reading -------------------------------------------------------------------------

    def of(self, user_id: str) -> Collection[Stream]:
        """The open streams of ``user_id``."""
        return self._registry.of(user_id)

    def all(self) -> Collection[Stream]:
        """Every open stream."""
        return self._registry.all()

    @property
    def live(self) -> int:
        """Streams whose close is not out yet (open ones, and closing ones)."""
        return len(self._live)

    def stats(self) -> dict[str, Any]:
        """The registry's gauges and the counters."""
        return {
            "total_connections": len(self._registry),
            "active_users": self._registry.user_count(),
            "connections_per_user": self._registry.counts(),
            **self.counters.as_dict(),
        }


def _build(messages: dict[Wire, Message], wire: Wire, event: Published) -> Message:
    message = messages[wire] = wire.event(event.text, event.id, event.key, event.transient)
    return message
