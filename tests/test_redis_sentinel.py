"""A Sentinel-managed Redis: events and replay through it, and a failover under load."""

from __future__ import annotations

import secrets
from typing import Any

import anyio
import coredis
import pytest

from asgi_events import BackendUnavailableError, EventHub
from asgi_events.backends.redis import RedisBackend
from asgi_events.backends.redis.connect import parse_sentinel_url

from .support.redis_sentinel import SentinelSetup
from .support.server import Connect, ServeFn, Server, assert_silent, close_code, recv, recv_n, users
from .test_redis import V1, frames_until_closed, until_healthy


async def sentinel_nodes(
    serve: ServeFn, setup: SentinelSetup, n: int = 2, **hub: Any
) -> list[Server]:
    """``n`` servers, each with its own hub, on the sentinels' primary, under one prefix."""
    options = {"prefix": f"t-{secrets.token_hex(4)}", "timeout": 1.0, "max_backoff": 0.2}
    return [
        await serve(
            hub=EventHub(
                users, backend=RedisBackend(setup.url, sentinel=setup.service, **options), **hub
            )
        )
        for _ in range(n)
    ]


def test_the_url_names_the_sentinels() -> None:
    sentinels, options = parse_sentinel_url("redis://u:p%40ss@10.0.0.1,[::1]:26380,h:1/2")
    assert [(s.host, s.port) for s in sentinels] == [("10.0.0.1", 26379), ("::1", 26380), ("h", 1)]
    assert options == {"db": 2, "username": "u", "password": "p@ss"}
    assert parse_sentinel_url("redis://:secret@h")[1] == {"password": "secret"}
    for bad in ("rediss://h", "unix:///s.sock", "redis://h/x", "redis://h?db=1", "redis://h,:1"):
        with pytest.raises(ValueError):
            RedisBackend(bad, sentinel="mymaster")


async def test_events_and_replay_through_the_sentinels_primary(
    serve: ServeFn, connect: Connect, redis_sentinels: SentinelSetup
) -> None:
    a, b = await sentinel_nodes(serve, redis_sentinels)
    async with (
        connect(a.ws_url(token="tok-alice")) as on_a,
        connect(b.ws_url(token="tok-alice")) as on_b,
    ):
        for n in range(3):
            await b.hub.broadcast("alice", {"type": "T", "payload": n})
        got_a, got_b = await recv_n(on_a, 3), await recv_n(on_b, 3)
        assert got_a == got_b and [f["payload"] for f in got_a] == [0, 1, 2]
    async with connect(a.ws_url(token="tok-alice", lastEventId=got_a[0]["id"]), V1) as ws:
        one, two, ready = await recv_n(ws, 3)
        assert [one, two] == got_a[1:]
        assert ready["payload"] == {"position": two["id"], "recovered": True, "replayed": 2}
        await assert_silent(ws)
    backend = a.hub.backend
    assert isinstance(backend, RedisBackend)
    primary = redis_sentinels.primary.url  # where the sentinels sent it
    async with coredis.Redis.from_url(primary, decode_responses=True) as client:
        assert await client.xlen(backend.keys("alice").stream) == 3


