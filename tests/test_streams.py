"""The node's core in process (``streams.py``): one message per transport and broadcast, and a
stream's user followed before its replay is read."""

from __future__ import annotations

import json
from typing import Any
from unittest.mock import ANY

import anyio

from asgi_events import EventHub, codec
from asgi_events.backends.base import Published, Replay
from asgi_events.backends.memory import MemoryBackend
from asgi_events.protocol import ResumePoint
from asgi_events.stream import Stream
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


class GatedBackend(MemoryBackend):
    """The memory backend, but ``follow`` waits until the test opens the gate: what reaches a
    stream while its user is being followed (on Redis, while its channel is subscribed)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.following = anyio.Event()
        self.gate = anyio.Event()

    async def follow(self, user_id: str) -> None:
        self.calls.append(f"follow {user_id}")
        self.following.set()
        await self.gate.wait()

    async def replay(
        self, user_id: str, resume: ResumePoint | None, latest: bool = False
    ) -> Replay:
        self.calls.append(f"replay {user_id}")
        return await super().replay(user_id, resume, latest)


async def publish(backend: MemoryBackend, user_id: str, payload: Any) -> None:
    await backend.publish(user_id, codec.prepare({"type": "T", "payload": payload}), False)


def payloads(stream: Stream) -> list[Any]:
    return [json.loads(message["text"]).get("payload") for message in stream.outbox.queued]


async def test_attach_follows_the_user_before_it_reads_the_replay() -> None:
    """An event published while the user is being followed reaches the stream both live and in
    its replay: it is queued once, in order, and the replay is read only once following."""
    backend = GatedBackend()
    hub = EventHub(users, backend=backend)
    await publish(backend, "alice", 0)
    stream = hub.streams.create(
        Principal("alice"), WIRE, nothing, ResumePoint(start=True), control=True
    )
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.streams.attach, stream)
            await backend.following.wait()
            assert backend.calls == ["follow alice"]  # and the replay is not read yet
            await publish(backend, "alice", 1)  # live while following: held
            assert list(stream.outbox.queued) == []
            backend.gate.set()
    assert backend.calls == ["follow alice", "replay alice"]
    assert payloads(stream) == [0, 1, {"position": ANY, "recovered": True, "replayed": 2}]
    await publish(backend, "alice", 2)
    assert payloads(stream)[-1] == 2


async def test_a_stream_with_nothing_to_replay_follows_its_user_too() -> None:
    backend = GatedBackend()
    hub = EventHub(users, backend=backend)
    stream = hub.streams.create(Principal("bob"), WIRE, nothing)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.streams.attach, stream)
            await backend.following.wait()
            await publish(backend, "bob", 1)  # (it is registered: live from now on)
            backend.gate.set()
    assert backend.calls == ["follow bob"]  # no replay to read
    assert payloads(stream) == [1]
