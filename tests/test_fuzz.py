"""Fuzz: random handshakes and inbound frames against real servers, on asyncio and trio.

Each case is drawn from a seeded ``random.Random`` (the same cases every run): a query string
of random percent-encoded bytes, repeated keys, huge values and junk resume points; random
Authorization, Origin and other headers (latin-1 bytes); a random subprotocol list; then, once
connected, random inbound frames (text, bytes, huge values, wrong JSON types, deep nesting,
``ping``), sometimes an oversized one or a flood over the rate limit.

For each case the documented rules predict the outcome: refused in the handshake (403 for a
foreign Origin; 401 for a bad token in "http" refusal mode), accepted and closed with 1008 (bad
token, "close" mode), closed with 1009 (a message over ``max_message_size``) or 1008 (over the
rate limit), or served: the ready message, one ``pong`` per ``ping``, and a broadcast to the
user the token names. Every wait is bounded. At the end: no exception escaped the app, nothing
was logged as an error (hypercorn's error log included), the counters add up, and no registry
entry is left.
"""

from __future__ import annotations

import json
import logging
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import anyio
import httpx
import pytest
from httpx_ws import (
    AsyncWebSocketSession,
    WebSocketDisconnect,
    WebSocketNetworkError,
    WebSocketUpgradeError,
)
from wsproto.utilities import LocalProtocolError

from asgi_events import EventHub, EventsMiddleware
from asgi_events.types import ASGIApp, Receive, Scope, Send

from .support.server import Connect, ServeFn, Server, http_app

SEED = 20260107
CASES = 60
CONCURRENCY = 6
CASE_TIMEOUT = 10.0
V1 = "asgi-events.v1"
TOKEN_PROTOCOL = "asgi-events.token."
ORIGIN = "https://app.example.com"
MAX_MESSAGE = 64 * 1024  # the default max_message_size
BURST = 60  # the default rate limit's burst
TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"  # RFC 7230 tchar
VISIBLE = bytes([*range(0x21, 0x7F), *range(0xC0, 0x100)])  # h11-valid, never str.isspace()
USERS = ["alice", "bob", "ünï cødé", "a&b=c?d", "%41", "x" * 300]


def verify(token: str) -> str | None:
    """Never raises: "tok-<user>" is <user>; anything else is refused."""
    return token[4:] if token.startswith("tok-") and len(token) > 4 else None


# -- cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    index: int
    mode: str  # "close" or "http": the server's refusal mode
    query: str
    headers: list[tuple[str, bytes]]
    subprotocols: list[str]
    frames: list[str | bytes]
    origin_ok: bool
    token: str | None  # the token the documented precedence picks
    flood: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def user(self) -> str | None:
        return None if self.token is None else verify(self.token)

    def __repr__(self) -> str:
        frames = [f[:40] for f in self.frames]
        return (
            f"Case(#{self.index}, mode={self.mode}, query={self.query[:300]!r}, "
            f"headers={[(k, v[:80]) for k, v in self.headers]!r}, "
            f"subprotocols={self.subprotocols!r}, frames={frames!r}, notes={self.notes})"
        )


def visible(rng: random.Random, n: int) -> bytes:
    """Latin-1 bytes h11 accepts in a header value, with single inner spaces."""
    out = bytearray(rng.choice(VISIBLE) for _ in range(n))
    for i in range(1, n - 1):
        if rng.random() < 0.1:
            out[i] = 0x20
    return bytes(out)


def junk(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def random_text(rng: random.Random, n: int) -> str:
    """Any characters but surrogates (a text frame is UTF-8)."""
    chars = []
    for _ in range(n):
        c = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0, 0xD800), 0xE000, 0x10FFFF])
        chars.append(chr(c))
    return "".join(chars)


def pct(value: str | bytes) -> str:
    return quote(value, safe="")


