"""The Python client against real hypercorn servers: resume, restart, close codes, backoff."""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from hypercorn.config import Config

from asgi_events import ConnectionInfo, EventHub, EventsMiddleware, Principal, history_app
from asgi_events.client import (
    AuthenticationError,
    EventsClient,
    EventsClientError,
    Gap,
    Item,
    RejectedError,
    RetriesExhaustedError,
    TokenExpiredError,
    backoff_delay,
)
from asgi_events.types import Message, Receive, Scope, Send

from .support.server import (
    QUIET,
    TIMEOUT,
    ServeFn,
    Server,
    http_app,
    run_server,
    signal_startup,
    users,
)

FAST: dict[str, Any] = {"initial_delay": 0.02, "max_delay": 0.1, "ping_interval": None}
PAD = "x" * 32768


async def until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` until it holds, within TIMEOUT."""
    with anyio.fail_after(TIMEOUT):
        while True:
            if predicate():
                return
            await anyio.sleep(0.01)


async def take(client: EventsClient, n: int = 1) -> list[Item]:
    """The client's next ``n`` items, within TIMEOUT."""
    with anyio.fail_after(TIMEOUT):
        return [await anext(client) for _ in range(n)]


def payloads(items: list[Item]) -> list[Any]:
    assert all(isinstance(item, dict) for item in items), items
    return [item["payload"] for item in items if isinstance(item, dict)]


@asynccontextmanager
async def serve_on(port: int, hub: EventHub, backend: str) -> AsyncIterator[Server]:
    """Like the ``serve`` fixture, but on a given port (to restart a server where it was)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    server = Server(port, hub)
    cfg = Config()
    cfg.bind = [f"fd://{sock.detach()}"]
    cfg.graceful_timeout = 0.2
    cfg.accesslog = cfg.errorlog = None
    app = signal_startup(EventsMiddleware(http_app, hub=hub), server.started)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_server, backend, app, cfg, server)
        with anyio.fail_after(TIMEOUT):
            await server.started.wait()
        try:
            yield server
        finally:
            await server.stop()


def scripted(*connections: list[Message]) -> tuple[Any, list[Scope]]:
    """An ASGI app whose n-th socket accepts with ``asgi-events.v1`` and sends the n-th list."""
    scopes: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return await http_app(scope, receive, send)
        scopes.append(scope)
        await receive()
        await send({"type": "websocket.accept", "subprotocol": "asgi-events.v1"})
        for message in connections[len(scopes) - 1]:
            await send(message)

    return app, scopes


def text(data: Any) -> Message:
    return {"type": "websocket.send", "text": data if isinstance(data, str) else json.dumps(data)}


def ready(position: str, **extra: Any) -> Message:
    payload = {"position": position, "recovered": True, "replayed": 0, **extra}
    return text({"type": "asgi_events.ready", "payload": payload})


def close(code: int, reason: str = "") -> Message:
    return {"type": "websocket.close", "code": code, "reason": reason}


@pytest.mark.parametrize("token_in", ["header", "query"])
async def test_receives_events_and_tracks_the_position(serve: ServeFn, token_in: Any) -> None:
    server = await serve()
    hub = server.hub
    assert hub is not None
    async with EventsClient(server.ws_url(), token="tok-alice", token_in=token_in, **FAST) as c:
        await until(lambda: hub.stats()["total_connections"] == 1)
        await hub.broadcast("alice", {"type": "JOB_STARTED", "payload": 1})
        await hub.broadcast("alice", {"type": "JOB_PROGRESS", "payload": 2})  # transient: no id
        await hub.broadcast("bob", {"type": "JOB_STARTED", "payload": "not alice's"})
        await hub.broadcast("alice", {"type": "JOB_COMPLETED", "payload": 3})
        events = [item for item in await take(c, 3) if isinstance(item, dict)]
        assert [event["payload"] for event in events] == [1, 2, 3]
        assert "id" not in events[1] and c.position == events[2]["id"]
    assert hub.stats()["auth_failures"] == 0


async def test_resumes_after_a_slow_consumer_close_with_no_loss_and_no_duplicate(
    serve: ServeFn,
) -> None:
    hub = EventHub(users, send_queue_size=16, buffer_size=5000)
    server = await serve(hub=hub)
    async with EventsClient(server.ws_url(), token="tok-alice", **FAST) as client:
        await until(lambda: hub.stats()["total_connections"] == 1)
        # The consumer does not iterate: the socket backs up until the server closes it.
        n = 0
        with anyio.fail_after(TIMEOUT):
            while not hub.stats()["slow_consumer_closes"]:
                await hub.broadcast("alice", {"type": "T", "payload": {"n": n, "pad": PAD}})
                await anyio.lowlevel.checkpoint()
                n += 1
                assert n < 4000, "the socket never backed up"
        for _ in range(5):  # while it is away
            await hub.broadcast("alice", {"type": "T", "payload": {"n": n, "pad": PAD}})
            n += 1
        got = [p["n"] for p in payloads(await take(client, n))]
        assert got == list(range(n))
        await hub.broadcast("alice", {"type": "T", "payload": {"n": n}})
        assert payloads(await take(client)) == [{"n": n}]  # the next one: nothing doubled
    stats = hub.stats()
    assert stats["slow_consumer_closes"] == 1 and stats["reconnection_count"] == 1
    assert stats["replays_incomplete"] == 0


async def test_survives_a_server_restart_and_reports_the_epoch_gap(
    serve: ServeFn, anyio_backend: str
) -> None:
    first = await serve(graceful_timeout=0.2)
    old_hub = first.hub
    assert old_hub is not None
    async with EventsClient(first.ws_url(), token="tok-alice", **FAST) as client:
        await until(lambda: old_hub.stats()["total_connections"] == 1)
        for n in range(3):
            await old_hub.broadcast("alice", {"type": "T", "payload": n})
        assert payloads(await take(client, 3)) == [0, 1, 2]
        old_position = client.position
        assert old_position is not None
        await first.stop()  # the client sees 1001, then refused connections, and retries

        hub = EventHub(users)
        async with serve_on(first.port, hub, anyio_backend):
            [gap] = await take(client)
            assert isinstance(gap, Gap) and gap.reason == "epoch"
            assert hub.stats()["reconnection_count"] == 1
            await hub.broadcast("alice", {"type": "T", "payload": 3})
            [event] = await take(client)
            assert isinstance(event, dict) and event["payload"] == 3
            assert client.position == event["id"]
            assert event["id"].split(".")[0] != old_position.split(".")[0]  # a new epoch


@pytest.mark.parametrize("refusal", ["close", "http"])
async def test_a_refused_token_stops_the_client_with_authentication_error(
    serve: ServeFn, refusal: Any
) -> None:
    server = await serve(hub=EventHub(users, refusal=refusal))
    with pytest.raises(AuthenticationError) as info:
        async with EventsClient(server.ws_url(), token="nope", **FAST) as client:
            await take(client)
    expected = (1008, "Authentication failed", None)
    if refusal == "http":
        expected = (None, "HTTP 401", 401)
    assert (info.value.code, info.value.reason, info.value.status) == expected
    assert server.hub is not None and server.hub.stats()["auth_failures"] == 1  # no retry


@pytest.mark.parametrize("refresher", ["none", "sync", "async", "refused"])
async def test_an_expired_token_is_refreshed_or_stops_the_client(
    serve: ServeFn, refresher: str
) -> None:
    def verify(token: str) -> Principal | None:
        if token == "short":
            return Principal("alice", expires_at=time.time() + 0.3)
        return Principal("alice") if token == "fresh" else None

    calls: list[str] = []

    def sync_refresh() -> str:
        calls.append("sync")
        return "fresh" if refresher == "sync" else "stale"

    async def async_refresh() -> str:
        calls.append("async")
        return "fresh"

    refreshers = {"none": None, "sync": sync_refresh, "async": async_refresh}
    hub = EventHub(verify)
    server = await serve(hub=hub)
    options: dict[str, Any] = {"token_refresher": refreshers.get(refresher, sync_refresh)}
    async with EventsClient(server.ws_url(), token="short", **FAST, **options) as client:
        await until(lambda: hub.stats()["total_connections"] == 1)
        await hub.broadcast("alice", {"type": "T", "payload": 0})
        assert payloads(await take(client)) == [0]
        if refresher == "none":
            with pytest.raises(TokenExpiredError) as expired:
                await take(client)
            assert (expired.value.code, expired.value.reason) == (4001, "Token expired")
        elif refresher == "refused":  # the fresh token is refused too: no loop
            with pytest.raises(AuthenticationError) as refused:
                await take(client)
            assert not isinstance(refused.value, TokenExpiredError)
            assert (refused.value.code, refused.value.reason) == (1008, "Authentication failed")
        else:
            await until(lambda: hub.stats()["reconnection_count"] == 1)
            await hub.broadcast("alice", {"type": "T", "payload": 1})
            assert payloads(await take(client)) == [1]
            assert calls == [refresher]
    assert len(calls) == (refresher != "none")


async def test_resumes_by_id_drops_duplicates_and_stops_on_1000(serve: ServeFn) -> None:
    e1, e2, e3 = ({"type": "T", "payload": n, "id": f"ep.{n}"} for n in (1, 2, 3))
    app, scopes = scripted(
        [text(e1), text(e2), ready("ep.2"), text("pong"), close(1012, "Service restart")],
        [
            text(e2),  # already yielded: dropped
            {"type": "websocket.send", "bytes": b"\x00"},  # not part of the protocol: ignored
            text("not json"),
            text(e3),
            ready("ep.9", recovered=False, reason="evicted", oldest="ep.5"),
            text({"type": "JOB_PROGRESS", "payload": 4}),
            close(1000),
        ],
    )
    server = await serve(app)
    got: list[Item] = []
    async with EventsClient(server.ws_url(), token="tok-alice", **FAST) as client:
        with anyio.fail_after(TIMEOUT):
            got = [item async for item in client]  # ends on 1000
        assert client.position == "ep.9"
    assert got[:3] == [e1, e2, e3] and got[3] == Gap("evicted", "ep.5")
    assert payloads(got[4:]) == [4]
    first, second = scopes
    assert (b"authorization", b"Bearer tok-alice") in first["headers"]
    assert "asgi-events.v1" in first["subprotocols"]
    assert b"lastEventId" not in first["query_string"]
    assert second["query_string"] == b"lastEventId=ep.2"


def progress_of(items: list[Item]) -> list[tuple[str, int, bool]]:
    """(jobId, percent, latest) of each JOB_PROGRESS item; none of them has an id."""
    found = []
    for item in items:
        assert isinstance(item, dict) and item["type"] == "JOB_PROGRESS" and "id" not in item
        found.append((item["payload"]["jobId"], item["payload"]["percent"], "latest" in item))
        assert item.get("latest", True) is True  # when there, it is true
    return found


async def test_latest_values_are_yielded_and_never_move_the_position(serve: ServeFn) -> None:
    hub = EventHub(users, latest_types={"JOB_PROGRESS": "payload.jobId"})
    server = await serve(hub=hub)
    first = await hub.broadcast("alice", {"type": "T", "payload": 0})
    for job, percent in (("a", 10), ("b", 5), ("a", 20)):  # a's 20 replaces its 10
        progress = {"type": "JOB_PROGRESS", "payload": {"jobId": job, "percent": percent}}
        assert await hub.broadcast("alice", progress) is None
    options: dict[str, Any] = {**FAST, "last_event_id": first}
    async with EventsClient(server.ws_url(), token="tok-alice", **options) as client:
        # After the (empty) replay, before the ready message: the latest value of each job.
        assert progress_of(await take(client, 2)) == [("b", 5, True), ("a", 20, True)]
        assert client.position == first
        live = {"type": "JOB_PROGRESS", "payload": {"jobId": "a", "percent": 30}}
        await hub.broadcast("alice", live)
        assert progress_of(await take(client)) == [("a", 30, False)]
        assert client.position == first
        second = await hub.broadcast("alice", {"type": "T", "payload": 1})
        [event] = await take(client)
        assert isinstance(event, dict) and event["id"] == second == client.position

        await hub.streams.lost()  # closes the socket with 1012: the client resumes by id
        assert progress_of(await take(client, 2)) == [("b", 5, True), ("a", 30, True)]
        assert client.position == second
        await hub.broadcast("alice", {"type": "T", "payload": 2})
        assert payloads(await take(client)) == [2]  # and nothing replayed twice before it
    assert hub.stats()["reconnection_count"] == 2  # both connections resumed by id


@pytest.mark.parametrize(
    ("code", "reason", "error"),
    [
        (4003, "Disconnected", None),  # hub.disconnect's default: a logout
        (1000, "", None),
        (1008, "Disconnected", RejectedError),
        (4400, "Banned", RejectedError),
    ],
)
async def test_hub_disconnect_stops_the_client_for_good_with_its_code(
    serve: ServeFn, code: int, reason: str, error: type[Exception] | None
) -> None:
    connections: list[ConnectionInfo] = []
    hub = EventHub(users, on_connect=connections.append)
    server = await serve(hub=hub)
    async with EventsClient(server.ws_url(), token="tok-alice", **FAST) as client:
        await until(lambda: len(connections) == 1)
        await hub.broadcast("alice", {"type": "T", "payload": 1})
        assert payloads(await take(client)) == [1]
        await hub.disconnect("alice", code=code, reason=reason)
        if error is None:
            with anyio.fail_after(TIMEOUT):
                rest = [item async for item in client]  # the iteration ends
            assert rest == []
        else:
            with pytest.raises(error) as info:
                await take(client)
            assert (info.value.code, info.value.reason) == (code, reason)
        assert (client.close_code, client.close_reason) == (code, reason)
        await anyio.sleep(QUIET)  # time enough for a reconnection (backoff <= 0.1 s): none
        assert len(connections) == 1 and await hub.presence("alice") == 0
    stats = hub.stats()
    assert stats["disconnects"] == 1 and stats["reconnection_count"] == 0


@pytest.mark.parametrize(
    ("code", "reason"), [(1008, "Too many connections"), (1009, "Message too big"), (4400, "")]
)
async def test_other_close_codes_stop_the_client(serve: ServeFn, code: int, reason: str) -> None:
    app, scopes = scripted([ready("ep.0"), close(code, reason)])
    server = await serve(app)
    with pytest.raises(RejectedError) as info:
        async with EventsClient(server.ws_url(), token="tok-alice", **FAST) as client:
            await take(client)
    assert (info.value.code, info.value.reason) == (code, reason) and len(scopes) == 1


async def test_gives_up_after_max_attempts() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    requests: list[httpx.Request] = []

    async def count(request: httpx.Request) -> None:
        requests.append(request)

    async with httpx.AsyncClient(event_hooks={"request": [count]}) as http:
        url = f"ws://127.0.0.1:{port}/ws"
        options: dict[str, Any] = {**FAST, "initial_delay": 0.001, "max_delay": 0.005}
        with pytest.raises(RetriesExhaustedError) as info:
            async with EventsClient(
                url, token="t", max_attempts=2, http_client=http, **options
            ) as client:
                await take(client)
    assert info.value.code == 1006 and len(requests) == 3  # the first try and two retries
    assert requests[0].url.scheme == "http"


async def test_pings_keep_an_idle_socket_open(serve: ServeFn) -> None:
    hub = EventHub(users, idle_timeout=0.2)
    server = await serve(hub=hub)
    options: dict[str, Any] = {**FAST, "ping_interval": 0.05}
    async with EventsClient(server.ws_url(), token="tok-alice", **options) as client:
        await until(lambda: hub.stats()["messages_received"] >= 8)  # twice the idle timeout
        await hub.broadcast("alice", {"type": "T", "payload": 1})
        assert payloads(await take(client)) == [1]  # and no "pong" among the items
    stats = hub.stats()
    assert stats["idle_closes"] == 0 and stats["reconnection_count"] == 0


def with_history(hub: EventHub) -> EventsMiddleware:
    """The middleware around an app that mounts ``history_app`` at /history."""
    history = history_app(hub)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/history":
            return await history(scope, receive, send)
        return await http_app(scope, receive, send)

    return EventsMiddleware(app, hub=hub)


async def test_history_reads_the_user_s_buffered_events_over_http(serve: ServeFn) -> None:
    hub = EventHub(users)
    server = await serve(with_history(hub), hub=hub)
    ids = [await hub.broadcast("alice", {"type": "T", "payload": n}) for n in range(3)]
    await hub.broadcast("alice", {"type": "JOB_PROGRESS", "payload": "transient"})
    await hub.broadcast("bob", {"type": "T", "payload": "not alice's"})
    client = EventsClient(server.ws_url(), token="tok-alice", history_url="/history", **FAST)
    page = await client.history()  # outside the block: no socket needed
    assert [event["id"] for event in page.events] == ids
    assert payloads(list(page.events)) == [0, 1, 2]
    assert (page.position, page.recovered, page.reason, page.oldest) == (ids[2], True, None, None)
    async with client:  # inside it, on the client's own HTTP client
        page = await client.history(after=ids[0], limit=1)  # the oldest ones first
        assert [event["id"] for event in page.events] == [ids[1]] and page.position == ids[2]
        unknown = await client.history(after="nope")
        assert (unknown.events, unknown.recovered, unknown.reason) == ((), False, "unknown")
        await until(lambda: hub.stats()["total_connections"] == 1)
        live = await hub.broadcast("alice", {"type": "T", "payload": 3})
        [event] = await take(client)  # the socket's items are its own, history or not
        assert isinstance(event, dict) and event["id"] == live == client.position
    requests: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        requests.append(request)

    async with httpx.AsyncClient(event_hooks={"request": [record]}) as http:
        url = f"{server.url}/history"
        absolute = EventsClient(
            server.ws_url(), token="tok-alice", token_in="query", http_client=http, history_url=url
        )
        page = await absolute.history(after=ids[1])
    assert [event["id"] for event in page.events] == [ids[2], live]
    [request] = requests  # the token as Bearer, never in the URL
    assert request.headers["authorization"] == "Bearer tok-alice"
    assert request.url.params == httpx.QueryParams({"after": ids[1]})


async def test_history_errors_carry_the_http_status(serve: ServeFn) -> None:
    hub = EventHub(users)
    server = await serve(with_history(hub), hub=hub)
    await hub.broadcast("alice", {"type": "T", "payload": 0})
    refused = EventsClient(server.ws_url(), token="stale", history_url="/history", **FAST)
    with pytest.raises(AuthenticationError) as auth:
        await refused.history()
    assert (auth.value.status, auth.value.code) == (401, None)
    assert auth.value.reason == "HTTP 401: Authentication failed"

    fresh: list[str] = []

    async def refresh() -> str:
        fresh.append("tok-alice")
        return "tok-alice"

    refreshed = EventsClient(
        server.ws_url(), token="stale", token_refresher=refresh, history_url="/history", **FAST
    )
    assert payloads(list((await refreshed.history()).events)) == [0] and len(fresh) == 1
    with pytest.raises(EventsClientError) as bad:
        await refreshed.history(limit=-1)
    assert bad.value.status == 400 and not isinstance(bad.value, AuthenticationError)
    assert bad.value.reason == "HTTP 400: limit must be a non-negative integer"
    nowhere = EventsClient(server.ws_url(), token="tok-alice", history_url="/nope", **FAST)
    with pytest.raises(EventsClientError) as missing:  # the inner app's "inner": no history
        await nowhere.history()
    assert missing.value.status == 200 and missing.value.reason == "HTTP 200: not a history"
    with pytest.raises(RuntimeError, match="history_url"):
        await EventsClient(server.ws_url(), token="tok-alice").history()
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}/history"
    with pytest.raises(EventsClientError) as unreachable:
        await EventsClient(server.ws_url(), token="tok-alice", history_url=down).history()
    assert unreachable.value.status is None and "ConnectError" in unreachable.value.reason
    assert len(fresh) == 1  # one refresh, kept: the 400 was asked with the fresh token


def test_backoff_is_exponential_with_full_jitter_and_bounded() -> None:
    rng = random.Random(6)
    for attempt in range(8):
        cap = min(1.0, 0.05 * 2**attempt)
        delays = [backoff_delay(attempt, 0.05, 1.0, rng) for _ in range(500)]
        assert all(0.0 <= d <= cap for d in delays)
        assert min(delays) < 0.05 * cap and max(delays) > 0.95 * cap  # spread over [0, cap]
        assert 0.4 * cap < sum(delays) / len(delays) < 0.6 * cap
        assert len(set(delays)) == len(delays)
    assert backoff_delay(10_000, 0.05, 1.0, rng) <= 1.0  # no overflow, still bounded
    again = [backoff_delay(3, 0.05, 1.0, random.Random(7)) for _ in range(2)]
    assert again[0] == again[1]  # reproducible with a seeded generator
