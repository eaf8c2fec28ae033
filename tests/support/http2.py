"""An HTTP/2 event-stream client for tests: h2 over one anyio socket (cleartext with prior
knowledge, or TLS with ALPN), several streams on it, each read like ``tests/support/sse.py``'s
``Events``, and each closable alone with RST_STREAM (what a browser does to a closed
``EventSource`` on a shared connection).

A self-signed certificate for 127.0.0.1 (``self_signed``) is made with ``cryptography``.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import anyio.abc
import h2.config
import h2.connection
import h2.errors
import h2.events

from .server import TIMEOUT
from .sse import SSE, Events


class H2Events(Events):
    """One stream of an ``H2Client``: its response's status and headers, its blocks as read."""

    def __init__(self, client: H2Client, stream_id: int) -> None:
        self._client, self.stream_id = client, stream_id
        self._buffer = b""
        self._pending = b""  # received, not yet read
        self._finished = False  # the server ended the stream (or reset it, or the connection)
        self._changed = anyio.Event()
        self._started = anyio.Event()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.ended = False
        self.reset_by_server = False

    # What the connection's reader tells it.

    def responded(self, status: int, headers: dict[str, str]) -> None:
        self.status, self.headers = status, headers
        self._started.set()

    def received(self, data: bytes) -> None:
        self._pending += data
        self._changed.set()

    def finished(self, reset: bool = False) -> None:
        """The server ended it, or reset it (``reset``), or the connection is gone."""
        self._finished = True
        self.reset_by_server = self.reset_by_server or reset
        self._started.set()
        self._changed.set()

    async def start(self) -> None:
        with anyio.fail_after(TIMEOUT):
            await self._started.wait()

    async def _more(self) -> None:
        while not self._pending and not self._finished:
            self._changed = anyio.Event()
            await self._changed.wait()
        self._buffer += self._pending
        self._pending = b""
        self.ended = self._finished

    async def cancel(self) -> None:
        """Close this stream alone: RST_STREAM with CANCEL, as a browser does."""
        await self._client.reset(self.stream_id)


class H2Client:
    """One HTTP/2 connection; ``open`` starts an event stream on it."""

    def __init__(self, stream: anyio.abc.ByteStream, authority: str, scheme: str) -> None:
        self._stream = stream
        self._authority, self._scheme = authority, scheme
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.streams: dict[int, H2Events] = {}
        self._lock = anyio.Lock()
        self.terminated = False
        local = stream.extra(anyio.abc.SocketAttribute.local_address)
        self.local_address: tuple[str, int] = (str(local[0]), int(local[1]))

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            async with self._lock:
                await self._stream.send(data)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Read the connection until it ends (run it in a task)."""
        self.conn.initiate_connection()
        await self._flush()
        task_status.started()
        try:
            while True:
                try:
                    data = await self._stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    break
                for event in self.conn.receive_data(data):
                    self._handle(event)
                await self._flush()
        finally:
            self.terminated = True
            for events in self.streams.values():
                events.finished()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = True
        events = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if events is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            headers = {bytes(k).decode(): bytes(v).decode() for k, v in event.headers or ()}
            events.responded(int(headers.pop(":status")), headers)
        elif isinstance(event, h2.events.DataReceived):
            events.received(event.data or b"")
            # Keep the windows open: everything received counts as consumed.
            self.conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
            events.finished(reset=isinstance(event, h2.events.StreamReset))

    async def open(
        self, path: str, headers: dict[str, str] | None = None, **params: str
    ) -> H2Events:
        """Request ``path`` as an event stream on this connection; its response headers read."""
        target = path + (f"?{urlencode(params)}" if params else "")
        stream_id = self.conn.get_next_available_stream_id()
        events = self.streams[stream_id] = H2Events(self, stream_id)
        request = [
            (":method", "GET"),
            (":scheme", self._scheme),
            (":authority", self._authority),
            (":path", target),
            *{**SSE, **(headers or {})}.items(),
        ]
        self.conn.send_headers(stream_id, request, end_stream=True)
        await self._flush()
        await events.start()
        return events

    async def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
        await self._flush()


@asynccontextmanager
async def h2_connection(
    host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[H2Client]:
    """One HTTP/2 connection to ``host:port``: cleartext with prior knowledge, or TLS (ALPN h2)
    with ``ssl_context``. Closed on exit, with everything on it."""
    tls: dict[str, Any] = {}
    if ssl_context is not None:
        # (not standard-compatible: no wait for the close_notify that hypercorn does not answer)
        tls = {"ssl_context": ssl_context, "tls_hostname": host, "tls_standard_compatible": False}
    async with await anyio.connect_tcp(host, port, **tls) as stream:
        if ssl_context is not None:
            alpn = stream.extra(anyio.streams.tls.TLSAttribute.alpn_protocol)
            assert alpn == "h2", alpn
        client = H2Client(stream, f"{host}:{port}", "https" if ssl_context else "http")
        async with anyio.create_task_group() as tg:
            await tg.start(client.run)
            yield client
            tg.cancel_scope.cancel()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key: ``(certfile, keyfile)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile


def client_context(certfile: Path) -> ssl.SSLContext:
    """A client TLS context that trusts ``certfile`` and offers h2 alone."""
    context = ssl.create_default_context(cafile=str(certfile))
    context.set_alpn_protocols(["h2"])
    return context
