"""One WebSocket: handshake, refusals, the reader (limits, ping/pong, client messages), close."""

from __future__ import annotations

import enum
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from .auth import BATCH_SUBPROTOCOL, Handshake, normalize_origin, parse_handshake, verify
from .delivery import PONG, Outbox, close_message
from .errors import BackendUnavailableError
from .limits import TokenBucket
from .stats import Counters
from .types import Principal

if TYPE_CHECKING:
    from .hub import EventHub
    from .types import Message, Receive, Scope, Send

logger = logging.getLogger("asgi_events")

CLOSE_TIMEOUT = 5.0  # how long a closing socket may take to finish


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a socket is not served: its close code, its HTTP status in "http" mode, its kind."""

    code: int
    reason: str
    status: int
    kind: str


MISSING_TOKEN = Refusal(1008, "Authentication failed", 401, "missing_token")
AUTH_FAILED = Refusal(1008, "Authentication failed", 401, "rejected")
TOKEN_EXPIRED = Refusal(4001, "Token expired", 401, "expired")
AUTH_ERROR = Refusal(1011, "Internal error", 500, "error")
AUTH_TIMEOUT = Refusal(1011, "Authentication timed out", 503, "timeout")
SHUTTING_DOWN = Refusal(1001, "Server shutdown", 503, "shutdown")
BACKEND_DOWN = Refusal(1012, "Service restart", 503, "backend")


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

    __slots__ = (
        "cancel_scope",
        "counters",
        "expires_at",
        "handshake",
        "outbox",
        "state",
        "user_id",
    )
    outbox: Outbox

    def __init__(self, principal: Principal, handshake: Handshake, counters: Counters) -> None:
        self.user_id = principal.user_id
        self.counters = counters
        self.expires_at = principal.expires_at
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
            self.counters.count(self.counters.closes, code)
            # Also bounds a send blocked by a client that stopped reading (where it can be
            # cancelled: hypercorn's trio worker shields its writes).
            deadline = anyio.current_time() + CLOSE_TIMEOUT
            self.cancel_scope.deadline = min(self.cancel_scope.deadline, deadline)


async def serve(
    hub: EventHub,
    scope: Scope,
    receive: Receive,
    send: Send,
    allowed_origins: frozenset[str] | None = None,
) -> None:
    """Run one WebSocket at the hub's path from ``websocket.connect`` to its end."""
    if (await receive())["type"] != "websocket.connect":
        return
    handshake = parse_handshake(scope)
    if allowed_origins is not None and handshake.origin is not None:
        if normalize_origin(handshake.origin) not in allowed_origins:
            hub._counters.count(hub._counters.refusals, "origin")
            await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            return
    principal, refusal = await _authenticate(hub, handshake)
    if principal is None:
        await _refuse(hub, scope, send, handshake, refusal)
        return

    settings = hub._settings
    conn = Connection(principal, handshake, hub._counters)
    conn.outbox = outbox = Outbox(
        settings.send_queue_size,
        settings.durable_limit,
        hub._counters,
        send,
        lambda error: _sent_all(conn, hub, error),
    )
    outbox.batch = handshake.subprotocol == BATCH_SUBPROTOCOL
    try:
        with conn.cancel_scope:
            # Join before accepting: a client that sees the handshake complete misses nothing.
            try:
                await hub._attach(conn)  # join live delivery and queue the replay, atomically
            except BackendUnavailableError:
                conn.close(BACKEND_DOWN.code, BACKEND_DOWN.reason)
            await send(_accept(handshake))
            if conn.state is State.CONNECTING:  # (not closed by a shutdown meanwhile)
                conn.to(State.OPEN)
            senders = hub._senders
            outbox.start(senders)
            if senders is None or conn.expires_at is not None:
                async with anyio.create_task_group() as tg:
                    if senders is None:  # the hub is not running: a writer of its own
                        tg.start_soon(outbox.run)
                    if conn.expires_at is not None:
                        tg.start_soon(_expire, conn, conn.expires_at)
                    await _read(conn, receive, hub)
                    tg.cancel_scope.cancel()
            else:  # (no task group: an idle socket costs as little as it can)
                await _read(conn, receive, hub)
    except anyio.get_cancelled_exc_class():
        # Cancelled from outside (the server stops): say goodbye, within a bound.
        outbox.abandon()
        if conn.state is State.OPEN:
            with anyio.CancelScope(shield=True) as farewell:
                farewell.deadline = anyio.current_time() + 1.0
                try:
                    await send(close_message(1001, "Server shutdown"))
                except Exception:  # the socket may be gone already
                    pass
        raise
    finally:
        outbox.abandon()  # the peer is gone: no more sends, no more pushes
        conn.to(State.CLOSED)
        hub._detach(conn)


def _accept(handshake: Handshake) -> Message:
    # Only our protocol is ever echoed: a token offered as a subprotocol never is.
    return {"type": "websocket.accept", "subprotocol": handshake.subprotocol}


