"""History: a user's buffered events as the application reads them (``hub.history``); the
HTTP endpoint that serves them is ``history_app`` (``history_http``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .backends.base import Backend
from .protocol import GapReason, ResumePoint


@dataclass(frozen=True, slots=True)
class History:
    """A user's buffered events after a point (``hub.history``).

    :param events: the events, oldest first, each as a client receives it (``id`` included).
    :param position: the user's newest id (what the ready message says).
    :param recovered: False if events after the point were lost (as in the ready message).
    :param reason: why they were lost: ``evicted``, ``expired``, ``epoch`` or ``unknown``
        (a malformed or never issued ``after``).
    :param oldest: when not recovered, the oldest id from which a history is complete now.
    """

    events: tuple[dict[str, Any], ...]
    position: str
    recovered: bool = True
    reason: GapReason | None = None
    oldest: str | None = None


async def read_history(
    backend: Backend, user_id: str, after: str | None, limit: int | None
) -> History:
    """``hub.history``: see there."""
    if limit is not None and limit < 0:
        raise ValueError("limit must not be negative")
    if after is None:
        resume = ResumePoint(start=True)
    else:
        resume = ResumePoint.parse(after, None) or ResumePoint(invalid=True)
    replay = await backend.replay(user_id, resume)
    found = replay.events if limit is None else replay.events[:limit]
    events = tuple(json.loads(event.text) for event in found)
    if replay.recovered:
        return History(events, replay.position)
    return History(events, replay.position, False, replay.reason, replay.oldest)
