"""``asgi_events.jwt.jwt_authenticator``, called directly with a ``HandshakeRequest``."""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import inspect
import json
import logging
import sys
import time
from typing import Any

import jwt
import pytest

import asgi_events.jwt as jwt_module
from asgi_events import Principal
from asgi_events.jwt import jwt_authenticator
from asgi_events.request import HandshakeRequest

SECRET = "a test secret of at least 32 bytes, as HS256 wants"
OTHER = "another secret of at least 32 bytes, but not SECRET"


def request(token: str | None = None, cookie: str | None = None, **kw: Any) -> HandshakeRequest:
    headers = [(b"cookie", cookie.encode())] if cookie else []
    scope = {"type": "websocket", "path": "/ws", "query_string": b"", "headers": headers}
    return HandshakeRequest(scope, token, **kw)


def token(key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    claims = {"sub": "alice", "exp": int(time.time()) + 600, **claims}
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_import_jwt_in_the_module_is_pyjwt_not_itself() -> None:
    assert jwt_module.jwt is jwt and jwt.__name__ == "jwt" and hasattr(jwt, "decode")


def test_without_pyjwt_the_import_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jwt", None)  # makes ``import jwt`` raise ImportError
    monkeypatch.delitem(sys.modules, "asgi_events.jwt")
    with pytest.raises(ImportError, match=r"pip install 'asgi-events\[jwt\]'"):
        importlib.import_module("asgi_events.jwt")


async def test_a_valid_hs256_token_gives_its_principal() -> None:
    exp = int(time.time()) + 600
    claims = {"sub": "alice", "exp": exp, "aud": "app", "iss": "me", "role": "admin"}
    auth = jwt_authenticator(SECRET, algorithms=["HS256"], audience="app", issuer="me")
    principal = await auth(request(jwt.encode(claims, SECRET, "HS256")))
    assert principal == Principal("alice", expires_at=exp)
    assert principal is not None and dict(principal.info) == claims


async def test_no_exp_is_no_expiry_and_user_claim_picks_the_claim() -> None:
    auth = jwt_authenticator(SECRET, algorithms=["HS256"], user_claim="uid")
    principal = await auth(request(token(exp=None, uid="u-7")))
    assert principal is not None
    assert (principal.user_id, principal.expires_at) == ("u-7", None)
    assert await auth(request(token(uid=7))) is None  # not a string: refused, not str()-ed


async def test_rs256_with_a_generated_key_pair() -> None:
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signed = token(private, "RS256")
    for key in (private.public_key(), pem):
        auth = jwt_authenticator(key, algorithms=["RS256"])
        principal = await auth(request(signed))
        assert principal is not None and principal.user_id == "alice"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert await auth(request(token(other, "RS256"))) is None
    # An HS256 token signed with the public key as its secret: the old algorithm confusion.
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64({'sub': 'mallory'})}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    assert await auth(request(forged)) is None


def unsigned(**claims: Any) -> str:
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': 'alice', **claims})}."


def good(**claims: Any) -> str:
    """A token the authenticator of ``test_an_invalid_token_gives_none`` accepts, but ``claims``."""
    return token(**{"aud": "app", "iss": "me", **claims})


INVALID = {
    "expired": lambda: good(exp=int(time.time()) - 60),
    "not yet valid": lambda: good(nbf=int(time.time()) + 60),
    "wrong key": lambda: token(OTHER, aud="app", iss="me"),
    "wrong audience": lambda: good(aud="other-app"),
    "no audience": lambda: good(aud=None),
    "wrong issuer": lambda: good(iss="mallory"),
    "no issuer": lambda: good(iss=None),
    "alg none": lambda: unsigned(aud="app", iss="me"),
    "alg none, signed": lambda: unsigned(aud="app", iss="me") + "c2ln",
    "malformed": lambda: "not-a-jwt",
    "malformed segments": lambda: "a.b.c",
    "payload not an object": lambda: jwt.api_jws.encode(b"[1]", SECRET, "HS256"),
    "bad signature": lambda: good()[:-4] + "AAAA",
    "missing sub": lambda: good(sub=None),
    "empty sub": lambda: good(sub=""),
    "numeric sub": lambda: good(sub=42),
    "list sub": lambda: good(sub=["alice"]),
    "string exp": lambda: good(exp=str(int(time.time()) + 600)),
    "huge exp": lambda: good(exp=10**400),
}


