"""Server-Sent Events over real servers: framing byte for byte, resume, refusals, every way a
stream ends, keepalives, and that other requests to the path still reach the inner app."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from asgi_events import EventHub, EventsMiddleware

from .support.server import TIMEOUT, Connect, ServeFn, close_code, http_app, recv, users
from .support.sse import SSE, open_events


@pytest.fixture
def sse() -> Any:
    return open_events


async def test_headers_and_framing_byte_for_byte(serve: ServeFn, sse: Any) -> None:
    server = await serve()
    hub = server.hub
    assert hub is not None
    first = await hub.broadcast("alice", {"type": "T", "payload": 1, "timestamp": "t1"})
    async with sse(f"{server.url}/ws", token="tok-alice", lastEventId=f"{first[:-1]}0") as s:
        assert s.status == 200
        assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert s.headers["cache-control"] == "no-cache"
        assert s.headers["x-accel-buffering"] == "no"
        retry = await s.block()
        assert retry.startswith(b"retry: ") and 1000 <= int(retry[7:]) <= 3000
        event = b'{"type":"T","payload":1,"timestamp":"t1","id":"%s"}' % first.encode()
        assert await s.block() == b"id: %s\ndata: %s" % (first.encode(), event)
        ready = b'{"type":"asgi_events.ready","payload":{"position":"%s","recovered":true,'
        ready += b'"replayed":1}}'
        assert await s.block() == b"event: asgi_events.ready\nid: %s\ndata: %s" % (
            first.encode(),
            ready % first.encode(),
        )
        await hub.broadcast("alice", {"type": "JOB_PROGRESS", "payload": 2, "timestamp": "t2"})
        assert await s.block() == b'data: {"type":"JOB_PROGRESS","payload":2,"timestamp":"t2"}'
        await hub.broadcast_to_all({"type": "ALL", "timestamp": "t3"})
        assert await s.block() == b'data: {"type":"ALL","timestamp":"t3"}'


async def test_last_event_id_wins_over_the_query(serve: ServeFn, sse: Any) -> None:
    server = await serve()
    hub = server.hub
    assert hub is not None
    ids = [await hub.broadcast("alice", {"type": "T", "payload": n}) for n in range(4)]
    url = f"{server.url}/ws"
    cases = [
        ({"last-event-id": ids[2]}, {"lastEventId": ids[0]}, [3]),
        ({}, {"lastEventId": ids[1], "lastEventTs": "2000-01-01T00:00:00Z"}, [2, 3]),
        ({}, {"lastEventTs": "2000-01-01T00:00:00Z"}, [0, 1, 2, 3]),
        ({}, {}, []),
    ]
    for headers, params, expected in cases:
        async with sse(url, headers, token="tok-alice", **params) as s:
            before, ready = await s.until_ready()
            assert [b["data"]["payload"] for b in before] == expected
            assert ready["id"] == ids[-1] == ready["data"]["payload"]["position"]
    async with sse(url, {"last-event-id": "garbage"}, token="tok-alice") as s:
        before, ready = await s.until_ready()
        assert before == [] and ready["data"]["payload"]["reason"] == "unknown"


async def test_final_refusals_are_http_statuses(serve: ServeFn, http: httpx.AsyncClient) -> None:
    hub = EventHub(users)
    server = await serve(EventsMiddleware(http_app, hub=hub, allowed_origins=["https://a.test"]))
    url = f"{server.url}/ws"
    for params in ({}, {"token": "wrong"}):
        refused = await http.get(url, params=params, headers=SSE)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    evil = await http.get(
        url, params={"token": "tok-a"}, headers={**SSE, "origin": "https://e.test"}
    )
    assert evil.status_code == 403
    assert hub.stats()["refusals"] == {"missing_token": 1, "rejected": 1, "origin": 1}


async def test_allowed_cross_origin_streams_get_cors_headers(serve: ServeFn, sse: Any) -> None:
    hub = EventHub(users)
    server = await serve(EventsMiddleware(http_app, hub=hub, allowed_origins=["https://a.test"]))
    async with sse(f"{server.url}/ws", {"origin": "https://a.test"}, token="tok-alice") as s:
        assert s.status == 200
        assert s.headers["access-control-allow-origin"] == "https://a.test"
        assert s.headers["access-control-allow-credentials"] == "true"
        assert "Origin" in s.headers["vary"]


async def test_other_requests_to_the_path_reach_the_inner_app(
    serve: ServeFn, http: httpx.AsyncClient
) -> None:
    server = await serve()
    url = f"{server.url}/ws"
    for method, headers in (
        ("GET", {}),
        ("GET", {"accept": "*/*"}),
        ("GET", {"accept": "text/html"}),
        ("POST", SSE),
        ("HEAD", SSE),
    ):
        answer = await http.request(method, url, headers=headers, params={"token": "tok-a"})
        assert answer.status_code == 200 and answer.text in ("inner", ""), (method, headers)
    accept = {"accept": "text/html;q=0.9, Text/Event-Stream ; q=1"}
    async with open_events(url, accept, token="tok-a") as s:
        assert s.headers["content-type"].startswith("text/event-stream")


async def test_the_server_says_why_it_ends_a_stream(serve: ServeFn, sse: Any) -> None:
    server = await serve()
    hub = server.hub
    assert hub is not None
    async with sse(f"{server.url}/ws", token="tok-alice") as s:
        await s.until_ready()
        await hub.disconnect("alice")
        assert await s.end() == {
            "event": "asgi_events.close",
            "data": {"code": 4003, "reason": "Disconnected"},
        }
    assert await hub.presence("alice") == 0
    async with sse(f"{server.url}/ws", token="tok-alice") as s:
        await s.until_ready()
        await hub.shutdown()
        assert (await s.end())["data"] == {"code": 1001, "reason": "Server shutdown"}
    async with sse(f"{server.url}/ws", token="tok-alice") as s:  # shut down: temporary
        assert s.status == 200
        assert (await s.end())["data"] == {"code": 1001, "reason": "Server shutdown"}


async def test_a_client_that_goes_away_is_detached(serve: ServeFn, sse: Any) -> None:
    left = anyio.Event()
    hub = EventHub(users, on_disconnect=lambda info, code: left.set())
    server = await serve(hub=hub)
    async with sse(f"{server.url}/ws", token="tok-alice") as s:
        await s.until_ready()
        assert await hub.presence("alice") == 1
    with anyio.fail_after(TIMEOUT):
        await left.wait()
    assert await hub.presence("alice") == 0 and hub.stats()["total_connections"] == 0


async def test_idle_streams_get_keepalive_comments(serve: ServeFn, sse: Any) -> None:
    server = await serve(hub=EventHub(users, sse_keepalive=0.05))
    async with sse(f"{server.url}/ws", token="tok-alice") as s:
        await s.until_ready()
        assert await s.block() == b": keepalive"


async def test_sse_streams_count_with_sockets(serve: ServeFn, sse: Any, connect: Connect) -> None:
    hub = EventHub(users, max_connections_per_user=1)
    server = await serve(hub=hub)
    async with connect(server.ws_url(token="tok-alice")) as ws:
        await hub.broadcast("alice", {"type": "HERE"})
        await recv(ws)
        async with sse(f"{server.url}/ws", token="tok-alice") as s:
            await s.until_ready()
            assert await close_code(ws) == (1008, "Too many connections")  # displaced
            await hub.broadcast("alice", {"type": "THERE"})
            assert (await s.fields())["data"]["type"] == "THERE"


async def test_a_bearer_token_and_authenticate_work_as_on_the_socket(
    serve: ServeFn, sse: Any
) -> None:
    server = await serve()
    async with sse(f"{server.url}/ws", {"authorization": "Bearer tok-alice"}) as s:
        assert s.status == 200
        await s.until_ready()

    def by_header(request: Any) -> str | None:
        return request.headers.get("x-user")

    hub = EventHub(authenticate=by_header)
    other = await serve(hub=hub)
    async with sse(f"{other.url}/ws", {"x-user": "bob"}) as s:
        await s.until_ready()
        await hub.broadcast("bob", {"type": "HI"})
        assert (await s.fields())["data"]["type"] == "HI"
    async with sse(f"{other.url}/ws") as s:
        assert s.status == 401
