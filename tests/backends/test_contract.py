"""The backend contract (``asgi_events.backends.base``), checked for every backend.

One set of checks, parametrised over the memory backend and ``RedisBackend`` on a real
redis-server (``subject``), each on asyncio and trio. Backends are driven directly: no hub.
"""

from __future__ import annotations

from datetime import datetime, timezone

import anyio

from asgi_events import codec
from asgi_events.backends.base import Published
from asgi_events.protocol import ResumePoint, make_id

from ..support.backends import TIMEOUT, Subject, epoch_of, fields_of, offset_of, point

ODD_PAYLOADS = [
    "plain",
    'quote " and brace }',
    "é ü 東京 \U0001f600",
    "line\nbreak\u2028sep",
    {"x": []},
]


async def test_publish_delivers_the_event_with_an_id_and_an_increasing_key(
    subject: Subject,
) -> None:
    async with subject.node() as node:
        sent = [await node.publish("alice", payload) for payload in ODD_PAYLOADS]
        delivered = await node.settle()
        position = (await node.replay("alice")).position
    assert len(delivered) == len(sent)
    for published, fields in zip(delivered, sent, strict=True):
        assert published.user_id == "alice" and not published.transient
        assert published.id is not None and epoch_of(published.id) == epoch_of(position)
        # The text is the event's own fields, unchanged, plus its id (last).
        assert published.text == codec.with_id(codec.encode(fields), published.id)
        assert fields_of(published) == {**fields, "id": published.id}
    keys = [published.key for published in delivered]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert position == delivered[-1].id


async def test_the_position_before_any_event_is_the_epochs_origin(subject: Subject) -> None:
    async with subject.node() as node:
        before = await node.replay("alice")
        assert before.events == [] and before.recovered is True and before.reason is None
        assert offset_of(before.position) == subject.origin_offset
        assert before.key == subject.origin_key
        await node.publish("alice", 1)
        await node.publish("alice", 2)
        delivered = await node.settle()
        after = await node.replay("alice")
        # From the origin, everything follows, completely.
        from_origin = await node.replay("alice", point(before.position))
    assert epoch_of(delivered[0].id or "") == epoch_of(before.position)
    assert (after.position, after.key) == (delivered[-1].id, delivered[-1].key)
    assert after.events == [] and after.recovered is True
    assert from_origin.events == delivered and from_origin.recovered is True


async def test_a_transient_event_has_no_id_and_is_never_replayed(subject: Subject) -> None:
    async with subject.node() as node:
        origin = await node.replay("alice")
        fields = await node.publish("alice", "progress", transient=True)
        (published,) = await node.settle()
        assert published == Published("alice", codec.encode(fields))
        assert published.transient
        by_id = await node.replay("alice", point(origin.position))
        by_time = await node.replay(
            "alice", ResumePoint(since=datetime(2000, 1, 1, tzinfo=timezone.utc))
        )
    for replay in (by_id, by_time):
        assert replay.events == [] and replay.recovered is True
        assert (replay.position, replay.key) == (origin.position, origin.key)


async def test_publish_to_all_reaches_everyone_unbuffered(subject: Subject) -> None:
    text = codec.encode(codec.prepare({"type": "ALL", "payload": "é"}))
    async with subject.node() as node:
        origin = await node.replay("alice")
        await node.backend.publish_to_all(text)
        delivered = await node.settle()
        replay = await node.replay("alice", point(origin.position))
    assert delivered == [Published(None, text)]
    assert not delivered[0].transient
    assert replay.events == [] and replay.position == origin.position


