"""The server side of the routing mode: control routes of a Redis node (``apps``).

- ``GET /stats``: ``hub.stats()`` (its ``backend`` part counts ``events_received`` and
  ``events_received_idle``, which the load side reads before and after a run).
- ``POST /publish-users``: the publisher's loop, per-user ``hub.broadcast(user_id, event)``
  (buffered events: one script per event appends it to the user's stream and publishes it on
  the user's channel). ``tasks`` loops run at once, as concurrent requests of an application
  would; each has its own share of the users (user ``i`` in loop ``i % tasks``), so every
  user's events are published one after the other, in ``seq`` order, which the clients check.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .apps import Route, bench_event

if TYPE_CHECKING:
    from asgi_events import EventHub


def routing_routes(hub: EventHub) -> dict[tuple[str, str], Route]:
    async def stats(_request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, {"stats": hub.stats()}

    async def publish_users(request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        import anyio

        users: list[str] = list(request["users"])
        rounds, pad = int(request["rounds"]), "x" * int(request["payload"])
        tasks = max(1, min(int(request.get("tasks", 1)), len(users)))

        async def publish(share: list[str]) -> None:
            for seq in range(rounds):
                for user in share:
                    await hub.broadcast(user, bench_event(seq, time.time_ns(), pad, False))

        start_ns, started = time.time_ns(), time.perf_counter()
        try:
            async with anyio.create_task_group() as task_group:
                for k in range(tasks):
                    task_group.start_soon(publish, users[k::tasks])
        except Exception as exc:  # (an ExceptionGroup from the task group)
            return 503, {"error": f"publishing failed: {exc!r}"}
        call_s = time.perf_counter() - started
        return 200, {"start_ns": start_ns, "call_s": call_s, "events": rounds * len(users)}

    return {("GET", "/stats"): stats, ("POST", "/publish-users"): publish_users}
