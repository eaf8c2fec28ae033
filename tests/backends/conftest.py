"""The contract suite's fixture: every test runs against each backend (see support/backends)."""

from __future__ import annotations

import pytest

from ..support.backends import Subject
from ..support.redis_cluster import RedisCluster
from ..support.redis_server import RedisServer


@pytest.fixture(params=["memory", "redis", "cluster"])
def subject(
    request: pytest.FixtureRequest, redis_server: RedisServer, redis_cluster: RedisCluster
) -> Subject:
    """One backend to check: memory, Redis on the session's redis-server, or on its Redis
    Cluster."""
    return Subject(str(request.param), redis_server, redis_cluster)
