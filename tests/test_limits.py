"""The hardening settings, each with its documented outcome, over a real server."""

from __future__ import annotations

import time

import pytest
from httpx_ws import WebSocketUpgradeError

from asgi_events import EventHub, EventsMiddleware, Principal

from .support.server import Connect, ServeFn, close_code, http_app, recv, recv_n, users

V1 = ["asgi-events.v1"]


async def test_an_oversized_message_is_closed_with_1009(serve: ServeFn, connect: Connect) -> None:
    server = await serve(hub=EventHub(users, max_message_size=1000))
    async with (
        connect(server.ws_url(token="tok-alice")) as big,
        connect(server.ws_url(token="tok-bob")) as other,
    ):
        await big.send_text('{"a": "' + "é" * 499 + '"}')  # 1,008 bytes in 506 characters
        assert await close_code(big) == (1009, "Message too big")
        await other.send_text("x" * 999)
        await other.send_text("ping")
        assert await other.receive_text(timeout=5) == "pong"
    stats = server.hub.stats()
    assert (stats["oversized_messages"], stats["malformed_messages"]) == (1, 1)


async def test_a_client_over_the_rate_limit_is_closed_with_1008(
    serve: ServeFn, connect: Connect
) -> None:
    server = await serve(hub=EventHub(users, rate_limit=(5, 0.001)))
    async with connect(server.ws_url(token="tok-alice")) as ws:
        for _ in range(5):
            await ws.send_text("ping")
        assert await ws.receive_text(timeout=5) == "pong"
        await ws.send_text("ping")  # the sixth within the burst
        assert await close_code(ws) == (1008, "Rate limit exceeded")
    assert server.hub.stats()["rate_limited"] == 1


async def test_too_many_sockets_close_the_oldest(serve: ServeFn, connect: Connect) -> None:
    server = await serve(hub=EventHub(users, max_connections_per_user=2))
    async with (
        connect(server.ws_url(token="tok-alice")) as first,
        connect(server.ws_url(token="tok-alice")) as second,
        connect(server.ws_url(token="tok-alice")) as third,
    ):
        assert await close_code(first) == (1008, "Too many connections")
        await server.hub.broadcast("alice", {"type": "T", "payload": 1})
        assert (await recv(second))["payload"] == (await recv(third))["payload"] == 1
        assert server.hub.stats()["connections_per_user"] == {"alice": 2}
    assert server.hub.stats()["connections_displaced"] == 1


async def test_an_idle_socket_is_closed_with_4002(serve: ServeFn, connect: Connect) -> None:
    server = await serve(hub=EventHub(users, idle_timeout=0.3))
    async with connect(server.ws_url(token="tok-alice")) as ws:
        assert await close_code(ws) == (4002, "Idle timeout")
    assert server.hub.stats()["idle_closes"] == 1


async def test_a_token_expiring_later_closes_the_socket_with_4001(
    serve: ServeFn, connect: Connect
) -> None:
    def verify(token: str) -> Principal | None:
        return Principal(token, expires_at=time.time() + 0.5)

    server = await serve(hub=EventHub(verify))
    async with connect(server.ws_url(token="alice")) as ws:
        await server.hub.broadcast("alice", {"type": "T", "payload": 1})
        assert (await recv(ws))["payload"] == 1
        assert await close_code(ws) == (4001, "Token expired")


