"""Event streams beyond one HTTP/1.1 server: several on one HTTP/2 connection (hypercorn,
cleartext and TLS), and across two nodes on one real Redis. (The matrix of servers and
frameworks is tests/test_interop.py.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from asgi_events import EventHub, EventsMiddleware
from asgi_events.types import ASGIApp, Receive, Scope, Send

from .support.http2 import client_context, h2_connection, self_signed
from .support.redis_server import RedisServer
from .support.server import TIMEOUT, ServeFn, http_app, users
from .support.sse import open_events
from .test_redis import nodes


def recording(app: ASGIApp, seen: list[tuple[str, tuple[str, int]]]) -> ASGIApp:
    """``app``, noting each HTTP request's version and client address."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            seen.append((scope["http_version"], tuple(scope["client"])))
        await app(scope, receive, send)

    return wrapper


async def until(predicate: Callable[[], bool]) -> None:
    """Poll a state of the server (no event to wait on), within TIMEOUT."""
    with anyio.fail_after(TIMEOUT):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)


# -- HTTP/2: several streams on one connection ----------------------------------------------


@pytest.mark.parametrize("mode", ["h2c", "tls"])
async def test_several_streams_share_one_http2_connection(
    serve: ServeFn, mode: str, tmp_path: Path
) -> None:
    """h2c: HTTP/2 with prior knowledge over cleartext (hypercorn takes it on any plain
    listener); tls: HTTP/2 by ALPN, as browsers use it."""
    hub = EventHub(users)
    seen: list[tuple[str, tuple[str, int]]] = []
    config, context = {}, None
    if mode == "tls":
        certfile, keyfile = self_signed(tmp_path)
        config = {"certfile": str(certfile), "keyfile": str(keyfile)}
        context = client_context(certfile)
    server = await serve(recording(EventsMiddleware(http_app, hub=hub), seen), **config)
    names = ["alice", "alice", "bob", "carol"]
    async with h2_connection("127.0.0.1", server.port, context) as client:
        streams = [await client.open("/ws", token=f"tok-{name}") for name in names]
        for s in streams:
            assert s.status == 200
            assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
            await s.until_ready()
        # One connection: one client address, HTTP/2, four streams of it.
        assert [s.stream_id for s in streams] == [1, 3, 5, 7]
        assert seen == [("2", client.local_address)] * 4
        assert hub.stats()["connections_per_user"] == {"alice": 2, "bob": 1, "carol": 1}

        # Each gets its own user's events, and nothing else: then one event for all.
        for name in ("carol", "bob", "alice"):
            await hub.broadcast(name, {"type": "T", "payload": name})
        await hub.broadcast_to_all({"type": "ALL"})
        for s, name in zip(streams, names, strict=True):
            assert (await s.fields())["data"]["payload"] == name
            assert (await s.fields())["data"]["type"] == "ALL"

        # RST_STREAM on one stream: only that one is detached.
        await streams[0].cancel()
        await until(lambda: hub.stats()["total_connections"] == 3)
        assert hub.stats()["connections_per_user"] == {"alice": 1, "bob": 1, "carol": 1}
        for name in ("alice", "bob", "carol"):
            await hub.broadcast(name, {"type": "AFTER", "payload": name})
        for s, name in zip(streams[1:], names[1:], strict=True):
            data = (await s.fields())["data"]
            assert (data["type"], data["payload"]) == ("AFTER", name)
        assert not client.terminated and not any(s.reset_by_server for s in streams)
        assert len(seen) == 4  # the same connection all along: nothing new was opened
    # The connection goes: every stream on it is detached.
    await until(lambda: hub.stats()["total_connections"] == 0)
    assert await hub.presence("alice") == 0


# -- two nodes on one Redis ---------------------------------------------------------------


async def test_a_stream_gets_events_of_another_node_and_resumes_on_it(
    serve: ServeFn, redis_server: RedisServer
) -> None:
    one, two = await nodes(serve, redis_server)
    assert one.hub is not None and two.hub is not None

    def event(n: int) -> dict[str, Any]:
        return {"type": "T", "payload": n}

    async with open_events(f"{one.url}/ws", token="tok-alice") as s:
        await s.until_ready()
        await two.hub.broadcast("alice", event(1))  # published on the other node
        first = await s.fields()
        assert first["data"]["payload"] == 1 and first["id"] == first["data"]["id"]
        await one.hub.broadcast("alice", event(2))  # queued for it, never read: it drops
    await until(lambda: one.hub is not None and one.hub.stats()["total_connections"] == 0)
    await two.hub.broadcast("alice", event(3))  # while it is away, on either node
    await one.hub.broadcast("alice", event(4))

    async with open_events(f"{two.url}/ws", {"last-event-id": first["id"]}, token="tok-alice") as s:
        missed, ready = await s.until_ready()
        assert [m["data"]["payload"] for m in missed] == [2, 3, 4]
        assert [m["id"] for m in missed] == [m["data"]["id"] for m in missed]
        assert ready["id"] == missed[-1]["id"]
        assert ready["data"]["payload"] == {
            "position": missed[-1]["id"],
            "recovered": True,
            "replayed": 3,
        }
        await one.hub.broadcast("alice", event(5))  # live again, from the node it left
        assert (await s.fields())["data"]["payload"] == 5
    assert two.hub.stats()["reconnection_count"] == 1
