"""asgi-events in a Starlette app.

Run: hypercorn examples.starlette_app:app
Two nodes on one Redis: see examples/two_nodes.sh.
Watch: connect a WebSocket to ws://127.0.0.1:8000/ws?token=secret-alice
Push: curl -X POST http://127.0.0.1:8000/jobs/alice
"""

from __future__ import annotations

import uuid

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_events import EventHub, EventsMiddleware

from ._backend import backend_from_env


def verify_token(token: str) -> str | None:
    """Toy auth: "secret-<user>" is <user>. Check a real token (a JWT, a session) here."""
    return token.removeprefix("secret-") if token.startswith("secret-") else None


hub = EventHub(verify_token, backend=backend_from_env())


async def start_job(request: Request) -> JSONResponse:
    job_id = uuid.uuid4().hex[:8]
    user = request.path_params["user"]
    await hub.broadcast(user, {"type": "JOB_STARTED", "payload": {"jobId": job_id}})
    return JSONResponse({"jobId": job_id})


async def stats(request: Request) -> JSONResponse:
    return JSONResponse(hub.stats())


app = Starlette(
    routes=[Route("/jobs/{user}", start_job, methods=["POST"]), Route("/stats", stats)],
    middleware=[Middleware(EventsMiddleware, hub=hub)],
)
