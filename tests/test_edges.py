"""Bad input and failing auth: a clear close code, other sockets undisturbed, tokens unlogged."""

from __future__ import annotations

import logging
import threading

import anyio
import anyio.from_thread
import pytest

from asgi_events import EventHub

from .support.server import Connect, ServeFn, close_code, record_close, recv, users

CANARY = "tok-CANARY-7f3a9"


async def test_verify_token_raising_closes_1011_without_logging_the_token(
    serve: ServeFn, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    def verify(token: str) -> str | None:
        raise ValueError(f"bad token {token}")

    server = await serve(hub=EventHub(verify))
    with caplog.at_level(logging.DEBUG, logger="asgi_events"):
        async with connect(server.ws_url(token=CANARY)) as ws:
            assert await close_code(ws) == (1011, "Internal error")
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("asgi_events"))
    assert "ValueError" in ours
    assert CANARY not in ours


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_hanging_verify_token_times_out_and_blocks_nobody(
    serve: ServeFn, connect: Connect, kind: str
) -> None:
    release = threading.Event()
    started = anyio.Event()

    async def async_verify(token: str) -> str | None:
        if token == "tok-hang":
            started.set()
            await anyio.sleep_forever()
        return users(token)

    def sync_verify(token: str) -> str | None:
        if token == "tok-hang":
            anyio.from_thread.run_sync(started.set)
            release.wait(10)  # blocks its worker thread, never the event loop
        return users(token)

    verify = async_verify if kind == "async" else sync_verify
    server = await serve(hub=EventHub(verify, verify_timeout=1.0))  # type: ignore[arg-type]
    try:
        async with anyio.create_task_group() as tg:
            codes: list[tuple[int, str]] = []
            tg.start_soon(record_close, connect, server.ws_url(token="tok-hang"), codes)
            with anyio.fail_after(5):
                await started.wait()
            async with connect(server.ws_url(token="tok-alice")) as ws:
                await ws.send_text("ping")
                assert await ws.receive_text(timeout=5) == "pong"
        assert codes == [(1011, "Authentication timed out")]
    finally:
        release.set()


async def test_verify_token_returning_a_non_string_is_1011(
    serve: ServeFn, connect: Connect
) -> None:
    server = await serve(hub=EventHub(lambda token: 42))  # type: ignore[arg-type,return-value]
    async with connect(server.ws_url(token="t")) as ws:
        assert (await close_code(ws))[0] == 1011


@pytest.mark.parametrize(
    "query",
    [
        "token=tok-alice&lastEventId=%ff%00",
        "token=tok-alice&lastEventId=" + "9" * 5000,
        "token=tok-alice&lastEventTs=%00%01&lastEventTs=x",
        "token=tok-alice&lastEventId=&lastEventTs=",
        "token=tok-alice&&&=&==&%zz",
        "lastEventId=a.b&token=tok-alice&token=tok-bob",
    ],
)
async def test_malformed_query_values_keep_the_socket_usable(
    serve: ServeFn, connect: Connect, query: str
) -> None:
    server = await serve()
    await server.hub.broadcast("alice", {"type": "T", "payload": "buffered"})
    async with connect(f"{server.url}/ws?{query}", ["asgi-events.v1"]) as ws:
        ready = await recv(ws)
        assert ready["type"] == "asgi_events.ready"
        await server.hub.broadcast("alice", {"type": "T", "payload": "live"})
        assert (await recv(ws))["payload"] == "live"
    assert server.hub.stats()["buffered_events"] == 2


@pytest.mark.parametrize(
    "value",
    ["Bearer \xff\xfe", "Bearer", "Token tok-alice", "bearer \t-", "Bearer tok-" + "a" * 8000],
)
async def test_malformed_authorization_headers(
    serve: ServeFn, connect: Connect, value: str
) -> None:
    server = await serve()
    async with connect(server.ws_url(), headers={"Authorization": value.encode("latin-1")}) as ws:
        if value.startswith("Bearer tok-"):  # long but well formed: this verify_token accepts it
            await ws.send_text("ping")
            assert await ws.receive_text(timeout=5) == "pong"
        else:
            assert await close_code(ws) == (1008, "Authentication failed")


async def test_bad_frames_never_disturb_the_socket_or_others(
    serve: ServeFn, connect: Connect
) -> None:
    server = await serve(hub=EventHub(users, max_message_size=2**21))
    async with (
        connect(server.ws_url(token="tok-alice")) as bad,
        connect(server.ws_url(token="tok-bob")) as other,
    ):
        for text in ["[" * 100_000, "{" * 50_000, "x" * 1_000_000, "null", "1e999", "\ud7ff"]:
            await bad.send_text(text)
        await bad.send_bytes(bytes(range(256)) * 100)
        await bad.send_text("ping")
        assert await bad.receive_text(timeout=5) == "pong"
        await server.hub.broadcast("bob", {"type": "T", "payload": 1})
        assert (await recv(other))["payload"] == 1
    assert server.hub.stats()["malformed_messages"] == 7