async def test_ids_strictly_increase_per_user_and_keys_order_them(subject: Subject) -> None:
    per_task = 15
    async with subject.node() as node:
        async with anyio.create_task_group() as tg:  # concurrent publishers, two users
            for task in range(4):

                async def publish(task: int = task) -> None:
                    for n in range(per_task):
                        await node.publish(("alice", "bob")[task % 2], [task, n])

                tg.start_soon(publish)
        delivered = await node.settle()
        positions = {user: (await node.replay(user)).position for user in ("alice", "bob")}
    assert len(delivered) == 4 * per_task
    assert len({published.id for published in delivered}) == len(delivered)
    for user in ("alice", "bob"):
        mine = [published for published in delivered if published.user_id == user]
        keys = [published.key for published in mine]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)  # delivered in id order
        epoch = epoch_of(positions[user])
        for published in mine:
            assert published.id == make_id(epoch, offset_of(published.id or ""))
        assert positions[user] == mine[-1].id
        for task in (0, 2) if user == "alice" else (1, 3):  # each publisher's order is kept
            payloads = [
                fields_of(p)["payload"][1] for p in mine if fields_of(p)["payload"][0] == task
            ]
            assert payloads == list(range(per_task))


async def test_replay_after_an_id_returns_exactly_what_followed(subject: Subject) -> None:
    async with subject.node() as node:
        for payload in ODD_PAYLOADS:
            await node.publish("alice", payload)
            await node.publish("bob", payload)  # another user's events are never in it
            await node.publish("alice", "transient", transient=True)
        delivered = await node.settle()
        alice = [p for p in delivered if p.user_id == "alice" and not p.transient]
        replays = [await node.replay("alice", point(p.id or "")) for p in alice]
    for n, replay in enumerate(replays):
        # The same Published values: ids, keys, and texts byte for byte.
        assert replay.events == alice[n + 1 :]
        assert replay.recovered is True and replay.reason is None
        assert (replay.position, replay.key) == (alice[-1].id, alice[-1].key)


async def test_an_id_of_another_epoch_replays_everything_buffered(subject: Subject) -> None:
    async with subject.node() as node:
        for n in range(3):
            await node.publish("alice", n)
        delivered = await node.settle()
        foreign = ResumePoint(
            epoch=f"x{epoch_of(delivered[0].id or '')}", offset=offset_of(delivered[1].id or "")
        )
        replay = await node.replay("alice", foreign)
        from_oldest = await node.replay("alice", point(replay.oldest or ""))
    assert replay.events == delivered
    assert replay.recovered is False and replay.reason == "epoch"
    assert replay.position == delivered[-1].id
    assert from_oldest.recovered is True and from_oldest.events == delivered


async def test_an_unknown_or_malformed_point_replays_nothing(subject: Subject) -> None:
    async with subject.node() as node:
        for n in range(3):
            await node.publish("alice", n)
        delivered = await node.settle()
        newest = delivered[-1].id or ""
        epoch = epoch_of(newest)
        malformed = ["", "abc", "-1", "1-", "-", "x-1", "1.5", "1-0-0", " 1", "٣", "1" * 23]
        malformed += ["99999999999999999999-0", "18446744073709551616-0"]  # beyond 64 bits
        points = [ResumePoint(epoch=epoch, offset=subject.next_offset(offset_of(newest)))]
        points += [ResumePoint(epoch=epoch, offset=offset) for offset in malformed]
        points += [ResumePoint(invalid=True)]
        replays = [(resume, await node.replay("alice", resume)) for resume in points]
    for resume, replay in replays:
        assert (replay.events, replay.recovered, replay.reason) == ([], False, "unknown"), resume
        assert (replay.position, replay.key) == (newest, delivered[-1].key)


async def test_events_evicted_by_size_are_reported_with_what_is_left(subject: Subject) -> None:
    async with subject.node(size=3) as node:
        for n in range(10):
            await node.publish("alice", n)
        delivered = await node.settle()
        ids = [p.id or "" for p in delivered]
        evicted = await node.replay("alice", point(ids[0]))
        from_oldest = await node.replay("alice", point(evicted.oldest or ""))
        just_before = await node.replay("alice", point(ids[5]))
        by_time = await node.replay(
            "alice", ResumePoint(since=datetime(2000, 1, 1, tzinfo=timezone.utc))
        )
    assert evicted.events == delivered[7:]
    assert (evicted.recovered, evicted.reason, evicted.oldest) == (False, "evicted", ids[6])
    assert from_oldest.events == delivered[7:] and from_oldest.recovered is True
    assert just_before.events == delivered[7:] and just_before.reason == "evicted"
    assert by_time.events == delivered[7:] and by_time.recovered is False
    assert by_time.reason == "evicted"
    assert evicted.position == ids[-1] == from_oldest.position


