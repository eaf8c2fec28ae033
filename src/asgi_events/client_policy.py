"""The Python client's policy: the errors it stops with, how a close or an HTTP refusal ends a
connection (from the close table, ``protocol.CLOSES``), and the reconnection backoff.

``asgi_events.client`` re-exports the errors and ``backoff_delay``; import them from there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import anyio
import httpcore
import httpx
from httpx_ws import HTTPXWSException

from .protocol import Action, client_action

__all__ = (
    "TRANSIENT",
    "AuthenticationError",
    "End",
    "EventsClientError",
    "Kind",
    "RejectedError",
    "RetriesExhaustedError",
    "TokenExpiredError",
    "backoff_delay",
    "classify",
    "refused",
    "transient",
)


class EventsClientError(Exception):
    """Why the client stopped: the close ``code`` (None for an HTTP refusal) and ``reason``;
    for an HTTP refusal (of the socket's handshake, or of a ``history`` request) its ``status``.
    """

    def __init__(self, code: int | None, reason: str, *, status: int | None = None) -> None:
        super().__init__(f"{code}: {reason}" if code is not None else reason)
        self.code = code
        self.reason = reason
        self.status = status


class AuthenticationError(EventsClientError):
    """The token was refused (1008 "Authentication failed", HTTP 401) or expired (4001)."""


class TokenExpiredError(AuthenticationError):
    """The token expired (4001) and no ``token_refresher`` could replace it."""


class RejectedError(EventsClientError):
    """The server closed the socket with a code not worth retrying as is (see the module doc)."""


class RetriesExhaustedError(EventsClientError):
    """``max_attempts`` reconnections in a row failed; ``code``/``reason`` are the last one's."""


def backoff_delay(
    attempt: int, initial: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff, full jitter: uniform in ``[0, min(maximum, initial * 2**attempt)]``."""
    cap = min(maximum, initial * 2.0 ** min(attempt, 64))
    return (rng or _RNG).uniform(0.0, cap)


_RNG = random.Random()


Kind = Literal["done", "retry", "auth", "fatal"]
"""How a connection ended: the server is done, retry, refresh the token, or stop and report."""


@dataclass(frozen=True, slots=True)
class End:
    """How one connection ended: its kind, the close code (None for an HTTP refusal), reason,
    and the HTTP status of a refusal in the handshake."""

    kind: Kind
    code: int | None
    reason: str
    status: int | None = None


_KINDS: dict[Action, Kind] = {
    Action.DONE: "done",
    Action.RETRY: "retry",
    Action.REFRESH: "auth",
    Action.GIVE_UP: "fatal",
}


def classify(code: int, reason: str) -> End:
    """How a close ends a connection: the close table's action (``protocol.CLOSES``).

    Final (no reconnection): 1000 and 4003 (``done``: the server is done with this client,
    ``hub.disconnect``'s default), and every code the table neither retries nor refreshes
    (``fatal``): a ``hub.disconnect`` with a code in 4000-4999 or a 1008 reason of its own.
    """
    return End(_KINDS[client_action(code, reason)], code, reason)


def refused(status: int) -> End:
    """How an HTTP refusal of the handshake ends a connection: 401 refreshes the token,
    408, 429 and 5xx retry, anything else is final."""
    kind: Kind = "auth" if status == 401 else "fatal"
    if status in (408, 429) or status >= 500:
        kind = "retry"
    return End(kind, None, f"HTTP {status}", status)


TRANSIENT: tuple[type[Exception], ...] = (
    OSError,  # TimeoutError included
    httpx.TransportError,
    httpcore.NetworkError,
    HTTPXWSException,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)
"""Errors of the network or the socket: worth a reconnection."""


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or every exception of a group) is a network or socket error."""
    group = getattr(exc, "exceptions", None)  # an exception group (no builtin name on 3.10)
    if isinstance(group, tuple) and group:
        return all(transient(inner) for inner in group)
    return isinstance(exc, TRANSIENT)
