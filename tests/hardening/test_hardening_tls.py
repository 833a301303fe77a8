"""Case 21: wss:// clients that never finish the TLS handshake, or the TLS close, or that
fail it.

The gateway terminates TLS itself (``transports/wss.py``), on both loops alike, so these are
the gateway's: how long such a connection may stay (``handshake_timeout`` for the handshake,
``close_timeout`` for the close, where the loops' own TLS protocols held 60 s and 30 s), what a
connection costs in memory before its handshake (asyncio's TLS protocol allocated a 256 KiB
read buffer per accepted socket), that a connection in its handshake counts against
``max_connections``, and that every failed handshake gets a log line (and a plain HTTP
request a plain 400).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

import pytest
from _support import (
    ALLOWANCE,
    CountingEcho,
    Guard,
    MiB,
    Tls,
    masked,
    read_until_closed,
    sockets_closed,
    tls_gateway,
)
from helpers import (
    HOST,
    metric,
    scrape,
    token,
    upgrade_request,
    wait_until,
)
from websockets.exceptions import InvalidStatus

pytestmark = pytest.mark.timeout(60)


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
    g = tls_gateway(harden, echo, tls, handshake_timeout=timeout, metrics_port=0)
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
    # ... and each has its log line, with the reason.
    timeouts = g.logs.messages("tls")
    assert len(timeouts) == n, f"{len(timeouts)} tls log lines for {n} timeouts"
    assert all('reason="TLS handshake timeout"' in line for line in timeouts), timeouts[:3]
    # ... and the metrics count them.
    assert metric(scrape(g.gw.metrics_port), "gaia_gateway_tls_failures_total",
                  kind="timeout") == n
    assert echo.contacted == 1  # the one normal client
    # 1,000 sockets held at once, both ends in this process: about 50 MiB on either loop
    # (measured 46-53), against 300 MiB with asyncio's own TLS protocol (256 KiB each)
    g.check(rss_bound=100 * MiB, main_route=True)


def test_case_21_tls_close_never_answered(harden: Callable[..., Guard], echo: CountingEcho,
                                          tls: Tls) -> None:
    """A client closes the websocket, then never answers the gateway's close_notify and its
    FIN, and keeps its TCP connection open: the gateway lets go of it at close_timeout, as it
    does a plain client that never closes after the close frames."""
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
        # Not answering the close_notify nor the FIN, and keeping the socket: the gateway
        # lets go of its end at close_timeout (its socket closed, the connection no longer
        # counted; what the client sees of that depends on the kernel, nothing here).
        server = g.gw.server
        assert server is not None
        if not wait_until(lambda: server.gateway.open_connections == 0 and not server.clients,
                          close_timeout + ALLOWANCE + 5, interval=0.005):
            pytest.fail(f"the connection was still held {close_timeout + ALLOWANCE + 5:.1f}s "
                        "after the gateway's close")
        took = time.monotonic() - t0
    assert close_timeout - 0.1 <= took < close_timeout + ALLOWANCE, f"dropped after {took:.2f}s"
    g.check(main_route=True)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize("client", ["plain-http", "untrusting", "not-tls", "old-tls"])
def test_case_21_tls_failures_answered_and_logged(harden: Callable[..., Guard],
                                                  echo: CountingEcho, tls: Tls,
                                                  client: str) -> None:
    """A client that cannot speak TLS with the gateway: every one gets a log line with the
    reason, nothing reaches the upstream, and a plain HTTP request gets a plain 400 that
    says what to do (nginx answers the same way)."""
    g = tls_gateway(harden, echo, tls, metrics_port=0)
    answer = b""
    raw = socket.create_connection((HOST, g.port), timeout=5)
    with raw:
        if client == "plain-http":  # a ws:// URL for the wss:// port
            raw.sendall(upgrade_request(f"/ws/experience?token={g.secret(token('plain'))}"))
            while chunk := raw.recv(65536):
                answer += chunk
        elif client == "not-tls":
            raw.sendall(bytes(range(1, 200)))
            answer = read_until_closed([raw], time.monotonic() + 5)[0][0]
        else:
            ctx = ssl.create_default_context()  # trusts the system CAs, not the test CA
            if client == "old-tls":  # TLS 1.1, which the gateway's context refuses
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
                ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(raw, server_hostname=HOST).close()
    reason = {
        "plain-http": "plain HTTP request on the TLS port",
        "untrusting": "TLS handshake failed: TLSV1_ALERT_UNKNOWN_CA",
        "not-tls": "TLS handshake failed: WRONG_VERSION_NUMBER",
        "old-tls": "TLS handshake failed: UNSUPPORTED_PROTOCOL",
    }[client]
    assert wait_until(lambda: len(g.logs.messages("tls")) == 1, 3), g.logs.messages("tls")
    lines = g.logs.messages("tls")
    assert "warning tls client=127.0.0.1" in lines[0] and f"reason={reason!r}" in \
        lines[0].replace('"', "'"), lines
    if client == "plain-http":
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:100]
        assert b"use wss://" in answer and "status=400" in lines[0]
    else:
        assert not answer.startswith(b"HTTP/")
    assert echo.tcp_accepts == 0
    kind = "plain_http" if client == "plain-http" else "handshake"
    s = scrape(g.gw.metrics_port)
    assert metric(s, "gaia_gateway_tls_failures_total", kind=kind) == 1
    assert sum(v for (name, _), v in s.items() if name == "gaia_gateway_tls_failures_total") == 1
    g.check()


def test_case_21_tls_handshakes_count_against_max_connections(
        harden: Callable[..., Guard], echo: CountingEcho, tls: Tls) -> None:
    """Sockets still in their TLS handshake count as connections: with max_connections of 5
    held by 5 silent sockets, a sixth client, a real one, gets 503; once they go, it is
    served."""
    g = tls_gateway(harden, echo, tls, max_connections=5)
    socks = [socket.create_connection((HOST, g.port), timeout=5) for _ in range(5)]
    with sockets_closed(socks):
        assert wait_until(lambda: g.gw.server.gateway.open_connections == 5, 3)
        with pytest.raises(InvalidStatus) as refused:
            g.echo("/ws/experience", n=1)
        assert refused.value.response.status_code == 503
    assert wait_until(lambda: g.gw.server.gateway.open_connections == 0, 3)
    g.check(main_route=True)
