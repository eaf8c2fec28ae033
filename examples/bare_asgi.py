"""asgi-events in front of a bare ASGI app.

Run: hypercorn examples.bare_asgi:app
Watch: connect a WebSocket to ws://127.0.0.1:8000/ws?token=secret-alice
Push: curl -X POST 'http://127.0.0.1:8000/notify?user=alice'
"""

from __future__ import annotations

from urllib.parse import parse_qs

from asgi_events import EventHub, EventsMiddleware
from asgi_events.types import Receive, Scope, Send


def verify_token(token: str) -> str | None:
    """Toy auth: "secret-<user>" is <user>. Check a real token (a JWT, a session) here."""
    return token.removeprefix("secret-") if token.startswith("secret-") else None


hub = EventHub(verify_token)


async def inner(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    query = parse_qs(scope["query_string"].decode())
    status, body = 404, b"not found\n"
    if scope["path"] == "/notify" and "user" in query:
        await hub.broadcast(query["user"][0], {"type": "NOTICE", "payload": {"text": "hello"}})
        status, body = 200, b"sent\n"
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})


app = EventsMiddleware(inner, hub=hub)
