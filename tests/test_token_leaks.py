"""A canary token through every failure path, from each token source, over a real server.

It must never show in: the log records of ``asgi_events`` and of hypercorn (its error log and an
access log whose format prints no query string), the close reasons and frames a client gets, the
handshake response (status line, headers, body; a token offered as a subprotocol is never
echoed), or ``hub.stats()``. The same holds for a credential only an ``authenticate`` callable
reads (a cookie, a custom header), whichever way it fails.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect
from hypercorn.config import Config

from asgi_events import EventHub, EventsMiddleware, HandshakeRequest, Principal

from .support.server import TIMEOUT, Connect, ServeFn, http_app, recv

V1 = "asgi-events.v1"
TOKEN_PROTOCOL = "asgi-events.token."
LOGGERS = ("asgi_events", "hypercorn.error", "hypercorn.access")
# An access log format with no query string in it: the path alone (%(U)s), never %(R)s, %(Uq)s
# or %(q)s. (Hypercorn 0.18's default format is safe too: its %(r)s has no query string either;
# see the last test.)
ACCESS_FORMAT = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(f)s" "%(a)s" %(L)s'
LINE = logging.Formatter("%(name)s %(levelname)s %(message)s")


@pytest.fixture
def secret() -> str:
    """The random part of this test's canary token: searched for in every output."""
    return secrets.token_hex(12)


