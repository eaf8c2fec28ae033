"""The application API over real servers: positions and the snapshot pattern, history and
``history_app``, disconnect, presence, latest-value events (one node; several: test_redis)."""

from __future__ import annotations

import json
import random
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from asgi_events import EventHub, EventsMiddleware, history_app
from asgi_events.types import Receive, Scope, Send

from .support.server import (
    TIMEOUT,
    Connect,
    ServeFn,
    assert_silent,
    close_code,
    recv,
    recv_n,
    users,
)

V1 = ["asgi-events.v1"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def lifespan(receive: Receive, send: Send) -> None:
    """An inner app's side of the lifespan protocol."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


# -- positions --------------------------------------------------------------------------


async def test_broadcast_returns_the_id_the_client_gets(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    hub = server.hub
    assert hub is not None
    async with connect(server.ws_url(token="tok-alice")) as ws:
        event_id = await hub.broadcast("alice", {"type": "T", "payload": 1})
        assert event_id is not None and (await recv(ws))["id"] == event_id
        assert await hub.broadcast("alice", {"type": "JOB_PROGRESS", "payload": 2}) is None
        assert "id" not in await recv(ws)
        assert await hub.broadcast_to_all({"type": "ALL"}) is None
        assert await hub.position("alice") == event_id
        assert await hub.position("nobody") == event_id.rpartition(".")[0] + ".0"


def snapshot_app(hub: EventHub, state: list[int]) -> Any:
    """The documented pattern: ``GET /snapshot`` reads the position first, then the state."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        position = await hub.position("alice")
        await anyio.lowlevel.checkpoint()  # (events may be published in between)
        body = json.dumps({"position": position, "state": list(state)}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


async def test_a_snapshot_then_resume_loses_and_doubles_nothing(
    serve: ServeFn, connect: Connect, http: httpx.AsyncClient
) -> None:
    """Events are published while snapshots are taken: whatever the moment, the client gets
    each event after the snapshot's position once, in order, and none is missing from both.
    (One published between the two reads is in the state *and* delivered: the client applies
    events idempotently, as the docs say.)"""
    hub, state = EventHub(users, buffer_size=1000), []
    server = await serve(EventsMiddleware(snapshot_app(hub, state), hub=hub))
    total = 300
    snapshots: list[dict[str, Any]] = []

    taken = anyio.Event()

    async def publish() -> None:
        nonlocal taken
        for n in range(total):
            state.append(n)  # the application changes its state, then tells the user
            await hub.broadcast("alice", {"type": "T", "payload": n})
            if n % 37 == 0:  # let a snapshot be taken mid-way, for sure
                with anyio.fail_after(TIMEOUT):
                    await taken.wait()
                taken = anyio.Event()
            elif random.random() < 0.3:
                await anyio.lowlevel.checkpoint()

    async def take() -> None:
        while len(state) < total:
            snapshots.append((await http.get(f"{server.url}/snapshot")).json())
            taken.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await publish()
    assert sum(0 < len(snapshot["state"]) < total for snapshot in snapshots) >= 8
    for snapshot in snapshots[:: max(1, len(snapshots) // 8)]:
        url = server.ws_url(token="tok-alice", lastEventId=snapshot["position"])
        async with connect(url, subprotocols=V1) as ws:
            frames = []
            with anyio.fail_after(TIMEOUT):
                while (frame := await recv(ws))["type"] != "asgi_events.ready":
                    frames.append(frame)
            assert frame["payload"]["recovered"] is True
        seen = [frame["payload"] for frame in frames]
        kept = snapshot["state"]
        assert kept == list(range(len(kept)))
        start = seen[0] if seen else total
        assert seen == list(range(start, total)) and start <= len(kept)


# -- history ----------------------------------------------------------------------------


async def test_history_pages_through_the_buffer(serve: ServeFn) -> None:
    server = await serve()
    hub = server.hub
    assert hub is not None
    ids = [await hub.broadcast("alice", {"type": "T", "payload": n}) for n in range(5)]
    await hub.broadcast("alice", {"type": "JOB_PROGRESS", "payload": "transient"})
    everything = await hub.history("alice")
    assert [e["payload"] for e in everything.events] == [0, 1, 2, 3, 4]
    assert [e["id"] for e in everything.events] == ids
    assert (everything.position, everything.recovered, everything.reason) == (ids[-1], True, None)
    page = await hub.history("alice", after=ids[1], limit=2)
    assert [e["payload"] for e in page.events] == [2, 3]
    assert [e["payload"] for e in (await hub.history("alice", after=ids[3])).events] == [4]
    assert (await hub.history("alice", after=ids[4])).events == ()
    assert (await hub.history("alice", limit=0)).events == ()
    with pytest.raises(ValueError):
        await hub.history("alice", limit=-1)


async def test_history_of_bad_points_and_unknown_users(serve: ServeFn) -> None:
    server = await serve()
    hub = server.hub
    assert hub is not None
    newest = await hub.broadcast("alice", {"type": "T"})
    assert newest is not None
    for bad in ("garbage", "", "x.y", newest.rpartition(".")[0] + ".999"):
        found = await hub.history("alice", after=bad)
        assert (found.events, found.recovered, found.reason) == ((), False, "unknown")
    foreign = await hub.history("alice", after="otherepoch.1")
    assert (foreign.recovered, foreign.reason, len(foreign.events)) == (False, "epoch", 1)
    nobody = await hub.history("nobody")
    assert (nobody.events, nobody.recovered) == ((), True)


def with_history(hub: EventHub, **options: Any) -> Any:
    """An inner app that mounts ``history_app`` at ``/history``."""
    endpoint = history_app(hub, **options)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["path"] == "/history":
            await endpoint(scope, receive, send)
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    return app


async def test_history_app_serves_the_callers_own_history(
    serve: ServeFn, http: httpx.AsyncClient
) -> None:
    hub = EventHub(users)
    server = await serve(EventsMiddleware(with_history(hub), hub=hub))
    ids = [await hub.broadcast("alice", {"type": "T", "payload": n}) for n in range(3)]
    await hub.broadcast("bob", {"type": "T", "payload": "bob's"})
    url = f"{server.url}/history"
    answer = await http.get(url, params={"token": "tok-alice", "after": ids[0]})
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert [e["payload"] for e in body["events"]] == [1, 2]
    assert body | {"events": None} == {
        "events": None,
        "position": ids[-1],
        "recovered": True,
        "reason": None,
        "oldest": None,
    }
    bearer = {"authorization": "Bearer tok-alice"}
    limited = await http.get(url, params={"limit": "1"}, headers=bearer)
    assert [e["payload"] for e in limited.json()["events"]] == [0]
    bad = await http.get(url, params={"token": "tok-alice", "after": "garbage"})
    assert (bad.json()["events"], bad.json()["reason"]) == ([], "unknown")


async def test_history_app_refusals(serve: ServeFn, http: httpx.AsyncClient) -> None:
    hub = EventHub(users)
    app = with_history(hub, allowed_origins=["https://app.example"])
    server = await serve(EventsMiddleware(app, hub=hub))
    url = f"{server.url}/history"
    for params in ({}, {"token": "wrong"}):
        refused = await http.get(url, params=params)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "events" not in refused.json()
    ok = {"token": "tok-alice"}
    for limit in ("-1", "x", "1.5"):
        assert (await http.get(url, params={**ok, "limit": limit})).status_code == 400
    posted = await http.post(url, params=ok)
    assert (posted.status_code, posted.headers["allow"]) == (405, "GET")
    evil = await http.get(url, params=ok, headers={"origin": "https://evil.example"})
    assert evil.status_code == 403
    mine = await http.get(url, params=ok, headers={"origin": "https://app.example"})
    assert mine.status_code == 200


# -- disconnect -------------------------------------------------------------------------


async def test_disconnect_closes_every_socket_of_the_user_only(
    serve: ServeFn, connect: Connect
) -> None:
    server = await serve()
    hub = server.hub
    assert hub is not None
    url = server.ws_url
    async with (
        connect(url(token="tok-alice")) as first,
        connect(url(token="tok-alice"), subprotocols=V1) as second,
        connect(url(token="tok-bob")) as bob,
    ):
        assert (await recv(second))["type"] == "asgi_events.ready"
        await hub.disconnect("alice")
        for ws in (first, second):
            assert await close_code(ws) == (4003, "Disconnected")
        await hub.broadcast("bob", {"type": "STILL"})
        assert (await recv(bob))["type"] == "STILL"
    stats = hub.stats()
    assert stats["disconnects"] == 2 and stats["closes"][4003] == 2
    await hub.disconnect("nobody")  # no error


async def test_disconnect_codes(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    hub = server.hub
    assert hub is not None
    for code, reason in ((4100, "Banned"), (1000, ""), (1008, "Password changed")):
        async with connect(server.ws_url(token="tok-alice")) as ws:
            await hub.broadcast("alice", {"type": "HERE"})
            await recv(ws)
            await hub.disconnect("alice", code=code, reason=reason)
            assert await close_code(ws) == (code, reason)
    for bad in (999, 1001, 1011, 3000, 3999, 5000):
        with pytest.raises(ValueError):
            await hub.disconnect("alice", code=bad)
    with pytest.raises(ValueError):
        await hub.disconnect("alice", reason="x" * 124)


async def test_disconnect_reaches_a_socket_being_admitted(serve: ServeFn, connect: Connect) -> None:
    """A socket whose token was checked before the disconnect, but which joins after it, is
    closed too: its credentials were revoked while it was admitted."""
    checking, release = anyio.Event(), anyio.Event()

    async def slow(token: str) -> str | None:
        if token == "tok-slow":
            checking.set()
            await release.wait()
            return "alice"
        return users(token)

    hub = EventHub(slow)
    server = await serve(hub=hub)
    codes: list[tuple[int, str]] = []

    async def open_slow() -> None:
        async with connect(server.ws_url(token="tok-slow")) as ws:
            codes.append(await close_code(ws))

    async with anyio.create_task_group() as tg:
        tg.start_soon(open_slow)
        with anyio.fail_after(TIMEOUT):
            await checking.wait()
        await hub.disconnect("alice")
        release.set()
    assert codes == [(4003, "Disconnected")]
    async with connect(server.ws_url(token="tok-alice")) as later:  # a new login is fine
        await hub.broadcast("alice", {"type": "AGAIN"})
        assert (await recv(later))["type"] == "AGAIN"


# -- presence ---------------------------------------------------------------------------


async def test_presence_and_online_follow_the_sockets(serve: ServeFn, connect: Connect) -> None:
    left = [anyio.Event(), anyio.Event()]
    hub = EventHub(users, on_disconnect=lambda info, code: left.pop(0).set())
    server = await serve(hub=hub)
    assert await hub.presence("alice") == 0 and await hub.online(["alice", "bob"]) == set()
    url = server.ws_url
    first, second = left
    async with connect(url(token="tok-alice"), subprotocols=V1) as a1:
        await recv(a1)  # ready: it is counted
        assert await hub.presence("alice") == 1
        async with connect(url(token="tok-alice"), subprotocols=V1) as a2:
            await recv(a2)
            assert await hub.presence("alice") == 2
            assert await hub.online(["alice", "bob", "carol", "alice"]) == {"alice"}
        with anyio.fail_after(TIMEOUT):
            await first.wait()  # (on_disconnect runs once it no longer counts)
        assert await hub.presence("alice") == 1
    with anyio.fail_after(TIMEOUT):
        await second.wait()
    assert await hub.presence("alice") == 0 and await hub.online(["alice"]) == set()


# -- latest values ----------------------------------------------------------------------


def progress(job: str | None, percent: int) -> dict[str, Any]:
    payload: dict[str, Any] = {"percent": percent}
    if job is not None:
        payload["jobId"] = job
    return {"type": "JOB_PROGRESS", "payload": payload}


async def test_latest_values_come_after_the_replay_and_before_ready(
    serve: ServeFn, connect: Connect
) -> None:
    hub = EventHub(users, latest_types={"JOB_PROGRESS": "payload.jobId"})
    server = await serve(hub=hub)
    first = await hub.broadcast("alice", {"type": "T", "payload": "before"})
    for job, percent in (("j1", 10), ("j2", 5), ("j1", 50)):
        assert await hub.broadcast("alice", progress(job, percent)) is None
    await hub.broadcast("alice", {"type": "T", "payload": "after"})
    await hub.broadcast("bob", progress("j1", 99))
    url = server.ws_url(token="tok-alice", lastEventId=first or "")
    async with connect(url, subprotocols=V1) as ws:
        replayed, j2, j1, ready = await recv_n(ws, 4)
        assert replayed["payload"] == "after"
        assert j2 == {**progress("j2", 5), "timestamp": j2["timestamp"], "latest": True}
        assert (j1["payload"], j1["latest"]) == ({"jobId": "j1", "percent": 50}, True)
        assert "id" not in j1 and "id" not in j2
        assert ready["type"] == "asgi_events.ready" and ready["payload"]["replayed"] == 1
        await hub.broadcast("alice", progress("j1", 60))
        live = await recv(ws)
        assert live["payload"]["percent"] == 60 and "latest" not in live
    # A plain client (no subprotocol, no resume) gets the values too, then live events.
    async with connect(server.ws_url(token="tok-alice")) as plain:
        values = await recv_n(plain, 2)
        assert [(v["payload"]["jobId"], v["payload"]["percent"]) for v in values] == [
            ("j2", 5),
            ("j1", 60),
        ]
        await assert_silent(plain)
    assert [e["type"] for e in (await hub.history("alice")).events] == ["T", "T"]
    assert hub.stats()["latest_values"] == 3  # alice's j1 and j2, bob's j1


async def test_latest_values_expire_and_a_missing_key_is_one_slot(
    serve: ServeFn, connect: Connect
) -> None:
    clock = FakeClock()
    hub = EventHub(
        users, latest_types={"JOB_PROGRESS": "payload.jobId"}, buffer_max_age=60, clock=clock
    )
    server = await serve(hub=hub)
    await hub.broadcast("alice", progress("old", 1))
    clock.now += 30
    await hub.broadcast("alice", progress(None, 2))
    await hub.broadcast("alice", progress(None, 3))  # the same slot: the key is None
    clock.now += 31  # "old" is 61 s old
    async with connect(server.ws_url(token="tok-alice"), subprotocols=V1) as ws:
        value, ready = await recv_n(ws, 2)
        assert value["payload"] == {"percent": 3} and value["latest"] is True
        assert ready["type"] == "asgi_events.ready"
