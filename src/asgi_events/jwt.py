"""Authenticate connections with JSON Web Tokens: ``jwt_authenticator`` (needs PyJWT,
``pip install 'asgi-events[jwt]'``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .types import Principal

try:  # an absolute import: PyJWT's ``jwt``, never this module (``asgi_events.jwt``)
    import jwt
    from jwt.algorithms import get_default_algorithms
except ImportError as exc:  # pragma: no cover - tested by hiding PyJWT
    raise ImportError("jwt_authenticator needs PyJWT: pip install 'asgi-events[jwt]'") from exc

if TYPE_CHECKING:
    from .request import HandshakeRequest

__all__ = ("JWTAuthenticator", "jwt_authenticator")

logger = logging.getLogger("asgi_events")

# What a token may make decoding raise besides PyJWT's errors (older PyJWT lets a malformed
# ``exp`` through as TypeError; ``float(exp)`` may overflow). The key's kind was checked at
# construction, so these come from the token, not from the configuration.
_INVALID = (jwt.PyJWTError, ValueError, TypeError, OverflowError)


class JWTAuthenticator:
    """The ``authenticate`` callable made (and checked) by ``jwt_authenticator``. It is async
    because decoding does no I/O, so the hub calls it without a worker thread.

    :ivar reads_cookies: whether it may read a cookie (the middleware warns at startup when
        it does and ``allowed_origins`` is not set).
    """

    __slots__ = ("_decode", "_key", "_leeway", "_user_claim", "cookie", "reads_cookies")

    def __init__(self, key: Any, user_claim: str, cookie: str | None, **decode: Any) -> None:
        self._key, self._user_claim = key, user_claim
        self._decode = decode  # jwt.decode's keyword arguments, checked by jwt_authenticator
        self._leeway: float = decode["leeway"]
        self.cookie, self.reads_cookies = cookie, bool(cookie)

    async def __call__(self, request: HandshakeRequest) -> Principal | None:
        """The request's ``Principal``, or None for a missing or invalid token."""
        token = request.token  # cookies are read only when there is no token
        if not token and self.cookie:
            token = request.cookies.get(self.cookie)
        return self.verify(token) if token else None

    def verify(self, token: str) -> Principal | None:
        """``token``'s ``Principal``, or None if it is invalid; usable as a sync ``verify_token``.
        Why a token is refused is logged at DEBUG, never the token."""
        try:
            claims = jwt.decode(token, self._key, **self._decode)
            user_id, exp = claims.get(self._user_claim), claims.get("exp")
            # A token in its leeway was accepted: its socket lives as long as it stays valid.
            expires_at = None if exp is None else float(exp) + self._leeway
        except _INVALID as exc:
            logger.debug("jwt_authenticator refused a token (%s)", type(exc).__name__)
            return None
        if not isinstance(user_id, str) or not user_id:
            logger.debug("jwt_authenticator refused a token (no string %r)", self._user_claim)
            return None
        if isinstance(exp, bool | str) or not (expires_at is None or math.isfinite(expires_at)):
            logger.debug("jwt_authenticator refused a token (exp is not a NumericDate)")
            return None
        return Principal(user_id, expires_at=expires_at, info=claims)

    def __repr__(self) -> str:  # never the key
        return (
            f"JWTAuthenticator(algorithms={self._decode['algorithms']!r}, cookie={self.cookie!r})"
        )


def jwt_authenticator(
    key: Any,
    *,
    algorithms: Sequence[str],
    audience: str | None = None,
    issuer: str | None = None,
    user_claim: str = "sub",
    cookie: str | None = None,
    leeway: float = 0.0,
) -> JWTAuthenticator:
    """An ``EventHub(authenticate=...)`` callable that accepts JSON Web Tokens (PyJWT).

    The token is ``request.token`` (``?token=``, ``Authorization: Bearer`` or the token
    subprotocol); when there is none and ``cookie`` is given, the value of that cookie. A token
    always wins over the cookie. A valid token gives ``Principal(claims[user_claim],
    expires_at=exp + leeway, info=claims)``, so the socket is closed with 4001 "Token expired"
    when the token expires; any invalid token gives None (close 1008).

    :param key: the verification key, as ``jwt.decode`` takes it: an HMAC secret (str or bytes),
        a PEM public key, a ``cryptography`` public key, or a ``jwt.PyJWK``.
    :param algorithms: the accepted ``alg`` values, e.g. ``["HS256"]`` or ``["RS256"]``;
        required, and never ``"none"``.
    :param audience: the required ``aud``; when None, tokens that carry an ``aud`` are refused.
    :param issuer: the required ``iss``; when None, ``iss`` is not checked.
    :param user_claim: the claim holding the user id; it must be a non-empty string (a number
        is refused, so that ``1`` and ``"1"`` can never be two spellings of one user).
    :param cookie: a cookie to read the token from when the request carries none. Reading
        cookies needs ``EventsMiddleware(allowed_origins=...)``: browsers send them from any
        site (cross-site WebSocket hijacking).
    :param leeway: seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``.
    :raises ValueError: ``algorithms`` is empty, names ``"none"`` or an algorithm PyJWT cannot
        verify (RS*, ES*, PS* and EdDSA need ``cryptography``), ``key`` does not fit one of
        them, or ``leeway`` is negative.
    """
    if isinstance(algorithms, str) or not algorithms:
        raise ValueError('algorithms must be a non-empty list of names, e.g. ["HS256"]')
    if not math.isfinite(leeway) or leeway < 0:
        raise ValueError("leeway must be a finite number of seconds >= 0")
    supported = get_default_algorithms()
    for name in algorithms:
        if name.lower() == "none":
            raise ValueError('algorithm "none" accepts unsigned tokens: it is never allowed')
        if name not in supported:
            raise ValueError(f"PyJWT cannot verify {name!r} (is cryptography installed?)")
        try:  # catches a key of the wrong kind now (and HS256 given an RSA public key)
            supported[name].prepare_key(key.key if isinstance(key, jwt.PyJWK) else key)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise ValueError(f"the key does not fit {name!r}") from exc
    return JWTAuthenticator(
        key,
        user_claim,
        cookie,
        algorithms=list(algorithms),
        audience=audience,
        issuer=issuer,
        leeway=leeway,
    )
