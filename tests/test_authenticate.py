"""``EventHub(authenticate=...)`` and ``jwt_authenticator``, over a real server."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import jwt
import pytest
from httpx_ws import WebSocketUpgradeError

from asgi_events import ConnectionInfo, EventHub, EventsMiddleware, HandshakeRequest, Principal
from asgi_events.jwt import jwt_authenticator
from asgi_events.request import COOKIE_WARNING, reset_cookie_warning

from .support.server import TIMEOUT, Connect, ServeFn, close_code, http_app, recv, users

ORIGIN = "https://app.example.com"
SESSIONS = {"s-alice": "alice", "s-bob": "bob"}
SECRET = "a test secret of at least 32 bytes, as HS256 wants"
OTHER = "another secret of at least 32 bytes, but not SECRET"


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def as_mode(fn: Callable[[HandshakeRequest], Any], mode: str) -> Callable[[HandshakeRequest], Any]:
    """``fn`` as it is (sync: run in a worker thread), or as a coroutine function."""
    if mode == "sync":
        return fn

    async def authenticate(request: HandshakeRequest) -> Any:
        await anyio.lowlevel.checkpoint()
        return fn(request)

    return authenticate


@pytest.fixture
def cookie_warning() -> Iterator[None]:
    """The cookie warning is logged once per process: as if this test were the first."""
    reset_cookie_warning()
    yield
    reset_cookie_warning()


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == COOKIE_WARNING]


async def gets_its_events(hub: EventHub, user: str, ws: Any) -> None:
    await hub.broadcast(user, {"type": "T", "payload": f"for {user}"})
    assert (await recv(ws))["payload"] == f"for {user}"


# -- by cookie, by a proxy's header, by query -------------------------------------------------

SOURCES: dict[str, tuple[Callable[[HandshakeRequest], str | None], dict[str, Any]]] = {
    # a session cookie (a browser on our origin sends it, with its Origin)
    "cookie": (
        lambda r: SESSIONS.get(r.cookies.get("session", "")),
        {"headers": {"cookie": "theme=dark; session=s-alice", "origin": ORIGIN}},
    ),
    # a header the reverse proxy in front sets once it has authenticated the user
    "proxy header": (
        lambda r: r.headers.get("x-user") if r.client and r.client[0] == "127.0.0.1" else None,
        {"headers": {"X-User": "alice"}},
    ),
    "query": (lambda r: SESSIONS.get(r.query.get("session", "")), {"session": "s-alice"}),
}


@pytest.mark.parametrize("source", list(SOURCES))
async def test_authenticate_by_the_request(
    serve: ServeFn, connect: Connect, mode: str, source: str
) -> None:
    check, how = SOURCES[source]
    seen: list[HandshakeRequest] = []

    def authenticate(request: HandshakeRequest) -> str | None:
        seen.append(request)
        return check(request)

    hub = EventHub(authenticate=as_mode(authenticate, mode))
    server = await serve(EventsMiddleware(http_app, hub=hub, allowed_origins=[ORIGIN]))
    headers = how.get("headers", {})
    params = {k: v for k, v in how.items() if k != "headers"}
    async with connect(server.ws_url(**params), headers=headers) as ws:
        await gets_its_events(hub, "alice", ws)
        assert await hub.presence("alice") == 1
    (request,) = seen
    assert request.token is None and request.path == "/ws"
    # Without the credential: refused, as a None from authenticate is.
    async with connect(server.ws_url()) as ws:
        assert await close_code(ws) == (1008, "Authentication failed")
    assert len(seen) == 2
    assert hub.stats()["refusals"] == {"rejected": 1}


async def test_authenticate_sees_the_token_too(serve: ServeFn, connect: Connect) -> None:
    async def authenticate(request: HandshakeRequest) -> str | None:
        return users(request.token or "")

    hub = EventHub(authenticate=authenticate)
    server = await serve(hub=hub)
    async with connect(server.ws_url(), headers={"authorization": "Bearer tok-bob"}) as ws:
        await gets_its_events(hub, "bob", ws)


async def test_none_is_refused_with_1008(serve: ServeFn, connect: Connect, mode: str) -> None:
    calls: list[str] = []

    def nobody(request: HandshakeRequest) -> None:
        calls.append(request.path)
        return None

    hub = EventHub(authenticate=as_mode(nobody, mode))
    server = await serve(hub=hub)
    async with connect(server.ws_url(token="tok-alice")) as ws:
        assert await close_code(ws) == (1008, "Authentication failed")
    assert calls == ["/ws"]
    stats = hub.stats()
    assert (stats["auth_failures"], stats["total_connections"]) == (1, 0)


async def test_a_raising_authenticate_is_1011_and_its_message_is_never_logged(
    serve: ServeFn, connect: Connect, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    canary = f"CANARY-{secrets.token_hex(12)}"

    def broken(request: HandshakeRequest) -> str:
        raise LookupError(f"no session {canary} in the store")

    caplog.set_level(logging.DEBUG)
    hub = EventHub(authenticate=as_mode(broken, mode))
    server = await serve(hub=hub)
    async with connect(server.ws_url(), headers={"cookie": f"session={canary}"}) as ws:
        closed = await close_code(ws)
    await server.stop()  # every record is written by now
    assert closed == (1011, "Internal error")
    assert hub.stats()["refusals"] == {"error": 1}
    # Logged, by type only.
    assert [r.getMessage() for r in caplog.records if r.name == "asgi_events"] == [
        "authenticate raised LookupError"
    ]
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    text = "\n".join(formatter.format(r) + repr(r.args) for r in caplog.records)
    assert canary not in text
    assert canary not in json.dumps(hub.stats())


async def test_a_slow_authenticate_times_out_with_1011(
    serve: ServeFn, connect: Connect, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    release = threading.Event()  # a sync one blocks its worker thread until the test ends

    def slow(request: HandshakeRequest) -> str:
        release.wait(TIMEOUT)
        return "alice"

    async def slow_async(request: HandshakeRequest) -> str:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    hub = EventHub(authenticate=slow if mode == "sync" else slow_async, verify_timeout=0.3)
    server = await serve(hub=hub)
    try:
        started = time.monotonic()
        async with connect(server.ws_url(token="tok-alice")) as ws:
            assert await close_code(ws) == (1011, "Authentication timed out")
        assert time.monotonic() - started >= 0.3
    finally:
        release.set()
    assert hub.stats()["refusals"] == {"timeout": 1}
    assert await hub.presence("alice") == 0
    assert any(
        r.name == "asgi_events" and r.levelno == logging.WARNING and "did not answer" in r.message
        for r in caplog.records
    )


async def test_eventhub_takes_exactly_one_of_verify_token_and_authenticate() -> None:
    with pytest.raises(TypeError, match="exactly one"):
        EventHub()
    with pytest.raises(TypeError, match="exactly one"):
        EventHub(users, authenticate=lambda request: "alice")
    assert EventHub(authenticate=lambda request: "alice").streams.authenticator.request_aware


async def test_principal_info_reaches_on_connect(serve: ServeFn, connect: Connect) -> None:
    connected: list[ConnectionInfo] = []
    hooked = anyio.Event()

    async def authenticate(request: HandshakeRequest) -> Principal:
        return Principal("alice", info={"roles": ["admin"], "session": request.query["session"]})

    def on_connect(info: ConnectionInfo) -> None:
        connected.append(info)
        hooked.set()

    hub = EventHub(authenticate=authenticate, on_connect=on_connect)
    server = await serve(hub=hub)
    async with connect(server.ws_url(session="s-1")) as ws:
        with anyio.fail_after(TIMEOUT):
            await hooked.wait()
        await gets_its_events(hub, "alice", ws)
    (info,) = connected
    assert info.user_id == "alice"
    assert dict(info.principal.info) == {"roles": ["admin"], "session": "s-1"}
    with pytest.raises(TypeError):
        info.principal.info["roles"] = []  # type: ignore[index]


# -- the cross-site warning about cookies -----------------------------------------------------


def by_cookie(request: HandshakeRequest) -> str | None:
    return SESSIONS.get(request.cookies.get("session", ""))


@pytest.mark.usefixtures("cookie_warning")
async def test_reading_cookies_without_allowed_origins_logs_the_warning_once(
    serve: ServeFn, connect: Connect, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    hub = EventHub(authenticate=as_mode(by_cookie, mode))
    server = await serve(EventsMiddleware(http_app, hub=hub))
    assert warnings(caplog) == []  # not at startup: nothing says it reads cookies
    async with connect(server.ws_url(), headers={"cookie": "session=s-alice"}) as ws:
        await gets_its_events(hub, "alice", ws)
    (warning,) = warnings(caplog)  # at the first read
    assert (warning.name, warning.levelno) == ("asgi_events", logging.ERROR)
    async with connect(server.ws_url(), headers={"cookie": "session=s-bob"}) as ws:
        await gets_its_events(hub, "bob", ws)
    async with connect(server.ws_url()) as ws:
        assert await close_code(ws) == (1008, "Authentication failed")
    assert len(warnings(caplog)) == 1  # ... and only then


@pytest.mark.usefixtures("cookie_warning")
@pytest.mark.parametrize("origin", [ORIGIN, None])
async def test_reading_cookies_with_allowed_origins_logs_no_warning(
    serve: ServeFn, connect: Connect, caplog: pytest.LogCaptureFixture, origin: str | None
) -> None:
    hub = EventHub(authenticate=by_cookie)
    server = await serve(EventsMiddleware(http_app, hub=hub, allowed_origins=[ORIGIN]))
    headers = {"cookie": "session=s-alice", **({"origin": origin} if origin else {})}
    async with connect(server.ws_url(), headers=headers) as ws:
        await gets_its_events(hub, "alice", ws)  # (so the cookie was read)
    await server.stop()
    assert warnings(caplog) == []


def says_it_reads_cookies(request: HandshakeRequest) -> str | None:
    return by_cookie(request)


says_it_reads_cookies.reads_cookies = True  # type: ignore[attr-defined]

READERS: dict[str, Callable[[], Any]] = {
    "reads_cookies attribute": lambda: says_it_reads_cookies,
    "jwt cookie mode": lambda: jwt_authenticator(SECRET, algorithms=["HS256"], cookie="jwt"),
}


@pytest.mark.usefixtures("cookie_warning")
@pytest.mark.parametrize("allowed", [None, [ORIGIN]], ids=["no allowed_origins", "allowed"])
@pytest.mark.parametrize("reader", list(READERS))
async def test_an_authenticate_that_reads_cookies_is_warned_about_at_startup(
    serve: ServeFn, caplog: pytest.LogCaptureFixture, reader: str, allowed: list[str] | None
) -> None:
    hub = EventHub(authenticate=READERS[reader]())
    await serve(EventsMiddleware(http_app, hub=hub, allowed_origins=allowed))
    found = warnings(caplog)  # (no request was made: this is the startup's)
    assert [(r.name, r.levelno) for r in found] == (
        [("asgi_events", logging.ERROR)] if allowed is None else []
    )


# -- jwt_authenticator ------------------------------------------------------------------------


def token(key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    claims = {"sub": "alice", "exp": int(time.time()) + 600, "aud": "app", **claims}
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm)


def unsigned(**claims: Any) -> str:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    body = {"sub": "alice", "exp": int(time.time()) + 600, "aud": "app", **claims}
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(body)}."


def jwt_hub(**kw: Any) -> EventHub:
    return EventHub(
        authenticate=jwt_authenticator(SECRET, algorithms=["HS256"], audience="app", **kw)
    )


@pytest.mark.parametrize("where", ["query", "bearer"])
async def test_a_valid_jwt_connects_and_gets_events(
    serve: ServeFn, connect: Connect, where: str
) -> None:
    hub = jwt_hub()
    server = await serve(hub=hub)
    jwt_token = token(sub="alice")
    if where == "query":
        url, headers = server.ws_url(token=jwt_token), {}
    else:
        url, headers = server.ws_url(), {"authorization": f"Bearer {jwt_token}"}
    async with connect(url, headers=headers) as ws:
        await gets_its_events(hub, "alice", ws)
    assert hub.stats()["auth_failures"] == 0


INVALID: dict[str, Callable[[], str]] = {
    "expired": lambda: token(exp=int(time.time()) - 60),
    "wrong key": lambda: token(key=OTHER),
    "wrong audience": lambda: token(aud="other"),
    "alg none": unsigned,
}


@pytest.mark.parametrize("kind", list(INVALID))
async def test_an_invalid_jwt_is_refused_with_1008(
    serve: ServeFn, connect: Connect, kind: str
) -> None:
    hub = jwt_hub()
    server = await serve(hub=hub)
    async with connect(server.ws_url(token=INVALID[kind]())) as ws:
        assert await close_code(ws) == (1008, "Authentication failed")
    assert hub.stats()["refusals"] == {"rejected": 1}
    assert await hub.presence("alice") == 0


async def test_a_jwt_socket_is_closed_with_4001_when_the_token_expires(
    serve: ServeFn, connect: Connect
) -> None:
    exp = int(time.time()) + 3  # two seconds at least: it is valid when it connects
    hub = jwt_hub()
    server = await serve(hub=hub)
    async with connect(server.ws_url(token=token(exp=exp))) as ws:
        await gets_its_events(hub, "alice", ws)  # open and live
        assert time.time() < exp
        assert await close_code(ws) == (4001, "Token expired")  # (bounded: TIMEOUT)
        assert time.time() >= exp - 0.05  # not before it expired
    assert hub.stats()["closes"] == {4001: 1}


async def test_jwt_cookie_mode_with_allowed_origins(
    serve: ServeFn, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    hub = jwt_hub(cookie="access_token")
    server = await serve(EventsMiddleware(http_app, hub=hub, allowed_origins=[ORIGIN]))
    cookie = f"access_token={token(sub='bob')}"
    async with connect(server.ws_url(), headers={"cookie": cookie, "origin": ORIGIN}) as ws:
        await gets_its_events(hub, "bob", ws)
    # The same cookie from a page on another site is refused in the handshake.
    evil = {"cookie": cookie, "origin": "https://evil.example.com"}
    with pytest.raises(WebSocketUpgradeError) as refused:
        async with connect(server.ws_url(), headers=evil):
            pass  # pragma: no cover
    assert refused.value.response.status_code == 403
    # An invalid token in the cookie is refused like any other.
    bad = {"cookie": f"access_token={token(key=OTHER)}", "origin": ORIGIN}
    async with connect(server.ws_url(), headers=bad) as ws:
        assert await close_code(ws) == (1008, "Authentication failed")
    stats = hub.stats()
    assert (stats["origin_refusals"], stats["refusals"]["rejected"]) == (1, 1)
    assert warnings(caplog) == []