async def test_since_a_timestamp_replays_the_strictly_later_events(subject: Subject) -> None:
    stamps = ["2020-01-01T00:00:00.000Z", "2020-01-01T00:00:01.000Z", "2020-01-01T00:00:01Z"]
    stamps += ["2020-01-01T01:00:02+01:00", "2020-01-01T00:00:03.000Z"]  # (00:00:02 UTC)
    async with subject.node() as node:
        for n, stamp in enumerate(stamps):
            await node.publish("alice", n, timestamp=stamp)
            await node.publish("alice", n, timestamp=stamp, transient=True)
        delivered = [p for p in await node.settle() if not p.transient]

        async def since(text: str) -> list[int]:
            at = codec.parse_timestamp(text)
            assert at is not None
            replay = await node.replay("alice", ResumePoint(since=at))
            assert replay.recovered is True and replay.position == delivered[-1].id
            assert all(event in delivered for event in replay.events)  # byte for byte
            return [fields_of(event)["payload"] for event in replay.events]

        assert await since("2019-12-31T23:59:59Z") == [0, 1, 2, 3, 4]
        assert await since("2020-01-01T00:00:00Z") == [1, 2, 3, 4]
        assert await since("2020-01-01T00:00:01Z") == [3, 4]  # both events at :01 are not later
        assert await since("2020-01-01T00:00:01.001Z") == [3, 4]
        assert await since("2020-01-01T02:00:02.5+02:00") == [4]
        assert await since("2020-01-01T00:00:03Z") == []


async def test_events_older_than_the_age_bound_are_reported_expired(subject: Subject) -> None:
    """The age bound (Redis' own clock for Redis, so this polls within a bounded wait)."""
    max_age, step = 1.0, 0.03
    async with subject.node(max_age=max_age) as node:
        await node.publish("alice", 0)
        await node.publish("alice", 1)
        first = (await node.settle())[0]
        # The later events are half the bound younger, so once the second one is gone (a
        # client that has the first one has a gap) they still have half the bound to live
        # while the checks below run.
        await node.elapse(max_age / 2)
        for n in range(2, 5):
            await node.publish("alice", n)
        delivered = await node.settle()
        with anyio.fail_after(TIMEOUT):
            while True:
                replay = await node.replay("alice", point(first.id or ""))
                assert replay.position == delivered[-1].id
                if not replay.recovered:
                    break
                assert replay.events == delivered[1:]
                await node.elapse(step)
        assert replay.reason == "expired"
        # What is left is a tail, and it is complete from ``oldest`` on.
        assert replay.events == delivered[2:]
        assert replay.oldest is not None and replay.oldest == delivered[1].id
        from_oldest = await node.replay("alice", point(replay.oldest))
        assert from_oldest.recovered is True and from_oldest.events == replay.events
        # Then everything expires: still "expired", with the newest id as the oldest complete.
        with anyio.fail_after(TIMEOUT):
            while replay.events:
                await node.elapse(step)
                replay = await node.replay("alice", point(first.id or ""))
        assert (replay.recovered, replay.reason) == (False, "expired")
        assert replay.oldest == replay.position == delivered[-1].id
        current = await node.replay("alice", point(delivered[-1].id or ""))
        assert current.recovered is True and current.events == []
        by_time = await node.replay(
            "alice", ResumePoint(since=datetime(2000, 1, 1, tzinfo=timezone.utc))
        )
        assert (by_time.events, by_time.recovered, by_time.reason) == ([], False, "expired")
