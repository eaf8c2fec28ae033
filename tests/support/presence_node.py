"""A node in a process of its own, for the test that kills one: ``python -m
tests.support.presence_node <url> <prefix> <presence_ttl> <asyncio|trio>``.

It runs a ``RedisBackend``, holds two streams of ``u`` (``present("u", 2)``), prints ``ready
<node id>`` once its counts are in Redis, and then waits until it is killed.
"""

from __future__ import annotations

import sys

import anyio
import coredis

from asgi_events.backends.base import Published
from asgi_events.backends.redis import RedisBackend


async def ignore(*args: object) -> None:
    pass


async def deliver(published: Published) -> None:
    pass


async def main(url: str, prefix: str, presence_ttl: float) -> None:
    backend = RedisBackend(url, prefix=prefix, presence_ttl=presence_ttl, heartbeat_interval=None)
    backend.bind(deliver, ignore, disconnect=ignore, size=10, max_age=60.0, max_users=None)
    async with (
        anyio.create_task_group() as tg,
        coredis.Redis[str].from_url(url, decode_responses=True) as client,
    ):
        await backend.start(tg)
        backend.present("u", 2)
        key = backend.presence_key(backend.node)
        with anyio.fail_after(10):
            while await client.hget(key, "u") != "2":  # noqa: ASYNC110 (written in the background)
                await anyio.sleep(0.01)
        print("ready", backend.node, flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    url, prefix, ttl, runner = sys.argv[1:5]
    anyio.run(main, url, prefix, float(ttl), backend=runner)
