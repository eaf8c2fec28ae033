"""The package's exceptions: one base class, one subclass per kind of misuse."""

from __future__ import annotations


class AsgiEventsError(Exception):
    """Base class of every error raised by asgi-events."""


class InvalidEventError(AsgiEventsError, ValueError):
    """An event passed to ``broadcast`` is not a mapping with a string ``type`` or is not JSON."""


class BackendUnavailableError(AsgiEventsError, ConnectionError):
    """The backend (e.g. Redis) did not confirm the event in time.

    It may still have been published (a timeout can cut the reply, not the work): retrying
    delivers it again, with a new id, unless the retry passes the same ``idempotency_key``
    (``EventHub.broadcast``) within ``buffer_max_age``.
    """
