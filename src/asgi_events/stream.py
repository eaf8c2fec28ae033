"""One stream: one client of one user, whatever its transport; its state and its outbox."""

from __future__ import annotations

import enum
import secrets
import time
from datetime import datetime, timezone

import anyio

from .hooks import ConnectionInfo, Transport
from .outbox import Outbox
from .protocol import SHUTDOWN, TOKEN_EXPIRED, Close, ResumePoint
from .stats import Counters
from .types import Principal, Send
from .wire import Wire

CLOSE_TIMEOUT = 5.0  # how long a closing stream may take to finish


class State(enum.Enum):
    """Where a stream is in its life; transitions only go forward (``Stream.to``)."""

    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


_NEXT: dict[State, frozenset[State]] = {
    State.CONNECTING: frozenset({State.OPEN, State.CLOSING, State.CLOSED}),
    State.OPEN: frozenset({State.CLOSING, State.CLOSED}),
    State.CLOSING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class Stream:
    """One client of one user: its state, its outbox, and a way to cancel it.

    :param principal: who it belongs to (its ``expires_at`` ends it with 4001).
    :param wire: how its transport frames messages.
    :param resume: where its client asked to resume from, if anywhere.
    :param control: whether it gets control messages (the ready message).
    :param transport, subprotocol, client: what ``info`` says of its connection.
    """

    __slots__ = (
        "admitted_at",
        "announced",
        "cancel_scope",
        "code",
        "control",
        "counters",
        "expires_at",
        "info",
        "outbox",
        "resume",
        "state",
        "user_id",
        "wire",
    )
    outbox: Outbox
    admitted_at: float
    """``anyio.current_time()`` before its request was checked."""

    def __init__(
        self,
        principal: Principal,
        wire: Wire,
        counters: Counters,
        resume: ResumePoint | None = None,
        control: bool = False,
        *,
        transport: Transport = "websocket",
        subprotocol: str | None = None,
        client: tuple[str, int] | None = None,
    ) -> None:
        self.user_id = principal.user_id
        self.expires_at = principal.expires_at
        self.wire = wire
        self.counters = counters
        self.resume = resume
        self.control = control
        self.state = State.CONNECTING
        self.cancel_scope = anyio.CancelScope()
        self.info = ConnectionInfo(
            user_id=principal.user_id,
            connection_id=secrets.token_hex(8),
            transport=transport,
            subprotocol=subprotocol,
            client=client,
            connected_at=datetime.now(timezone.utc),
            principal=principal,
        )
        """What the application's hooks are told of it."""
        self.announced = False  # on_connect ran: on_disconnect is due
        self.code: int | None = None
        """The close code it ended with: the server's, else the client's."""

    async def expire(self) -> None:
        """Close the stream with 4001 when its principal's ``expires_at`` comes (run it in a
        task that ends with the stream)."""
        if self.expires_at is not None:
            await anyio.sleep(self.expires_at - time.time())
            self.close(TOKEN_EXPIRED)

    async def say_goodbye(self, send: Send) -> None:
        """The transport is cancelled from outside (the server stops): send, within a second,
        the close that was queued and not sent yet, or 1001 "Server shutdown" if the stream
        was open (a server may run the hub's shutdown, which queues closes, right after it
        cancels the requests it stopped waiting for); then send nothing more."""
        farewell = self.outbox.unsent_close()
        self.outbox.abandon()
        if self.state is State.OPEN:
            self.code = SHUTDOWN.code
            farewell = self.wire.close(SHUTDOWN.code, SHUTDOWN.reason)
        if farewell is not None:
            with anyio.CancelScope(shield=True) as bound:
                bound.deadline = anyio.current_time() + 1.0
                try:
                    await send(farewell)
                except Exception:  # the peer may be gone already
                    pass

    def to(self, state: State) -> None:
        """Move to ``state``.

        :raises RuntimeError: not a transition that state allows.
        """
        if state not in _NEXT[self.state]:
            raise RuntimeError(f"a stream cannot go from {self.state.value} to {state.value}")
        self.state = state

    def close(self, close: Close) -> bool:
        """Send ``close`` next, then give the stream ``CLOSE_TIMEOUT`` to end; False if it was
        closing already. Counts it (``closes`` by code, and its own counter if any)."""
        if self.state not in (State.CONNECTING, State.OPEN):
            return False
        self.to(State.CLOSING)
        self.code = close.code
        self.outbox.close(close.code, close.reason)
        self.counters.closed(close)
        # Also bounds a send blocked by a client that stopped reading (where it can be
        # cancelled: hypercorn's trio worker shields its writes).
        deadline = anyio.current_time() + CLOSE_TIMEOUT
        self.cancel_scope.deadline = min(self.cancel_scope.deadline, deadline)
        return True
