"""Each example app serves for real and delivers an event pushed through its own hub."""

from __future__ import annotations

import importlib

import pytest

from asgi_events import EventHub
from examples import demo

from .support.server import Connect, ServeFn, recv


@pytest.mark.parametrize(
    ("module", "token"),
    [
        ("examples.bare_asgi", "secret-alice"),
        ("examples.starlette_app", "secret-alice"),
        ("examples.fastapi_app", "secret-alice"),
        ("examples.demo", "demo-alice"),
    ],
)
async def test_example_delivers_an_event(
    serve: ServeFn, connect: Connect, module: str, token: str
) -> None:
    example = importlib.import_module(module)
    hub: EventHub = example.hub
    server = await serve(example.app)
    async with connect(server.ws_url(token=token)) as ws:
        await hub.broadcast("alice", {"type": "EXAMPLE", "payload": module})
        while (frame := await recv(ws))["type"] != "EXAMPLE":  # the demo sends its own jobs
            pass
        assert frame["payload"] == module


async def test_the_demo_gives_a_client_connecting_mid_job_the_latest_progress(
    serve: ServeFn, connect: Connect
) -> None:
    server = await serve(demo.app)
    url = server.ws_url(token="demo-alice")
    async with connect(url) as watching:  # the demo's own jobs: wait for some progress
        while (seen := await recv(watching))["type"] != "JOB_PROGRESS":
            pass
    job, percent = seen["payload"]["jobId"], seen["payload"]["percent"]
    async with connect(url, subprotocols=["asgi-events.v1"]) as late:
        before_ready = []
        while (message := await recv(late))["type"] != "asgi_events.ready":
            before_ready.append(message)
    # No replay (no lastEventId): only the latest values, each job's newest progress.
    assert before_ready and all(
        m["type"] == "JOB_PROGRESS" and m["latest"] is True and "id" not in m for m in before_ready
    )
    latest = {m["payload"]["jobId"]: m["payload"]["percent"] for m in before_ready}
    assert latest[job] >= percent  # the progress seen live, or a newer one