async def test_a_failover_under_load(
    serve: ServeFn, connect: Connect, redis_sentinels: SentinelSetup
) -> None:
    """SIGKILL the primary while a client listens and a publisher runs: the sockets are closed
    with 1012, the nodes come back on the promoted replica, and a client resuming gets exactly
    what it missed, or is told it cannot (``recovered: false``)."""
    a, b = await sentinel_nodes(serve, redis_sentinels, buffer_size=10_000)
    acked: dict[int, str] = {}  # payload -> id, for every broadcast Redis acknowledged
    failed: list[int] = []  # and every one that failed (Redis may have taken some)
    back, stop = anyio.Event(), anyio.Event()

    async def publisher() -> None:
        n = 0
        while not stop.is_set():
            try:
                event_id = await b.hub.broadcast("alice", {"type": "T", "payload": n})
                assert event_id is not None
                acked[n] = event_id
                if failed and n - failed[-1] >= 2:
                    back.set()  # two in a row acknowledged by the new primary
            except BackendUnavailableError:
                failed.append(n)
                await anyio.sleep(0.01)  # (pacing only: Redis refuses at once)
            n += 1

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            async with connect(a.ws_url(token="tok-alice")) as ws:
                tg.start_soon(publisher)
                seen = await recv_n(ws, 3)
                redis_sentinels.kill_primary()
                more, code = await frames_until_closed(ws)
            assert code == (1012, "Service restart")
            seen += more
            backend = a.hub.stats()["backend"]
            assert backend["healthy"] is False and backend["interruptions"] == 1
            assert backend["last_error"]
            async with connect(a.ws_url(token="tok-alice")) as refused:
                assert await close_code(refused) == (1012, "Service restart")
            await anyio.to_thread.run_sync(redis_sentinels.wait_failover)  # (2.5-3 s)
            await until_healthy(a, b)
            await back.wait()
            stop.set()
    payloads = [f["payload"] for f in seen]
    assert payloads == sorted(payloads) and set(payloads) <= set(acked) | set(failed)
    last = seen[-1]
    missed = [n for n in sorted(acked) if n > last["payload"]]
    url = a.ws_url(token="tok-alice", lastEventId=last["id"])
    async with connect(url, V1) as resumed, connect(a.ws_url(token="tok-alice")) as fresh:
        frames = []
        while not frames or frames[-1]["type"] != "asgi_events.ready":
            frames.append(await recv(resumed))
        *replayed, ready = frames
        if ready["payload"]["recovered"]:
            # Exactly what it missed: every acknowledged event (and any whose reply was lost).
            got = [f["payload"] for f in replayed]
            assert [n for n in got if n in acked] == missed
            assert set(got) <= set(missed) | set(failed)
            assert [f["id"] for f in replayed if f["payload"] in acked] == [
                acked[n] for n in missed
            ]
        else:
            assert ready["payload"]["reason"] in ("unknown", "epoch")
        event_id = await a.hub.broadcast("alice", {"type": "T", "payload": "after"})
        assert (await recv(fresh))["id"] == event_id
        assert (await recv(resumed))["id"] == event_id
    for node in (a, b):
        assert node.hub.stats()["backend"]["healthy"] is True
        assert node.hub.stats()["backend"]["interruptions"] == 1


async def test_a_manual_failover_moves_the_nodes_at_once(
    serve: ServeFn, connect: Connect, redis_sentinels: SentinelSetup
) -> None:
    """``SENTINEL FAILOVER`` leaves the old primary up, and a primary to its clients until the
    sentinels demote it, some ten seconds later: the nodes leave it as soon as the sentinels
    name the new one (they ask every ``timeout``), not when it drops them."""
    a, b = await sentinel_nodes(serve, redis_sentinels)
    async with connect(a.ws_url(token="tok-alice")) as ws:
        await b.hub.broadcast("alice", {"type": "T", "payload": "before"})
        before = await recv(ws)
        redis_sentinels.failover()
        with anyio.fail_after(8):  # (about 2 s: promoted, then noticed within ``timeout``)
            assert await close_code(ws) == (1012, "Service restart")
        assert redis_sentinels.role(redis_sentinels.primary) == "master"  # not demoted yet
    await anyio.to_thread.run_sync(redis_sentinels.wait_failover)
    await until_healthy(a, b)
    url = a.ws_url(token="tok-alice", lastEventId=before["id"])
    async with connect(url, V1) as resumed:
        await b.hub.broadcast("alice", {"type": "T", "payload": "after"})
        ready, after = await recv_n(resumed, 2)
    assert ready["payload"]["recovered"] is True and after["payload"] == "after"
    backend = a.hub.backend
    assert isinstance(backend, RedisBackend)
    async with coredis.Redis.from_url(redis_sentinels.replica.url, decode_responses=True) as new:
        assert await new.xlen(backend.keys("alice").stream) == 2
