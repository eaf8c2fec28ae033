from __future__ import annotations

from asgi_events import EventHub

from .support.server import Connect, ServeFn, recv


async def test_smoke(serve: ServeFn, connect: Connect) -> None:
    server = await serve()
    assert isinstance(server.hub, EventHub)
    async with connect(server.ws_url(token="tok-alice")) as ws:
        await ws.send_text("ping")
        assert await ws.receive_text(timeout=5) == "pong"
        await server.hub.broadcast("alice", {"type": "JOB_STARTED", "payload": {"id": 1}})
        event = await recv(ws)
        assert event["type"] == "JOB_STARTED"
