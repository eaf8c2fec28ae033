"""The server side of the routing and soak modes: control routes of an asgi-events node
(``apps``), in memory or on Redis.

- ``GET /stats``: ``hub.stats()`` (its ``backend`` part counts ``events_received`` and
  ``events_received_idle``, which the load side reads before and after a run).
- ``POST /publish-users``: the publisher's loop, per-user ``hub.broadcast(user_id, event)``
  (buffered events: one script per event appends it to the user's stream and publishes it on
  the user's channel). ``tasks`` loops run at once, as concurrent requests of an application
  would; each has its own share of the users (user ``i`` in loop ``i % tasks``), so every
  user's events are published one after the other, in ``seq`` order, which the clients check.
- ``POST /publish-soak``: the soak mode's publisher, open loop at ``rate`` ticks per second (as
  steady mode's, ``t`` is the time a tick was due); a tick is one ``hub.broadcast(user_id,
  event)`` per user, in user order (``broadcast_to_all`` is not buffered, so its events could
  not be resumed). It answers at the end, with how late the ticks were, per bucket of
  ``bucket_s`` seconds (by due time).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .apps import Route, bench_event
from .common import percentile

if TYPE_CHECKING:
    from asgi_events import EventHub


def hub_routes(hub: EventHub) -> dict[tuple[str, str], Route]:
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

    return {
        ("GET", "/stats"): stats,
        ("POST", "/publish-users"): publish_users,
        ("POST", "/publish-soak"): publish_soak(hub),
    }


def publish_soak(hub: EventHub) -> Route:
    async def publish(request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        import anyio

        users = [f"user-{i}" for i in range(int(request["users"]))]
        events, rate = int(request["events"]), float(request["rate"])
        pad, bucket_s = "x" * int(request["payload"]), float(request["bucket_s"])
        lags: list[list[int]] = []  # per bucket (by due time): how late each tick started, ns
        start_ns, started = time.time_ns(), time.perf_counter()
        for seq in range(events):
            due = seq / rate
            delay = started + due - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            bucket = int(due // bucket_s)
            while len(lags) <= bucket:
                lags.append([])
            lags[bucket].append(int((time.perf_counter() - started - due) * 1e9))
            event = bench_event(seq, start_ns + int(due * 1e9), pad, False)
            for user in users:  # (broadcast copies the event: one dict serves every user)
                await hub.broadcast(user, event)
        call_s = time.perf_counter() - started
        for lag in lags:
            lag.sort()
        lag_ms = [[percentile(lag, 0.99) / 1e6, lag[-1] / 1e6 if lag else 0.0] for lag in lags]
        return 200, {"start_ns": start_ns, "call_s": call_s, "lag_ms": lag_ms}

    return publish
