"""One WebSocket: handshake, auth, the reader (ping/pong, client messages) and close codes."""

from __future__ import annotations

import enum
import inspect
import json
import logging
from typing import TYPE_CHECKING, Any

import anyio

from .auth import Handshake, parse_handshake, verify
from .delivery import Outbox, close_message, text_message

if TYPE_CHECKING:
    from .hub import EventHub
    from .types import Receive, Scope, Send

logger = logging.getLogger("asgi_events")

PONG = text_message("pong")
CLOSE_TIMEOUT = 5.0  # how long a closing socket waits for the peer's close frame


class State(enum.Enum):
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


class Connection:
    """One socket of one user: its state, its outbox, and a way to cancel it."""

    def __init__(self, user_id: str, outbox: Outbox, handshake: Handshake) -> None:
        self.user_id = user_id
        self.outbox = outbox
        self.handshake = handshake
        self.state = State.CONNECTING
        self.cancel_scope = anyio.CancelScope()

    def to(self, state: State) -> None:
        if state not in _NEXT[self.state]:
            raise RuntimeError(f"connection cannot go from {self.state.value} to {state.value}")
        self.state = state

    def close(self, code: int, reason: str) -> None:
        """Send a close frame next, then give the socket ``CLOSE_TIMEOUT`` to end."""
        if self.state in (State.CONNECTING, State.OPEN):
            self.to(State.CLOSING)
            self.outbox.close(code, reason)
            # Also bounds a send blocked by a client that stopped reading (where it can be
            # cancelled: hypercorn's trio worker shields its writes).
            deadline = anyio.current_time() + CLOSE_TIMEOUT
            self.cancel_scope.deadline = min(self.cancel_scope.deadline, deadline)


async def serve(hub: EventHub, scope: Scope, receive: Receive, send: Send) -> None:
    """Run one WebSocket at the hub's path from ``websocket.connect`` to its end."""
    if (await receive())["type"] != "websocket.connect":
        return
    handshake = parse_handshake(scope)
    accept = {"type": "websocket.accept", "subprotocol": handshake.subprotocol}
    user_id, code, reason = await _authenticate(hub, handshake)
    if not hub._accepting:  # the hub is shut down (perhaps while verify_token ran)
        user_id, code, reason = None, 1001, "Server shutdown"
    elif user_id is None:
        hub._counters.auth_failures += 1
    if user_id is None:
        await send(accept)
        await send(close_message(code, reason))
        return

    outbox = Outbox(hub._send_queue_size, hub._durable_limit, hub._counters)
    conn = Connection(user_id, outbox, handshake)
    try:
        with conn.cancel_scope:
            # Join before accepting: a client that sees the handshake complete misses nothing.
            hub._attach(conn)  # replay + join live delivery, with no await in between
            await send(accept)
            if conn.state is State.CONNECTING:  # (not closed by a shutdown meanwhile)
                conn.to(State.OPEN)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_write, conn, send, hub)
                await _read(conn, receive, hub)
                hub._detach(conn)  # the peer is gone: no more pushes
                tg.cancel_scope.cancel()
    except anyio.get_cancelled_exc_class():
        # Cancelled from outside (the server stops): say goodbye, within a bound.
        if conn.state is State.OPEN:
            with anyio.CancelScope(shield=True) as farewell:
                farewell.deadline = anyio.current_time() + 1.0
                try:
                    await send(close_message(1001, "Server shutdown"))
                except Exception:  # the socket may be gone already
                    pass
        raise
    finally:
        conn.to(State.CLOSED)
        hub._detach(conn)


async def _authenticate(hub: EventHub, handshake: Handshake) -> tuple[str | None, int, str]:
    """The user id, or None with the close code and reason to refuse with."""
    if handshake.token is None:
        return None, 1008, "Authentication failed"
    try:
        user_id = await verify(hub._verify_token, handshake.token, hub._verify_timeout)
    except TimeoutError:
        logger.warning("verify_token did not answer within %.1f s", hub._verify_timeout)
        return None, 1011, "Authentication timed out"
    except Exception as exc:
        # The exception text may quote the token, so log only its type.
        logger.error("verify_token raised %s", type(exc).__name__)
        return None, 1011, "Internal error"
    if user_id is None:
        return None, 1008, "Authentication failed"
    return user_id, 1000, ""


async def _write(conn: Connection, send: Send, hub: EventHub) -> None:
    await conn.outbox.run(send, hub._slots)
    # The close frame is out: the socket no longer counts as open. The reader waits (within
    # the close deadline) for the peer's answer: closing TCP first could reset unread data.
    hub._detach(conn)


async def _read(conn: Connection, receive: Receive, hub: EventHub) -> None:
    counters = hub._counters
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.disconnect":
            return
        if kind != "websocket.receive":
            continue
        counters.messages_received += 1
        text = message.get("text")
        if text == "ping":
            conn.outbox.push(PONG)
            continue
        data = _parse(text)
        if data is None:
            counters.malformed_messages += 1
        elif hub._on_client_message is not None and conn.state is State.OPEN:
            await _call_hook(hub, conn.user_id, data)


def _parse(text: object) -> dict[str, Any] | None:
    if not isinstance(text, str):
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


async def _call_hook(hub: EventHub, user_id: str, data: dict[str, Any]) -> None:
    assert hub._on_client_message is not None
    try:
        result = hub._on_client_message(user_id, data)
        if inspect.isawaitable(result):
            await result
    except Exception:
        hub._counters.hook_errors += 1
        logger.exception("on_client_message raised for a message of user %r", user_id)
