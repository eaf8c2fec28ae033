"""Messages and outboxes for the in-process tests of the delivery path."""

from __future__ import annotations

from asgi_events.outbox import Outbox
from asgi_events.transports.websocket import WIRE
from asgi_events.types import Message
from asgi_events.wire import DurableMessage


def plain(n: int) -> Message:
    return WIRE.event(str(n), None, None, False)


def durable(n: int) -> Message:
    return DurableMessage(type="websocket.send", text=str(n))


def transient(n: int) -> Message:
    return WIRE.event(str(n), None, None, True)


def texts(outbox: Outbox) -> list[str]:
    return [m["text"] for m in outbox.queued]
