"""asgi-events in a FastAPI app.

Run: hypercorn examples.fastapi_app:app
Watch: connect a WebSocket to ws://127.0.0.1:8000/ws?token=secret-alice
Push: curl -X POST http://127.0.0.1:8000/jobs/alice/done
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from asgi_events import EventHub, EventsMiddleware


async def verify_token(token: str) -> str | None:
    """Toy auth: "secret-<user>" is <user>. Check a real token (a JWT, a session) here."""
    return token.removeprefix("secret-") if token.startswith("secret-") else None


hub = EventHub(verify_token)
app = FastAPI()
app.add_middleware(EventsMiddleware, hub=hub)


@app.post("/jobs/{user}/done")
async def job_done(user: str) -> dict[str, Any]:
    await hub.broadcast(user, {"type": "JOB_COMPLETED", "payload": {"result": "ok"}})
    return {"sent": True}


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return hub.stats()