@pytest.mark.parametrize("make", INVALID.values(), ids=INVALID.keys())
async def test_an_invalid_token_gives_none(make: Any) -> None:
    auth = jwt_authenticator(SECRET, algorithms=["HS256"], audience="app", issuer="me")
    assert await auth(request(good())) is not None  # the control
    assert await auth(request(make())) is None


async def test_a_token_with_an_aud_is_refused_when_no_audience_is_set() -> None:
    auth = jwt_authenticator(SECRET, algorithms=["HS256"])
    assert await auth(request(token(aud="some-app"))) is None


async def test_leeway_accepts_a_token_expired_by_less_and_keeps_the_socket_as_long() -> None:
    exp = int(time.time()) - 5
    assert await jwt_authenticator(SECRET, algorithms=["HS256"])(request(token(exp=exp))) is None
    auth = jwt_authenticator(SECRET, algorithms=["HS256"], leeway=30)
    principal = await auth(request(token(exp=exp)))
    assert principal is not None and principal.expires_at == exp + 30
    assert await auth(request(token(exp=exp - 60))) is None


async def test_the_cookie_is_read_only_without_a_token(caplog: pytest.LogCaptureFixture) -> None:
    auth = jwt_authenticator(SECRET, algorithms=["HS256"], cookie="session")
    assert auth.reads_cookies
    assert not jwt_authenticator(SECRET, algorithms=["HS256"]).reads_cookies
    bob = f"other=1; session={token(sub='bob')}"
    principal = await auth(request(None, bob))
    assert principal is not None and principal.user_id == "bob"
    principal = await auth(request(token(), bob))  # the token wins...
    assert principal is not None and principal.user_id == "alice"
    assert await auth(request(token(OTHER), bob)) is None  # ...even when it is invalid
    assert await auth(request(None, "other=1")) is None
    # With a token the cookies are not even parsed (no cross-site warning from the request).
    assert await auth(request(token(), bob, origin_checked=False)) is not None
    assert caplog.records == []
    no_cookie = jwt_authenticator(SECRET, algorithms=["HS256"])
    assert await no_cookie(request(None, f"session={token()}")) is None


@pytest.mark.parametrize(
    ("algorithms", "key"),
    [
        (["none"], SECRET),
        (["HS256", "None"], SECRET),
        ([], SECRET),
        ("HS256", SECRET),
        (["HS257"], SECRET),
        (["RS256"], SECRET),  # a secret is no RSA key
        (["HS256"], "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----\n"),
    ],
)
def test_construction_refuses_none_unknown_algorithms_and_unfit_keys(
    algorithms: Any, key: str
) -> None:
    with pytest.raises(ValueError) as info:
        jwt_authenticator(key, algorithms=algorithms)
    assert SECRET not in str(info.value)


def test_construction_refuses_a_negative_leeway() -> None:
    with pytest.raises(ValueError, match="leeway"):
        jwt_authenticator(SECRET, algorithms=["HS256"], leeway=-1)


async def test_a_refused_token_never_reaches_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    auth = jwt_authenticator(SECRET, algorithms=["HS256"], audience="app", issuer="me", cookie="s")
    tokens = [make() for make in INVALID.values()]
    for refused in tokens:
        assert await auth(request(refused)) is None
        assert await auth(request(None, f"s={refused}")) is None
    assert len(caplog.records) == 2 * len(tokens)
    logged = caplog.text + repr([r.args for r in caplog.records]) + repr(auth)
    for refused in tokens:
        assert refused not in logged
        signature = refused.split(".")[-1]
        assert len(signature) < 16 or signature not in logged  # not even the signature
    assert SECRET not in logged
    assert "ExpiredSignatureError" in caplog.text  # but why, for whoever debugs it


def test_the_hub_sees_an_async_callable_and_verify_is_a_sync_verify_token() -> None:
    auth = jwt_authenticator(SECRET, algorithms=["HS256"])
    assert inspect.iscoroutinefunction(auth.__call__)
    principal = auth.verify(token())
    assert principal is not None and principal.user_id == "alice"
    assert auth.verify("junk") is None
