"""The backend contract's application API (``asgi_events.backends.base``), for every backend:
publish returning the id, latest values, resuming from the start, disconnects and presence.

Checks of one node run against memory and Redis (``subject``); what only several nodes on one
Redis can show (shared latest values, a disconnect reaching every node, presence adding up, a
killed node) runs against Redis. Each test runs on asyncio and trio.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteReceiveStream

from asgi_events import codec, latest
from asgi_events.backends.base import Published
from asgi_events.protocol import ResumePoint

from ..support.backends import TIMEOUT, Node, Subject, fields_of, point
from ..support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]


async def publish_latest(
    node: Node, user_id: str, key: Any, payload: Any = None, *, transient: bool = True
) -> Published:
    """Publish a latest value of the slot of type ``L`` and ``key``, as the hub does; the
    value as it must be delivered live and kept."""
    fields = codec.prepare({"type": "L", "payload": {"key": key, "value": payload}})
    slot = latest.slot("L", fields, "payload.key")
    published = Published(user_id, codec.encode(fields))
    assert await node.backend.publish(user_id, fields, transient, latest=slot) is None
    return published


async def latest_values(node: Node, user_id: str) -> list[Published]:
    return (await node.backend.replay(user_id, None, latest=True)).latest


async def test_publish_returns_the_id_the_event_is_delivered_with(subject: Subject) -> None:
    async with subject.node() as node:
        ids = []
        for n in range(3):
            fields = codec.prepare({"type": "T", "payload": n})
            ids.append(await node.backend.publish("alice", fields, False))
        transient = codec.prepare({"type": "T", "payload": "live"})
        assert await node.backend.publish("alice", transient, True) is None
        await publish_latest(node, "alice", 1, transient=False)  # (None too)
        delivered = await node.settle()
        position = (await node.replay("alice")).position
    assert [published.id for published in delivered if not published.transient] == ids
    assert len(set(ids)) == 3 and all(isinstance(event_id, str) for event_id in ids)
    assert position == ids[-1]


async def test_latest_values_replace_per_slot_and_come_oldest_first(subject: Subject) -> None:
    async with subject.node() as node:
        origin = await node.replay("alice")
        first_a = await publish_latest(node, "alice", "a", 1)
        b = await publish_latest(node, "alice", "b", 1)
        await node.publish("alice", "buffered")
        a = await publish_latest(node, "alice", "a", "é\n}")  # replaces the first one
        none = await publish_latest(node, "alice", None, 3)  # a slot whose key is None
        await publish_latest(node, "bob", "a", 4)
        delivered = await node.settle()
        replay = await node.backend.replay("alice", point(origin.position), latest=True)
        without = await node.backend.replay("alice", point(origin.position))
    # Delivered live like transient events: no id, never replayed.
    assert [p for p in delivered if p.user_id == "alice" and p.transient] == [first_a, b, a, none]
    assert replay.latest == [b, a, none]  # oldest first, by when each slot was last set
    assert all(value.id is None and value.key is None for value in replay.latest)
    buffered = [p for p in delivered if not p.transient]
    assert replay.events == buffered and len(buffered) == 1 and replay.recovered is True
    assert without.latest == [] and without.events == replay.events


async def test_latest_values_of_one_user_are_its_own(subject: Subject) -> None:
    async with subject.node() as node:
        alice = await publish_latest(node, "alice", "a", 1)
        bob = await publish_latest(node, "bob", "a", 2)
        assert await latest_values(node, "alice") == [alice]
        assert await latest_values(node, "bob") == [bob]
        assert await latest_values(node, "carol") == []


async def test_latest_values_expire_by_age(subject: Subject) -> None:
    """Redis' clock is real, so this polls within a bounded wait; the younger value has half
    the bound to live when the older one is gone."""
    max_age, step = 2.0, 0.03
    async with subject.node(max_age=max_age) as node:
        old = await publish_latest(node, "alice", "old", 1)
        await node.elapse(max_age / 2)
        young = await publish_latest(node, "alice", "young", 2)
        with anyio.fail_after(TIMEOUT):
            while (values := await latest_values(node, "alice")) == [old, young]:
                await node.elapse(step)
        assert values == [young]
        with anyio.fail_after(TIMEOUT):
            while values:
                await node.elapse(step)
                values = await latest_values(node, "alice")
            assert values == []
        # Setting a slot again starts its age afresh.
        again = await publish_latest(node, "alice", "old", 3)
        assert await latest_values(node, "alice") == [again]


async def test_at_most_latest_per_user_slots_are_kept(subject: Subject) -> None:
    limit = latest.LATEST_PER_USER
    async with subject.node() as node:
        values = [await publish_latest(node, "alice", n, n) for n in range(limit + 5)]
        assert await latest_values(node, "alice") == values[5:]
        # Setting a kept slot makes it the newest: the least recently set one goes next.
        renewed = await publish_latest(node, "alice", 5, "again")
        extra = await publish_latest(node, "alice", "extra")
        assert await latest_values(node, "alice") == [*values[7:], renewed, extra]


async def test_resuming_from_the_start_replays_everything_buffered(subject: Subject) -> None:
    async with subject.node(size=3) as node:
        start = await node.replay("alice", ResumePoint(start=True))
        assert (start.events, start.recovered, start.reason) == ([], True, None)
        for n in range(5):
            await node.publish("alice", n)
            await node.publish("alice", "live", transient=True)
            await node.publish("bob", n)
        delivered = [p for p in await node.settle() if p.user_id == "alice"]
        replay = await node.replay("alice", ResumePoint(start=True))
    buffered = [p for p in delivered if not p.transient]
    # Everything still buffered, as complete (events the size bound dropped are not a gap).
    assert replay.events == buffered[2:]
    assert (replay.recovered, replay.reason) == (True, None)
    assert replay.position == buffered[-1].id and replay.latest == []


async def test_disconnect_follows_the_events_published_before_it(subject: Subject) -> None:
    async with subject.node() as node:
        for n in range(3):
            await node.publish("alice", n)
        await node.backend.disconnect("alice", 4003, "Disconnected")
        await node.publish("alice", 3)
        await node.backend.disconnect("nobody", 4321, "bye\né")  # an unknown user is no error
        with anyio.fail_after(TIMEOUT):
            while len(node.disconnects) < 2:
                await node.changed()
        delivered = await node.received(4)
    assert node.disconnects == [("alice", 4003, "Disconnected"), ("nobody", 4321, "bye\né")]
    assert node.disconnected_after == [3, 4]
    assert [fields_of(p)["payload"] for p in delivered] == [0, 1, 2, 3]


async def test_presence_counts_this_nodes_streams(subject: Subject) -> None:
    async with subject.node() as node:
        backend = node.backend
        assert await backend.presence([]) == {}
        assert await backend.presence(["alice", "bob"]) == {"alice": 0, "bob": 0}
        backend.present("alice", 2)
        backend.present("bob", 1)
        assert await backend.presence(["alice", "bob", "carol"]) == {
            "alice": 2,
            "bob": 1,
            "carol": 0,
        }
        backend.present("alice", 0)
        assert await backend.presence(["alice", "bob"]) == {"alice": 0, "bob": 1}


# -- several nodes on one Redis ------------------------------------------------------------


async def test_latest_values_are_shared_by_the_nodes(redis_server: RedisServer) -> None:
    subject = Subject("redis", redis_server)
    async with subject.node() as a, subject.node() as b:
        first = await publish_latest(a, "alice", "a", 1)
        second = await publish_latest(b, "alice", "b", 2)
        replaced = await publish_latest(b, "alice", "a", 3)
        for node in (a, b):
            assert await latest_values(node, "alice") == [second, replaced]
            live = [p for p in await node.settle() if p.user_id == "alice"]
            assert live == [first, second, replaced]


async def test_a_disconnect_reaches_every_node_after_the_events_before_it(
    redis_server: RedisServer,
) -> None:
    subject = Subject("redis", redis_server)
    async with subject.node() as a, subject.node() as b:
        for n in range(3):
            await (a, b)[n % 2].publish("alice", n)
        await b.backend.disconnect("alice", 1008, "Policy")
        await a.publish("alice", 3)
        for node in (a, b):
            with anyio.fail_after(TIMEOUT):
                while not node.disconnects:
                    await node.changed()
            delivered = await node.received(4)
            assert node.disconnects == [("alice", 1008, "Policy")]
            assert node.disconnected_after == [3]
            assert [fields_of(p)["payload"] for p in delivered] == [0, 1, 2, 3]


async def poll_presence(node: Node, user_id: str, expected: int) -> None:
    """Wait (bounded) until ``node`` counts ``expected`` streams of ``user_id``: other nodes
    write theirs in the background, so there is nothing to wait on but the count itself."""
    with anyio.fail_after(TIMEOUT):
        while (await node.backend.presence([user_id]))[user_id] != expected:  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_presence_adds_up_over_the_nodes(redis_server: RedisServer) -> None:
    subject = Subject("redis", redis_server)
    async with subject.node() as a:
        a.backend.present("alice", 2)
        async with subject.node() as b:
            b.backend.present("alice", 3)
            b.backend.present("bob", 1)
            await poll_presence(a, "alice", 5)
            assert await a.backend.presence(["alice", "bob", "carol"]) == {
                "alice": 5,
                "bob": 1,
                "carol": 0,
            }
            await poll_presence(b, "alice", 5)
            b.backend.present("alice", 0)
            await poll_presence(a, "alice", 2)
            b.backend.present("alice", 4)
            await poll_presence(a, "alice", 6)
        # A clean stop says goodbye: its counts are gone at once.
        assert await a.backend.presence(["alice", "bob"]) == {"alice": 2, "bob": 0}


async def read_line(stream: ByteReceiveStream) -> str:
    data = b""
    while not data.endswith(b"\n"):
        data += await stream.receive()
    return data.decode()


async def test_a_killed_node_stops_counting_within_presence_ttl(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    """A node in a process of its own holds two streams of ``u``, and is killed (SIGKILL: no
    goodbye); its counts expire within ``presence_ttl`` of its last write, before the kill."""
    subject, ttl = Subject("redis", redis_server), 1.5
    command = [sys.executable, str(ROOT / "tests" / "support" / "presence_node.py")]
    command += [redis_server.url, subject.prefix, str(ttl), anyio_backend]
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    async with subject.node() as here:
        async with await anyio.open_process(command, env=env, stderr=None) as process:
            try:
                assert process.stdout is not None
                with anyio.fail_after(20):  # a new process: imports, then its first write
                    line = await read_line(process.stdout)
                assert line.startswith("ready ")
                assert await here.backend.presence(["u"]) == {"u": 2}
                process.kill()
                await process.wait()
                with anyio.fail_after(ttl + 3):  # (it expires in Redis: no event, poll)
                    while (await here.backend.presence(["u"]))["u"] != 0:  # noqa: ASYNC110
                        await anyio.sleep(0.05)
            finally:
                if process.returncode is None:
                    process.kill()
