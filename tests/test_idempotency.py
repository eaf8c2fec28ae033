"""Idempotent broadcasts through the hub: which keys it takes, the memory store's bounds, and a
client that gets an event once although it was broadcast twice with one key (memory and Redis,
over a real server). The backends' side is in ``tests/backends/test_idempotency.py``."""

from __future__ import annotations

import secrets

import pytest

from asgi_events import EventHub
from asgi_events.backends.redis import RedisBackend
from asgi_events.idempotency import MAX_KEY_LENGTH, IdempotencyKeys, check_key

from .support.redis_server import RedisServer
from .support.server import Connect, ServeFn, recv, users

V1 = ["asgi-events.v1"]

BAD_KEYS: list[object] = ["", "k" * (MAX_KEY_LENGTH + 1), 7, b"bytes", "lone \ud800 surrogate"]
GOOD_KEYS = ["k", "k" * MAX_KEY_LENGTH, "order:{42}\n é 東京 \U0001f600", " "]


def test_a_key_is_a_non_empty_str_of_at_most_200_characters() -> None:
    assert MAX_KEY_LENGTH == 200
    for key in GOOD_KEYS:
        assert check_key(key) == key
    for bad in BAD_KEYS:
        with pytest.raises(ValueError, match="idempotency_key"):
            check_key(bad)


async def test_broadcast_refuses_a_bad_key_and_publishes_nothing() -> None:
    hub = EventHub(users)
    for bad in BAD_KEYS:
        with pytest.raises(ValueError, match="idempotency_key"):
            await hub.broadcast("alice", {"type": "T"}, idempotency_key=bad)  # type: ignore[arg-type]
    assert (await hub.history("alice")).events == ()
    ids = [await hub.broadcast("alice", {"type": "T"}, idempotency_key=k) for k in GOOD_KEYS]
    assert len(set(ids)) == len(GOOD_KEYS)
    assert [event["id"] for event in (await hub.history("alice")).events] == ids


def test_the_memory_store_expires_a_key_max_age_after_its_first_publish() -> None:
    keys = IdempotencyKeys(max_age=10.0)
    keys.record("alice", "k", "e.1", now=100.0)
    assert keys.get("alice", "k", now=109.9) == (100.0, "e.1")  # a retry does not refresh it
    assert keys.get("bob", "k", now=100.0) is None
    assert keys.get("alice", "k", now=110.0) is None  # max_age after it: gone
    keys.record("alice", "a", None, now=200.0)
    keys.record("alice", "b", "e.2", now=205.0)
    keys.prune(now=210.0)
    assert len(keys) == 1 and keys.get("alice", "b", now=210.0) == (205.0, "e.2")


def test_the_memory_store_keeps_at_most_max_keys_and_drops_the_oldest_first() -> None:
    keys = IdempotencyKeys(max_age=60.0, max_keys=3)
    for n in range(5):
        keys.record(f"user{n % 2}", f"k{n}", f"e.{n}", now=float(n))
    assert len(keys) == 3
    assert [keys.get(f"user{n % 2}", f"k{n}", now=5.0) for n in range(2)] == [None, None]
    assert [keys.get(f"user{n % 2}", f"k{n}", now=5.0) for n in range(2, 5)] == [
        (2.0, "e.2"),
        (3.0, "e.3"),
        (4.0, "e.4"),
    ]


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_client_gets_an_event_once_although_it_was_broadcast_twice_with_one_key(
    kind: str, serve: ServeFn, connect: Connect, redis_server: RedisServer
) -> None:
    backend = None
    if kind == "redis":
        backend = RedisBackend(redis_server.url, prefix=f"t-{secrets.token_hex(4)}", timeout=2.0)
    server = await serve(hub=EventHub(users, backend=backend))
    hub = server.hub
    assert hub is not None
    async with connect(server.ws_url(token="tok-alice"), subprotocols=V1) as ws:
        assert (await recv(ws))["type"] == "asgi_events.ready"
        order = {"type": "ORDER_SHIPPED", "payload": {"order": 42}}
        first = await hub.broadcast("alice", order, idempotency_key="order-42-shipped")
        retry = await hub.broadcast("alice", order, idempotency_key="order-42-shipped")
        after = await hub.broadcast("alice", {"type": "AFTER"})  # (delivered in order)
        received = [await recv(ws), await recv(ws)]
    assert first is not None and retry == first
    assert [(event["type"], event["id"]) for event in received] == [
        ("ORDER_SHIPPED", first),
        ("AFTER", after),
    ]
    assert [event["id"] for event in (await hub.history("alice")).events] == [first, after]