def make_query(rng: random.Random, case: Case) -> str | None:
    """The query string; returns the token it carries (None: absent or empty)."""
    pairs: list[tuple[str, str]] = []  # already encoded
    kinds = ["absent", "absent", "empty", "valid", "valid", "valid", "junk", "huge", "twice"]
    kind = rng.choice(kinds)
    case.notes.append(f"query token {kind}")
    user = rng.choice(USERS)
    if kind == "empty":
        pairs.append(("token", ""))
    elif kind == "valid":
        pairs.append(("token", pct("tok-" + user)))
    elif kind == "junk":
        pairs.append(("token", pct(b"x" + junk(rng, rng.randrange(0, 40)))))
    elif kind == "huge":
        pairs.append(("token", pct("tok-" + "h" * 10_000)))
    elif kind == "twice":
        first = rng.choice(["", pct("tok-" + user), "nope"])
        pairs += [("token", first), ("token", pct("tok-" + rng.choice(USERS)))]
    big = kind == "huge"  # one huge value at most: a request head must stay under 16 KiB
    resume = rng.choice(["none", "none", "id", "ts", "both"])
    if resume in ("id", "both"):
        values = [pct(junk(rng, 12)), "a.b", "0ther.1", "x.-1", "%ff%00", "", "e.1e3"]
        pairs.append(("lastEventId", rng.choice([*values, *([] if big else ["9" * 5000])])))
        big = big or pairs[-1][1] == "9" * 5000
    if resume in ("ts", "both"):
        values = [pct(junk(rng, 12)), "1970-01-01T00:00:00Z", "2999-01-01T00:00:00", "", "%00"]
        pairs.append(("lastEventTs", rng.choice([*values, *([] if big else ["t" * 3000])])))
        big = big or pairs[-1][1] == "t" * 3000
    for _ in range(rng.randrange(0, 5)):
        pairs.append(("j" + pct(junk(rng, rng.randrange(0, 8))), pct(junk(rng, rng.randrange(20)))))
    if not big and rng.random() < 0.15:
        pairs.append(("pad", "p" * 10_000))
    for repeat in rng.sample(pairs, k=min(len(pairs), rng.randrange(3))):
        if repeat[0] != "token" and len(repeat[1]) < 100:  # (a token: see "twice")
            pairs.append(repeat)
    parts = [f"{key}={value}" for key, value in pairs]
    parts += rng.sample(["&&", "=", "%zz", "a=b=c", "==x", "&"], k=rng.randrange(3))
    rng.shuffle(parts)
    case.query = "&".join(parts)
    # The first token parameter wins (the shuffle may swap the two of "twice"), and an empty one
    # counts as absent.
    first = next((part for part in parts if part.startswith("token=")), None)
    return unquote(first[len("token=") :], errors="replace") or None if first else None


def interleave(rng: random.Random, ordered: list[Any], others: list[Any]) -> list[Any]:
    """``others`` shuffled, with ``ordered`` inserted among them in its own order."""
    out = list(others)
    rng.shuffle(out)
    at = 0
    for item in ordered:
        at = rng.randrange(at, len(out) + 1)
        out.insert(at, item)
        at += 1
    return out


def make_headers(rng: random.Random, case: Case) -> str | None:
    """Authorization, Origin and other headers; returns the Bearer token (None: none)."""
    name = rng.choice(["Authorization", "authorization", "AUTHORIZATION"])
    user = rng.choice(USERS[:2]).encode() if rng.random() < 0.5 else visible(rng, 6)
    user = user.replace(b" ", b"")
    choices = ["absent", "absent", "valid", "bare", "junk", "basic", "other"]
    kind = rng.choice(choices + ([] if len(case.query) > 4000 else ["huge"]))
    case.notes.append(f"authorization {kind}")
    token: str | None = None
    value = b""
    if kind == "valid":
        scheme = rng.choice([b"Bearer", b"bearer", b"BEARER", b"bEaReR"])
        value = scheme + b" " * rng.randrange(1, 4) + b"tok-" + user
        token = "tok-" + user.decode("latin-1")
    elif kind == "bare":
        value = b"Bearer"
    elif kind == "junk":  # a Bearer token that is no valid one
        value = b"Bearer x" + visible(rng, rng.randrange(1, 60))
        token = value[len(b"Bearer ") :].decode("latin-1")
    elif kind == "basic":
        value = b"Basic " + visible(rng, 20)
    elif kind == "other":  # not the Bearer scheme, whatever follows
        value = rng.choice([b"Token tok-alice", b"Z" + visible(rng, rng.randrange(0, 80))])
    elif kind == "huge":
        value = b"Bearer tok-" + b"a" * 8000
        token = "tok-" + "a" * 8000
    auth = [(name, value)] if value else []
    if value and rng.random() < 0.3:  # two Authorization headers: the first one counts
        second = ("Authorization", b"Bearer tok-bob")
        if rng.random() < 0.5:
            auth.append(second)
        else:
            auth.insert(0, second)
            token = "tok-bob"
            case.notes.append("bob's Authorization first")
    others: list[tuple[str, bytes]] = []
    bad_origins = [
        b"null",
        b"https://evil.example.com",
        b"https://app.example.com:99999",
        b"http://app.example.com",
        b"https://[::1",
        b"x" + visible(rng, rng.randrange(0, 40)),
    ]
    roll = rng.random()
    origin = (
        None
        if roll < 0.6
        else rng.choice([ORIGIN.encode(), b"https://APP.example.com:443"])
        if roll < 0.8
        else rng.choice(bad_origins)
    )
    if origin is not None:
        others.append(("Origin", origin))
    case.origin_ok = origin in (None, ORIGIN.encode(), b"https://APP.example.com:443")
    for _ in range(rng.randrange(0, 4)):
        others.append((f"X-Junk-{rng.randrange(100)}", visible(rng, rng.randrange(1, 100))))
    if rng.random() < 0.3:
        others.append(("User-Agent", visible(rng, 30)))
    case.headers = interleave(rng, auth, others)
    return token


