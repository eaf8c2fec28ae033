"""The contract suite's fixture: every test runs against each backend (see support/backends)."""

from __future__ import annotations

import pytest

from ..support.backends import Subject
from ..support.redis_server import RedisServer


@pytest.fixture(params=["memory", "redis"])
def subject(request: pytest.FixtureRequest, redis_server: RedisServer) -> Subject:
    """One backend to check: memory, or Redis on the session's redis-server."""
    return Subject(str(request.param), redis_server)
