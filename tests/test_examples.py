"""Each example app serves for real and delivers an event pushed through its own hub."""

from __future__ import annotations

import importlib

import pytest

from asgi_events import EventHub

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
