"""Prometheus metrics read from the hub at scrape time."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry, generate_latest

from asgi_events import EventHub, EventsMiddleware
from asgi_events.metrics import instrument, metrics_app
from asgi_events.types import Receive, Scope, Send

from .support.server import Connect, ServeFn, close_code, recv, users


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics")


async def test_metrics_follow_the_hub(serve: ServeFn, connect: Connect) -> None:
    hub = EventHub(users)
    registry = CollectorRegistry()
    instrument(hub, registry)
    server = await serve(hub=hub)
    async with connect(server.ws_url(token="tok-alice")) as ws:
        await hub.broadcast("alice", {"type": "T", "payload": 1})
        await recv(ws)
        text = generate_latest(registry).decode()
        assert sample(text, "asgi_events_sockets") == 1
        assert sample(text, "asgi_events_users") == 1
    async with connect(server.ws_url(token="nope")) as ws:
        await close_code(ws)
    async with connect(server.ws_url()) as ws:
        await close_code(ws)
    text = generate_latest(registry).decode()
    assert sample(text, "asgi_events_events_published_total") == 1
    assert sample(text, "asgi_events_messages_sent_total") == 1
    assert sample(text, "asgi_events_buffered_events") == 1
    assert sample(text, 'asgi_events_refusals_total{reason="rejected"}') == 1
    assert sample(text, 'asgi_events_refusals_total{reason="missing_token"}') == 1
    assert sample(text, 'asgi_events_closes_total{code="1008"}') == 2
    assert sample(text, "asgi_events_broadcast_seconds_count") == 1
    assert sample(text, 'asgi_events_broadcast_seconds_bucket{le="+Inf"}') == 1
    assert sample(text, "asgi_events_disconnects_total") == 0


async def test_metrics_of_the_application_api(serve: ServeFn, connect: Connect) -> None:
    def fails(info: object) -> None:
        raise RuntimeError("a hook that raises")

    hub = EventHub(users, latest_types={"JOB_PROGRESS": "payload.jobId"}, on_connect=fails)
    registry = CollectorRegistry()
    instrument(hub, registry)
    server = await serve(hub=hub)
    await hub.broadcast("alice", {"type": "JOB_PROGRESS", "payload": {"jobId": "j"}})
    async with connect(server.ws_url(token="tok-alice")) as ws:
        assert (await recv(ws))["latest"] is True
        await hub.disconnect("alice")
        await close_code(ws)
    text = generate_latest(registry).decode()
    assert sample(text, "asgi_events_hook_errors_total") == 1
    assert sample(text, "asgi_events_disconnects_total") == 1
    assert sample(text, "asgi_events_latest_values") == 1


async def test_metrics_app_serves_the_text_format(serve: ServeFn) -> None:
    hub = EventHub(users)
    exposition = metrics_app(hub)

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            await exposition(scope, receive, send)

    server = await serve(EventsMiddleware(inner, hub=hub))
    async with httpx.AsyncClient() as http:
        response = await http.get(server.url + "/metrics")
    assert response.status_code == 200
    assert "asgi_events_sockets 0.0" in response.text
