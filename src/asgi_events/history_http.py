"""``history_app``: the ASGI app that serves ``hub.history`` over HTTP to the user it is of."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import codec
from .auth import Authenticator, normalize_origin, parse_handshake, parse_origins
from .errors import BackendUnavailableError
from .hub import EventHub
from .protocol import Close
from .request import Authenticate, HandshakeRequest
from .types import ASGIApp, Receive, Scope, Send


def history_app(
    hub: EventHub,
    *,
    authenticate: Authenticate | None = None,
    allowed_origins: Iterable[str] | None = None,
) -> ASGIApp:
    """An ASGI app answering ``GET ?after=<id>&limit=<n>`` with the caller's ``hub.history``
    as JSON: ``{"events": [...], "position", "recovered", "reason", "oldest"}``.

    The caller is authenticated as a socket is: by the hub's ``verify_token`` (``?token=`` or
    ``Authorization: Bearer``) or ``authenticate``, or by ``authenticate`` given here. A
    refusal has the status of the socket's HTTP refusal (401 with ``WWW-Authenticate: Bearer``,
    500, 503), a cross-origin page not in ``allowed_origins`` gets 403, a ``limit`` that is
    not a non-negative integer 400, a method other than GET 405, an unreachable backend 503.
    Mount it where you like (``Mount("/events/history", history_app(hub))`` in Starlette).
    """
    origins = None if allowed_origins is None else parse_origins(allowed_origins)
    authenticator = Authenticator(authenticate=authenticate) if authenticate else None

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError("history_app serves HTTP requests only")
        if scope.get("method") != "GET":
            await _answer(send, 405, {"error": "method not allowed"}, [(b"allow", b"GET")])
            return
        handshake = parse_handshake(scope)
        origin = handshake.origin
        if origins is not None and origin is not None and normalize_origin(origin) not in origins:
            await _answer(send, 403, {"error": "origin not allowed"})
            return
        request = HandshakeRequest(scope, handshake.token, origin_checked=origins is not None)
        if authenticator is None:
            admitted = await hub.streams.admit(request)
        else:
            admitted = await authenticator(request, hub.streams.settings.verify_timeout)
        if isinstance(admitted, Close):
            await _refuse(send, admitted)
            return
        query = request.query
        try:
            limit = int(query["limit"]) if query.get("limit") else None
            if limit is not None and limit < 0:
                raise ValueError
        except ValueError:
            await _answer(send, 400, {"error": "limit must be a non-negative integer"})
            return
        try:
            found = await hub.history(admitted.user_id, query.get("after") or None, limit)
        except BackendUnavailableError:
            await _answer(send, 503, {"error": "backend unavailable"})
            return
        body = {
            "events": found.events,
            "position": found.position,
            "recovered": found.recovered,
            "reason": found.reason,
            "oldest": found.oldest,
        }
        await _answer(send, 200, body)

    return app


async def _refuse(send: Send, refusal: Close) -> None:
    headers = [(b"www-authenticate", b"Bearer")] if refusal.status == 401 else ()
    await _answer(send, refusal.status or 403, {"error": refusal.reason}, headers)


async def _answer(
    send: Send, status: int, body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    content = codec.encode(body).encode("utf-8")
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
        (b"cache-control", b"no-store"),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": content})