def make_subprotocols(rng: random.Random, case: Case) -> str | None:
    """A random subprotocol list; returns the token a token protocol carries (None: none)."""
    protocols = [
        "".join(rng.choice(TOKEN_CHARS) for _ in range(rng.randrange(1, 13)))
        for _ in range(rng.randrange(0, 5))
    ]
    if rng.random() < 0.6:
        protocols.append(V1)
    kind = rng.choice(["none", "none", "valid", "junk", "empty", "two"])
    case.notes.append(f"token protocol {kind}")
    if kind == "valid":
        protocols.append(TOKEN_PROTOCOL + "tok-" + rng.choice(USERS[:2]))
    elif kind == "junk":
        protocols.append(TOKEN_PROTOCOL + "x" + "".join(rng.choices(TOKEN_CHARS, k=10)))
    elif kind == "empty":
        protocols.append(TOKEN_PROTOCOL)
    elif kind == "two":
        protocols += [TOKEN_PROTOCOL + "tok-alice", TOKEN_PROTOCOL + "tok-bob"]
    rng.shuffle(protocols)
    case.subprotocols = protocols
    # The first token protocol counts; an empty one means none.
    first = next((p for p in protocols if p.startswith(TOKEN_PROTOCOL)), None)
    return first[len(TOKEN_PROTOCOL) :] or None if first is not None else None


def make_frames(rng: random.Random, case: Case) -> None:
    makers: list[Callable[[], str | bytes]] = [
        lambda: "ping",
        lambda: b"ping",
        lambda: rng.choice([" ping", "PING", "ping\n", "pong", ""]),
        lambda: random_text(rng, rng.randrange(0, 200)),
        lambda: junk(rng, rng.randrange(0, 300)),
        lambda: rng.choice(["null", "1", '"s"', "[1, 2]", "true", "1e999", "-0", '{"a":', "{}}"]),
        lambda: "9" * 5000,  # over Python's int digit limit
        lambda: rng.choice(["{}", '{"type": 5}', '{"a": [1, {"b": null}]}', '{"n": NaN}']),
        lambda: "[" * 50_000,
        lambda: '{"a":' * 10_000,
        lambda: '{"v": "' + "x" * 60_000 + '"}',
        lambda: "é" * 16_000,
        lambda: "x" * MAX_MESSAGE,  # exactly at the limit
        lambda: bytes(MAX_MESSAGE),
    ]
    frames = [rng.choice(makers)() for _ in range(rng.randrange(0, 16))]
    roll = rng.random()
    if roll < 0.2:  # one message over the limit, anywhere
        big = rng.choice(["x" * (MAX_MESSAGE + 1), b"\0" * (MAX_MESSAGE + 1), "é" * 32_769])
        frames.insert(rng.randrange(len(frames) + 1), big)
        case.notes.append("oversized")
    elif roll < 0.35:  # a flood far over the burst
        frames += [f'{{"flood": {i}}}' for i in range(2 * BURST)]
        case.flood = True
        case.notes.append("flood")
    case.frames = frames


def make_case(rng: random.Random, index: int) -> Case:
    case = Case(index, rng.choice(["close", "http"]), "", [], [], [], True, None)
    by_query = make_query(rng, case)
    by_header = make_headers(rng, case)
    by_protocol = make_subprotocols(rng, case)
    # The documented precedence: query, then Bearer header, then token subprotocol.
    case.token = by_query or by_header or by_protocol
    make_frames(rng, case)
    return case


