from __future__ import annotations

from typing import Any

import pytest

from asgi_events import Principal
from asgi_events.auth import normalize_origin, parse_handshake, verify
from asgi_events.protocol import SUBPROTOCOL


def scope(query: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None, **kw: Any) -> Any:
    return {"type": "websocket", "query_string": query, "headers": headers or [], **kw}


@pytest.mark.parametrize(
    ("query", "headers", "token"),
    [
        (b"token=abc", [], "abc"),
        (b"token=a%20b%2Bc", [], "a b+c"),
        (b"", [(b"authorization", b"Bearer xyz")], "xyz"),
        (b"", [(b"Authorization", b"bEaReR   xyz  ")], "xyz"),
        (b"token=q", [(b"authorization", b"Bearer h")], "q"),  # the query wins
        (b"token=", [(b"authorization", b"Bearer h")], "h"),  # an empty one does not
        (b"", [(b"authorization", b"Basic dXNlcg==")], None),
        (b"", [(b"authorization", b"Bearer")], None),
        (b"token=a&token=b", [], "a"),
        (b"%zz&&==&token", [], None),
        (b"", [], None),
    ],
)
def test_token_sources(query: bytes, headers: list[tuple[bytes, bytes]], token: str | None) -> None:
    assert parse_handshake(scope(query, headers)).token == token


@pytest.mark.parametrize(
    ("query", "headers", "protocols", "token"),
    [
        (b"", [], ["asgi-events.v1", "asgi-events.token.abc"], "abc"),
        (b"", [], ["asgi-events.token."], None),
        (b"token=q", [], ["asgi-events.token.p"], "q"),  # query, then header, then subprotocol
        (b"", [(b"authorization", b"Bearer h")], ["asgi-events.token.p"], "h"),
    ],
)
def test_token_as_a_subprotocol(
    query: bytes, headers: list[tuple[bytes, bytes]], protocols: list[str], token: str | None
) -> None:
    hs = parse_handshake(scope(query, headers, subprotocols=protocols))
    assert hs.token == token
    assert hs.subprotocol == ("asgi-events.v1" if "asgi-events.v1" in protocols else None)


@pytest.mark.parametrize(
    ("origin", "normal"),
    [
        ("https://App.Example.com", "https://app.example.com:443"),
        ("https://app.example.com:443", "https://app.example.com:443"),
        ("http://localhost:8000", "http://localhost:8000"),
        ("http://[::1]:80", "http://::1:80"),
        ("null", None),
        ("", None),
        ("https://", None),
        ("ftp://host", None),
        ("http://host:99999", None),
        ("http://host:x", None),
    ],
)
def test_normalize_origin(origin: str, normal: str | None) -> None:
    assert normalize_origin(origin) == normal


def test_resume_parameters_and_subprotocol() -> None:
    hs = parse_handshake(
        scope(b"lastEventId=e.5&lastEventTs=2020-01-01T00:00:00Z", subprotocols=["x", SUBPROTOCOL])
    )
    assert (hs.last_event_id, hs.last_event_ts, hs.subprotocol) == (
        "e.5",
        "2020-01-01T00:00:00Z",
        SUBPROTOCOL,
    )
    plain = parse_handshake(scope(b"", subprotocols=["other"]))
    assert (plain.subprotocol, plain.last_event_id, plain.last_event_ts) == (None, None, None)


def test_non_utf8_query_does_not_raise() -> None:
    assert parse_handshake(scope(b"token=%ff%fe")).token is not None


async def test_verify_sync_async_and_awaitable_returning(anyio_backend: str) -> None:
    async def async_verify(token: str) -> str | None:
        return token.upper()

    class Verifier:
        async def __call__(self, token: str) -> str | None:
            return token + "!"

    assert await verify(lambda t: t * 2, "a", 1) == Principal("aa")
    assert await verify(async_verify, "a", 1) == Principal("A")
    assert await verify(Verifier(), "a", 1) == Principal("a!")
    assert await verify(lambda t: None, "a", 1) is None
    assert await verify(lambda t: "", "a", 1) is None
    assert await verify(lambda t: Principal("u", 5.0), "a", 1) == Principal("u", 5.0)
    for bad in (42, Principal(""), b"bytes"):
        with pytest.raises(TypeError):
            await verify(lambda t, bad=bad: bad, "a", 1)  # type: ignore[misc]
