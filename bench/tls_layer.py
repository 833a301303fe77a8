"""The TLS layer alone, per record: uvloop's ``SSLProtocol`` against gaia's ``TlsProtocol``.

Until session 12 the gateway's wss:// ran through the loop's TLS protocol
(``create_server(ssl=...)``); now through its own (``transports/wss.py``). End to end the
difference drowns in the host's noise, so this measures the layer itself, in one process, with
no socket: a real TLS 1.3 client (``ssl.SSLObject`` over memory, trusting a trustme CA) makes
its records in advance, then each layer takes them one by one, hands each record's 64 B to an
echo protocol, which writes them back through the layer, encrypted, to a transport that
counts them. That is one client message and its echo, without the frame relay and the syscalls.

    python bench/tls_layer.py [--size 64] [--records 20000] [--rounds 7]

Run it pinned (``taskset -c 0``) on a quiet machine. It allocates and frees 1 MiB first, as a
busy gateway's process has: ``SSLObject.read`` allocates the size asked, uvloop asks 256 KiB,
and glibc serves that with mmap (25 us a read) until a large free raises its threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import statistics
import time
from types import SimpleNamespace
from typing import Any

import trustme
import uvloop

from gaia_gateway.core import Limits
from gaia_gateway.transports.wss import TlsProtocol

HOST = "gateway.test"


class NullTransport(asyncio.Transport):
    """The socket under the layer: it keeps the ciphertext in ``sent``, or only counts it."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.keep = True
        self.count = 0

    def write(self, data: Any) -> None:
        if self.keep:
            self.sent.append(bytes(data))
        else:
            self.count += len(data)

    def take(self) -> bytes:
        out = b"".join(self.sent)
        self.sent.clear()
        return out

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def measure(layer: str, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                  size: int, n: int) -> float:
    """ns per record taken in and echoed back through ``layer``."""
    loop = asyncio.get_running_loop()
    raw = NullTransport()
    proto: Any
    if layer == "uvloop":
        proto = uvloop.loop.SSLProtocol(loop, Echo(), server_ctx, None, server_side=True)

        def feed(data: bytes) -> None:
            buf = proto.get_buffer(len(data))
            buf[: len(data)] = data
            proto.buffer_updated(len(data))
    else:
        # the connection's bookkeeping happens once per connection, not per record
        gateway = SimpleNamespace(limits=Limits(), connection_opened=lambda _address: None,
                                  connection_closed=lambda _address: None)
        server = SimpleNamespace(server_ssl=server_ctx, loop=loop, handshaking=set(),
                                 gateway=gateway)
        proto = TlsProtocol(server)  # type: ignore[arg-type]
        proto.app = Echo()  # the layer alone: no session, no relay
        feed = proto.data_received
    proto.connection_made(raw)
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=HOST)
    for _ in range(20):  # the handshake, every flight through the layer
        try:
            client.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        if c_out.pending:
            feed(c_out.read())
        await asyncio.sleep(0)  # uvloop's protocol finishes some steps in callbacks
        c_in.write(raw.take())
        if done:
            break
    else:
        raise RuntimeError(f"{layer}: the handshake did not finish")
    records = []
    for _ in range(n):
        client.write(b"x" * size)
        records.append(c_out.read())
    await asyncio.sleep(0)
    raw.take()
    raw.keep = False
    t0 = time.perf_counter_ns()
    for record in records:
        feed(record)
    took = (time.perf_counter_ns() - t0) / n
    if raw.count < size * n:  # each echo went out, in records of its own
        raise RuntimeError(f"{layer}: {raw.count} bytes sent, {size * n} echoed at least")
    if layer == "gaia" and proto._timer is not None:
        proto._timer.cancel()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="payload per record (default 64)")
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
    o = ap.parse_args()
    big = bytearray(1 << 20)  # see the module's docstring
    del big
    server_ctx, client_ctx = contexts()
    loop = uvloop.new_event_loop()
    res: dict[str, list[float]] = {"uvloop": [], "gaia": []}
    for _ in range(o.rounds):
        for layer, values in res.items():
            values.append(loop.run_until_complete(
                measure(layer, server_ctx, client_ctx, o.size, o.records)))
    loop.close()
    for layer, values in res.items():
        print(f"{o.size} B, {layer:6s}: median {statistics.median(values):6.0f} ns per record "
              f"({', '.join(f'{v:.0f}' for v in values)})")
    ratios = [g / u for g, u in zip(res["gaia"], res["uvloop"], strict=True)]
    print(f"gaia / uvloop, round by round: median {statistics.median(ratios):.2f} "
          f"({', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
