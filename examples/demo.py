"""The demo: jobs for a few users, pushed live, watched in a browser.

Run: hypercorn examples.demo:app --bind 127.0.0.1:8000
Then open http://127.0.0.1:8000/?user=alice (or bob, carol; add &in=query to pass the token in
the query string instead of the subprotocol, and &transport=sse for Server-Sent Events instead of
the WebSocket, or &transport=auto for a WebSocket that falls back to SSE; the page's Transport
menu switches too).

The page (demo.html) uses the browser client the middleware serves at /ws/client.js: it shows
each job go JOB_STARTED -> progress -> JOB_COMPLETED/JOB_FAILED, its Disconnect/Reconnect
button cuts and restores the socket, and the events missed meanwhile arrive marked "replayed",
with a marker when the replay was incomplete. Its first connection asks for the last 15 s of
events (lastEventTs), so that the job in progress shows at once. JOB_PROGRESS is a latest-value
type: live only, but the hub keeps each job's newest progress, and every connection gets it
after its replay ("latest": true), so a page that reconnects mid-job shows where it is at once.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from asgi_events import EventHub, EventsMiddleware

from ._backend import backend_from_env

USERS = ("alice", "bob", "carol")
PAGE = (Path(__file__).parent / "demo.html").read_text(encoding="utf-8")


def verify_token(token: str) -> str | None:
    """Demo auth: "demo-<user>" is <user>."""
    user = token.removeprefix("demo-")
    return user if user in USERS else None


hub = EventHub(
    verify_token,
    backend=backend_from_env(),
    latest_types={"JOB_PROGRESS": "payload.jobId"},  # progress is {"jobId", "percent"}
)


async def run_jobs(user: str, pace: float = 0.6) -> None:
    """Forever: start a job, report its progress, then complete or fail it."""
    number = 0
    while True:
        number += 1
        job = {"jobId": f"{user}-{number}"}
        await hub.broadcast(user, {"type": "JOB_STARTED", "payload": job})
        for percent in range(10, 100, 10):
            await anyio.sleep(pace * random.uniform(0.5, 1.5))
            progress = {**job, "percent": percent}
            await hub.broadcast(user, {"type": "JOB_PROGRESS", "payload": progress})
        await anyio.sleep(pace)
        if random.random() < 0.8:
            await hub.broadcast(user, {"type": "JOB_COMPLETED", "payload": {**job, "percent": 100}})
        else:
            await hub.broadcast(user, {"type": "JOB_FAILED", "payload": {**job, "error": "boom"}})
        await anyio.sleep(pace * 2)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with anyio.create_task_group() as jobs:
        for user in USERS:
            jobs.start_soon(run_jobs, user)
        print("demo: open http://127.0.0.1:8000/?user=alice (or bob, carol)", flush=True)
        yield
        jobs.cancel_scope.cancel()


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE)


async def stats(request: Request) -> JSONResponse:
    return JSONResponse(hub.stats())


app = Starlette(
    routes=[Route("/", page), Route("/stats", stats)],
    middleware=[Middleware(EventsMiddleware, hub=hub)],
    lifespan=lifespan,
)
