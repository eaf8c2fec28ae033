"""The hub's per-socket settings and the inbound rate limiter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Refusal = Literal["close", "http"]


@dataclass(frozen=True, slots=True)
class Settings:
    """What a socket may do and how it is refused; see ``EventHub`` for each meaning."""

    send_queue_size: int = 1024
    durable_limit: int = 100
    verify_timeout: float = 10.0
    max_message_size: int = 64 * 1024
    rate_limit: tuple[float, float] | None = (60.0, 10.0)
    max_connections_per_user: int = 100
    idle_timeout: float | None = None
    refusal: Refusal = "close"
    sse_keepalive: float = 15.0

    def __post_init__(self) -> None:
        if self.send_queue_size < 1 or self.durable_limit < 1:
            raise ValueError("send_queue_size must be at least 1")
        if self.max_message_size < 1 or self.max_connections_per_user < 1:
            raise ValueError("max_message_size and max_connections_per_user must be at least 1")
        if self.rate_limit is not None and min(self.rate_limit) <= 0:
            raise ValueError("rate_limit is (burst, per second), both positive")
        if not self.sse_keepalive > 0:
            raise ValueError("sse_keepalive must be positive")
        if self.refusal not in ("close", "http"):
            raise ValueError('refusal is "close" or "http"')


class TokenBucket:
    """Allows ``burst`` messages at once and ``rate`` per second after that."""

    __slots__ = ("_last", "_rate", "_size", "_tokens")

    def __init__(self, burst: float, rate: float, now: float) -> None:
        self._size = self._tokens = burst
        self._rate = rate
        self._last = now

    def take(self, now: float) -> bool:
        """Spend one token; False if there is none (the message is over the limit)."""
        self._tokens = min(self._size, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
