"""The WebSocket transport: one ASGI WebSocket from ``websocket.connect`` to its end.

The handshake, refusals (a close code, or an HTTP status with ``refusal="http"``), the reader
(limits, ping/pong, client messages) and the socket's messages (``WebSocketWire``). What the
socket receives, and when, is the core's business (``streams.py``).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

import anyio

from .. import codec, protocol
from ..auth import Handshake, normalize_origin, parse_handshake
from ..limits import TokenBucket
from ..protocol import BATCH_SUBPROTOCOL, Close
from ..request import HandshakeRequest
from ..stream import State, Stream
from ..streams import Streams
from ..types import Message, Receive, Scope, Send
from ..wire import DurableMessage, TransientMessage
from . import lifecycle

logger = logging.getLogger("asgi_events")


class WebSocketWire:
    """ASGI ``websocket.send`` and ``websocket.close`` messages (see ``outbox.Wire``)."""

    def __init__(self) -> None:
        self.pong: Message = {"type": "websocket.send", "text": protocol.PONG}

    def event(self, text: str, event_id: str | None, key: Any, transient: bool) -> Message:
        if key is not None:
            message = DurableMessage(type="websocket.send", text=text)
            message.key = key
            return message
        if transient:
            return TransientMessage(type="websocket.send", text=text)
        return {"type": "websocket.send", "text": text}

    closing_handshake = True

    def control(self, kind: str, text: str, event_id: str | None = None) -> Message:
        return {"type": "websocket.send", "text": text}

    def close(self, code: int, reason: str) -> Message:
        return {"type": "websocket.close", "code": code, "reason": reason}

    def batch(self, queue: deque[Message], limit: int) -> tuple[Message, int, int]:
        pong = self.pong
        if queue[0] is pong:  # not JSON: it goes alone, as the plain text "pong"
            return queue.popleft(), 1, 0
        texts: list[str] = []
        size = durable = 0
        while queue and size < limit and queue[0] is not pong:
            message = queue.popleft()
            if type(message) is DurableMessage:
                durable += 1
            texts.append(message["text"])
            size += len(texts[-1])
        batch = {"type": "websocket.send", "text": codec.encode_batch(texts)}
        return batch, len(texts), durable


WIRE = WebSocketWire()


async def serve(
    streams: Streams,
    scope: Scope,
    receive: Receive,
    send: Send,
    allowed_origins: frozenset[str] | None = None,
) -> None:
    """Run one WebSocket at the hub's path from ``websocket.connect`` to its end."""
    if (await receive())["type"] != "websocket.connect":
        return
    handshake = parse_handshake(scope)
    if allowed_origins is not None and handshake.origin is not None:
        if normalize_origin(handshake.origin) not in allowed_origins:
            streams.counters.refused(protocol.ORIGIN_REFUSED)
            await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            return
    started = anyio.current_time()
    request = HandshakeRequest(scope, handshake.token, origin_checked=allowed_origins is not None)
    admitted = await streams.admit(request)
    if isinstance(admitted, Close):
        await _refuse(streams, scope, send, handshake, admitted)
        return

    stream = streams.create(
        admitted,
        WIRE,
        send,
        resume=handshake.resume,
        control=handshake.subprotocol is not None,
        batch=handshake.subprotocol == BATCH_SUBPROTOCOL,
        transport="websocket",
        subprotocol=handshake.subprotocol,
        client=request.client,
        admitted_at=started,
    )
    await lifecycle.run(
        streams,
        stream,
        send,
        lambda: send(_accept(handshake)),
        lambda: _read(stream, receive, streams),
    )


def _accept(handshake: Handshake) -> Message:
    # Only our protocol is ever echoed: a token offered as a subprotocol never is.
    return {"type": "websocket.accept", "subprotocol": handshake.subprotocol}


async def _refuse(
    streams: Streams, scope: Scope, send: Send, handshake: Handshake, refusal: Close
) -> None:
    if streams.settings.refusal == "http":
        if "websocket.http.response" in (scope.get("extensions") or {}):
            headers = [(b"content-type", b"text/plain; charset=utf-8")]
            if refusal.status == 401:
                headers.append((b"www-authenticate", b"Bearer"))
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": refusal.status,
                    "headers": headers,
                }
            )
            await send({"type": "websocket.http.response.body", "body": refusal.reason.encode()})
        else:
            await send({"type": "websocket.close", "code": refusal.code})  # the server sends 403
        return
    # Accept, then close: browser JavaScript can read a close code, never a handshake status.
    await send(_accept(handshake))
    await send(WIRE.close(refusal.code, refusal.reason))
    streams.counters.count(streams.counters.closes, refusal.code)


async def _read(stream: Stream, receive: Receive, streams: Streams) -> None:
    settings, counters = streams.settings, streams.counters
    bucket = (
        TokenBucket(*settings.rate_limit, anyio.current_time()) if settings.rate_limit else None
    )
    while True:
        idle_timeout = settings.idle_timeout if stream.state is State.OPEN else None
        with anyio.move_on_after(math.inf if idle_timeout is None else idle_timeout) as idle:
            message = await receive()
        if idle.cancelled_caught:
            stream.close(protocol.IDLE_TIMEOUT)
            continue
        kind = message["type"]
        if kind == "websocket.disconnect":
            if stream.code is None:  # the client closed first
                stream.code = int(message.get("code") or protocol.NO_STATUS.code)
            return
        if kind != "websocket.receive":
            continue
        counters.messages_received += 1
        if stream.state is not State.OPEN:
            continue  # closing: the rest is ignored
        if bucket is not None and not bucket.take(anyio.current_time()):
            stream.close(protocol.RATE_LIMITED)
        elif _too_big(message, settings.max_message_size):
            stream.close(protocol.MESSAGE_TOO_BIG)
        else:
            await _handle(stream, message, streams)


def _too_big(message: Message, limit: int) -> bool:
    text = message.get("text")
    if isinstance(text, str):  # UTF-8 takes at most 4 bytes a character: encode only if needed
        return len(text) * 4 > limit and len(text.encode("utf-8", "replace")) > limit
    data = message.get("bytes")
    return isinstance(data, (bytes, bytearray)) and len(data) > limit


async def _handle(stream: Stream, message: Message, streams: Streams) -> None:
    text = message.get("text")
    if text == protocol.PING:
        stream.outbox.push(WIRE.pong)
        return
    data = codec.decode_message(text)
    if data is None:
        streams.counters.malformed_messages += 1
    else:
        await streams.hooks.message(stream.info, data, streams.counters)
