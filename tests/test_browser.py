"""End to end: the demo page, and the browser client's reconnects, in headless Chromium.

Chromium is Debian's ``chromium`` package (or the binary named by ``ASGI_EVENTS_CHROMIUM``),
driven over the DevTools protocol with httpx-ws: no browser download, no driver package. One
browser serves the module; each test opens its own tab on its own server (hypercorn, on the
test's anyio backend) running ``examples.demo:app`` with its job producer.
Set ``ASGI_EVENTS_SCREENSHOTS`` to a directory to keep a screenshot of each test's page.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from httpx_ws import AsyncWebSocketSession, aconnect_ws

from asgi_events import ConnectionInfo, EventHub, EventsMiddleware
from asgi_events.types import Receive, Scope, Send
from examples import demo

from .support.server import QUIET, TIMEOUT, Connect, ServeFn, users

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-background-timer-throttling",  # tabs not in front keep their timers (pings)
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--window-size=900,1000",
    "--remote-debugging-port=0",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[str]:
    """A headless Chromium for the module: its DevTools base URL (http://127.0.0.1:<port>)."""
    binary = os.environ.get("ASGI_EVENTS_CHROMIUM") or shutil.which("chromium")
    if binary is None:
        pytest.fail("the browser tests need Chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        profile = Path(tmp, "profile")
        with open(Path(tmp, "chromium.log"), "wb") as log:
            process = subprocess.Popen(
                [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            yield f"http://127.0.0.1:{_devtools_port(process, profile, Path(tmp, 'chromium.log'))}"
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                process.kill()
                process.wait()


def _devtools_port(process: subprocess.Popen[bytes], profile: Path, log: Path) -> int:
    """Chromium writes the port it picked to DevToolsActivePort in its profile."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        path = profile / "DevToolsActivePort"
        lines = path.read_text().split() if path.exists() else []
        if len(lines) == 2:
            return int(lines[0])
        if process.poll() is not None:
            break
        time.sleep(0.05)
    pytest.fail(f"Chromium did not start:\n{log.read_text(errors='replace')[-3000:]}")


class Tab:
    """One page over the DevTools protocol: just commands and their results, in turn."""

    def __init__(self, ws: AsyncWebSocketSession) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self.ids)
        await self.ws.send_text(json.dumps({"id": number, "method": method, "params": params}))
        with anyio.fail_after(TIMEOUT):
            while True:  # skip the protocol's events: nothing here enables them, but still
                reply = json.loads(await self.ws.receive_text())
                if reply.get("id") == number:
                    break
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return dict(reply["result"])

    async def js(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str) -> Any:
        """Poll ``expression`` until it is truthy (bounded by TIMEOUT); its value."""
        deadline = anyio.current_time() + TIMEOUT
        while not (value := await self.js(expression)):
            if anyio.current_time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; page:\n{await self.text()}")
            await anyio.sleep(0.05)
        return value

    async def text(self) -> str:
        return str(await self.js("document.body.innerText"))[:3000]

    async def screenshot(self, name: str) -> None:
        directory = os.environ.get("ASGI_EVENTS_SCREENSHOTS")
        if directory:
            png = base64.b64decode((await self.send("Page.captureScreenshot"))["data"])
            await anyio.Path(directory, name).write_bytes(png)


@asynccontextmanager
async def open_tab(devtools: str, url: str) -> AsyncIterator[Tab]:
    async with httpx.AsyncClient(base_url=devtools, timeout=TIMEOUT) as http:
        target = (await http.put("/json/new?about:blank")).raise_for_status().json()
        try:
            page_ws = target["webSocketDebuggerUrl"].replace("ws://", "http://", 1)
            async with aconnect_ws(
                page_ws, http, keepalive_ping_interval_seconds=None, max_message_size_bytes=2**25
            ) as ws:
                tab = Tab(ws)
                await tab.send("Page.navigate", url=url)
                here = f"location.href === {json.dumps(url)}"
                await tab.wait_for(f"{here} && document.readyState === 'complete'", f"{url}")
                yield tab  # the page is loaded: its module scripts have run
        finally:
            with anyio.move_on_after(2, shield=True), suppress(httpx.HTTPError):
                await http.get(f"/json/close/{target['id']}")


# The page's state, read from its DOM: event rows newest first, so reversed here.
EVENTS = """[...document.querySelectorAll('#log li.event')].reverse().map(li => ({
  id: li.dataset.id, type: li.dataset.type, job: li.dataset.job,
  replayed: li.dataset.replayed === 'true', payload: JSON.parse(li.dataset.payload)}))"""
READIES = """[...document.querySelectorAll('#log li.ready')].reverse().map(li => ({
  recovered: li.dataset.recovered === 'true', reason: li.dataset.reason,
  replayed: Number(li.dataset.replayedCount), gap: li.classList.contains('gap')}))"""
STATUS = "document.getElementById('status').dataset.status"
TOGGLE = "document.getElementById('toggle').click()"


async def cut(tab: Tab) -> None:
    """The page's Disconnect button, and its socket is gone (both sides)."""
    assert await tab.js("document.getElementById('toggle').textContent") == "Disconnect"
    await tab.js(TOGGLE)
    await tab.wait_for(f"{STATUS} === 'paused'", "the page to say paused")
    with anyio.fail_after(TIMEOUT):
        while demo.hub.stats()["total_connections"]:  # noqa: ASYNC110 - the server's state
            await anyio.sleep(0.02)


async def restore(tab: Tab, readies: int) -> list[dict[str, Any]]:
    """The page's Reconnect button; once the new socket's ready message is shown, the readies."""
    assert await tab.js("document.getElementById('toggle').textContent") == "Reconnect"
    await tab.js(TOGGLE)
    await tab.wait_for(f"({READIES}).length === {readies}", f"ready message {readies}")
    result: list[dict[str, Any]] = await tab.js(READIES)
    return result


async def test_the_demo_shows_live_jobs_and_missed_events_exactly_once(
    serve: ServeFn, browser: str
) -> None:
    server = await serve(demo.app)
    async with open_tab(browser, f"{server.url}/?user=alice") as tab:
        # The first connection: the job in progress (replayed by lastEventTs), then live progress.
        await tab.wait_for(f"({READIES}).length === 1", "the first ready message")
        await tab.wait_for(
            "[...document.querySelectorAll('#jobs .job')].some(j => j.dataset.percent > 0)",
            "a job's progress bar to move (live JOB_PROGRESS)",
        )
        assert await tab.js(f"{STATUS} === 'open'")
        first = (await tab.js(READIES))[0]
        assert first["recovered"] and first["replayed"] >= 1  # at least the job's JOB_STARTED

        await cut(tab)
        missed = []
        for n in (1, 2, 3):
            job = {"jobId": f"e2e-{n}"}
            missed += [("JOB_STARTED", job["jobId"]), ("JOB_COMPLETED", job["jobId"])]
            await demo.hub.broadcast("alice", {"type": "JOB_STARTED", "payload": job})
            progress = {**job, "percent": 50}  # live only; kept as the job's latest value
            await demo.hub.broadcast("alice", {"type": "JOB_PROGRESS", "payload": progress})
            await demo.hub.broadcast("alice", {"type": "JOB_COMPLETED", "payload": job})
        readies = await restore(tab, 2)

        assert [r["gap"] for r in readies] == [False, False]
        assert readies[1]["recovered"] and readies[1]["replayed"] >= len(missed)
        events = await tab.js(EVENTS)
        ids = [e["id"] for e in events]
        assert len(ids) == len(set(ids)) and all(ids), "an event shown twice, or without id"
        ours = [e for e in events if e["job"].startswith("e2e-")]
        assert [(e["type"], e["job"]) for e in ours] == missed
        assert all(e["replayed"] for e in ours)
        assert await tab.js("document.querySelectorAll('.gap, .stale').length") == 0
        for n in (1, 2, 3):  # their latest progress (50), sent after the replay, left them be
            card = f"document.getElementById('job-e2e-{n}')"
            assert await tab.js(f"{card}.classList.contains('JOB_COMPLETED')")
            assert await tab.js(f"{card}.dataset.percent") == "100"

        # Live again, on the restored socket.
        await demo.hub.broadcast("alice", {"type": "JOB_STARTED", "payload": {"jobId": "e2e-live"}})
        live = await tab.wait_for(
            f"({EVENTS}).filter(e => e.job === 'e2e-live')", "the live event after the reconnect"
        )
        assert [e["replayed"] for e in live] == [False]
        await tab.screenshot(f"demo-resumed-{server.port}.png")


async def test_the_demo_shows_a_job_s_current_progress_after_a_reconnect(
    serve: ServeFn, browser: str
) -> None:
    server = await serve(demo.app)
    card = "document.getElementById('job-mid-1')"
    job = {"jobId": "mid-1"}
    async with open_tab(browser, f"{server.url}/?user=carol") as tab:
        await tab.wait_for(f"({READIES}).length === 1", "the first ready message")
        await demo.hub.broadcast("carol", {"type": "JOB_STARTED", "payload": job})
        await demo.hub.broadcast(
            "carol", {"type": "JOB_PROGRESS", "payload": {**job, "percent": 20}}
        )
        await tab.wait_for(f"{card}?.dataset.percent === '20'", "the live progress")
        await cut(tab)
        await demo.hub.broadcast(
            "carol", {"type": "JOB_PROGRESS", "payload": {**job, "percent": 60}}
        )
        await restore(tab, 2)  # returns once the ready message is shown: after the latest values
        assert await tab.js(f"{card}.dataset.percent") == "60"
        assert await tab.js(f"{card}.dataset.latest") == "true"
        assert await tab.js(f"{card}.querySelector('.state').textContent") == "running 60%"
        assert await tab.js(f"{card}.querySelector('.bar > div').style.width") == "60%"
        await tab.screenshot(f"demo-latest-{server.port}.png")


async def test_the_demo_marks_an_incomplete_replay(serve: ServeFn, browser: str) -> None:
    server = await serve(demo.app)
    async with open_tab(browser, f"{server.url}/?user=bob&in=query") as tab:  # token in query
        await tab.wait_for(f"({READIES}).length === 1", "the first ready message")
        await cut(tab)
        total = 260  # more than the demo hub's buffer_size (200): the oldest are evicted
        for n in range(total):
            await demo.hub.broadcast("bob", {"type": "NOTICE", "payload": {"n": n}})
        readies = await restore(tab, 2)

        assert [r["gap"] for r in readies] == [False, True]
        assert readies[1]["reason"] == "evicted" and not readies[1]["recovered"]
        note = await tab.js("document.getElementById('note').textContent")
        assert "replay incomplete (evicted)" in note
        events = await tab.js(EVENTS)
        ids = [e["id"] for e in events]
        assert len(ids) == len(set(ids)) and all(ids)
        kept = [e["payload"]["n"] for e in events if e["type"] == "NOTICE"]
        assert kept == list(range(total - len(kept), total)) and 150 < len(kept) <= 200
        assert all(e["replayed"] for e in events if e["type"] == "NOTICE")
        await tab.screenshot(f"demo-gap-{server.port}.png")


# A bare page for the client itself: its options from the query, what it reports kept in
# window.seen (payload, replayed), window.events (each event as given), window.readies and
# window.statuses ([status, code]); and, from a wrapper around the page's WebSocket, the
# subprotocols each socket offered (window.offered) and every frame received, as it came
# (window.frames_: the text of each frame, on any socket, in order).
CLIENT_PAGE = b"""<!doctype html><script type="module">
import { connect } from "/ws/client.js";
const q = new URLSearchParams(location.search);
Object.assign(window, { seen: [], events: [], readies: [], statuses: [] });
Object.assign(window, { offered: [], frames_: [] });
window.WebSocket = class extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    offered.push(protocols);
    this.addEventListener("message", (message) => frames_.push(message.data));
  }
};
window.client = connect({
  token: q.get("token"), tokenIn: q.get("in") || undefined, ping: Number(q.get("ping") || 0),
  batch: q.get("batch") === "0" ? false : undefined, lastEventTs: q.get("since") || undefined,
  backoff: { initial: 100, max: 400 },
  refreshToken: q.get("fresh") ? async () => q.get("fresh") : undefined,
  onEvent: (event, { replayed }) => { seen.push([event.payload, replayed]); events.push(event); },
  onReady: (ready) => readies.push(ready),
  onStatus: (status, detail) => statuses.push([status, detail.code ?? null]),
});
</script>"""


async def client_page(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        headers = [(b"content-type", b"text/html")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": CLIENT_PAGE})


async def test_the_client_reconnects_resumes_pings_refreshes_and_stops(
    serve: ServeFn, connect: Connect, browser: str
) -> None:
    hub = EventHub(users, idle_timeout=0.8, max_connections_per_user=1)
    server = await serve(EventsMiddleware(client_page, hub=hub), hub=hub)
    async with (
        open_tab(browser, f"{server.url}/?token=tok-alice") as idle,
        open_tab(browser, f"{server.url}/?token=tok-bob&ping=150") as pinging,
        open_tab(browser, f"{server.url}/?token=no&fresh=tok-carol&in=query&ping=150") as fresh,
    ):
        for tab in (idle, pinging, fresh):  # (alice's tab may be on its next socket already)
            await tab.wait_for("readies.length >= 1", "the first ready message")
        # alice never writes: closed with 4002 every 0.8 s, she reconnects and resumes by id;
        # bob's pings keep his one socket open.
        for n in range(30):
            await hub.broadcast("alice", {"type": "N", "payload": n})
            await hub.broadcast("bob", {"type": "N", "payload": n})
            await anyio.sleep(0.06)
        for tab in (idle, pinging):
            await tab.wait_for("seen.length >= 30", "30 events")
            assert [payload for payload, _ in await tab.js("seen")] == list(range(30))
        await idle.wait_for("statuses.some(([, code]) => code === 4002)", "an idle close")
        assert ["closed", 4002] in await idle.js("statuses")
        assert all(ready["recovered"] for ready in await idle.js("readies"))
        assert await pinging.js("statuses") == [["connecting", None], ["open", None]]
        # A bad token (1008), then the one refreshToken gave.
        statuses = await fresh.js("statuses")
        assert [s for s in statuses if s[0] == "closed"] == [["closed", 1008]]
        assert statuses[-1] == ["open", None]
        # A new socket of bob's displaces the page's (1008): the client stops, for good.
        async with connect(server.ws_url(token="tok-bob")):
            await pinging.wait_for("client.status === 'stopped'", "the client to stop")
            await anyio.sleep(QUIET)
            assert (await pinging.js("statuses"))[-1] == ["stopped", 1008]
            assert hub.stats()["connections_per_user"].get("bob") == 1


async def test_the_client_stops_for_good_on_4003(serve: ServeFn, browser: str) -> None:
    connections: list[ConnectionInfo] = []
    hub = EventHub(users, on_connect=connections.append)
    server = await serve(EventsMiddleware(client_page, hub=hub), hub=hub)
    async with open_tab(browser, f"{server.url}/?token=tok-alice") as tab:
        await tab.wait_for("readies.length === 1", "the first ready message")
        await hub.disconnect("alice")  # 4003 "Disconnected": say the user logged out
        await tab.wait_for("client.status === 'stopped'", "the client to stop")
        await anyio.sleep(QUIET)  # longer than the page's first backoff (<= 100 ms)
        statuses = await tab.js("statuses")
        assert statuses[-1] == ["stopped", 4003]  # reported to the page, with its code
        assert "closed" not in [status for status, _ in statuses]  # no retry was scheduled
        assert len(connections) == 1 and await hub.presence("alice") == 0
        assert await tab.js("client.status") == "stopped"


async def test_latest_values_reach_the_page_and_leave_the_dedupe_alone(
    serve: ServeFn, browser: str
) -> None:
    hub = EventHub(users, latest_types={"P": "payload.job"})
    server = await serve(EventsMiddleware(client_page, hub=hub), hub=hub)
    for job, n in (("a", 1), ("b", 1), ("a", 2)):
        await hub.broadcast("alice", {"type": "P", "payload": {"job": job, "n": n}})
    async with open_tab(browser, f"{server.url}/?token=tok-alice") as tab:
        await tab.wait_for("readies.length === 1", "the first ready message")
        await hub.broadcast("alice", {"type": "P", "payload": {"job": "a", "n": 3}})
        first = await hub.broadcast("alice", {"type": "N", "payload": {"n": 1}})
        await tab.wait_for("events.length === 4", "two latest values and two live events")
        assert await tab.js("client.position") == first
        await hub.streams.lost()  # 1012: the page reconnects and resumes from `first`
        await tab.wait_for("readies.length === 2", "the second ready message")
        assert await tab.js("client.position") == first  # the latest values did not move it
        second = await hub.broadcast("alice", {"type": "N", "payload": {"n": 2}})
        await tab.wait_for("events.length === 7", "the live event after the reconnect")
        events = await tab.js("events")
        shown = [(e["type"], e["payload"], e.get("id"), e.get("latest")) for e in events]
        assert shown == [
            ("P", {"job": "b", "n": 1}, None, True),  # the latest value of each job, oldest
            ("P", {"job": "a", "n": 2}, None, True),  # first, before the ready message
            ("P", {"job": "a", "n": 3}, None, None),  # live: no id, no latest
            ("N", {"n": 1}, first, None),
            ("P", {"job": "b", "n": 1}, None, True),  # again on the new connection
            ("P", {"job": "a", "n": 3}, None, True),
            ("N", {"n": 2}, second, None),  # and N 1 not again
        ]
        replayed = [flag for _, flag in await tab.js("seen")]
        assert replayed == [True, True, False, False, True, True, False]
        assert await tab.js("client.position") == second


BATCH = "asgi-events.v1.batch"
V1 = "asgi-events.v1"
READY = "asgi_events.ready"


def unpack(frames: list[str]) -> list[list[Any] | str]:
    """The page's frames: "pong" as it is, every other one parsed (a batch is a list)."""
    return [frame if frame == "pong" else json.loads(frame) for frame in frames]


def messages(frames: list[list[Any] | str]) -> list[Any]:
    """Every message of ``frames`` in order, with a batch's unpacked; "pong" left out."""
    out: list[Any] = []
    for frame in frames:
        if frame != "pong":
            out += frame if isinstance(frame, list) else [frame]
    return out


async def until_pong_after(tab: Tab, count: int) -> None:
    """Until the page got a "pong" after its first ``count`` frames (its pings are timed)."""
    await tab.wait_for(f"frames_.slice({count}).includes('pong')", f"a pong after frame {count}")


async def test_the_client_unpacks_batches_in_order_with_ready_and_pong(
    serve: ServeFn, browser: str
) -> None:
    connections: list[ConnectionInfo] = []
    hub = EventHub(users, on_connect=connections.append)
    server = await serve(EventsMiddleware(client_page, hub=hub), hub=hub)
    for n in range(20):  # replayed on connect (lastEventTs), with the ready message
        await hub.broadcast("alice", {"type": "B", "payload": n})
    url = f"{server.url}/?token=tok-alice&ping=100&since=2000-01-01T00:00:00Z"
    async with open_tab(browser, url) as tab:
        await tab.wait_for("readies.length === 1", "the first ready message")
        assert [info.subprotocol for info in connections] == [BATCH]  # picked by the server
        assert await tab.js("client.protocol") == BATCH
        assert await tab.js("offered") == [[BATCH, V1, "asgi-events.token.tok-alice"]]
        # (a) The replay and the ready message came in one frame: the ready inside a batch.
        first = unpack(await tab.js("frames_"))[0]
        assert isinstance(first, list)
        assert [m["type"] for m in first] == ["B"] * 20 + [READY]

        # (b) A live burst: broadcast with the memory backend never yields, so all 100 are
        # queued before the socket's sender runs, and go out together.
        before = len(await tab.js("frames_"))
        for n in range(20, 120):
            await hub.broadcast("alice", {"type": "B", "payload": n})
        await tab.wait_for("seen.length === 120", "the burst")
        burst = [f for f in unpack((await tab.js("frames_"))[before:]) if f != "pong"]
        assert all(isinstance(f, list) for f in burst)
        assert max(len(f) for f in burst) > 1 and len(burst) < 100
        # (d) Pong on the batch socket: a plain frame of its own, between batches.
        await until_pong_after(tab, len(await tab.js("frames_")))
        for n in range(120, 140):
            await hub.broadcast("alice", {"type": "B", "payload": n})
        await tab.wait_for("seen.length === 140", "the second burst")

        # (c) A resume by id with nothing missed: the ready message alone in its frame.
        before = len(await tab.js("frames_"))
        await hub.streams.lost()  # 1012: the page reconnects, resuming from its position
        await tab.wait_for("readies.length === 2", "the second ready message")
        [alone] = [f for f in unpack((await tab.js("frames_"))[before:]) if f != "pong"]
        assert isinstance(alone, list) and [m["type"] for m in alone] == [READY]
        # A resume with missed events: the replay and the ready message, one batch again.
        await tab.js("client.pause()")
        with anyio.fail_after(TIMEOUT):
            while hub.stats()["total_connections"]:  # noqa: ASYNC110 - the server's state
                await anyio.sleep(0.02)
        for n in range(140, 150):
            await hub.broadcast("alice", {"type": "B", "payload": n})
        before = len(await tab.js("frames_"))
        await tab.js("client.resume()")
        await tab.wait_for("readies.length === 3", "the third ready message")
        [resumed] = [f for f in unpack((await tab.js("frames_"))[before:]) if f != "pong"]
        assert isinstance(resumed, list)
        assert [m["payload"] for m in resumed[:-1]] == list(range(140, 150))
        assert resumed[-1]["type"] == READY and resumed[-1]["payload"]["replayed"] == 10
        await until_pong_after(tab, len(await tab.js("frames_")))

        # Every event once, in order, as the frames carried them; replayed ones flagged.
        seen = await tab.js("seen")
        assert [payload for payload, _ in seen] == list(range(150))
        flags = [replayed for _, replayed in seen]
        assert flags == [True] * 20 + [False] * 120 + [True] * 10
        frames = unpack(await tab.js("frames_"))
        assert all(f == "pong" or isinstance(f, list) for f in frames)  # nothing else
        sent = [m["payload"] for m in messages(frames) if m["type"] == "B"]
        assert sent == list(range(150))
        assert [r["recovered"] for r in await tab.js("readies")] == [True, True, True]
        assert [info.subprotocol for info in connections] == [BATCH] * 3
        # The pings kept the sockets healthy: the only closes were the two above.
        statuses = await tab.js("statuses")
        assert [s for s in statuses if s[0] == "closed"] == [["closed", 1012]]


@pytest.mark.parametrize("how", ["option", "old-server"])
async def test_the_client_falls_back_to_one_message_a_frame(
    serve: ServeFn, browser: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asgi_events import auth

    if how == "old-server":  # a server from before batching: it knows only asgi-events.v1
        monkeypatch.setattr(auth, "SUBPROTOCOLS", (V1,))
    connections: list[ConnectionInfo] = []
    hub = EventHub(users, on_connect=connections.append)
    server = await serve(EventsMiddleware(client_page, hub=hub), hub=hub)
    for n in range(5):
        await hub.broadcast("alice", {"type": "B", "payload": n})
    option = "&batch=0" if how == "option" else ""
    url = f"{server.url}/?token=tok-alice&ping=100&since=2000-01-01T00:00:00Z{option}"
    async with open_tab(browser, url) as tab:
        await tab.wait_for("readies.length === 1", "the ready message")
        offered = [V1] if how == "option" else [BATCH, V1]
        assert await tab.js("offered") == [[*offered, "asgi-events.token.tok-alice"]]
        assert [info.subprotocol for info in connections] == [V1]
        assert await tab.js("client.protocol") == V1
        for n in range(5, 55):  # a burst: still one message a frame
            await hub.broadcast("alice", {"type": "B", "payload": n})
        await tab.wait_for("seen.length === 55", "the burst")
        await until_pong_after(tab, len(await tab.js("frames_")))
        assert [payload for payload, _ in await tab.js("seen")] == list(range(55))
        frames = unpack(await tab.js("frames_"))
        assert all(f == "pong" or isinstance(f, dict) for f in frames)  # never an array
        types = [m["type"] for m in messages(frames)]
        assert types == ["B"] * 5 + [READY] + ["B"] * 50
        assert "closed" not in [status for status, _ in await tab.js("statuses")]