def kind_of(frame: str | bytes) -> str:
    """What the server does with a frame: "ping", "object" (to the hook) or "malformed"."""
    if isinstance(frame, bytes):
        return "malformed"
    if frame == "ping":
        return "ping"
    try:
        return "object" if isinstance(json.loads(frame), dict) else "malformed"
    except (ValueError, RecursionError):
        return "malformed"


def too_big(frame: str | bytes) -> bool:
    size = len(frame) if isinstance(frame, bytes) else len(frame.encode())
    return size > MAX_MESSAGE


# -- running a case ---------------------------------------------------------------------------


@dataclass
class Tally:
    """What the servers' counters must show afterwards."""

    malformed: int = 0
    objects: int = 0  # JSON objects certainly handed to the hook
    objects_max: int = 0  # ... and at most (a flood is cut off somewhere)
    oversized: int = 0
    rate_limited: int = 0
    auth_failures: dict[str, int] = field(default_factory=lambda: {"close": 0, "http": 0})
    origin_refusals: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


async def frames_until_close(ws: AsyncWebSocketSession) -> tuple[list[str | bytes], int, str]:
    """Every data frame until the server closes, and the close code and reason."""
    received: list[str | bytes] = []
    while True:
        try:
            event = await ws.receive()
        except WebSocketDisconnect as exc:
            return received, exc.code, exc.reason
        received.append(event.data)


async def run_case(case: Case, server: Server, connect: Connect, tally: Tally) -> None:
    hub = server.hub
    assert hub is not None
    url = f"{server.url}/ws?{case.query}"
    if not case.origin_ok:
        with pytest.raises(WebSocketUpgradeError) as refused:
            async with connect(url, case.subprotocols or None, httpx.Headers(case.headers)):
                pass  # pragma: no cover
        assert refused.value.response.status_code == 403
        tally.origin_refusals += 1
        tally.count("403 origin")
        return
    if case.user is None and case.mode == "http":
        with pytest.raises(WebSocketUpgradeError) as refused:
            async with connect(url, case.subprotocols or None, httpx.Headers(case.headers)):
                pass  # pragma: no cover
        response = refused.value.response
        assert (response.status_code, response.headers["www-authenticate"]) == (401, "Bearer")
        tally.auth_failures["http"] += 1
        tally.count("401 auth")
        return
    async with connect(url, case.subprotocols or None, httpx.Headers(case.headers)) as ws:
        # Only our protocol is ever chosen, also for a refused client (and never the token).
        assert ws.subprotocol == (V1 if V1 in case.subprotocols else None)
        if case.user is None:
            received, code, reason = await frames_until_close(ws)
            assert (received, code, reason) == ([], 1008, "Authentication failed")
            tally.auth_failures["close"] += 1
            tally.count("1008 auth")
            return
        if V1 in case.subprotocols:
            await read_ready(ws)
        await exchange(case, ws, hub, tally)


async def read_ready(ws: AsyncWebSocketSession) -> None:
    """Replayed events, then exactly one ready message that counts them."""
    replayed = 0
    while True:
        frame = json.loads(await ws.receive_text())
        if frame["type"] == "asgi_events.ready":
            break
        assert "id" in frame, frame  # a replayed (buffered) event
        replayed += 1
    payload = frame["payload"]
    assert isinstance(payload["position"], str) and isinstance(payload["recovered"], bool)
    assert payload["replayed"] == replayed
    if not payload["recovered"]:
        assert payload["reason"] in ("evicted", "expired", "unknown", "epoch")


