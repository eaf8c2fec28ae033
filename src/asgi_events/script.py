"""The browser client, served by the middleware over plain HTTP at ``<path>/client.js``."""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.resources import files

from .types import Receive, Scope, Send


@cache
def _body() -> tuple[bytes, bytes]:
    body = (files("asgi_events") / "static" / "asgi-events.js").read_bytes()
    return body, f'"{hashlib.sha256(body).hexdigest()[:16]}"'.encode()


async def serve_script(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer GET/HEAD with the JavaScript module, anything else with 405."""
    if scope["method"] not in ("GET", "HEAD"):
        headers = [(b"allow", b"GET, HEAD"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 405, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    body, etag = _body()
    headers = [
        (b"content-type", b"text/javascript; charset=utf-8"),
        (b"cache-control", b"no-cache"),  # revalidated each time: cheap with the ETag
        (b"etag", etag),
        (b"access-control-allow-origin", b"*"),  # a module imported by a page of another origin
    ]
    if any(k == b"if-none-match" and etag in v for k, v in scope.get("headers", ())):
        await send({"type": "http.response.start", "status": 304, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
