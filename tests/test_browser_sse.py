"""Server-Sent Events in headless Chromium: the browser's own EventSource (no library) against
the server's framing, resume and refusals; the browser client over SSE, and its "auto"
fallback behind a proxy that refuses WebSockets; the demo over SSE.

The harness (Chromium over the DevTools protocol, one tab per test) is test_browser.py's. The
server's reconnection delay (``retry:``, 1-3 s) is shortened here where a test waits for the
browser to come back, and where a QUIET window must be long enough to see a reconnect.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import anyio
import pytest

from asgi_events import ConnectionInfo, EventHub, EventsMiddleware
from asgi_events.backends.redis import RedisBackend
from asgi_events.transports import sse
from asgi_events.types import ASGIApp, Receive, Scope, Send
from examples import demo

from .support.redis_server import RedisServer
from .support.server import QUIET, TIMEOUT, ServeFn, users
from .test_browser import EVENTS, READIES, browser, cut, open_tab, restore

__all__ = ["browser"]  # the module's Chromium (a fixture of test_browser.py)

# The browser's own EventSource. It lets the browser reconnect (sending Last-Event-ID) after a
# temporary end, and closes it on a final one, as docs/protocol.md says a page must; 4001 it
# lets through too (a fresh cookie would go along; a ?token= that expired gets a 401).
NATIVE_PAGE = b"""<!doctype html><script>
const RETRY = new Set([1001, 1005, 1006, 1011, 1012, 1013, 1014, 4002, 4001]);
const token = new URLSearchParams(location.search).get("token");
Object.assign(window, { events: [], readies: [], closes: [], errors: [], opens: 0 });
const source = window.source = new EventSource("/ws?token=" + encodeURIComponent(token));
source.onopen = () => opens++;
source.onmessage = (m) => events.push(JSON.parse(m.data));
source.addEventListener("asgi_events.ready", (m) =>
  readies.push({ ...JSON.parse(m.data).payload, lastEventId: m.lastEventId }));
source.addEventListener("asgi_events.close", (m) => {
  const { code } = JSON.parse(m.data);
  closes.push(code);
  if (!RETRY.has(code)) source.close(); // final: the browser would come back otherwise
});
source.onerror = () => errors.push(source.readyState);
</script>"""

# The browser client: its options from the query, what it reports kept in window.seen
# (payload, replayed), window.events, window.readies and window.statuses
# ([status, code, transport]).
CLIENT_PAGE = b"""<!doctype html><script type="module">
import { connect } from "/ws/client.js";
const q = new URLSearchParams(location.search);
Object.assign(window, { seen: [], events: [], readies: [], statuses: [] });
window.client = connect({
  token: q.get("token"), transport: q.get("transport") || undefined,
  lastEventId: q.get("last") || undefined, backoff: { initial: 100, max: 400 },
  refreshToken: q.get("fresh") ? async () => q.get("fresh") : undefined,
  onEvent: (event, { replayed }) => { seen.push([event.payload, replayed]); events.push(event); },
  onReady: (ready) => readies.push(ready),
  onStatus: (status, detail) =>
    statuses.push([status, detail.code ?? null, detail.transport ?? null]),
});
</script>"""


def page(html: bytes) -> ASGIApp:
    """An inner app answering every HTTP request with ``html``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(b"content-type", b"text/html")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": html})

    return app


class Proxy:
    """In front of the middleware, as a reverse proxy would be: it records each event-stream
    request (its query and Last-Event-ID) and each WebSocket, and while ``refuse_websockets``
    refuses the upgrade (a close before accept: HTTP 403), as a proxy that strips it would."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.refuse_websockets = False
        self.websockets = 0
        self.streams: list[tuple[str, str | None]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            self.websockets += 1
            if self.refuse_websockets:
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1000})
                return
        elif scope["type"] == "http" and sse.wants_events(scope):
            headers = dict(scope["headers"])
            last = headers.get(b"last-event-id")
            self.streams.append((scope["query_string"].decode(), last and last.decode()))
        await self.app(scope, receive, send)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll the server's state until ``condition()`` holds (bounded by TIMEOUT)."""
    deadline = anyio.current_time() + TIMEOUT
    while not condition():  # the server's state: no event to wait on
        if anyio.current_time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.02)


