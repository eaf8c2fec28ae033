"""The life of one admitted stream, the same for every transport: join (hold, replay,
release), the transport's answer, open, send, read until the peer goes, end."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from .. import protocol
from ..errors import BackendUnavailableError
from ..stream import State, Stream
from ..streams import Streams
from ..types import Send


async def run(
    streams: Streams,
    stream: Stream,
    send: Send,
    answer: Callable[[], Awaitable[None]],
    read: Callable[[], Awaitable[None]],
) -> None:
    """Run ``stream`` (from ``streams.create``) to its end.

    :param answer: sends the transport's answer (the WebSocket's accept, the response's
        head); called once the stream has joined, so a client that has it misses nothing.
    :param read: reads from the peer until it goes.
    """
    outbox = stream.outbox
    try:
        with stream.cancel_scope:
            try:
                await streams.attach(stream)  # join live delivery and queue the replay, atomically
            except BackendUnavailableError:
                stream.close(protocol.SERVICE_RESTART)
            await answer()
            if stream.state is State.CONNECTING:  # (not closed by a shutdown meanwhile)
                stream.to(State.OPEN)
            sent_for = streams.start(stream)
            if not sent_for or stream.expires_at is not None:
                async with anyio.create_task_group() as tg:
                    if not sent_for:  # the hub is not running: a writer of its own
                        tg.start_soon(outbox.run)
                    if stream.expires_at is not None:
                        tg.start_soon(stream.expire)
                    await _live(streams, stream, read)
                    tg.cancel_scope.cancel()
            else:  # (no task group: an idle stream costs as little as it can)
                await _live(streams, stream, read)
    except anyio.get_cancelled_exc_class():
        await stream.say_goodbye(send)  # cancelled from outside (the server stops)
        raise
    finally:
        outbox.abandon()  # the peer is gone (or the response is complete): nothing more
        stream.to(State.CLOSED)
        streams.detach(stream)
        await streams.ended(stream)


async def _live(streams: Streams, stream: Stream, read: Callable[[], Awaitable[None]]) -> None:
    if stream.state is State.OPEN:
        await streams.opened(stream)
    await read()
