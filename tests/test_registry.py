from __future__ import annotations

from asgi_events.registry import Registry


def test_add_remove_and_counts() -> None:
    reg: Registry[str] = Registry()
    reg.add("alice", "a1")
    reg.add("alice", "a2")
    reg.add("bob", "b1")
    assert list(reg.of("alice")) == ["a1", "a2"]
    assert list(reg.all()) == ["a1", "a2", "b1"]
    assert (len(reg), reg.user_count(), reg.counts()) == (3, 2, {"alice": 2, "bob": 1})
    reg.remove("alice", "a1")
    reg.remove("alice", "a2")
    reg.remove("alice", "a2")  # twice is fine
    reg.remove("nobody", "x")
    assert list(reg.of("alice")) == [] and reg.counts() == {"bob": 1}
    reg.clear()
    assert len(reg) == 0 and reg.user_count() == 0