async def exchange(case: Case, ws: AsyncWebSocketSession, hub: EventHub, tally: Tally) -> None:
    """Send the frames and a last ping; then expect a pong per ping, or the documented close."""
    messages = [*case.frames, "ping"]
    # The first limit crossed closes the socket; what comes after it is ignored.
    stop = next((i for i, m in enumerate(messages) if too_big(m)), None)
    handled = messages if stop is None else messages[:stop]
    if case.flood:  # cut off somewhere in the flood: count only what comes before it
        handled = case.frames[: -2 * BURST]
    kinds = [kind_of(m) for m in handled]
    tally.malformed += kinds.count("malformed")
    tally.objects += kinds.count("object")
    tally.objects_max += kinds.count("object") + (2 * BURST if case.flood else 0)
    pings = kinds.count("ping")
    if stop is None and not case.flood:
        for message in messages:
            await send(ws, message)
        pongs = 0
        while pongs < pings:
            text = await ws.receive_text()
            pongs += text == "pong"
        # Served as the user its token names.
        user, nonce = case.user, f"fuzz-{case.index}"
        assert user is not None
        await hub.broadcast(user, {"type": "FUZZ", "payload": nonce})
        while True:
            text = await ws.receive_text()
            assert text != "pong", "more pongs than pings"
            if json.loads(text).get("payload") == nonce:
                break
        tally.count("served")
        return
    for message in messages:
        try:
            await send(ws, message)
        except (LocalProtocolError, WebSocketNetworkError):
            break  # the server has closed it already
    received, code, reason = await frames_until_close(ws)
    # Queued pongs may be dropped for the close frame, never invented.
    assert received.count("pong") <= pings
    if case.flood:
        assert (code, reason) == (1008, "Rate limit exceeded")
        tally.rate_limited += 1
        tally.count("1008 rate")
    else:
        assert (code, reason) == (1009, "Message too big")
        tally.oversized += 1
        tally.count("1009 size")


async def send(ws: AsyncWebSocketSession, message: str | bytes) -> None:
    if isinstance(message, bytes):
        await ws.send_bytes(message)
    else:
        await ws.send_text(message)


# -- the test ---------------------------------------------------------------------------------


def guarded(app: ASGIApp, errors: list[BaseException]) -> ASGIApp:
    """The app, recording any exception that escapes it (cancellation is not one)."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await app(scope, receive, send)
        except Exception as exc:
            errors.append(exc)
            raise

    return wrapper


async def test_fuzzed_handshakes_and_frames(
    serve: ServeFn, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    errors: list[BaseException] = []
    hook_calls: list[tuple[str, dict[str, Any]]] = []

    def hook(user: str, message: dict[str, Any]) -> None:
        assert isinstance(user, str) and type(message) is dict
        hook_calls.append((user, message))

    servers: dict[str, Server] = {}
    for mode in ("close", "http"):
        hub = EventHub(verify, refusal=mode, on_client_message=hook)  # type: ignore[arg-type]
        app = EventsMiddleware(http_app, hub=hub, allowed_origins=[ORIGIN])
        servers[mode] = await serve(
            guarded(app, errors), hub=hub, errorlog=logging.getLogger("hypercorn.error")
        )
        for user in USERS[:3]:  # something to replay for a resume point
            for n in range(3):
                await hub.broadcast(user, {"type": "SEED", "payload": n})

    rng = random.Random(SEED)
    cases = [make_case(rng, i) for i in range(CASES)]
    tally = Tally()
    limiter = anyio.CapacityLimiter(CONCURRENCY)

    async def run_one(case: Case) -> None:
        async with limiter:
            try:
                with anyio.fail_after(CASE_TIMEOUT):
                    await run_case(case, servers[case.mode], connect, tally)
            except Exception as exc:
                raise AssertionError(f"{case!r} failed: {exc!r}") from exc

    async with anyio.create_task_group() as tg:
        for case in cases:
            tg.start_soon(run_one, case)

    # Every socket is gone from the registries, within a bound.
    with anyio.fail_after(5):
        while True:
            if not any(s.hub.stats()["total_connections"] for s in servers.values() if s.hub):
                break
            await anyio.sleep(0.01)
    stats = {mode: s.hub.stats() for mode, s in servers.items() if s.hub}
    for mode, st in stats.items():
        assert (st["total_connections"], st["active_users"]) == (0, 0), mode
        assert st["connections_per_user"] == {}, mode
        assert st["auth_failures"] == tally.auth_failures[mode], mode
        assert st["hook_errors"] == 0, mode
    assert errors == []
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert noisy == [], [r.getMessage() for r in noisy]
    assert sum(st["malformed_messages"] for st in stats.values()) == tally.malformed
    assert sum(st["oversized_messages"] for st in stats.values()) == tally.oversized
    assert sum(st["rate_limited"] for st in stats.values()) == tally.rate_limited
    assert sum(st["origin_refusals"] for st in stats.values()) == tally.origin_refusals
    assert tally.objects <= len(hook_calls) <= tally.objects_max
    # The cases reach every outcome (the generator is seeded: this is a check on it).
    assert set(tally.outcomes) == {
        "403 origin",
        "401 auth",
        "1008 auth",
        "1008 rate",
        "1009 size",
        "served",
    }, tally.outcomes
