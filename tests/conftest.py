"""Fixtures: both anyio backends, a real hypercorn server on an ephemeral port, WS clients,
real redis-servers. What they are built from is in ``tests/support/``."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from httpx_ws import AsyncWebSocketSession, aconnect_ws
from hypercorn.config import Config

from asgi_events import EventHub, EventsMiddleware
from asgi_events.types import ASGIApp

from .support.redis_cluster import RedisCluster, running_cluster
from .support.redis_sentinel import SentinelSetup, running_sentinels
from .support.redis_server import RedisServer, running_redis
from .support.server import (
    TIMEOUT,
    Connect,
    ServeFn,
    Server,
    http_app,
    run_server,
    signal_startup,
    users,
)


@pytest.fixture(params=[pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def serve(anyio_backend: str) -> AsyncIterator[ServeFn]:
    """Start hypercorn (the asyncio or trio worker, as the test's backend) on 127.0.0.1:0.

    With no ``app``, serves ``EventsMiddleware(http_app, hub=hub)``; ``port=`` binds that port
    instead (a restart on the port of a stopped server). Returns once lifespan startup is
    complete; every server is stopped at the end of the test.
    """
    servers: list[Server] = []
    async with anyio.create_task_group() as tg:

        async def start(
            app: ASGIApp | None = None, *, hub: EventHub | None = None, **config: Any
        ) -> Server:
            if app is None:
                hub = hub or EventHub(users)
                app = EventsMiddleware(http_app, hub=hub)
            port = config.pop("port", 0)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if port:  # the last server's connections on it may be in TIME_WAIT
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(1024)
            server = Server(sock.getsockname()[1], hub)
            cfg = Config()
            cfg.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) it from here
            cfg.graceful_timeout = config.pop("graceful_timeout", 1.0)
            cfg.accesslog = None
            cfg.errorlog = None
            for key, value in config.items():
                setattr(cfg, key, value)
            tg.start_soon(
                run_server, anyio_backend, signal_startup(app, server.started), cfg, server
            )
            with anyio.fail_after(TIMEOUT):
                await server.started.wait()
            servers.append(server)
            return server

        yield start
        for server in servers:
            await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
def connect(http: httpx.AsyncClient) -> Connect:
    """``connect(url, subprotocols=None, headers=None)``: an httpx-ws session (no keepalive)."""

    @asynccontextmanager
    async def _connect(
        url: str, subprotocols: list[str] | None = None, headers: dict[str, str] | None = None
    ) -> AsyncIterator[AsyncWebSocketSession]:
        async with aconnect_ws(
            url,
            http,
            subprotocols=subprotocols,
            headers=headers or {},
            keepalive_ping_interval_seconds=None,
            max_message_size_bytes=4 * 1024 * 1024,
        ) as ws:
            yield ws

    return _connect


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Every coroutine test runs under anyio, on each backend of ``anyio_backend``: marked here,
    before anyio's own hook (it parametrizes only tests marked by then)."""
    import inspect

    if isinstance(collector, pytest.Module | pytest.Class) and collector.istestfunction(obj, name):
        if inspect.iscoroutinefunction(obj):
            pytest.mark.anyio(obj)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session; tests keep apart by a key prefix of their own."""
    with running_redis() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may stop and restart."""
    with running_redis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One Redis Cluster (3 masters, 3 replicas) for the session, for tests that kill no node;
    they keep apart by key prefixes of their own."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def own_redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster of the test's own, whose nodes it may kill and restart."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def redis_sentinels() -> Iterator[SentinelSetup]:
    """A primary, its replica and three sentinels (quorum 2) of the test's own, ready for a
    failover (``kill_primary()`` or ``failover()``, then ``wait_failover()``); started in
    about 0.1 s."""
    with running_sentinels() as setup:
        yield setup
