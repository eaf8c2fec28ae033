"""The interop matrix's apps: one factory per framework, each mounting EventsMiddleware.

Every app has its own hub (``verify_token``: "tok-<user>" is <user>) and a route
``POST /publish?user=<user>&n=<n>`` written in the framework's own way, which broadcasts
``{"type": "INTEROP", "payload": {"n": <n>}}`` to <user>: the tests publish over HTTP, so a
server in another process is driven exactly like the in-process one.

In-process: ``build(name)`` returns ``(app, hub)``. A server subprocess imports
``tests.support.interop_apps:app`` (daphne takes no factory, so this is a module attribute, built on
first access from ``$INTEROP_APP``); it prints every lifespan message the app sends, to
stderr, as ``interop-lifespan: <type>``, for the test to check after the server stopped, and
answers ``GET /_probe?user=<user>`` (outside the framework: test instrumentation) with the hub's
presence of <user>, its open streams, and which ``asgi_events`` the server imported.
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import asgi_events
from asgi_events import EventHub, EventsMiddleware
from asgi_events.types import ASGIApp, Message, Receive, Scope, Send

APP_ENV = "INTEROP_APP"
LIFESPAN_MARK = "interop-lifespan: "
PROBE = "/_probe"


def verify_token(token: str) -> str | None:
    """Token "tok-<user>" is <user>; anything else is refused (as the tests' ``users``)."""
    return token.removeprefix("tok-") if token.startswith("tok-") else None


def event(n: str | int) -> dict[str, Any]:
    return {"type": "INTEROP", "payload": {"n": int(n)}}


# -- the apps --------------------------------------------------------------------------


def bare_app(hub: EventHub) -> ASGIApp:
    """A bare ASGI callable. It ignores lifespan (returns at once): the middleware completes
    the protocol for it."""

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        status, body = 404, b"not found"
        if scope["path"] == "/publish" and scope["method"] == "POST":
            query = parse_qs(scope["query_string"].decode())
            await hub.broadcast(query["user"][0], event(query["n"][0]))
            status, body = 200, b"sent"
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return EventsMiddleware(inner, hub=hub)


def starlette_app(hub: EventHub) -> ASGIApp:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def publish(request: Request) -> PlainTextResponse:
        query = request.query_params
        await hub.broadcast(query["user"], event(query["n"]))
        return PlainTextResponse("sent")

    return Starlette(
        routes=[Route("/publish", publish, methods=["POST"])],
        middleware=[Middleware(EventsMiddleware, hub=hub)],
    )


def fastapi_app(hub: EventHub) -> ASGIApp:
    from fastapi import FastAPI

    app = FastAPI()
    app.add_middleware(EventsMiddleware, hub=hub)

    @app.post("/publish")
    async def publish(user: str, n: int) -> str:
        await hub.broadcast(user, event(n))
        return "sent"

    return app


def litestar_app(hub: EventHub) -> ASGIApp:
    # Wrapped, not DefineMiddleware: Litestar runs its middleware only inside a matched route
    # handler (a WebSocket at /ws is closed with 4500 "Not Found" before it), and never for
    # lifespan, so the hub would not run either.
    from litestar import Litestar, Request, post

    @post("/publish", status_code=200)
    async def publish(request: Request) -> str:  # (inferred query parameters are deprecated)
        await hub.broadcast(request.query_params["user"], event(request.query_params["n"]))
        return "sent"

    return EventsMiddleware(Litestar(route_handlers=[publish]), hub=hub)


def quart_app(hub: EventHub) -> ASGIApp:
    from quart import Quart, request

    app = Quart(__name__)

    @app.post("/publish")
    async def publish() -> str:
        await hub.broadcast(request.args["user"], event(request.args["n"]))
        return "sent"

    app.asgi_app = EventsMiddleware(app.asgi_app, hub=hub)  # type: ignore[method-assign]
    return app


def django_app(hub: EventHub) -> ASGIApp:
    """Django's ASGI app, settings in code. It raises on a lifespan scope: the middleware
    completes the protocol for it."""
    from django.conf import settings
    from django.http import HttpRequest, HttpResponse
    from django.urls import path

    async def publish(request: HttpRequest) -> HttpResponse:
        if request.method != "POST":
            return HttpResponse(status=405)
        await hub.broadcast(request.GET["user"], event(request.GET["n"]))
        return HttpResponse("sent")

    # ROOT_URLCONF may be a module object: a fresh one per app (and hub).
    urls = types.ModuleType("interop_urls")
    urls.urlpatterns = [path("publish", publish)]  # type: ignore[attr-defined]
    if settings.configured:  # settings are per process; an earlier app configured them
        settings.ROOT_URLCONF = urls
    else:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="interop-tests",
            ALLOWED_HOSTS=["127.0.0.1", "localhost"],
            ROOT_URLCONF=urls,
            INSTALLED_APPS=[],
            MIDDLEWARE=[],
            DATABASES={},
        )
    from django.core.asgi import get_asgi_application

    return EventsMiddleware(get_asgi_application(), hub=hub)


FACTORIES: dict[str, Callable[[EventHub], ASGIApp]] = {
    "bare": bare_app,
    "starlette": starlette_app,
    "fastapi": fastapi_app,
    "litestar": litestar_app,
    "quart": quart_app,
    "django": django_app,
}


def build(name: str) -> tuple[ASGIApp, EventHub]:
    hub = EventHub(verify_token)
    return FACTORIES[name](hub), hub


def record_lifespan(app: ASGIApp, record: Callable[[str], None]) -> ASGIApp:
    """``app``, with ``record(type)`` called for each lifespan message it sends."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def recording_send(message: Message) -> None:
            await send(message)
            record(message["type"])

        await app(scope, receive, recording_send)

    return wrapper


# -- for server subprocesses -----------------------------------------------------------


def with_probe(app: ASGIApp, hub: EventHub) -> ASGIApp:
    """``app``, with ``GET /_probe?user=<user>`` answered first: a JSON object of the hub's
    ``presence`` of <user>, its ``total_connections``, and the ``module`` file of the
    ``asgi_events`` this process imported (the tests check it is the one they test)."""

    async def probed(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PROBE:
            await app(scope, receive, send)
            return
        user = parse_qs(scope["query_string"].decode()).get("user", [""])[0]
        answer = {
            "presence": await hub.presence(user),
            "total_connections": hub.stats()["total_connections"],
            "module": asgi_events.__file__,
        }
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    return probed


def _print_lifespan(kind: str) -> None:
    print(LIFESPAN_MARK + kind, file=sys.stderr, flush=True)


_served: ASGIApp | None = None


def __getattr__(name: str) -> Any:
    global _served
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _served is None:
        served, hub = build(os.environ[APP_ENV])
        _served = record_lifespan(with_probe(served, hub), _print_lifespan)
    return _served
