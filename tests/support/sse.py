"""An event-stream client for tests: HTTP/1.1 by h11 over an anyio socket, so the body is
seen byte for byte as the server wrote it, and closing early leaves nothing behind (httpx on
trio leaves its body generators to the garbage collector when a stream is closed early)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode, urlsplit

import anyio
import h11

from .server import TIMEOUT

SSE = {"accept": "text/event-stream"}


class Events:
    """An open event stream: the response's status and headers, and its blocks as read."""

    def __init__(self, stream: anyio.abc.ByteStream, conn: h11.Connection) -> None:
        self._stream, self._conn = stream, conn
        self._buffer = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.ended = False

    async def _next(self) -> Any:
        while True:
            event = self._conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self._stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            self._conn.receive_data(data)

    async def start(self) -> None:
        with anyio.fail_after(TIMEOUT):
            response = await self._next()
        assert isinstance(response, h11.Response), response
        self.status = response.status_code
        self.headers = {k.decode().lower(): v.decode() for k, v in response.headers}

    async def body(self) -> bytes:
        """The rest of the body, to its end (for refusals)."""
        with anyio.fail_after(TIMEOUT):
            while not self.ended:
                await self._more()
        body, self._buffer = self._buffer, b""
        return body

    async def _more(self) -> None:
        event = await self._next()
        if isinstance(event, h11.Data):
            self._buffer += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            self.ended = True

    async def block(self) -> bytes:
        """The next block (up to a blank line), without it, within TIMEOUT.

        :raises EOFError: the response ended first.
        """
        with anyio.fail_after(TIMEOUT):
            while b"\n\n" not in self._buffer:
                if self.ended:
                    raise EOFError(self._buffer)
                await self._more()
        block, _, self._buffer = self._buffer.partition(b"\n\n")
        return block

    async def fields(self) -> dict[str, Any]:
        """The next block's fields (``data`` parsed as JSON), skipping comments."""
        while (block := await self.block()).startswith(b":"):
            pass
        fields: dict[str, Any] = {}
        for line in block.decode().split("\n"):
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value) if name == "data" else value
        return fields

    async def until_ready(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The events before the ready event (not ``retry``), and the ready event."""
        before = []
        while (block := await self.fields()).get("event") != "asgi_events.ready":
            if "retry" not in block:
                before.append(block)
        return before, block

    async def end(self) -> dict[str, Any]:
        """Read to the end of the response: the last block (the close event)."""
        last: dict[str, Any] = {}
        while True:
            try:
                last = await self.fields()
            except EOFError as exc:
                assert exc.args[0] == b"", exc.args  # nothing after the last block
                return last


@asynccontextmanager
async def open_events(
    url: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    **params: str,
) -> AsyncIterator[Events]:
    """Request ``url`` as an event stream (its status and headers read); closed on exit."""
    parts = urlsplit(url)
    target = parts.path + (f"?{urlencode(params)}" if params else "")
    host = f"{parts.hostname}:{parts.port}"
    request_headers = [("host", host), *{**SSE, **(headers or {})}.items()]
    conn = h11.Connection(h11.CLIENT)
    async with await anyio.connect_tcp(parts.hostname or "", parts.port or 80) as stream:
        request = h11.Request(method=method, target=target, headers=request_headers)
        await stream.send(conn.send(request) + conn.send(h11.EndOfMessage()))
        events = Events(stream, conn)
        await events.start()
        yield events
