"""The Server-Sent Events transport: one ``GET`` with ``Accept: text/event-stream`` at the hub's
path, from the request to the end of its response.

The same core as the WebSocket (``streams.py``): admission, the registry, the replay and the
atomic handoff, fan-out, the senders and the slow-consumer policy. What differs is framing
(``SSEWire``: ``id:``/``data:`` lines, control messages as named events, everything queued in
one body chunk) and how a stream ends: there is no closing handshake, so the server says why in
an ``asgi_events.close`` event and ends the response; a final refusal is an HTTP status, since
``EventSource`` gives up on any answer but 200 and reconnects after anything else.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from typing import Any

import anyio

from .. import codec, protocol
from ..auth import normalize_origin, parse_handshake
from ..protocol import Close, ResumePoint
from ..request import HandshakeRequest
from ..stream import State, Stream
from ..streams import Streams
from ..types import Message, Receive, Scope, Send
from ..wire import DurableMessage, TransientMessage
from . import lifecycle

logger = logging.getLogger("asgi_events")

CLOSE_EVENT = "asgi_events.close"  # why the server ends a stream: {"code", "reason"}
RETRY_MS = (1000, 3000)  # the reconnection delay each stream is told, jittered in this range
FINAL_STATUSES = (401, 403)  # refusals a browser must not retry: an HTTP error status


def wants_events(scope: Scope) -> bool:
    """Whether an HTTP request asks for an event stream: ``GET`` whose ``Accept`` names
    ``text/event-stream`` (``*/*`` does not: a page or a probe gets the inner app)."""
    if scope.get("method") != "GET":
        return False
    for name, value in scope.get("headers", ()):
        if name.lower() == b"accept":
            types = (item.split(b";")[0].strip().lower() for item in value.split(b","))
            if b"text/event-stream" in types:
                return True
    return False


class SSEWire:
    """ASGI ``http.response.body`` chunks in the ``text/event-stream`` format (see ``Wire``)."""

    closing_handshake = False

    def __init__(self) -> None:
        self.keepalive: Message = _body(b": keepalive\n\n")

    def event(self, text: str, event_id: str | None, key: Any, transient: bool) -> Message:
        # Only buffered events carry an id: the browser's last event id then stays right.
        frame = f"id: {event_id}\ndata: {text}\n\n" if event_id else f"data: {text}\n\n"
        body = frame.encode()
        if key is not None:
            message = DurableMessage(type="http.response.body", body=body, more_body=True)
            message.key = key
            return message
        if transient:
            return TransientMessage(type="http.response.body", body=body, more_body=True)
        return _body(body)

    def control(self, kind: str, text: str, event_id: str | None = None) -> Message:
        resume = f"id: {event_id}\n" if event_id else ""
        return _body(f"event: {kind}\n{resume}data: {text}\n\n".encode())

    def close(self, code: int, reason: str) -> Message:
        text = codec.encode({"code": code, "reason": reason})
        frame = f"event: {CLOSE_EVENT}\ndata: {text}\n\n".encode()
        return {"type": "http.response.body", "body": frame, "more_body": False}

    def batch(self, queue: deque[Message], limit: int) -> tuple[Message, int, int]:
        if len(queue) == 1:  # (steady traffic) the shared message itself: no copy per stream
            message = queue.popleft()
            return message, 1, int(type(message) is DurableMessage)
        chunks: list[bytes] = []
        size = durable = 0
        while queue and size < limit:
            message = queue.popleft()
            if type(message) is DurableMessage:
                durable += 1
            chunks.append(message["body"])
            size += len(chunks[-1])
        return _body(b"".join(chunks)), len(chunks), durable


def _body(data: bytes) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": True}


WIRE = SSEWire()


async def serve(
    streams: Streams,
    scope: Scope,
    receive: Receive,
    send: Send,
    allowed_origins: frozenset[str] | None = None,
) -> None:
    """Run one event stream, from the request to the end of its response."""
    handshake = parse_handshake(scope)
    origin = handshake.origin
    cors: list[tuple[bytes, bytes]] = []
    if allowed_origins is not None and origin is not None:
        if normalize_origin(origin) not in allowed_origins:
            streams.counters.refused(protocol.ORIGIN_REFUSED)
            await _refuse(send, protocol.ORIGIN_REFUSED, cors)
            return
        cors = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-credentials", b"true"),
            (b"vary", b"Origin"),
        ]
    started = anyio.current_time()
    request = HandshakeRequest(scope, handshake.token, origin_checked=allowed_origins is not None)
    admitted = await streams.admit(request)
    if isinstance(admitted, Close):
        await _refuse(send, admitted, cors)
        if admitted.status not in FINAL_STATUSES:
            streams.counters.count(streams.counters.closes, admitted.code)
        return
    # EventSource sends Last-Event-ID when it reconnects: it wins over the query's points.
    last_id = request.headers.get("last-event-id") or handshake.last_event_id
    stream = streams.create(
        admitted,
        WIRE,
        send,
        resume=ResumePoint.parse(last_id, handshake.last_event_ts),
        control=True,
        batch=True,
        transport="sse",
        client=request.client,
        admitted_at=started,
    )
    await lifecycle.run(
        streams,
        stream,
        send,
        lambda: _start(send, cors),
        lambda: _read(stream, receive, streams.settings.sse_keepalive),
    )


async def _start(send: Send, cors: list[tuple[bytes, bytes]]) -> None:
    headers = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
        *cors,
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    # A jittered reconnection delay, so that a restart does not bring every browser back at once.
    retry = f"retry: {random.randint(*RETRY_MS)}\n\n"
    await send(_body(retry.encode()))


async def _refuse(send: Send, refusal: Close, cors: list[tuple[bytes, bytes]]) -> None:
    if refusal.status in FINAL_STATUSES:  # EventSource stops for good on an error status
        headers = [(b"content-type", b"text/plain; charset=utf-8"), *cors]
        if refusal.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": refusal.reason.encode()})
        return
    # Temporary (shutdown, backend, auth error or timeout): say why; the browser comes back.
    await _start(send, cors)
    await send(WIRE.close(refusal.code, refusal.reason))


async def _read(stream: Stream, receive: Receive, keepalive: float) -> None:
    """Wait for the client to go (``http.disconnect``); a comment every ``keepalive`` seconds
    keeps proxies from cutting an idle stream, and finds a dead peer."""
    while True:
        with anyio.move_on_after(keepalive) as idle:
            message = await receive()
        if idle.cancelled_caught:
            if stream.state is State.OPEN:
                stream.outbox.push(WIRE.keepalive)
            continue
        if message["type"] == "http.disconnect":
            if stream.code is None:
                stream.code = protocol.NO_STATUS.code
            return
