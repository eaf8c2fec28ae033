"""The node's core in process (``streams.py``): one message per transport and broadcast."""

from __future__ import annotations

from typing import Any

from asgi_events import EventHub
from asgi_events.backends.base import Published
from asgi_events.transports.websocket import WIRE, WebSocketWire
from asgi_events.types import Message, Principal

from .support.server import users


class TaggedWire(WebSocketWire):
    """Another transport's framing: the same messages, marked with whose they are."""

    def event(self, text: str, event_id: str | None, key: Any, transient: bool) -> Message:
        message = super().event(text, event_id, key, transient)
        message["wire"] = "tagged"
        return message


async def nothing(message: Message) -> None:
    pass


async def test_each_stream_gets_its_own_transport_s_message_built_once() -> None:
    hub = EventHub(users)
    tagged = TaggedWire()
    streams = [
        hub.streams.create(Principal("alice"), wire, nothing) for wire in (WIRE, tagged, WIRE)
    ]
    for stream in streams:
        await hub.streams.attach(stream)
    await hub.streams.deliver(Published("alice", '{"type":"T"}', "e.1", 1))
    first, second, third = (stream.outbox.queued[-1] for stream in streams)
    assert "wire" not in first and second["wire"] == "tagged"
    assert first is third  # one message per transport and broadcast, shared by its streams
    assert first["text"] == second["text"] == '{"type":"T"}'


async def test_with_one_transport_every_stream_shares_one_message() -> None:
    hub = EventHub(users)
    streams = [hub.streams.create(Principal(user), WIRE, nothing) for user in ("a", "b", "c")]
    for stream in streams:
        await hub.streams.attach(stream)
    await hub.streams.deliver(Published(None, '{"type":"T"}'))
    messages = [stream.outbox.queued[-1] for stream in streams]
    assert all(message is messages[0] for message in messages)
