"""Case 21: wss:// clients that never finish the TLS handshake, or the TLS close.

The TLS handshake runs in the event loop's TLS protocol before the gateway's own protocol (and
its handshake deadline) exists, and the TLS close after the gateway closed the transport. So
these are the loop's, and are checked here on both loops: how long such a connection may stay
(the loop's ``ssl_handshake_timeout`` and ``ssl_shutdown_timeout``, 60 s and 30 s unless the
gateway passes its ``handshake_timeout`` and ``close_timeout``), and what a connection costs in
memory before its handshake (asyncio's TLS protocol allocates a 256 KiB read buffer per
accepted socket unless the gateway's ``transports/tls.py`` is installed).
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trustme
from _support import (
    ALLOWANCE,
    CountingEcho,
    Guard,
    MiB,
    masked,
    read_until_closed,
    sockets_closed,
)
from helpers import HOST, gateway_cert_files, token, trusting, upgrade_request

pytestmark = pytest.mark.timeout(60)


@dataclass
class Tls:
    certfile: str
    keyfile: str
    client_ssl: ssl.SSLContext  # trusts the gateway's certificate


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    ca = trustme.CA()
    return Tls(*gateway_cert_files(ca, tmp_path_factory.mktemp("tls21")), trusting(ca))


def tls_gateway(harden: Callable[..., Guard], echo: CountingEcho, tls: Tls,
                **settings: Any) -> Guard:
    return harden(echo.url(), certfile=tls.certfile, keyfile=tls.keyfile,
                  client_ssl=tls.client_ssl, **settings)


def _client_hello(ctx: ssl.SSLContext) -> bytes:
    """The first flight of a real TLS client (a ClientHello), taken from a memory BIO."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("attack", ["silent", "half-hello"])
def test_case_21_tls_handshake_never_finished(harden: Callable[..., Guard], echo: CountingEcho,
                                              tls: Tls, attack: str) -> None:
    timeout = 1.0
    g = tls_gateway(harden, echo, tls, handshake_timeout=timeout)
    hello = _client_hello(tls.client_ssl)
    first = hello[: len(hello) // 2] if attack == "half-hello" else b""
    n = 1000
    socks: list[socket.socket] = []
    with sockets_closed(socks):
        t_open = time.monotonic()
        for _ in range(n):
            s = socket.create_connection((HOST, g.port), timeout=5)
            if first:
                s.sendall(first)
            socks.append(s)
        opened = time.monotonic() - t_open
        # All of them held by the gateway at once: memory is what they cost.
        g.sample_for(0.3)
        # A normal wss:// client is served meanwhile.
        g.echo("/ws/experience", n=1)
        # Every one is closed by the gateway at the handshake timeout, with not a byte sent
        # back: no ClientHello was complete, so there was nothing to answer.
        deadline = t_open + opened + timeout + ALLOWANCE
        got, ended = read_until_closed(socks, deadline + 1.0)
        done_at = time.monotonic()
    assert len(ended) == n, f"{n - len(ended)} of {n} connections still open at handshake_timeout"
    assert set(got) == {b""}, "the gateway answered an unfinished ClientHello"
    assert done_at < deadline, f"closed {done_at - t_open:.2f}s after the first was opened"
    assert echo.contacted == 1  # the one normal client
    # 1,000 sockets held at once, both ends in this process: about 50 MiB on either loop
    # (measured 46-53), against 300 MiB with asyncio's own TLS protocol (256 KiB each)
    g.check(rss_bound=100 * MiB, main_route=True)


def test_case_21_tls_close_never_answered(harden: Callable[..., Guard], echo: CountingEcho,
                                          tls: Tls) -> None:
    """A client closes the websocket, then never answers the gateway's TLS close_notify and
    keeps its TCP connection open: the gateway drops it at close_timeout (the loop's own
    bound is 30 s), as it drops a plain client that never closes after the close frames."""
    close_timeout = 1.0
    g = tls_gateway(harden, echo, tls, close_timeout=close_timeout)
    raw = socket.create_connection((HOST, g.port), timeout=5)
    with tls.client_ssl.wrap_socket(raw, server_hostname=HOST) as sock:
        sock.sendall(upgrade_request(f"/ws/experience?token={g.secret(token('tls-closer'))}"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101 "), head[:100]
        sock.sendall(masked(0x8, (1000).to_bytes(2, "big")))
        t0 = time.monotonic()
        frames = b""
        while chunk := sock.recv(4096):  # the close frame, then b"" at the close_notify
            frames += chunk
        assert frames.endswith(bytes([0x88, 2]) + (1000).to_bytes(2, "big")), frames
        # Not answering the close_notify; watching the TCP connection underneath.
        with socket.socket(fileno=os.dup(sock.fileno())) as tcp:
            tcp.settimeout(close_timeout + ALLOWANCE + 5)
            try:
                assert tcp.recv(4096) == b""
            except ConnectionResetError:
                pass
            except TimeoutError:
                pytest.fail(f"the TCP connection was still open {tcp.gettimeout():.1f}s after "
                            "the gateway's close_notify")
            took = time.monotonic() - t0
    assert close_timeout - 0.1 <= took < close_timeout + ALLOWANCE, f"dropped after {took:.2f}s"
    g.check(main_route=True)
