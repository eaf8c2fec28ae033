"""A resuming Python client for asgi-events (``pip install 'asgi-events[client]'``).

::

    async with EventsClient("https://example.com/ws", token=token) as client:
        async for item in client:
            if isinstance(item, Gap):
                await refetch_state()  # events may have been missed: item.reason says why
            else:
                handle(item)  # an event: the server's JSON object, as a dict

On asyncio and trio (anyio, httpx-ws). Design:

- **One reader task**, in a task group that the ``async with`` block owns, connects, reads and
  reconnects. It hands the iterator one item at a time and reads nothing more meanwhile: a
  consumer that stops iterating stops the socket being read, the server closes it as a slow
  consumer (1013), and the client resumes from the last item the consumer took.
- **Position**: the ``position`` of each ``asgi_events.ready`` and the ``id`` of each event
  the consumer took (``client.position``: store it, pass it back as ``last_event_id`` in a
  later process). Each reconnection sends it as ``lastEventId``. The ids of the last
  ``dedupe_window`` events are never yielded again; events without an id are yielded as they
  come, in the server's order, and never move the position: transient ones, and latest
  values (``"latest": true``: the newest value of each key of the hub's ``latest_types``,
  sent again on each connection after its replay, so a value may come more than once).
- **Gaps are items, not exceptions**: on ``recovered: false`` the iterator yields a ``Gap``
  where the ready message was (after what the server could still replay, before live
  events), and goes on. Refetch your state.
- **Close codes**: 1000 and 4003 "Disconnected" (``hub.disconnect``: say a logout) end the
  iteration: the server is done with this client, which does not reconnect
  (``client.close_code`` says which). 1001, 1005, 1006, 1011, 1012, 1013, 1014, 4002,
  network errors and HTTP 408/429/5xx: reconnect with exponential backoff and full jitter
  (the count restarts once a connection gets its ready message). 1008 "Authentication
  failed", 4001 and HTTP 401: call ``token_refresher`` and reconnect at once; without one, or
  if the fresh token is refused too, raise ``AuthenticationError`` (``TokenExpiredError`` for
  4001). Any other code (1008 "Too many connections" or "Rate limit exceeded", 1009, other
  4xxx, a ``hub.disconnect`` with a code or a 1008 reason of its own) or HTTP status raises
  ``RejectedError``, and the client does not reconnect either; ``max_attempts`` failed
  reconnections in a row raise ``RetriesExhaustedError``. The iteration raises them,
  unwrapped.
- **History**: where the server mounts ``history_app``, ``await client.history(after, limit)``
  reads the user's buffered events over HTTP (``history_url``; ``client_history.py``).
- **Keepalive**: text ``ping`` every ``ping_interval`` seconds (``pong`` is dropped); a socket
  on which nothing arrives for twice that long is taken as dead and replaced.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.to_thread
import httpx
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from httpx_ws import (
    AsyncWebSocketSession,
    HTTPXWSException,
    WebSocketDisconnect,
    WebSocketInvalidTypeReceived,
    WebSocketUpgradeError,
    aconnect_ws,
)

from . import codec
from .client_history import HistoryPage, fetch_history
from .client_policy import (
    AuthenticationError,
    End,
    EventsClientError,
    RejectedError,
    RetriesExhaustedError,
    TokenExpiredError,
    backoff_delay,
    classify,
    refused,
    transient,
)
from .protocol import BATCH_SUBPROTOCOL, PING, READY, SUBPROTOCOL

__all__ = (
    "AuthenticationError",
    "EventsClient",
    "EventsClientError",
    "Gap",
    "HistoryPage",
    "Item",
    "RejectedError",
    "RetriesExhaustedError",
    "TokenExpiredError",
    "backoff_delay",
)

TokenRefresher = Callable[[], str | Awaitable[str]]
"""``() -> token``, sync (run in a worker thread) or async."""


@dataclass(frozen=True, slots=True)
class Gap:
    """Events may have been missed (the server's ``recovered: false``): refetch your state.

    :param reason: ``evicted``, ``expired``, ``epoch`` (the server restarted) or ``unknown``.
    :param oldest: the oldest id the server could resume from completely now, if any.
    """

    reason: str
    oldest: str | None


Item = dict[str, Any] | Gap
"""What the iteration yields: an event (a dict; with ``"latest": true`` for a latest value) or a
``Gap``."""


def _http_url(url: str) -> httpx.URL:
    scheme, sep, rest = url.partition("://")
    return httpx.URL({"ws": "http", "wss": "https"}.get(scheme, scheme) + sep + rest)


class EventsClient:
    """Receive one user's events from an asgi-events server, resuming across reconnections.

    :param url: the middleware's WebSocket URL (``ws(s)://`` or ``http(s)://``).
    :param token: the credential; sent as ``Authorization: Bearer`` (``token_in="header"``)
        or as the ``token`` query parameter (``token_in="query"``; servers may log URLs).
    :param token_refresher: ``() -> token``, sync or async, called on 1008 "Authentication
        failed", 4001 or HTTP 401 to reconnect with a fresh token; its errors stop the client.
    :param last_event_id: resume from this position (a ``position`` stored earlier).
    :param initial_delay: the first reconnection's backoff bound, in seconds; doubling.
    :param max_delay: the largest backoff bound, in seconds.
    :param max_attempts: failed reconnections in a row before ``RetriesExhaustedError``;
        None to retry for ever.
    :param ping_interval: seconds between text ``ping`` frames (keep it under the server's
        ``idle_timeout``), or None for none; also the dead-socket detection, at twice that.
    :param dedupe_window: how many recent event ids are remembered to drop duplicates.
    :param http_client: an ``httpx.AsyncClient`` to connect with (TLS, proxies, headers);
        by default one of the client's own.
    :param history_url: where the server mounts ``history_app``, for ``history()``: absolute,
        or relative to ``url`` (``"/events/history"``).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str,
        token_in: Literal["header", "query"] = "header",
        token_refresher: TokenRefresher | None = None,
        last_event_id: str | None = None,
        initial_delay: float = 0.5,
        max_delay: float = 30.0,
        max_attempts: int | None = None,
        ping_interval: float | None = 20.0,
        dedupe_window: int = 1024,
        http_client: httpx.AsyncClient | None = None,
        history_url: str | None = None,
    ) -> None:
        self._url = _http_url(url)
        self._history_url = None if history_url is None else self._url.join(_http_url(history_url))
        self._token, self._token_in, self._refresher = token, token_in, token_refresher
        self._position = last_event_id
        self._delays = (initial_delay, max_delay)
        self._max_attempts, self._ping_interval = max_attempts, ping_interval
        self._seen: dict[str, None] = {}
        self._window = dedupe_window
        self._http, self._own_http = http_client, http_client is None
        self._healthy = self._control = self._batch = False
        self._error: Exception | None = None
        self._close: tuple[int | None, str] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._send: MemoryObjectSendStream[Item]
        self._receive: MemoryObjectReceiveStream[Item]

    @property
    def position(self) -> str | None:
        """The id up to which the consumer is current (resume from it), if any yet."""
        return self._position

    @property
    def close_code(self) -> int | None:
        """The close code that stopped the client: 1000 or 4003 when the iteration ended (the
        server is done with it), else that of the ``EventsClientError`` the iteration raised
        (None for an HTTP refusal, as there); None while it runs."""
        return None if self._close is None else self._close[0]

    @property
    def close_reason(self) -> str | None:
        """The reason that goes with ``close_code`` (``"Disconnected"`` for 4003)."""
        return None if self._close is None else self._close[1]

    async def history(self, after: str | None = None, limit: int | None = None) -> HistoryPage:
        """The user's buffered events after the id ``after`` (all of them if None), oldest
        first, at most ``limit`` of them, from the server's ``history_app`` at ``history_url``
        (say to refetch state after a ``Gap``, or to page through what a socket would replay).

        One ``GET`` with the token as ``Authorization: Bearer`` (whatever ``token_in``); on
        HTTP 401, ``token_refresher`` (if any) gives a fresh token for one more try. It needs
        no connection: it may be called outside the ``async with`` block too. The client's
        ``position`` and dedupe are left as they are.

        :raises RuntimeError: the client has no ``history_url``.
        :raises AuthenticationError: the token was refused (``status`` 401).
        :raises EventsClientError: any other HTTP error (``status``: 400 for a bad ``limit``,
            503 if the server's backend is unavailable), or a network error (``status`` None).
        """
        if self._history_url is None:
            raise RuntimeError("pass EventsClient(history_url=...): where history_app is mounted")
        if self._http is not None:
            return await self._history(self._http, self._history_url, after, limit)
        async with httpx.AsyncClient(timeout=30.0) as http:  # outside the async with block
            return await self._history(http, self._history_url, after, limit)

    async def _history(
        self, http: httpx.AsyncClient, url: httpx.URL, after: str | None, limit: int | None
    ) -> HistoryPage:
        try:
            return await fetch_history(http, url, self._token, after, limit)
        except AuthenticationError:
            if self._refresher is None:
                raise
        self._token = await self._refresh(self._refresher)
        return await fetch_history(http, url, self._token, after, limit)

    async def __aenter__(self) -> EventsClient:
        """Start connecting in the background; iterate to receive."""
        if self._tg is not None:
            raise RuntimeError("this EventsClient is running already")
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=30.0)
        self._send, self._receive = anyio.create_memory_object_stream[Item](0)
        self._error = self._close = None
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._main)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the connection and stop the reader task."""
        tg, self._tg = self._tg, None
        assert tg is not None, "the client was not entered"
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)  # the body's error, if any, propagates unwrapped
        self._receive.close()
        if self._own_http and self._http is not None:
            http, self._http = self._http, None
            with anyio.CancelScope(shield=True):
                await http.aclose()

    def __aiter__(self) -> EventsClient:
        """The client is its own (single) iterator."""
        return self

    async def __anext__(self) -> Item:
        """The next event or ``Gap``; raises the ``EventsClientError`` that stopped the client."""
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            pass
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    async def _main(self) -> None:
        try:
            end = await self._run()
            self._close = (end.code, end.reason)
        except EventsClientError as exc:  # handed to the consumer by __anext__
            self._error, self._close = exc, (exc.code, exc.reason)
        except Exception as exc:
            self._error = exc
        finally:
            self._send.close()

    async def _run(self) -> End:
        """Connect until the server is done with the client (that close); or raise why not."""
        failures, refreshed = 0, False
        while True:
            end = await self._connect()
            if self._healthy:
                failures, refreshed = 0, False
            if end.kind == "done":
                return end
            if end.kind == "auth":
                if self._refresher is None or refreshed:
                    error = TokenExpiredError if end.code == 4001 else AuthenticationError
                    raise error(end.code, end.reason, status=end.status)
                self._token, refreshed = await self._refresh(self._refresher), True
                continue
            if end.kind == "fatal":
                raise RejectedError(end.code, end.reason, status=end.status)
            if self._max_attempts is not None and failures >= self._max_attempts:
                raise RetriesExhaustedError(end.code, end.reason, status=end.status)
            await anyio.sleep(backoff_delay(failures, *self._delays))
            failures += 1

    @staticmethod
    async def _refresh(refresher: TokenRefresher) -> str:
        call: Callable[[], object] = refresher
        token = (
            call() if inspect.iscoroutinefunction(call) else await anyio.to_thread.run_sync(call)
        )
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str) or not token:
            raise TypeError(f"token_refresher must return a non-empty str, not {token!r}")
        return token

    async def _connect(self) -> End:
        url, headers = self._url, dict[str, str]()
        if self._position is not None:
            url = url.copy_set_param("lastEventId", self._position)
        if self._token_in == "query":
            url = url.copy_set_param("token", self._token)
        else:
            headers["Authorization"] = f"Bearer {self._token}"
        self._healthy, end = False, None
        try:
            async with aconnect_ws(
                str(url),
                self._http,
                subprotocols=[BATCH_SUBPROTOCOL, SUBPROTOCOL],
                headers=headers,
                keepalive_ping_interval_seconds=None,
                queue_size=16,  # a slow consumer leaves the backlog in TCP and the server
                session_class=AsyncWebSocketSession,
            ) as ws:
                end = await self._read(ws)
        except WebSocketUpgradeError as exc:
            return refused(exc.response.status_code)
        except Exception as exc:
            if end is None and not transient(exc):
                raise
            end = end or End("retry", 1006, f"{type(exc).__name__}: {exc}")
        assert end is not None
        return end

    async def _read(self, ws: AsyncWebSocketSession) -> End:
        self._batch = ws.subprotocol == BATCH_SUBPROTOCOL
        self._control = self._batch or ws.subprotocol == SUBPROTOCOL
        interval = self._ping_interval
        async with anyio.create_task_group() as tg:
            if interval is not None:
                tg.start_soon(self._ping, ws, interval)
            try:
                while True:
                    try:
                        text = await ws.receive_text(None if interval is None else 2 * interval)
                    except WebSocketInvalidTypeReceived:
                        continue  # binary frames are not part of the protocol
                    self._healthy |= not self._control
                    await self._frame(text)
            except WebSocketDisconnect as exc:
                end = classify(exc.code, exc.reason)
            except (HTTPXWSException, TimeoutError) as exc:
                end = End("retry", 1006, type(exc).__name__)
            tg.cancel_scope.cancel()
        return end

    @staticmethod
    async def _ping(ws: AsyncWebSocketSession, interval: float) -> None:
        try:
            while True:
                await anyio.sleep(interval)
                await ws.send_text(PING)
        except Exception:  # the socket is closing: the reader finds out how
            return

    async def _frame(self, text: str) -> None:
        for message in codec.decode_frame(text, self._batch):
            await self._message(message)

    async def _message(self, message: dict[str, Any]) -> None:
        if self._control and message.get("type") == READY:
            payload = message.get("payload")
            payload = payload if isinstance(payload, dict) else {}
            self._healthy = True
            if payload.get("recovered") is False:  # the position moves once the gap is taken
                oldest = payload.get("oldest")
                reason = str(payload.get("reason", "unknown"))
                await self._send.send(Gap(reason, oldest if isinstance(oldest, str) else None))
            if isinstance(payload.get("position"), str):
                self._position = payload["position"]
            return
        event_id = message.get("id")
        if not isinstance(event_id, str):
            await self._send.send(message)
            return
        if event_id in self._seen:
            return
        await self._send.send(message)
        self._position = event_id
        self._seen[event_id] = None
        if len(self._seen) > self._window:
            del self._seen[next(iter(self._seen))]
