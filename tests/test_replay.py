"""Replay on reconnect: by timestamp, exactly by id, the ready message, gaps, and races."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asgi_events import EventHub

from .support.server import Connect, ServeFn, assert_silent, recv, recv_n, users

V1 = ["asgi-events.v1"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ts(second: int) -> str:
    return f"2026-01-01T00:00:{second:02d}.000Z"


async def publish(hub: EventHub, user: str, *payloads: Any, **fields: Any) -> None:
    for payload in payloads:
        await hub.broadcast(user, {"type": "T", "payload": payload, **fields})


async def test_replay_by_timestamp_is_strictly_after(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    for second in range(5):
        await publish(server.hub, "alice", second, timestamp=ts(second))
    async with connect(server.ws_url(token="tok-alice", lastEventTs=ts(2))) as ws:
        assert [e["payload"] for e in await recv_n(ws, 2)] == [3, 4]
        await assert_silent(ws)
        await publish(server.hub, "alice", "live")
        assert (await recv(ws))["payload"] == "live"


async def test_replay_comes_before_live_and_ready_between(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    await publish(server.hub, "alice", 1, 2)
    url = server.ws_url(token="tok-alice", lastEventTs="2000-01-01T00:00:00Z")
    async with connect(url, subprotocols=V1) as ws:
        assert ws.subprotocol == "asgi-events.v1"
        await publish(server.hub, "alice", 3)
        frames = await recv_n(ws, 4)
    assert [f.get("payload") for f in frames[:2]] == [1, 2]
    assert frames[2] == {
        "type": "asgi_events.ready",
        "payload": {"position": frames[1]["id"], "recovered": True, "replayed": 2},
    }
    assert frames[3]["payload"] == 3


@pytest.mark.parametrize("value", ["yesterday", "2026-99-01", "%00", "1" * 200])
async def test_unparseable_timestamp_replays_nothing_and_stays_open(
    serve: ServeFn, connect: Connect, value: str
) -> None:
    server = await serve()
    await publish(server.hub, "alice", 1)
    async with connect(server.ws_url(token="tok-alice", lastEventTs=value), V1) as ws:
        ready = await recv(ws)
        assert ready["payload"]["replayed"] == 0 and ready["payload"]["recovered"] is False
        await publish(server.hub, "alice", 2)
        assert (await recv(ws))["payload"] == 2


async def test_transient_events_are_live_only(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    hub = server.hub
    async with connect(server.ws_url(token="tok-alice")) as ws:
        await hub.broadcast("alice", {"type": "JOB_PROGRESS", "payload": 10})
        await hub.broadcast("alice", {"type": "CUSTOMER_UPDATE_PROGRESS", "payload": 20})
        await hub.broadcast("alice", {"type": "JOB_COMPLETED", "payload": 30})
        assert [e["payload"] for e in await recv_n(ws, 3)] == [10, 20, 30]
    async with connect(server.ws_url(token="tok-alice", lastEventTs="2000-01-01")) as ws:
        assert (await recv(ws))["payload"] == 30
        await assert_silent(ws)
    assert hub.stats()["buffered_events"] == 1


@pytest.mark.parametrize("subprotocols", [None, V1])
async def test_exact_resume_by_id_over_equal_timestamps(
    serve: ServeFn, connect: Connect, subprotocols: list[str] | None
) -> None:
    server = await serve()
    await publish(server.hub, "alice", *range(6), timestamp=ts(7))  # all the same timestamp
    async with connect(server.ws_url(token="tok-alice", lastEventTs=ts(6))) as ws:
        first = await recv_n(ws, 6)
    seen = first[3]["id"]
    # lastEventTs cannot tell these apart; lastEventId can, and wins when both are given.
    url = server.ws_url(token="tok-alice", lastEventId=seen, lastEventTs=ts(0))
    async with connect(url, subprotocols) as ws:
        replayed = await recv_n(ws, 2)
        assert replayed == first[4:]
        if subprotocols:
            ready = await recv(ws)
            expected = {"position": first[5]["id"], "recovered": True, "replayed": 2}
            assert ready["payload"] == expected
        await assert_silent(ws)


async def test_ready_without_resume_and_for_a_user_without_events(
    serve: ServeFn, connect: Connect
) -> None:
    server = await serve()
    async with connect(server.ws_url(token="tok-carol"), V1) as ws:
        ready = await recv(ws)
    position = ready["payload"]["position"]
    assert ready["payload"] == {"position": position, "recovered": True, "replayed": 0}
    await publish(server.hub, "carol", "missed")
    async with connect(server.ws_url(token="tok-carol", lastEventId=position), V1) as ws:
        missed, ready = await recv_n(ws, 2)
    assert missed["payload"] == "missed"
    assert ready["payload"] == {"position": missed["id"], "recovered": True, "replayed": 1}


async def test_not_recovered_after_eviction_by_size(serve: ServeFn, connect: Connect) -> None:
    server = await serve(hub=EventHub(users, buffer_size=3))
    async with connect(server.ws_url(token="tok-alice")) as ws:
        await publish(server.hub, "alice", 0)
        seen = (await recv(ws))["id"]
    await publish(server.hub, "alice", 1, 2, 3, 4)  # 1 is evicted
    async with connect(server.ws_url(token="tok-alice", lastEventId=seen), V1) as ws:
        frames = await recv_n(ws, 4)
    assert [f["payload"] for f in frames[:3]] == [2, 3, 4]
    assert frames[3]["payload"]["recovered"] is False
    assert frames[3]["payload"]["reason"] == "evicted"
    assert server.hub.stats()["replays_incomplete"] == 1


async def test_not_recovered_after_eviction_by_age(serve: ServeFn, connect: Connect) -> None:
    clock = FakeClock()
    server = await serve(hub=EventHub(users, buffer_max_age=60, clock=clock))
    await publish(server.hub, "alice", "old")
    position = (await server.hub.backend.replay("alice", None)).position
    clock.now += 30
    await publish(server.hub, "alice", "kept")
    clock.now += 31  # "old" is 61 s old, "kept" 31 s
    async with connect(server.ws_url(token="tok-alice", lastEventId="x"), V1) as ws:
        await recv(ws)  # an unknown id replays nothing
    first_id = position.rsplit(".", 1)[0] + ".0"
    async with connect(server.ws_url(token="tok-alice", lastEventId=first_id), V1) as ws:
        kept, ready = await recv_n(ws, 2)
    assert kept["payload"] == "kept"
    assert ready["payload"]["recovered"] is False and ready["payload"]["reason"] == "expired"
    async with connect(server.ws_url(token="tok-alice", lastEventId=position), V1) as ws:
        kept, ready = await recv_n(ws, 2)
    assert kept["payload"] == "kept" and ready["payload"]["recovered"] is True


async def test_resume_with_an_id_of_another_epoch(serve: ServeFn, connect: Connect) -> None:
    first = await serve()
    async with connect(first.ws_url(token="tok-alice")) as ws:
        await publish(first.hub, "alice", "before restart")
        old_id = (await recv(ws))["id"]
    await first.stop()
    second = await serve()  # a new server run: a new epoch
    await publish(second.hub, "alice", "after restart")
    async with connect(second.ws_url(token="tok-alice", lastEventId=old_id), V1) as ws:
        after, ready = await recv_n(ws, 2)
    assert after["payload"] == "after restart" and after["id"] != old_id
    assert ready["payload"]["recovered"] is False and ready["payload"]["reason"] == "epoch"
    assert ready["payload"]["replayed"] == 1


@pytest.mark.parametrize("subprotocols", [None, V1])
async def test_broadcast_racing_reconnects_has_no_gap_and_no_duplicate(
    serve: ServeFn, connect: Connect, subprotocols: list[str] | None
) -> None:
    total = 400
    server = await serve(hub=EventHub(users, buffer_size=total))
    received: list[int] = []
    last_id: str | None = None

    async def publisher() -> None:
        for n in range(total):
            await publish(server.hub, "alice", n)
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher)
            while len(received) < total:
                params = {"token": "tok-alice", "lastEventTs": "2000-01-01T00:00:00Z"}
                if last_id is not None:
                    params["lastEventId"] = last_id  # wins over lastEventTs
                async with connect(server.ws_url(**params), subprotocols) as ws:
                    for _ in range(37):  # leave mid-stream, at a different point each time
                        frame = await recv(ws)
                        if frame["type"] == "asgi_events.ready":
                            assert frame["payload"]["recovered"] is True
                            continue
                        received.append(frame["payload"])
                        last_id = frame["id"]
                        if len(received) == total:
                            break
    assert received == list(range(total))
    assert server.hub.stats()["reconnection_count"] >= total // 37
