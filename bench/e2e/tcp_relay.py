"""A raw uvloop TCP byte relay: the floor for a Python proxy (the issue's second anchor row).

No HTTP parsing, no JWT, no frame checks: every byte from the client goes to the backend and
back, through two asyncio Protocols on uvloop, with the same backpressure a real proxy needs
(a side whose write buffer is full pauses reading on the other). Its CPU per message and per
handshake is what any Python relay pays before it does any work of its own.

    python bench/e2e/tcp_relay.py --port 9100 --upstream-port 9001

``GET /health`` (the harness's readiness probe) is answered locally; everything else is
relayed byte for byte.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
from typing import Any

HEALTH = b"GET /health "
HEALTH_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def eof_received(self) -> bool:
        t = self.client.transport
        if t is not None:
            t.close()  # after what is buffered
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        t = self.client.transport
        if t is not None:
            t.close()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()


class Client(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, port: int) -> None:
        self.loop = loop
        self.port = port
        self.transport: Any = None
        self.up: Upstream | None = None
        self.pending: list[bytes] | None = []  # bytes read before the upstream connected

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        up = self.up
        if up is not None and up.transport is not None:
            up.transport.write(data)
            return
        if self.pending is None:
            return
        if not self.pending:
            if data.startswith(HEALTH):
                self.transport.write(HEALTH_OK)
                self.transport.close()
                self.pending = None
                return
            self.loop.create_task(self._connect())
        self.pending.append(data)
        self.transport.pause_reading()  # until the upstream is there

    async def _connect(self) -> None:
        self.up = Upstream(self)
        try:
            await self.loop.create_connection(lambda: self.up, "127.0.0.1", self.port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        pending, self.pending = self.pending or [], None
        if self.transport is None:  # the client left meanwhile
            self.up.transport.close()
            return
        self.up.transport.write(b"".join(pending))
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        up = self.up
        if up is not None and up.transport is not None:
            up.transport.close()  # after what is buffered
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        up = self.up
        if up is not None and up.transport is not None:
            up.transport.close()

    def pause_writing(self) -> None:
        up = self.up
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.up
        if up is not None and up.transport is not None:
            up.transport.resume_reading()


def server_tls(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """The context gaia builds for --certfile (gaia_gateway.app), so that over TLS the relay
    stays the floor: the same handshake, the same records."""
    if not certfile:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile, keyfile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def main(host: str, port: int, upstream_port: int, tls: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(loop, upstream_port), host, port,
                                      backlog=2048, ssl=tls)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--certfile", help="serve TLS with this certificate chain (PEM)")
    ap.add_argument("--keyfile", help="the private key (PEM) for --certfile")
    o = ap.parse_args()
    import uvloop

    uvloop.run(main(o.host, o.port, o.upstream_port, server_tls(o.certfile, o.keyfile)))
