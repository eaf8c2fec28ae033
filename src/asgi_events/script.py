"""The browser client, served by the middleware over plain HTTP at ``<path>/client.js``."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from .types import Receive, Scope, Send


@cache
def _body() -> bytes:
    return (files("asgi_events") / "static" / "asgi-events.js").read_bytes()


async def serve_script(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer GET/HEAD with the JavaScript module, anything else with 405."""
    if scope["method"] not in ("GET", "HEAD"):
        headers = [(b"allow", b"GET, HEAD"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 405, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    body = _body()
    headers = [
        (b"content-type", b"text/javascript; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"public, max-age=3600"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
