"""The examples' backend, chosen by the environment: memory, or Redis for several nodes.

ASGI_EVENTS_REDIS_URL=redis://127.0.0.1:6379/0 selects RedisBackend (extra "redis");
ASGI_EVENTS_PREFIX sets its key prefix (default "asgi-events").
"""

from __future__ import annotations

import os

from asgi_events.backends.base import Backend


def backend_from_env() -> Backend | None:
    url = os.environ.get("ASGI_EVENTS_REDIS_URL")
    if not url:
        return None
    from asgi_events.backends.redis import RedisBackend

    return RedisBackend(url, prefix=os.environ.get("ASGI_EVENTS_PREFIX", "asgi-events"))
