"""EventsMiddleware: takes over WebSockets at one path; everything else goes to the inner app."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .connection import serve
from .lifespan import run_lifespan

if TYPE_CHECKING:
    from .hub import EventHub
    from .types import ASGIApp, Receive, Scope, Send


class EventsMiddleware:
    """Pure-ASGI middleware serving the hub's WebSockets at ``path``.

    :param app: the inner ASGI app; it gets every HTTP scope, every WebSocket on another path,
        and the lifespan messages (the hub runs between startup and shutdown).
    :param hub: the :class:`EventHub` these sockets belong to.
    :param path: the WebSocket path to take over, matched exactly against ``scope["path"]``.

    With Starlette: ``Middleware(EventsMiddleware, hub=hub)``.
    """

    def __init__(self, app: ASGIApp, *, hub: EventHub, path: str = "/ws") -> None:
        self.app = app
        self.hub = hub
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == self.path:
            await serve(self.hub, scope, receive, send)
        elif scope["type"] == "lifespan":
            await run_lifespan(self.app, self.hub, scope, receive, send)
        else:
            await self.app(scope, receive, send)