async def _authenticate(hub: EventHub, handshake: Handshake) -> tuple[Principal | None, Refusal]:
    """The principal, or None with the refusal to answer with."""
    principal: Principal | None = None
    refusal = AUTH_FAILED if handshake.token is not None else MISSING_TOKEN
    if handshake.token is not None:
        try:
            principal = await verify(
                hub._verify_token, handshake.token, hub._settings.verify_timeout
            )
        except TimeoutError:
            logger.warning(
                "verify_token did not answer within %.1f s", hub._settings.verify_timeout
            )
            refusal = AUTH_TIMEOUT
        except Exception as exc:
            # The exception text may quote the token, so log only its type.
            logger.error("verify_token raised %s", type(exc).__name__)
            refusal = AUTH_ERROR
    if principal is not None and principal.expires_at is not None:
        if principal.expires_at <= time.time():
            principal, refusal = None, TOKEN_EXPIRED
    if not hub._accepting:  # the hub is shut down (perhaps while verify_token ran)
        principal, refusal = None, SHUTTING_DOWN
    elif not hub._backend.healthy:  # live events could not reach the socket
        principal, refusal = None, BACKEND_DOWN
    if principal is None:
        hub._counters.count(hub._counters.refusals, refusal.kind)
    return principal, refusal


async def _refuse(
    hub: EventHub, scope: Scope, send: Send, handshake: Handshake, refusal: Refusal
) -> None:
    if hub._settings.refusal == "http":
        if "websocket.http.response" in (scope.get("extensions") or {}):
            headers = [(b"content-type", b"text/plain; charset=utf-8")]
            if refusal.status == 401:
                headers.append((b"www-authenticate", b"Bearer"))
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": refusal.status,
                    "headers": headers,
                }
            )
            await send({"type": "websocket.http.response.body", "body": refusal.reason.encode()})
        else:
            await send({"type": "websocket.close", "code": refusal.code})  # the server sends 403
        return
    # Accept, then close: browser JavaScript can read a close code, never a handshake status.
    await send(_accept(handshake))
    await send(close_message(refusal.code, refusal.reason))
    hub._counters.count(hub._counters.closes, refusal.code)


def _sent_all(conn: Connection, hub: EventHub, error: Exception | None) -> None:
    # The close frame is out (or the peer is gone): the socket no longer counts as open. The
    # reader waits (within the close deadline) for the peer's answer: closing TCP first could
    # reset unread data.
    hub._sent_all(conn)
    if error is not None:
        logger.error("send raised %s: the socket is dropped", type(error).__name__)
        conn.cancel_scope.cancel()


async def _expire(conn: Connection, expires_at: float) -> None:
    await anyio.sleep(expires_at - time.time())
    conn.close(TOKEN_EXPIRED.code, TOKEN_EXPIRED.reason)


async def _read(conn: Connection, receive: Receive, hub: EventHub) -> None:
    settings, counters = hub._settings, hub._counters
    bucket = (
        TokenBucket(*settings.rate_limit, anyio.current_time()) if settings.rate_limit else None
    )
    while True:
        idle_timeout = settings.idle_timeout if conn.state is State.OPEN else None
        with anyio.move_on_after(math.inf if idle_timeout is None else idle_timeout) as idle:
            message = await receive()
        if idle.cancelled_caught:
            counters.idle_closes += 1
            conn.close(4002, "Idle timeout")
            continue
        kind = message["type"]
        if kind == "websocket.disconnect":
            return
        if kind != "websocket.receive":
            continue
        counters.messages_received += 1
        if conn.state is not State.OPEN:
            continue  # closing: the rest is ignored
        if bucket is not None and not bucket.take(anyio.current_time()):
            counters.rate_limited += 1
            conn.close(1008, "Rate limit exceeded")
        elif _too_big(message, settings.max_message_size):
            counters.oversized_messages += 1
            conn.close(1009, "Message too big")
        else:
            await _handle(conn, message, hub)


def _too_big(message: Message, limit: int) -> bool:
    text = message.get("text")
    if isinstance(text, str):  # UTF-8 takes at most 4 bytes a character: encode only if needed
        return len(text) * 4 > limit and len(text.encode("utf-8", "replace")) > limit
    data = message.get("bytes")
    return isinstance(data, (bytes, bytearray)) and len(data) > limit


async def _handle(conn: Connection, message: Message, hub: EventHub) -> None:
    text = message.get("text")
    if text == "ping":
        conn.outbox.push(PONG)
        return
    data = _parse(text)
    if data is None:
        hub._counters.malformed_messages += 1
    elif hub._on_client_message is not None:
        try:
            result = hub._on_client_message(conn.user_id, data)
            if inspect.isawaitable(result):
                await result
        except Exception:
            hub._counters.hook_errors += 1
            logger.exception("on_client_message raised for a message of user %r", conn.user_id)


def _parse(text: object) -> dict[str, Any] | None:
    if not isinstance(text, str):
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None
