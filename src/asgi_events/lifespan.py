"""Lifespan forwarding: the inner app gets every lifespan message; the hub runs in between.

The hub is entered around the inner app's lifespan and shut down on ``lifespan.shutdown``
before the inner app hears of it (its sockets close while the app's resources still exist).
An inner app without lifespan support (it raises or returns before ``startup.complete``) gets
the protocol completed on its behalf, as uvicorn and hypercorn treat such apps.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .hub import EventHub
    from .types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("asgi_events")


async def run_lifespan(
    app: ASGIApp, hub: EventHub, scope: Scope, receive: Receive, send: Send
) -> None:
    received: list[str] = []
    sent: list[str] = []

    async def receive_wrapper() -> Message:
        message = await receive()
        if message["type"] == "lifespan.shutdown":
            await hub.shutdown()
        received.append(message["type"])
        return message

    async def send_wrapper(message: Message) -> None:
        sent.append(message["type"])
        await send(message)

    async with hub:
        try:
            await app(scope, receive_wrapper, send_wrapper)
        except Exception:
            if "lifespan.startup.complete" in sent or "lifespan.startup.failed" in sent:
                raise
            logger.info("the inner app does not support lifespan; asgi-events completes it")
        else:
            if "lifespan.startup.complete" in sent or "lifespan.startup.failed" in sent:
                return
        if "lifespan.startup" not in received:
            await receive()  # lifespan.startup
        await send({"type": "lifespan.startup.complete"})
        if "lifespan.shutdown" not in received:
            await receive_wrapper()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})
