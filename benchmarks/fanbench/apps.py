"""The server side: the HTTP control routes every variant shares, and one ASGI app per variant.

Every variant publishes the same events, ``{"type": "bench.tick", "payload": {"seq", "t",
"pad"}, "timestamp"}``, through its own idiomatic API; ``Control`` runs the publish loop (a
burst, or open loop at a fixed rate) and calls the variant's ``publish_one`` per event.
"""

from __future__ import annotations

import cProfile
import gc
import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from .common import (
    BROADCASTER_VARIANT,
    EVENT_TYPE,
    SERVER_READY_WAIT,
    SOCKETIO_PATH,
    SOCKETIO_VARIANT,
    WS_PATH,
    ASGIApp,
    Receive,
    Scope,
    Send,
    percentile,
)

# (seq, t in ns since the epoch, pad) -> the event published to every socket.
PublishOne = Callable[[int, int, str], Awaitable[None]]
# A control route of a variant's own: the request's JSON body -> (status, answer).
Route = Callable[[dict[str, Any]], Awaitable[tuple[int, dict[str, Any]]]]


def utc_now_iso() -> str:
    """The same timestamp format asgi-events adds to each event."""
    now = datetime.now(timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def bench_event(seq: int, t_ns: int, pad: str, timestamp: bool = True) -> dict[str, Any]:
    """The event every variant publishes (asgi-events adds ``timestamp`` itself)."""
    event: dict[str, Any] = {"type": EVENT_TYPE, "payload": {"seq": seq, "t": t_ns, "pad": pad}}
    if timestamp:
        event["timestamp"] = utc_now_iso()
    return event


def encode_event(seq: int, t_ns: int, pad: str) -> str:
    return _encoder.encode(bench_event(seq, t_ns, pad))


class Control:
    """The HTTP control routes every variant shares: ready, settle, publish, measure, shutdown.

    From the start of a burst (``POST /publish``, or ``POST /measure/start`` on a node that does
    not publish) to ``POST /measure/stop`` it times the garbage collector (and, with a profile
    path, runs cProfile).
    """

    def __init__(
        self,
        count: Callable[[], int],
        publish_one: PublishOne,
        profile_path: str | None,
        ready: Callable[[], bool] = lambda: True,
        routes: dict[tuple[str, str], Route] | None = None,
    ) -> None:
        import anyio

        self._anyio = anyio
        self.count = count  # sockets the server has registered for delivery
        self.publish_one = publish_one
        self.ready = ready  # e.g. subscribed to Redis
        self.routes = routes or {}  # a variant's own, e.g. GET /stats
        self.shutdown = anyio.Event()
        self._profile_path = profile_path
        self._profiler: cProfile.Profile | None = None
        self._gc_seconds = 0.0
        self._gc_runs = [0, 0, 0]  # collections per generation
        self._gc_started: float | None = None
        self._measuring = False
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if not self._measuring:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self._gc_seconds += time.perf_counter() - self._gc_started
            self._gc_runs[info["generation"]] += 1
            self._gc_started = None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        if body is None:
            return  # http.disconnect
        route = (scope["method"], scope["path"])
        if route == ("GET", "/ready"):
            ok = self.ready()
            await respond(send, 200 if ok else 503, {"ok": ok})
        elif route == ("POST", "/settle"):
            status, answer = await self._settle(int(json.loads(body)["sockets"]))
            await respond(send, status, answer)
        elif route == ("POST", "/measure/start"):
            status, answer = await self._arm(int(json.loads(body)["sockets"]))
            await respond(send, status, answer)
        elif route == ("POST", "/publish"):
            status, answer = await self._publish(json.loads(body))
            await respond(send, status, answer)
        elif route == ("POST", "/measure/stop"):
            self._stop_measuring()
            await respond(send, 200, {"gc_s": self._gc_seconds, "gc_runs": self._gc_runs})
        elif route in self.routes:
            status, answer = await self.routes[route](json.loads(body) if body else {})
            await respond(send, status, answer)
        elif route == ("POST", "/shutdown"):
            self._stop_measuring()
            await respond(send, 200, {"ok": True})
            self.shutdown.set()
        else:
            await respond(send, 404, {"error": "not found"})

    async def _settle(self, sockets: int) -> tuple[int, dict[str, Any]]:
        """Wait until exactly ``sockets`` are registered, then collect garbage (idle mode)."""
        with self._anyio.move_on_after(SERVER_READY_WAIT):
            while self.count() != sockets:
                await self._anyio.sleep(0.005)
        registered = self.count()
        if registered != sockets:
            return 503, {"error": f"{registered} sockets registered, not {sockets}"}
        gc.collect()
        return 200, {"registered": registered}

    async def _arm(self, sockets: int) -> tuple[int, dict[str, Any]]:
        """Wait until ``sockets`` are registered, collect garbage, start measuring."""
        # The client saw its 101 before the server registered the socket: wait for all of them.
        with self._anyio.move_on_after(SERVER_READY_WAIT):
            while self.count() < sockets:
                await self._anyio.sleep(0.005)
        connected = self.count()
        if connected < sockets:
            return 503, {"error": f"only {connected} of {sockets} sockets registered"}
        gc.collect()
        self._measuring = True
        if self._profile_path is not None and self._profiler is None:
            self._profiler = cProfile.Profile()
            self._profiler.enable()
        return 200, {"connected": connected}

    async def _publish(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        events, pad = int(request["events"]), "x" * int(request["payload"])
        status, answer = await self._arm(int(request["sockets"]))
        if status != 200:
            return status, answer
        start_ns = time.time_ns()
        started = time.perf_counter()
        rate = request.get("rate")
        if rate:
            answer.update(await self._publish_steady(events, pad, float(rate), start_ns))
        else:
            for seq in range(events):
                await self.publish_one(seq, time.time_ns(), pad)
        call_s = time.perf_counter() - started
        return 200, {"start_ns": start_ns, "call_s": call_s, **answer}

    async def _publish_steady(
        self, events: int, pad: str, rate: float, start_ns: int
    ) -> dict[str, Any]:
        """Open loop: event ``i`` is due at start + i/rate, whatever happened to the others.

        Its ``t`` is the time it was due, not when the loop got to it: a publisher that falls
        behind (the raw loop still sending the previous event) adds its lateness to every
        client's latency, as it would for a real application (no coordinated omission). The
        lateness itself is returned (``lag_p99_ms``, ``lag_max_ms``).
        """
        started = time.perf_counter()
        lags: list[int] = []
        for seq in range(events):
            due = seq / rate
            delay = started + due - time.perf_counter()
            if delay > 0:
                await self._anyio.sleep(delay)
            lags.append(int((time.perf_counter() - started - due) * 1e9))
            await self.publish_one(seq, start_ns + int(due * 1e9), pad)
        lags.sort()
        return {"lag_p99_ms": percentile(lags, 0.99) / 1e6, "lag_max_ms": lags[-1] / 1e6}

    def _stop_measuring(self) -> None:
        self._measuring = False
        profiler, self._profiler = self._profiler, None
        if profiler is not None and self._profile_path is not None:
            profiler.disable()
            profiler.dump_stats(self._profile_path)


async def read_body(receive: Receive) -> bytes | None:
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk: bytes = message.get("body", b"")
        body += chunk
        if not message.get("more_body", False):
            return body


async def respond(send: Send, status: int, answer: dict[str, Any]) -> None:
    body = json.dumps(answer).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def run_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


def route_http(control: Control, other: ASGIApp) -> ASGIApp:
    """HTTP to the control routes; WebSocket and lifespan scopes to ``other``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await control.handle(scope, receive, send)
        else:
            await other(scope, receive, send)

    return app


# -- the variants -----------------------------------------------------------------------------


def build_asgi_events_app(
    profile_path: str | None, redis: tuple[str, str] | None = None, cluster: bool = False
) -> tuple[ASGIApp, Control]:
    """EventsMiddleware + EventHub; an event is one ``broadcast_to_all`` call.

    With ``redis`` (url, key prefix) the hub is one node on ``RedisBackend`` (``cluster``: on a
    Redis Cluster): it is ready once subscribed, and a burst published here reaches the other
    nodes' sockets through Redis. In memory or not, the routes of ``publisher.hub_routes`` are
    added: ``GET /stats`` (``hub.stats()``), ``POST /publish-users`` (per-user ``broadcast``, the
    routing mode's publisher) and ``POST /publish-soak`` (the soak mode's).
    """
    from asgi_events import EventHub, EventsMiddleware

    async def verify_token(token: str) -> str | None:
        return token or None

    ready: Callable[[], bool] = lambda: True  # noqa: E731
    if redis is None:
        hub = EventHub(verify_token)
    else:
        from asgi_events.backends.redis import RedisBackend

        url, prefix = redis
        options: dict[str, Any] = {"cluster": True} if cluster else {}  # (not merged yet)
        backend = RedisBackend(url, prefix=prefix, **options)
        hub = EventHub(verify_token, backend=backend)
        ready = lambda: backend.healthy  # noqa: E731

    async def publish_one(seq: int, t_ns: int, pad: str) -> None:
        await hub.broadcast_to_all(bench_event(seq, t_ns, pad, timestamp=False))

    from .publisher import hub_routes

    control = Control(
        lambda: int(hub.stats()["total_connections"]),
        publish_one,
        profile_path,
        ready,
        hub_routes(hub),
    )

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await run_lifespan(receive, send)
        elif scope["type"] == "http":
            await control.handle(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": 1000})

    return EventsMiddleware(inner, hub=hub, path=WS_PATH), control


def build_raw_app(profile_path: str | None) -> tuple[ASGIApp, Control]:
    """The naive loop: encode each event once, then await ``send`` for each socket in turn."""
    sockets: set[Send] = set()

    async def publish_one(seq: int, t_ns: int, pad: str) -> None:
        message = {"type": "websocket.send", "text": encode_event(seq, t_ns, pad)}
        for send in list(sockets):
            try:
                await send(message)
            except Exception:
                sockets.discard(send)

    control = Control(lambda: len(sockets), publish_one, profile_path)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await run_lifespan(receive, send)
        elif scope["type"] == "http":
            await control.handle(scope, receive, send)
        elif scope["type"] == "websocket" and scope["path"] == WS_PATH:
            if (await receive())["type"] != "websocket.connect":
                return
            await send({"type": "websocket.accept"})
            sockets.add(send)
            try:
                while (await receive())["type"] != "websocket.disconnect":
                    pass
            finally:
                sockets.discard(send)
        else:
            await send({"type": "websocket.close", "code": 1000})

    return app, control


def build_broadcaster_app(profile_path: str | None) -> tuple[ASGIApp, Control]:
    """Starlette + broadcaster (``memory://``), as in broadcaster's README: each socket's task
    subscribes to the channel and forwards every message; an event is one ``publish``."""
    from contextlib import asynccontextmanager

    import anyio
    from broadcaster import Broadcast
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    broadcast = Broadcast("memory://")
    channel = "bench"
    subscribed = 0

    async def receiver(websocket: WebSocket) -> None:
        async for _message in websocket.iter_text():
            pass  # the clients send nothing; this ends when the client goes

    async def sender(websocket: WebSocket) -> None:
        nonlocal subscribed
        async with broadcast.subscribe(channel=channel) as subscriber:
            subscribed += 1
            try:
                async for event in subscriber:  # type: ignore[union-attr,unused-ignore]
                    await websocket.send_text(event.message)  # type: ignore[union-attr]
            finally:
                subscribed -= 1

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        async with anyio.create_task_group() as task_group:

            async def run_receiver() -> None:
                await receiver(websocket)
                task_group.cancel_scope.cancel()

            task_group.start_soon(run_receiver)
            await sender(websocket)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> Any:
        async with broadcast:
            yield

    starlette = Starlette(routes=[WebSocketRoute(WS_PATH, endpoint)], lifespan=lifespan)

    async def publish_one(seq: int, t_ns: int, pad: str) -> None:
        await broadcast.publish(channel=channel, message=encode_event(seq, t_ns, pad))

    control = Control(lambda: subscribed, publish_one, profile_path)
    return route_http(control, starlette), control


def build_socketio_app(profile_path: str | None) -> tuple[ASGIApp, Control]:
    """python-socketio: ``AsyncServer(async_mode="asgi")`` in ``ASGIApp``; an event is one
    ``emit`` to every connected client (the default namespace)."""
    import socketio

    sio = socketio.AsyncServer(async_mode="asgi")
    connected: set[str] = set()

    @sio.event  # type: ignore[untyped-decorator,unused-ignore]
    async def connect(sid: str, environ: dict[str, Any]) -> None:
        connected.add(sid)

    @sio.event  # type: ignore[untyped-decorator,unused-ignore]
    async def disconnect(sid: str, *reason: object) -> None:
        connected.discard(sid)

    async def publish_one(seq: int, t_ns: int, pad: str) -> None:
        await sio.emit(EVENT_TYPE, bench_event(seq, t_ns, pad))

    control = Control(lambda: len(connected), publish_one, profile_path)

    async def other(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await control.handle(scope, receive, send)
        elif scope["type"] == "lifespan":
            await run_lifespan(receive, send)
        else:
            await send({"type": "websocket.close", "code": 1000})

    app = socketio.ASGIApp(sio, other_asgi_app=other, socketio_path=SOCKETIO_PATH.strip("/"))
    return app, control


def build_app(
    variant: str, profile_path: str | None, redis: tuple[str, str] | None, cluster: bool = False
) -> tuple[ASGIApp, Control]:
    if variant == "raw":
        return build_raw_app(profile_path)
    if variant == BROADCASTER_VARIANT:
        return build_broadcaster_app(profile_path)
    if variant == SOCKETIO_VARIANT:
        return build_socketio_app(profile_path)
    return build_asgi_events_app(profile_path, redis, cluster)