async def test_an_expired_token_is_refused_with_4001(serve: ServeFn, connect: Connect) -> None:
    server = await serve(hub=EventHub(lambda token: Principal(token, expires_at=time.time() - 1)))
    async with connect(server.ws_url(token="alice")) as ws:
        assert await close_code(ws) == (4001, "Token expired")


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),  # not a browser
        ("https://app.example.com", True),
        ("https://APP.example.com:443", True),
        ("http://app.example.com", False),  # another scheme
        ("https://app.example.com:8443", False),  # another port
        ("https://evil.example.com", False),
        ("null", False),
    ],
)
async def test_allowed_origins(
    serve: ServeFn, connect: Connect, origin: str | None, allowed: bool
) -> None:
    hub = EventHub(users)
    app = EventsMiddleware(http_app, hub=hub, allowed_origins=["https://app.example.com"])
    server = await serve(app)
    headers = {"Origin": origin} if origin else {}
    if allowed:
        async with connect(server.ws_url(token="tok-alice"), headers=headers) as ws:
            await ws.send_text("ping")
            assert await ws.receive_text(timeout=5) == "pong"
    else:
        with pytest.raises(WebSocketUpgradeError) as refused:
            async with connect(server.ws_url(token="tok-alice"), headers=headers):
                pass  # pragma: no cover
        assert refused.value.response.status_code == 403
        assert hub.stats()["origin_refusals"] == 1


def test_allowed_origins_must_be_origins() -> None:
    with pytest.raises(ValueError):
        EventsMiddleware(http_app, hub=EventHub(users), allowed_origins=["example.com"])


@pytest.mark.parametrize(
    ("params", "status"), [({}, 401), ({"token": "wrong"}, 401), ({"token": "tok-x"}, None)]
)
async def test_refusal_in_the_handshake_with_http_401(
    serve: ServeFn, connect: Connect, params: dict[str, str], status: int | None
) -> None:
    server = await serve(hub=EventHub(users, refusal="http"))
    if status is None:
        async with connect(server.ws_url(**params)) as ws:
            await ws.send_text("ping")
            assert await ws.receive_text(timeout=5) == "pong"
        return
    with pytest.raises(WebSocketUpgradeError) as refused:
        async with connect(server.ws_url(**params)):
            pass  # pragma: no cover
    response = refused.value.response
    assert response.status_code == status
    assert response.headers["www-authenticate"] == "Bearer"


async def test_token_as_a_subprotocol_is_never_echoed(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    async with connect(server.ws_url(), ["asgi-events.v1", "asgi-events.token.tok-alice"]) as ws:
        assert ws.subprotocol == "asgi-events.v1"
        assert "tok-alice" not in str(ws.response.headers if ws.response else "")
        assert (await recv(ws))["type"] == "asgi_events.ready"
        await server.hub.broadcast("alice", {"type": "T", "payload": 1})
        assert (await recv(ws))["payload"] == 1


async def test_least_recently_used_buffers_are_evicted_and_resumes_say_so(
    serve: ServeFn, connect: Connect
) -> None:
    hub = EventHub(users, max_buffered_users=2)
    server = await serve(hub=hub)
    await hub.broadcast("alice", {"type": "T", "payload": "a1"})
    async with connect(server.ws_url(token="tok-alice"), V1) as ws:
        position = (await recv(ws))["payload"]["position"]
    await hub.broadcast("alice", {"type": "T", "payload": "a2"})  # missed by alice
    await hub.broadcast("bob", {"type": "T", "payload": "b"})
    await hub.broadcast("carol", {"type": "T", "payload": "c"})  # alice's buffer goes
    assert hub.stats()["buffered_users"] == 2
    async with connect(server.ws_url(token="tok-alice", lastEventId=position), V1) as ws:
        ready = await recv(ws)
    assert ready["payload"]["recovered"] is False
    assert ready["payload"]["reason"] == "evicted"
    assert ready["payload"]["oldest"] != position
    await hub.broadcast("alice", {"type": "T", "payload": "a3"})
    url = server.ws_url(token="tok-alice", lastEventId=ready["payload"]["oldest"])
    async with connect(url, V1) as ws:
        a3, ready = await recv_n(ws, 2)
    assert a3["payload"] == "a3" and ready["payload"]["recovered"] is True


@pytest.mark.parametrize(
    "bad",
    [
        {"send_queue_size": 0},
        {"max_message_size": 0},
        {"rate_limit": (0, 1)},
        {"max_connections_per_user": 0},
        {"refusal": "maybe"},
        {"max_buffered_users": 0},
        {"buffer_size": -1},
    ],
)
def test_invalid_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        EventHub(users, **bad)  # type: ignore[arg-type]