@pytest.fixture
def log_lines() -> Iterator[list[logging.LogRecord]]:
    """Every record (DEBUG and up) of asgi_events and of hypercorn's error and access logs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(keep)
        logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(keep)
            logger.setLevel(level)


def logging_config(access_log_format: str = ACCESS_FORMAT) -> dict[str, Any]:
    return {
        "accesslog": logging.getLogger("hypercorn.access"),
        "errorlog": logging.getLogger("hypercorn.error"),
        "access_log_format": access_log_format,
    }


# -- one handshake, whatever its outcome -------------------------------------------------------


@dataclass
class Outcome:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    frames: list[str] = field(default_factory=list)
    close: tuple[int, str] | None = None


def upgrade_headers() -> dict[str, str]:
    return {
        "connection": "upgrade",
        "upgrade": "websocket",
        "sec-websocket-version": "13",
        "sec-websocket-key": base64.b64encode(os.urandom(16)).decode(),
    }


def handshake_request(
    url: str, token: str, source: str, origin: str | None
) -> tuple[str, dict[str, str]]:
    """The URL and headers of a WebSocket upgrade offering ``asgi-events.v1``, with ``token``
    sent in ``source``."""
    protocols = [V1]
    headers = upgrade_headers()
    if source == "query":
        url += f"?token={token}"
    elif source == "header":
        headers["authorization"] = f"Bearer {token}"
    else:
        protocols.append(TOKEN_PROTOCOL + token)
    headers["sec-websocket-protocol"] = ", ".join(protocols)
    if origin is not None:
        headers["origin"] = origin
    return url, headers


async def attempt(
    http: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    messages: tuple[str, ...] = (),
) -> Outcome:
    """Open the socket (httpx-ws over the upgraded stream), send ``messages``, and read until
    the server closes; or, refused in the handshake, read the HTTP response whole."""
    async with http.stream("GET", url, headers=headers) as response:
        result = Outcome(response.status_code, list(response.headers.multi_items()))
        if response.status_code != 101:
            result.body = await response.aread()
            return result
        session = AsyncWebSocketSession(
            response.extensions["network_stream"],
            response=response,
            keepalive_ping_interval_seconds=None,
        )
        async with session as ws:
            for text in messages:
                await ws.send_text(text)
            with anyio.fail_after(TIMEOUT):
                while result.close is None:
                    try:
                        result.frames.append(await ws.receive_text())
                    except WebSocketDisconnect as closed:
                        result.close = (closed.code, closed.reason or "")
    return result


# -- the failure paths ------------------------------------------------------------------------


@dataclass
class Path:
    """A failure path: how the hub is set up, what the client does, what it must get."""

    verify: Callable[[str, str], Any]  # (token, canary) -> what verify_token answers
    expect: tuple[int, str] | int  # a close code and reason, or an HTTP status
    counter: str  # the stats counter the path bumps
    hub: dict[str, Any] = field(default_factory=dict)
    allowed_origins: list[str] | None = None
    origin: str | None = None
    messages: Callable[[str], tuple[str, ...]] = lambda canary: ()


def _no_user(token: str, canary: str) -> None:
    return None


def _raises(token: str, canary: str) -> None:
    raise ValueError(f"unknown token {token!r}")  # a message quoting the token


async def _hangs(token: str, canary: str) -> None:
    await anyio.sleep_forever()


def _expired(token: str, canary: str) -> Principal | None:
    return Principal("alice", expires_at=time.time() - 1) if token == canary else None


def _valid(token: str, canary: str) -> str | None:
    return "alice" if token == canary else None


def _echo(canary: str, count: int, pad: int = 0) -> tuple[str, ...]:
    """Client messages quoting the token (a client echoing its credential)."""
    return tuple(json.dumps({"token": canary, "pad": "x" * pad}) for _ in range(count))


PATHS = {
    "no_user": Path(_no_user, (1008, "Authentication failed"), "auth_failures"),
    "verify_raises": Path(_raises, (1011, "Internal error"), "auth_failures"),
    "verify_times_out": Path(
        _hangs, (1011, "Authentication timed out"), "auth_failures", {"verify_timeout": 0.2}
    ),
    "expired": Path(_expired, (4001, "Token expired"), "auth_failures"),
    "http_refusal": Path(_no_user, 401, "auth_failures", {"refusal": "http"}),
    "origin_refused": Path(
        _valid,
        403,
        "origin_refusals",
        allowed_origins=["https://app.example.com"],
        origin="https://evil.example.com",
    ),
    "rate_limited": Path(
        _valid,
        (1008, "Rate limit exceeded"),
        "rate_limited",
        {"rate_limit": (2.0, 0.001)},
        messages=lambda canary: _echo(canary, 3),
    ),
    "oversized": Path(
        _valid,
        (1009, "Message too big"),
        "oversized_messages",
        {"max_message_size": 256},
        messages=lambda canary: _echo(canary, 1, pad=300),
    ),
}


def make_verify(
    path: Path, canary: str, seen: list[str]
) -> Callable[[str], Any] | Callable[[str], Awaitable[Any]]:
    if path.verify is _hangs:

        async def hanging(token: str) -> None:
            seen.append(token)
            await _hangs(token, canary)

        return hanging

    def verify(token: str) -> Any:  # sync: runs in a worker thread
        seen.append(token)
        return path.verify(token, canary)

    return verify


@pytest.mark.parametrize("source", ["query", "header", "subprotocol"])
@pytest.mark.parametrize("name", list(PATHS))
async def test_the_token_never_leaks(
    serve: ServeFn,
    http: httpx.AsyncClient,
    log_lines: list[logging.LogRecord],
    secret: str,
    name: str,
    source: str,
) -> None:
    path, canary = PATHS[name], f"tok-CANARY-{secret}"
    seen: list[str] = []
    hub = EventHub(make_verify(path, canary, seen), **path.hub)
    app = EventsMiddleware(http_app, hub=hub, allowed_origins=path.allowed_origins)
    server = await serve(app, **logging_config())
    url, headers = handshake_request(f"{server.url}/ws", canary, source, path.origin)

    outcome = await attempt(http, url, headers, path.messages(canary))

    # The path was taken, with the token read from this source.
    if isinstance(path.expect, int):
        assert outcome.status == path.expect
    else:
        assert outcome.status == 101 and outcome.close == path.expect
    assert seen == ([] if path.origin else [canary])  # an Origin refusal never verifies
    stats = hub.stats()
    assert stats[path.counter] == 1 and stats["total_connections"] == 0
    await server.stop()  # every log record is written by now
    lines = [LINE.format(record) for record in log_lines]
    assert any(r.name == "hypercorn.access" for r in log_lines), "the access log is not on"
    if name in ("verify_raises", "verify_times_out"):
        assert any(r.name == "asgi_events" and r.levelno >= logging.WARNING for r in log_lines)

    # ... and the token is nowhere.
    assert secret not in "\n".join(lines)
    assert secret not in json.dumps(hub.stats())
    assert secret not in json.dumps(outcome.headers)
    assert secret not in outcome.body.decode("latin-1")
    assert secret not in json.dumps([outcome.frames, outcome.close])
    protocols = [value for key, value in outcome.headers if key == "sec-websocket-protocol"]
    assert protocols == ([V1] if outcome.status == 101 else [])


async def test_a_query_token_shows_only_in_access_log_atoms_that_print_the_query(
    serve: ServeFn,
    connect: Connect,
    log_lines: list[logging.LogRecord],
    secret: str,
) -> None:
    """Which hypercorn access log atoms would print a ``?token=``: %(R)s, %(Uq)s and %(q)s do;
    %(r)s (in hypercorn 0.18 the default format's request line: method, path, protocol) and
    %(U)s do not. Sending the token in the Authorization header or as a subprotocol keeps it
    out of every URL-based atom.
    """
    canary = f"tok-CANARY-{secret}"
    fmt = "r=%(r)s|U=%(U)s|R=%(R)s|Uq=%(Uq)s|q=%(q)s"
    server = await serve(hub=EventHub(lambda token: "alice"), **logging_config(fmt))
    async with connect(server.ws_url(token=canary), [V1]) as ws:
        assert (await recv(ws))["type"] == "asgi_events.ready"
    await server.stop()
    (access,) = [r for r in log_lines if r.name == "hypercorn.access"]
    atoms = dict(part.split("=", 1) for part in access.getMessage().split("|"))
    assert {atom: secret in text for atom, text in atoms.items()} == {
        "r": False,
        "U": False,
        "R": True,
        "Uq": True,
        "q": True,
    }
    assert "%(r)s" in Config.access_log_format
    assert not any(atom in Config.access_log_format for atom in ("%(R)s", "%(Uq)s", "%(q)s"))
    # The record's arguments (hypercorn's atoms mapping) hold the query string and every request
    # header whatever the format: a handler that dumps ``record.args`` (a JSON formatter, say)
    # would print the token from any source.
    assert isinstance(access.args, dict) and secret in access.args["q"]


# -- a credential that only an ``authenticate`` callable reads --------------------------------

SESSION_HEADER = "x-session"  # a custom header (a proxy's, an app's own scheme)
AUTHENTICATE_PATHS = [
    "no_user",
    "verify_raises",
    "verify_times_out",
    "expired",
    "http_refusal",
    "origin_refused",
]


def read_credential(request: HandshakeRequest, source: str) -> str:
    if source == "cookie":
        return request.cookies.get("session", "")
    return request.headers.get(SESSION_HEADER, "")


def make_authenticate(
    path: Path, canary: str, seen: list[str], source: str
) -> Callable[[HandshakeRequest], Any] | Callable[[HandshakeRequest], Awaitable[Any]]:
    """``path.verify`` fed the credential ``authenticate`` reads from ``source`` (so a raise
    quotes the canary, as a careless session store's error would)."""
    if path.verify is _hangs:

        async def hanging(request: HandshakeRequest) -> None:
            seen.append(read_credential(request, source))
            await _hangs(seen[-1], canary)

        return hanging

    def authenticate(request: HandshakeRequest) -> Any:  # sync: runs in a worker thread
        seen.append(read_credential(request, source))
        return path.verify(seen[-1], canary)

    return authenticate


@pytest.mark.parametrize("source", ["cookie", "custom header"])
@pytest.mark.parametrize("name", AUTHENTICATE_PATHS)
async def test_a_credential_read_by_authenticate_never_leaks(
    serve: ServeFn,
    http: httpx.AsyncClient,
    log_lines: list[logging.LogRecord],
    secret: str,
    name: str,
    source: str,
) -> None:
    path, canary = PATHS[name], f"tok-CANARY-{secret}"
    seen: list[str] = []
    hub = EventHub(authenticate=make_authenticate(path, canary, seen, source), **path.hub)
    app = EventsMiddleware(http_app, hub=hub, allowed_origins=path.allowed_origins)
    server = await serve(app, **logging_config())
    headers = {**upgrade_headers(), "sec-websocket-protocol": V1}
    if source == "cookie":
        headers["cookie"] = f"theme=dark; session={canary}"
    else:
        headers[SESSION_HEADER] = canary
    if path.origin is not None:
        headers["origin"] = path.origin

    outcome = await attempt(http, f"{server.url}/ws", headers)

    # The path was taken, with the credential read from this source.
    if isinstance(path.expect, int):
        assert outcome.status == path.expect
    else:
        assert outcome.status == 101 and outcome.close == path.expect
    assert seen == ([] if path.origin else [canary])  # an Origin refusal never authenticates
    stats = hub.stats()
    assert stats[path.counter] == 1 and stats["total_connections"] == 0
    await server.stop()  # every log record is written by now
    lines = [LINE.format(record) for record in log_lines]
    assert any(r.name == "hypercorn.access" for r in log_lines), "the access log is not on"
    if name in ("verify_raises", "verify_times_out"):
        assert any(r.name == "asgi_events" and r.levelno >= logging.WARNING for r in log_lines)

    # ... and the credential is nowhere.
    assert secret not in "\n".join(lines)
    assert secret not in json.dumps(hub.stats())
    assert secret not in json.dumps(outcome.headers)
    assert secret not in outcome.body.decode("latin-1")
    assert secret not in json.dumps([outcome.frames, outcome.close])
