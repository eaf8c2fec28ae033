"""The server process: one variant on one server, on a listening socket passed by the load side.

Started as ``fanout.py --serve SERVER VARIANT FD``; it runs until ``POST /shutdown``.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from .apps import Control, build_app
from .common import (
    CHILD_MAX_LIFETIME,
    SERVER_CPU,
    ASGIApp,
    die_with_parent,
    pin_to_cpu,
    raise_nofile,
    start_watchdog,
)

UVICORN_WS_CHOICES = ("auto", "websockets", "websockets-sansio", "wsproto")


# uvicorn's HTTP implementation (SSE streams go through it): h11 by default, the same on every
# machine; FANBENCH_UVICORN_HTTP=httptools measures uvicorn's C parser (pip install httptools).
UVICORN_HTTP = os.environ.get("FANBENCH_UVICORN_HTTP", "h11")


def uvicorn_ws_name(choice: str) -> str:
    """The WebSocket implementation uvicorn uses for ``ws=choice`` ("auto" resolved)."""
    if choice != "auto":
        return choice
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    module = getattr(AutoWebSocketsProtocol, "__module__", "")
    names = {"websockets_sansio_impl": "websockets-sansio", "websockets_impl": "websockets"}
    return names.get(module.rsplit(".", 1)[-1], "wsproto" if "wsproto" in module else "?")


def server_description(server: str, uvicorn_ws: str) -> str:
    """The server's name, version and settings, for the report header."""
    from importlib.metadata import version

    if server == "uvicorn":
        return (
            f"uvicorn {version('uvicorn')} (ws={uvicorn_ws_name(uvicorn_ws)}, http={UVICORN_HTTP}, "
            "stdlib asyncio loop, access log off, lifespan on)"
        )
    return f"hypercorn {version('hypercorn')} ({server.split('-')[1]} worker, access log off)"


def hypercorn_config(fd: int) -> Any:
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{fd}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    config.backlog = 4096
    config.graceful_timeout = 3.0
    return config


async def serve_hypercorn_asyncio(app: ASGIApp, control: Control, fd: int) -> None:
    from hypercorn.asyncio import serve

    await serve(app, hypercorn_config(fd), shutdown_trigger=control.shutdown.wait)  # type: ignore[arg-type]


async def serve_hypercorn_trio(app: ASGIApp, control: Control, fd: int) -> None:
    from hypercorn.trio import serve

    await serve(app, hypercorn_config(fd), shutdown_trigger=control.shutdown.wait)  # type: ignore[arg-type]


async def serve_uvicorn(app: ASGIApp, control: Control, fd: int, ws: str) -> None:
    """``uvicorn.Server`` on the passed socket, under the running (stdlib asyncio) loop."""
    import uvicorn

    config = uvicorn.Config(
        app,
        ws=ws,
        http=UVICORN_HTTP,
        lifespan="on",
        access_log=False,
        log_level="warning",
        backlog=4096,
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)
    sock = socket.socket(fileno=fd)

    async def stop_on_shutdown() -> None:
        await control.shutdown.wait()
        server.should_exit = True

    stopper = asyncio.ensure_future(stop_on_shutdown())
    try:
        await server.serve(sockets=[sock])
    finally:
        stopper.cancel()


def serve_main(
    server: str,
    variant: str,
    fd: int,
    profile_path: str | None,
    redis: tuple[str, str] | None,
    uvicorn_ws: str = "auto",
    *,
    cluster: bool = False,
    cpu: int = SERVER_CPU,
) -> None:
    """The server process: ``server`` on the listening socket ``fd`` until ``POST /shutdown``.

    ``cluster``: the Redis at ``redis`` is a Redis Cluster. ``cpu``: the core to pin to (the
    routing mode's publisher runs next to the load process).
    """
    die_with_parent()
    start_watchdog(CHILD_MAX_LIFETIME)
    pin_to_cpu(cpu)
    raise_nofile(0)

    async def main() -> None:
        app, control = build_app(variant, profile_path, redis, cluster)
        if server == "hypercorn-asyncio":
            await serve_hypercorn_asyncio(app, control, fd)
        elif server == "hypercorn-trio":
            await serve_hypercorn_trio(app, control, fd)
        else:
            await serve_uvicorn(app, control, fd, uvicorn_ws)

    if server == "hypercorn-trio":
        import trio

        trio.run(main)
    else:
        asyncio.run(main())