# -- the browser's own EventSource ---------------------------------------------------------


async def test_a_native_event_source_comes_back_by_itself_after_a_restart_and_resumes(
    serve: ServeFn, browser: str, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis keeps the events (and their epoch) across the restart, as in production; the
    # memory backend starts a new epoch with every run.
    monkeypatch.setattr(sse, "RETRY_MS", (100, 200))
    prefix = f"t-{secrets.token_hex(4)}"

    def node() -> EventHub:
        backend = RedisBackend(redis_server.url, prefix=prefix, timeout=1.0, max_backoff=0.2)
        return EventHub(users, backend=backend)

    first = node()
    server = await serve(Proxy(EventsMiddleware(page(NATIVE_PAGE), hub=first)), hub=first)
    async with node() as publisher, open_tab(browser, f"{server.url}/?token=tok-alice") as tab:
        await tab.wait_for("readies.length === 1", "the first ready event")
        ids = [await publisher.broadcast("alice", {"type": "N", "payload": n}) for n in range(3)]
        await tab.wait_for("events.length === 3", "three live events")

        await first.shutdown()  # 1001 "Server shutdown": temporary, the browser comes back
        await tab.wait_for("closes.length > 0", "the close event")
        await server.stop()  # (the browser keeps trying: refused while the hub is shut down)
        ids += [await publisher.broadcast("alice", {"type": "N", "payload": n}) for n in (3, 4, 5)]
        second = node()
        proxy = Proxy(EventsMiddleware(page(NATIVE_PAGE), hub=second))
        await serve(proxy, hub=second, port=server.port)  # the server is back, same address
        await tab.wait_for("readies.length === 2", "the ready event after the restart")
        ids.append(await publisher.broadcast("alice", {"type": "N", "payload": 6}))
        await tab.wait_for("events.length === 7", "the live event after the restart")

        events = await tab.js("events")
        assert [e["payload"] for e in events] == list(range(7))  # each exactly once, in order
        assert [e["id"] for e in events] == ids
        readies = await tab.js("readies")
        assert readies[1]["recovered"] is True and readies[1]["replayed"] == 3
        assert readies[1]["lastEventId"] == readies[1]["position"] == ids[5]
        assert set(await tab.js("closes")) == {1001}
        assert await tab.js("source.readyState") == 1  # OPEN
        # It came back by itself, saying where it was in Last-Event-ID (the URL has no id).
        assert proxy.streams and all(s == ("token=tok-alice", ids[2]) for s in proxy.streams)


async def test_a_refused_token_stops_a_native_event_source_for_good(
    serve: ServeFn, browser: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reconnection delay well within QUIET: a retry after the refusal would be seen.
    monkeypatch.setattr(sse, "RETRY_MS", (50, 50))
    valid = {"tok-erin"}
    hub = EventHub(lambda token: users(token) if token in valid else None)
    server = await serve(EventsMiddleware(page(NATIVE_PAGE), hub=hub), hub=hub)
    async with open_tab(browser, f"{server.url}/?token=tok-mallory") as tab:
        await tab.wait_for("source.readyState === EventSource.CLOSED", "the EventSource to stop")
        assert await tab.js("[opens, errors]") == [0, [2]]  # one error, and CLOSED
    assert hub.stats()["refusals"] == {"rejected": 1}

    async with open_tab(browser, f"{server.url}/?token=tok-erin") as tab:
        await tab.wait_for("readies.length === 1", "the ready event")
        valid.clear()  # the token is revoked, and the stream ended with a temporary close
        await hub.disconnect("erin", code=4001, reason="Token expired")
        await tab.wait_for("source.readyState === EventSource.CLOSED", "the EventSource to stop")
        assert hub.stats()["refusals"] == {"rejected": 2}  # it came back once: 401
        await anyio.sleep(QUIET)  # four reconnection delays: no further request
        assert hub.stats()["refusals"] == {"rejected": 2}
        assert await tab.js("[opens, closes, errors]") == [1, [4001], [0, 2]]
        assert await tab.js("source.readyState") == 2
    assert hub.stats()["total_connections"] == 0


# -- the browser client over SSE -----------------------------------------------------------


async def test_the_client_over_sse_resumes_refreshes_its_token_and_stops_on_4003(
    serve: ServeFn, browser: str
) -> None:
    connections: list[ConnectionInfo] = []
    hub = EventHub(users, on_connect=connections.append)
    server = await serve(EventsMiddleware(page(CLIENT_PAGE), hub=hub), hub=hub)
    before = [await hub.broadcast("carol", {"type": "C", "payload": n}) for n in range(2)]
    fresh_url = f"{server.url}/?token=no&fresh=tok-carol&transport=sse&last={before[0]}"
    async with (
        open_tab(browser, f"{server.url}/?token=tok-alice&transport=sse") as tab,
        open_tab(browser, fresh_url) as fresh,
    ):
        # carol: refused (401), a fresh token, then the replay after her lastEventId.
        await fresh.wait_for("readies.length === 1", "carol's ready message")
        statuses = await fresh.js("statuses")
        assert statuses == [
            ["connecting", None, "sse"],
            ["closed", 401, None],
            ["connecting", None, "sse"],
            ["open", None, "sse"],
        ]
        assert await fresh.js("seen") == [[1, True]]
        assert (await fresh.js("readies"))[0]["replayed"] == 1
        await hub.disconnect("carol", code=4001, reason="Token expired")  # a fresh token again
        await fresh.wait_for("readies.length === 2", "carol's ready message after the 4001")
        assert [s for s in await fresh.js("statuses") if s[0] == "closed"] == [
            ["closed", 401, None],
            ["closed", 4001, None],
        ]
        assert (await fresh.js("readies"))[1]["recovered"] and await fresh.js("seen.length") == 1

        await tab.wait_for("readies.length === 1", "alice's first ready message")
        ids = [await hub.broadcast("alice", {"type": "N", "payload": n}) for n in range(3)]
        await tab.wait_for("seen.length === 3", "three live events")
        await tab.js("client.pause()")  # published meanwhile: replayed on resume
        await until(lambda: "alice" not in hub.stats()["connections_per_user"], "alice gone")
        ids += [await hub.broadcast("alice", {"type": "N", "payload": n}) for n in (3, 4, 5)]
        await tab.js("client.resume()")
        await tab.wait_for("readies.length === 2", "the ready message on resume")
        await hub.streams.lost()  # 1012: the server ends the stream; the client comes back
        await tab.wait_for("readies.length === 3", "the ready message after the 1012")
        ids.append(await hub.broadcast("alice", {"type": "N", "payload": 6}))
        await tab.wait_for("seen.length === 7", "the live event after it")
        assert await tab.js("seen") == [[n, n in (3, 4, 5)] for n in range(7)]
        assert [e["id"] for e in await tab.js("events")] == ids
        readies = await tab.js("readies")
        assert [(r["recovered"], r["replayed"]) for r in readies] == [(True, n) for n in (0, 3, 0)]
        assert await tab.js("client.position") == ids[-1]

        await hub.disconnect("alice")  # 4003: final
        await tab.wait_for("client.status === 'stopped'", "the client to stop")
        await anyio.sleep(QUIET)  # longer than its first backoff (<= 100 ms)
        statuses = await tab.js("statuses")
        assert statuses[-1] == ["stopped", 4003, None]
        assert [s for s in statuses if s[0] == "closed"] == [["closed", 1012, None]]
        assert {transport for status, _, transport in statuses if status == "open"} == {"sse"}
    ours = [info for info in connections if info.user_id == "alice"]
    assert len(ours) == 3 and {info.transport for info in ours} == {"sse"}
    assert await hub.presence("alice") == 0


async def test_auto_falls_back_to_sse_when_a_proxy_refuses_the_upgrade(
    serve: ServeFn, browser: str
) -> None:
    hub = EventHub(users)
    proxy = Proxy(EventsMiddleware(page(CLIENT_PAGE), hub=hub))
    proxy.refuse_websockets = True
    server = await serve(proxy, hub=hub)
    async with open_tab(browser, f"{server.url}/?token=tok-alice&transport=auto") as tab:
        await tab.wait_for("readies.length === 1", "the ready message")
        assert await tab.js("client.transport") == "sse"
        assert await tab.js("statuses") == [
            ["connecting", None, "websocket"],
            ["closed", 1006, None],  # the upgrade was refused (HTTP 403): at once over SSE
            ["connecting", None, "sse"],
            ["open", None, "sse"],
        ]
        first = await hub.broadcast("alice", {"type": "N", "payload": 1})
        await tab.wait_for("seen.length === 1", "a live event")
        assert await tab.js("seen") == [[1, False]]
        await hub.streams.lost()  # it comes back, over SSE again: no further upgrade tried
        await tab.wait_for("readies.length === 2", "the ready message after the 1012")
        assert proxy.websockets == 1 and len(proxy.streams) == 2
        assert proxy.streams[1] == (f"token=tok-alice&lastEventId={first}", None)
        assert (await tab.js("statuses"))[-1] == ["open", None, "sse"]


async def test_auto_never_falls_back_once_a_websocket_opened(serve: ServeFn, browser: str) -> None:
    hub = EventHub(users)
    proxy = Proxy(EventsMiddleware(page(CLIENT_PAGE), hub=hub))
    server = await serve(proxy, hub=hub)
    async with open_tab(browser, f"{server.url}/?token=tok-alice&transport=auto") as tab:
        await tab.wait_for("readies.length === 1", "the ready message")
        assert await tab.js("statuses") == [
            ["connecting", None, "websocket"],
            ["open", None, "websocket"],
        ]
        proxy.refuse_websockets = True
        await hub.streams.lost()  # 1012: it reconnects, and now the upgrade is refused
        await until(lambda: proxy.websockets >= 3, "two refused upgrades")
        assert await tab.js("client.transport") == "websocket" and proxy.streams == []
        proxy.refuse_websockets = False
        await tab.wait_for("readies.length === 2", "the ready message once upgrades pass")
        statuses = await tab.js("statuses")
        assert {t for status, _, t in statuses if status == "connecting"} == {"websocket"}
        assert [code for status, code, _ in statuses if status == "closed"][:3] == [
            1012,
            1006,
            1006,
        ]
        assert proxy.streams == [] and (await tab.js("readies"))[1]["recovered"]


# -- the demo ------------------------------------------------------------------------------


async def test_the_demo_over_sse_shows_live_jobs_and_replays_missed_events(
    serve: ServeFn, browser: str
) -> None:
    server = await serve(demo.app)
    async with open_tab(browser, f"{server.url}/?user=alice&transport=sse") as tab:
        await tab.wait_for(f"({READIES}).length === 1", "the first ready message")
        await tab.wait_for(
            "[...document.querySelectorAll('#jobs .job')].some(j => j.dataset.percent > 0)",
            "a job's progress bar to move (live JOB_PROGRESS)",
        )
        assert await tab.js("demo.client.transport") == "sse"
        assert await tab.js("document.getElementById('transport').value") == "sse"
        assert [s.info.transport for s in demo.hub.streams.all()] == ["sse"]

        await cut(tab)
        missed = [("JOB_STARTED", "sse-1"), ("JOB_COMPLETED", "sse-1")]
        for kind, job in missed:
            await demo.hub.broadcast("alice", {"type": kind, "payload": {"jobId": job}})
        readies = await restore(tab, 2)
        assert readies[1]["recovered"] and readies[1]["replayed"] >= len(missed)
        events = await tab.js(EVENTS)
        ids = [e["id"] for e in events]
        assert len(ids) == len(set(ids)) and all(ids), "an event shown twice, or without id"
        ours = [e for e in events if e["job"].startswith("sse-")]
        assert [(e["type"], e["job"]) for e in ours] == missed
        assert all(e["replayed"] for e in ours)
        await tab.screenshot(f"demo-sse-{server.port}.png")
