"""Disconnects that must also reach the streams still being admitted.

``hub.disconnect`` closes the streams a user has. A request whose credentials were checked
before the disconnect but whose stream joins after it would escape, holding a session the
application has just revoked. So each disconnect is remembered for as long as an admission
may take, and a stream admitted before it is closed as it joins.
"""

from __future__ import annotations

from .protocol import Close


class Revocations:
    """The users disconnected within the last ``horizon`` seconds, with when and how.

    :param horizon: seconds a disconnect is remembered: longer than any admission takes.
    """

    def __init__(self, horizon: float) -> None:
        self.horizon = horizon
        self._cuts: dict[str, tuple[float, Close]] = {}  # oldest first

    def add(self, user_id: str, close: Close, now: float) -> None:
        """``user_id`` was disconnected with ``close`` at ``now``."""
        for user, (at, _) in list(self._cuts.items()):
            if at >= now - self.horizon:
                break
            del self._cuts[user]
        self._cuts.pop(user_id, None)
        self._cuts[user_id] = (now, close)

    def of(self, user_id: str, admitted_at: float) -> Close | None:
        """How a stream of ``user_id`` admitted at ``admitted_at`` must be closed, if it must."""
        cut = self._cuts.get(user_id)
        return cut[1] if cut is not None and admitted_at <= cut[0] else None

    def __len__(self) -> int:
        return len(self._cuts)
