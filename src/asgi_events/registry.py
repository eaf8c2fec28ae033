"""Who is connected: user id -> open connections, and every open connection."""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class Registry(Generic[C]):
    """Open connections by user; insertion-ordered, so fan-out order is stable."""

    def __init__(self) -> None:
        self._by_user: dict[str, dict[C, None]] = {}
        self._all: dict[C, None] = {}

    def add(self, user_id: str, conn: C) -> None:
        self._by_user.setdefault(user_id, {})[conn] = None
        self._all[conn] = None

    def remove(self, user_id: str, conn: C) -> None:
        """Forget ``conn``; removing one that is not there is a no-op."""
        self._all.pop(conn, None)
        conns = self._by_user.get(user_id)
        if conns is not None:
            conns.pop(conn, None)
            if not conns:
                del self._by_user[user_id]

    def of(self, user_id: str) -> Collection[C]:
        return self._by_user.get(user_id, {}).keys()

    def all(self) -> Collection[C]:
        return self._all.keys()

    def where(self, test: Callable[[str], bool]) -> list[C]:
        """The connections of the users ``test`` is true of."""
        return [conn for user, conns in self._by_user.items() if test(user) for conn in conns]

    def __len__(self) -> int:
        return len(self._all)

    def user_count(self) -> int:
        return len(self._by_user)

    def counts(self) -> dict[str, int]:
        return {user: len(conns) for user, conns in self._by_user.items()}

    def clear(self) -> None:
        self._by_user.clear()
        self._all.clear()
