"""Broadcast, fan-out, isolation and the wire shape, over a real server and real sockets."""

from __future__ import annotations

import json

import anyio
import anyio.lowlevel
import pytest
from httpx_ws import WebSocketDisconnect, WebSocketUpgradeError

from asgi_events import EventHub, InvalidEventError

from .support.server import Connect, ServeFn, assert_silent, close_code, recv, recv_n, users

JOB_TYPES = ["JOB_STARTED", "JOB_PROGRESS", "JOB_COMPLETED", "JOB_FAILED"]


async def test_token_by_query(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    async with connect(server.ws_url(token="tok-alice")) as ws:
        await server.hub.broadcast("alice", {"type": "T", "payload": 1})
        assert (await recv(ws))["payload"] == 1


async def test_token_by_bearer_header(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    async with connect(server.ws_url(), headers={"Authorization": "bearer tok-bob"}) as ws:
        await server.hub.broadcast("bob", {"type": "T", "payload": 2})
        assert (await recv(ws))["payload"] == 2


@pytest.mark.parametrize("params", [{}, {"token": "wrong"}, {"token": ""}])
async def test_refused_with_1008(serve: ServeFn, connect: Connect, params: dict[str, str]) -> None:
    server = await serve()
    async with connect(server.ws_url(**params)) as ws:
        assert await close_code(ws) == (1008, "Authentication failed")
    assert server.hub.stats()["auth_failures"] == 1


async def test_refused_client_with_subprotocol_gets_it_and_no_message(
    serve: ServeFn, connect: Connect
) -> None:
    server = await serve()
    async with connect(server.ws_url(token="bad"), subprotocols=["asgi-events.v1"]) as ws:
        assert ws.subprotocol == "asgi-events.v1"
        with pytest.raises(WebSocketDisconnect) as closed:
            await ws.receive(timeout=5)  # the first thing is the close, no message before it
        assert closed.value.code == 1008


async def test_wire_shape_of_a_buffered_event(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    async with connect(server.ws_url(token="tok-alice")) as ws:
        event = {"type": "JOB_COMPLETED", "payload": {"jobId": "j1", "n": [1, 2]}}
        await server.hub.broadcast("alice", event)
        text = await ws.receive_text(timeout=5)
    frame = json.loads(text)
    assert list(frame) == ["type", "payload", "timestamp", "id"]
    assert frame["type"] == "JOB_COMPLETED" and frame["payload"] == {"jobId": "j1", "n": [1, 2]}
    assert frame["timestamp"].endswith("Z") and isinstance(frame["id"], str)


async def test_given_timestamp_is_kept_and_transient_has_no_id(
    serve: ServeFn, connect: Connect
) -> None:
    server = await serve()
    async with connect(server.ws_url(token="tok-alice")) as ws:
        ts = "2020-05-05T05:05:05.000Z"
        event = {"type": "JOB_PROGRESS", "payload": 50, "timestamp": ts}
        await server.hub.broadcast("alice", event)
        assert await recv(ws) == {"type": "JOB_PROGRESS", "payload": 50, "timestamp": ts}


async def test_the_four_job_types_in_order(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    async with connect(server.ws_url(token="tok-alice")) as ws:
        for kind in JOB_TYPES:
            await server.hub.broadcast("alice", {"type": kind, "payload": {"jobId": "j"}})
        got = await recv_n(ws, 4)
    assert [e["type"] for e in got] == JOB_TYPES
    assert "id" not in got[1]  # JOB_PROGRESS is transient
    assert all("id" in e for e in (got[0], got[2], got[3]))


async def test_unknown_user_is_no_error_and_still_buffered(
    serve: ServeFn, connect: Connect
) -> None:
    server = await serve()
    await server.hub.broadcast("ghost", {"type": "JOB_STARTED", "payload": {}})
    assert server.hub.stats()["buffered_events"] == 1
    url = server.ws_url(token="tok-ghost", lastEventTs="2000-01-01T00:00:00Z")
    async with connect(url) as ws:
        assert (await recv(ws))["type"] == "JOB_STARTED"


async def test_isolation_and_several_sockets_per_user(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    async with (
        connect(server.ws_url(token="tok-alice")) as a1,
        connect(server.ws_url(token="tok-alice")) as a2,
        connect(server.ws_url(token="tok-bob")) as b,
    ):
        await server.hub.broadcast("alice", {"type": "T", "payload": "for alice"})
        await server.hub.broadcast("bob", {"type": "T", "payload": "for bob"})
        assert (await recv(a1))["payload"] == "for alice"
        assert (await recv(a2))["payload"] == "for alice"
        assert (await recv(b))["payload"] == "for bob"
        await assert_silent(a1)
        await assert_silent(b)
        stats = server.hub.stats()
        assert stats["connections_per_user"] == {"alice": 2, "bob": 1}


async def test_broadcast_to_all_is_not_buffered(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    async with (
        connect(server.ws_url(token="tok-alice")) as a,
        connect(server.ws_url(token="tok-bob")) as b,
    ):
        await server.hub.broadcast_to_all({"type": "NOTICE", "payload": "all"})
        for ws in (a, b):
            frame = await recv(ws)
            assert frame["payload"] == "all" and "id" not in frame
    assert server.hub.stats()["buffered_events"] == 0


async def test_invalid_events_raise_and_change_nothing(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    async with connect(server.ws_url(token="tok-alice")) as ws:
        for bad in ({"payload": 1}, {"type": "T", "payload": object()}, "T"):
            with pytest.raises(InvalidEventError):
                await server.hub.broadcast("alice", bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidEventError):
            await server.hub.broadcast_to_all({"type": "T", "payload": {1, 2}})
        await server.hub.broadcast("alice", {"type": "T", "payload": "ok"})
        assert (await recv(ws))["payload"] == "ok"
    assert server.hub.stats()["buffered_events"] == 1


async def test_ping_pong(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    async with connect(server.ws_url(token="tok-alice")) as ws:
        for _ in range(3):
            await ws.send_text("ping")
            assert await ws.receive_text(timeout=5) == "pong"


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_client_messages_reach_the_hook(serve: ServeFn, connect: Connect, kind: str) -> None:
    got: list[tuple[str, dict[str, object]]] = []
    arrived = anyio.Event()

    def sync_hook(user: str, message: dict[str, object]) -> None:
        got.append((user, message))
        if len(got) == 2:
            arrived.set()

    async def async_hook(user: str, message: dict[str, object]) -> None:
        await anyio.lowlevel.checkpoint()
        sync_hook(user, message)

    hook = sync_hook if kind == "sync" else async_hook
    server = await serve(hub=EventHub(users, on_client_message=hook))
    async with connect(server.ws_url(token="tok-alice")) as ws:
        for text in ("not json", "[1, 2]", '{"a": 1}', "\x00", '"str"', '{"b": [2]}'):
            await ws.send_text(text)
        await ws.send_bytes(b'{"c": 3}')
        with anyio.fail_after(5):
            await arrived.wait()
        await ws.send_text("ping")  # the socket is still fine
        assert await ws.receive_text(timeout=5) == "pong"
    assert got == [("alice", {"a": 1}), ("alice", {"b": [2]})]
    stats = server.hub.stats()
    assert stats["malformed_messages"] == 5 and stats["messages_received"] == 8


async def test_a_raising_hook_is_counted_not_fatal(serve: ServeFn, connect: Connect) -> None:
    def hook(user: str, message: dict[str, object]) -> None:
        raise RuntimeError("boom")

    server = await serve(hub=EventHub(users, on_client_message=hook))
    async with connect(server.ws_url(token="tok-alice")) as ws:
        await ws.send_text("{}")
        await ws.send_text("ping")
        assert await ws.receive_text(timeout=5) == "pong"
    assert server.hub.stats()["hook_errors"] == 1


async def test_stats(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    hub = server.hub
    async with (
        connect(server.ws_url(token="tok-alice")) as a1,
        connect(server.ws_url(token="tok-alice", lastEventId="x.0")) as a2,
        connect(server.ws_url(token="tok-bob")) as b,
    ):
        await hub.broadcast("alice", {"type": "T", "payload": 1})
        await hub.broadcast("bob", {"type": "JOB_PROGRESS", "payload": 1})
        await recv(a1), await recv(a2), await recv(b)
        await a1.send_text("{}")
        await a1.send_text("ping")
        await a1.receive_text(timeout=5)
        stats = hub.stats()
    assert stats["total_connections"] == 3
    assert stats["active_users"] == 2
    assert stats["connections_per_user"] == {"alice": 2, "bob": 1}
    assert stats["reconnection_count"] == 1
    assert stats["messages_sent"] == 4  # three events and one pong
    assert stats["messages_received"] == 2
    assert stats["buffered_events"] == 1 and stats["buffered_users"] == 1
    assert stats["events_published"] == 2
    assert stats["uptime"] >= 0
    json.dumps(stats)


async def test_other_scopes_pass_through(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    import httpx

    async with httpx.AsyncClient() as http:
        response = await http.get(server.url + "/anything")
    assert (response.status_code, response.text) == (200, "inner")
    with pytest.raises(WebSocketUpgradeError) as refused:  # http_app refuses other sockets
        async with connect(server.ws_url("/other", token="tok-alice")):
            pass  # pragma: no cover
    assert refused.value.response.status_code == 403
    assert server.hub.stats()["total_connections"] == 0


async def test_the_browser_client_is_served_next_to_the_socket(serve: ServeFn) -> None:
    import httpx

    server = await serve()
    async with httpx.AsyncClient(base_url=server.url) as http:
        script = await http.get("/ws/client.js")
        head = await http.head("/ws/client.js")
        post = await http.post("/ws/client.js")
        again = await http.get("/ws/client.js", headers={"If-None-Match": script.headers["etag"]})
    assert script.status_code == 200 and "export" in script.text
    assert again.status_code == 304 and again.content == b""
    assert script.headers["access-control-allow-origin"] == "*"
    assert script.headers["content-type"].startswith("text/javascript")
    assert head.status_code == 200 and head.content == b""
    assert post.status_code == 405


async def test_batch_subprotocol_sends_json_arrays(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    hub = server.hub
    await hub.broadcast("alice", {"type": "T", "payload": 0})
    url = server.ws_url(token="tok-alice", lastEventTs="2000-01-01")
    async with connect(url, ["asgi-events.v1", "asgi-events.v1.batch"]) as ws:
        assert ws.subprotocol == "asgi-events.v1.batch"
        first = json.loads(await ws.receive_text(timeout=5))  # the replay and ready, together
        assert [m["type"] for m in first] == ["T", "asgi_events.ready"]
        for n in range(1, 51):
            await hub.broadcast("alice", {"type": "T", "payload": n})
        got: list[int] = []
        frames = 0
        while len(got) < 50:
            batch = json.loads(await ws.receive_text(timeout=5))
            assert isinstance(batch, list) and batch
            got += [m["payload"] for m in batch]
            frames += 1
        assert got == list(range(1, 51))
        assert frames < 50  # queued together, sent together
        await ws.send_text("ping")
        assert await ws.receive_text(timeout=5) == "pong"  # the one plain frame
