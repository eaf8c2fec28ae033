"""The Python client's HTTP side: a user's buffered events from the server's ``history_app``
(``EventsClient.history``), read with the client's token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from .client_policy import TRANSIENT, AuthenticationError, EventsClientError

__all__ = ("HistoryPage", "fetch_history")


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """The user's buffered events after a point, as ``history_app`` answers (``hub.history``).

    :param events: the events, oldest first, each as the socket delivers it (``id`` included);
        at most ``limit`` of them: page on with ``after=events[-1]["id"]``.
    :param position: the user's newest id.
    :param recovered: False if events after the point were lost (as in a ``Gap``).
    :param reason: why they were lost: ``evicted``, ``expired``, ``epoch`` or ``unknown``.
    :param oldest: when not recovered, the oldest id from which a history is complete now.
    """

    events: tuple[dict[str, Any], ...]
    position: str
    recovered: bool = True
    reason: str | None = None
    oldest: str | None = None


async def fetch_history(
    http: httpx.AsyncClient, url: httpx.URL, token: str, after: str | None, limit: int | None
) -> HistoryPage:
    """``GET url?after=&limit=`` with ``Authorization: Bearer <token>``.

    :raises AuthenticationError: the token was refused (HTTP 401; ``status`` 401).
    :raises EventsClientError: any other status but 200 (``status``), a network error
        (``status`` None), or an answer that is not a history.
    """
    params = {
        name: str(value)
        for name, value in (("after", after), ("limit", limit))
        if value is not None
    }
    try:
        response = await http.get(url, params=params, headers={"Authorization": f"Bearer {token}"})
    except TRANSIENT as exc:
        raise EventsClientError(None, f"{type(exc).__name__}: {exc}") from exc
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if status != 200:
        error = body.get("error") if isinstance(body, dict) else None
        reason = f"HTTP {status}" + (f": {error}" if isinstance(error, str) and error else "")
        kind = AuthenticationError if status == 401 else EventsClientError
        raise kind(None, reason, status=status)
    page = _page(body)
    if page is None:
        raise EventsClientError(None, "HTTP 200: not a history", status=status)
    return page


def _page(body: object) -> HistoryPage | None:
    if not isinstance(body, dict):
        return None
    events, position = body.get("events"), body.get("position")
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        return None
    if not isinstance(position, str):
        return None
    recovered = body.get("recovered") is not False
    reason, oldest = body.get("reason"), body.get("oldest")
    return HistoryPage(
        tuple(events),
        position,
        recovered,
        reason if isinstance(reason, str) else None,
        oldest if isinstance(oldest, str) else None,
    )
