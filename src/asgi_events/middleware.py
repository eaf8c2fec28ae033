"""EventsMiddleware: takes over WebSockets at one path; everything else goes to the inner app."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .auth import parse_origins
from .lifespan import run_lifespan
from .request import warn_about_cookies
from .script import serve_script
from .transports import sse, websocket

if TYPE_CHECKING:
    from .hub import EventHub
    from .types import ASGIApp, Receive, Scope, Send


class EventsMiddleware:
    """Pure-ASGI middleware serving the hub's WebSockets and Server-Sent Events at ``path``.

    :param app: the inner ASGI app; it gets every other HTTP request (an event stream is a
        ``GET`` of ``path`` whose ``Accept`` names ``text/event-stream``), every WebSocket on
        another path, and the lifespan messages (the hub runs between startup and shutdown).
    :param hub: the ``EventHub`` these sockets belong to.
    :param path: the path to take over, matched exactly against ``scope["path"]``;
        the browser client (a JavaScript module) is served at ``<path>/client.js``.
    :param allowed_origins: if given, the only ``scheme://host[:port]`` origins whose browser
        pages may open a socket (others get HTTP 403 in the handshake, against cross-site
        WebSocket hijacking); clients that send no Origin header (not browsers) are let in.
        Required in practice when the hub's ``authenticate`` reads cookies: without it, that
        is logged as an error at startup (when ``authenticate.reads_cookies`` says so) or at
        the first request whose cookies it reads.

    With Starlette: ``Middleware(EventsMiddleware, hub=hub)``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        hub: EventHub,
        path: str = "/ws",
        allowed_origins: Iterable[str] | None = None,
    ) -> None:
        self.app = app
        self.hub = hub
        self.path = path
        self.script_path = path.rstrip("/") + "/client.js"
        self.allowed_origins = None if allowed_origins is None else parse_origins(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == self.path:
            await websocket.serve(self.hub.streams, scope, receive, send, self.allowed_origins)
        elif scope["type"] == "lifespan":
            authenticator = self.hub.streams.authenticator
            if authenticator.reads_cookies and self.allowed_origins is None:
                warn_about_cookies()  # at startup: the first request would be late
            await run_lifespan(self.app, self.hub, scope, receive, send)
        elif scope["type"] == "http" and scope["path"] == self.path and sse.wants_events(scope):
            await sse.serve(self.hub.streams, scope, receive, send, self.allowed_origins)
        elif scope["type"] == "http" and scope["path"] == self.script_path:
            await serve_script(scope, receive, send)
        else:
            await self.app(scope, receive, send)
