"""Lifespan forwarding: the inner app gets every lifespan message; the hub runs in between.

The hub is entered around the inner app's lifespan and shut down on ``lifespan.shutdown``
before the inner app hears of it (its sockets close while the app's resources still exist).
The server is told that shutdown is complete only once the hub has stopped as well (servers
cancel the lifespan task when they hear it); an inner app still running once it has answered
shutdown is cancelled then, as the server would have done.
An inner app without lifespan support (it raises before it takes ``lifespan.startup``, or
returns without answering it) gets the protocol completed on its behalf; one that takes
startup and then raises has failed to start, and the server is told so.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from .hub import EventHub
    from .types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("asgi_events")


async def run_lifespan(
    app: ASGIApp, hub: EventHub, scope: Scope, receive: Receive, send: Send
) -> None:
    got_startup = got_shutdown = answered_startup = False
    finished: Message | None = None  # the inner app's shutdown answer
    app_scope = anyio.CancelScope()

    async def receive_wrapper() -> Message:
        nonlocal got_startup, got_shutdown
        message = await receive()
        if message["type"] == "lifespan.startup":
            got_startup = True
        elif message["type"] == "lifespan.shutdown":
            await hub.shutdown()  # sockets close while the app's resources still exist
            got_shutdown = True
        return message

    async def send_wrapper(message: Message) -> None:
        nonlocal answered_startup, finished
        kind = message["type"]
        if kind in ("lifespan.startup.complete", "lifespan.startup.failed"):
            answered_startup = True
        elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            finished = message  # sent once the hub has stopped
            app_scope.cancel()  # (an app that goes on waiting must not hold the server up)
            return
        await send(message)

    try:
        async with hub:
            completed = False
            try:
                with app_scope:
                    await app(scope, receive_wrapper, send_wrapper)
            except Exception as exc:
                if answered_startup:
                    raise
                if got_startup:  # it took startup and then failed: that is a startup failure
                    logger.exception("the inner app failed during lifespan startup")
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    raise
                logger.info("the inner app does not support lifespan; asgi-events completes it")
            else:
                completed = answered_startup
            if not completed:
                if not got_startup:
                    await receive_wrapper()  # lifespan.startup
                await send({"type": "lifespan.startup.complete"})
                if not got_shutdown:
                    await receive_wrapper()  # lifespan.shutdown
                finished = {"type": "lifespan.shutdown.complete"}
    finally:  # (also when the inner app raises after its answer, as Starlette does)
        if finished is not None:
            await send(finished)
