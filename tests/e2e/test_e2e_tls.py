"""TLS on both legs: wss:// to the gateway (trustme CA #1), wss:// to the upstream (CA #2)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from helpers import (
    HOST,
    EchoServer,
    GatewayHandle,
    RawWS,
    connect_tls,
    encode_frame,
    gateway_cert_files,
    handshake_status,
    token,
    trusting,
    upgrade_request,
)
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.timeout(30)


@dataclass
class Pki:
    gateway_ca: trustme.CA
    certfile: str
    keyfile: str
    upstream_ca_file: str
    upstream_ctx: ssl.SSLContext  # server context of the trusted upstream
    rogue_ctx: ssl.SSLContext  # server context signed by a CA nobody trusts

    def client_ctx(self) -> ssl.SSLContext:
        return trusting(self.gateway_ca)


def _server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST, "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp: Path = tmp_path_factory.mktemp("pki")
    gateway_ca, upstream_ca, rogue_ca = trustme.CA(), trustme.CA(), trustme.CA()
    certfile, keyfile = gateway_cert_files(gateway_ca, tmp)
    upstream_ca.cert_pem.write_to_path(str(tmp / "upstream-ca.pem"))
    return Pki(gateway_ca, certfile, keyfile, str(tmp / "upstream-ca.pem"),
               _server_ctx(upstream_ca), _server_ctx(rogue_ca))


@pytest.fixture
def tls_echo(pki: Pki) -> Iterator[EchoServer]:
    server = EchoServer(ssl_context=pki.upstream_ctx).start()
    yield server
    server.stop()


@pytest.fixture
def rogue_echo(pki: Pki) -> Iterator[EchoServer]:
    server = EchoServer(ssl_context=pki.rogue_ctx).start()
    yield server
    server.stop()


def tls_gateway(factory: Callable[..., GatewayHandle], pki: Pki, upstream: str) -> GatewayHandle:
    return factory(upstream, certfile=pki.certfile, keyfile=pki.keyfile,
                   upstream_ca_file=pki.upstream_ca_file)


def test_tls_both_legs_echo(gateway_factory: Callable[..., GatewayHandle], pki: Pki,
                            tls_echo: EchoServer) -> None:
    gw = tls_gateway(gateway_factory, pki, tls_echo.url())
    url = gw.url(token())
    assert url.startswith("wss://")
    with connect_tls(url, pki.client_ctx(), max_size=None) as ws:
        for message in ("hello", b"\x00\x01" * 40000, "y" * 70000):
            ws.send(message)
            assert ws.recv(timeout=3) == message
        ws.close(4001, "bye")
        assert (ws.close_code, ws.close_reason) == (4001, "bye")
    rec = tls_echo.wait_record()
    assert rec.closed.wait(3)
    assert rec.close_code == 4001
    assert rec.header("X-Forwarded-Proto") == ["https"]


def test_tls_upstream_close_and_drop(gateway_factory: Callable[..., GatewayHandle], pki: Pki,
                                     tls_echo: EchoServer) -> None:
    gw = tls_gateway(gateway_factory, pki, tls_echo.url())
    with connect_tls(gw.url(token()), pki.client_ctx()) as ws:
        ws.send("cmd:close 4002 srv")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=3)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4002, "srv")
    with connect_tls(gw.url(token()), pki.client_ctx()) as ws:
        ws.send("cmd:drop")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=3)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011


def test_tls_health(gateway_factory: Callable[..., GatewayHandle], pki: Pki,
                    tls_echo: EchoServer) -> None:
    gw = tls_gateway(gateway_factory, pki, tls_echo.url())
    ctx = pki.client_ctx()
    with socket.create_connection((HOST, gw.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=HOST) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["status"] == "ok"
    # Plain HTTP against the TLS port (a ws:// URL for a wss:// port): a plain 400 that says
    # so, as nginx answers, and the connection closes.
    with socket.create_connection((HOST, gw.port), timeout=5) as plain:
        plain.sendall(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        answer = b""
        while chunk := plain.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert answer.endswith(b"This port speaks TLS: use wss:// (or https:// for /health).\n")
    assert tls_echo.requests == 0


def test_tls_untrusted_upstream_502(gateway_factory: Callable[..., GatewayHandle], pki: Pki,
                                    rogue_echo: EchoServer) -> None:
    gw = tls_gateway(gateway_factory, pki, rogue_echo.url())
    assert handshake_status(gw.url(token()), ssl=pki.client_ctx()) == 502
    assert rogue_echo.records == []


def test_tls_client_reset_upstream_gets_1001(gateway_factory: Callable[..., GatewayHandle],
                                             pki: Pki, tls_echo: EchoServer) -> None:
    gw = tls_gateway(gateway_factory, pki, tls_echo.url())
    ws = RawWS(gw.port, f"/ws/experience?token={token()}", ssl_context=pki.client_ctx())
    assert ws.status == 101
    ws.send_frame(0x1, b"hello")
    assert ws.recv_frame().payload == b"hello"
    t0 = time.monotonic()
    ws.reset()
    rec = tls_echo.wait_record()
    assert rec.closed.wait(3)
    assert rec.close_code == 1001
    assert rec.closed_at - t0 < 1.5


def test_tls_stalled_client_bounded_and_dropped(gateway_factory: Callable[..., GatewayHandle],
                                                pki: Pki, tls_echo: EchoServer) -> None:
    gw = gateway_factory(tls_echo.url(), certfile=pki.certfile, keyfile=pki.keyfile,
                         upstream_ca_file=pki.upstream_ca_file, send_timeout=1.0)
    t0 = time.monotonic()
    with RawWS(gw.port, f"/ws/experience?token={token()}", rcvbuf=4096,
               ssl_context=pki.client_ctx()) as ws:
        assert ws.status == 101
        ws.send_frame(0x1, f"cmd:flood {50 * 1024 * 1024} 65536".encode())
        rec = tls_echo.wait_record()
        peak = 0
        while not rec.closed.is_set() and time.monotonic() - t0 < 5:
            peak = max([peak, *(c for c, _ in gw.write_buffers())])
            time.sleep(0.02)
        assert rec.closed.is_set(), "the stalled TLS client was never dropped"
        assert rec.close_code == 1001
        assert 0.9 <= rec.closed_at - t0 < 2.5
        assert peak <= 512 * 1024, peak
        assert rec.flood_sent < 25 * 1024 * 1024


def test_tls_records_in_small_pieces(gateway_factory: Callable[..., GatewayHandle], pki: Pki,
                                     tls_echo: EchoServer) -> None:
    """The client's TLS bytes reach the gateway 7 at a time, so most reads of its TLS
    termination (``transports/wss.py``, which stops reading when no whole record is left) end
    inside a record: the handshake, the upgrade and an echo still go through, byte for
    byte."""
    gw = tls_gateway(gateway_factory, pki, tls_echo.url())
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = pki.client_ctx().wrap_bio(incoming, outgoing, server_hostname=HOST)
    with socket.create_connection((HOST, gw.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def send_pending() -> None:
            data = outgoing.read()
            for i in range(0, len(data), 7):
                sock.sendall(data[i:i + 7])
                time.sleep(0.0005)

        def fill() -> None:
            chunk = sock.recv(65536)
            assert chunk, "the gateway closed the connection"
            incoming.write(chunk)

        def receive(n: int) -> bytes:
            out = b""
            while len(out) < n:
                try:
                    out += tls.read(n - len(out))
                except ssl.SSLWantReadError:
                    fill()
            return out

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                send_pending()
                fill()
        tls.write(upgrade_request(f"/ws/experience?token={token()}"))
        send_pending()
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += receive(1)
        assert head.startswith(b"HTTP/1.1 101 "), head
        payload = os.urandom(300)
        tls.write(encode_frame(0x2, payload))
        send_pending()
        assert receive(4) == bytes([0x82, 126]) + len(payload).to_bytes(2, "big")
        assert receive(len(payload)) == payload


def test_tls_node_ws_client(gateway_factory: Callable[..., GatewayHandle], pki: Pki,
                            tls_echo: EchoServer, tmp_path: Path) -> None:
    """Node's TLS stack and the npm ``ws`` client over wss://: a second, independent peer for
    the gateway's TLS termination (records of its own sizes, its own close_notify)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are needed for the Node client")
    from nodeclient import NodeClient, open_echo_close

    ca_file = tmp_path / "gateway-ca.pem"
    pki.gateway_ca.cert_pem.write_to_path(str(ca_file))
    gw = tls_gateway(gateway_factory, pki, tls_echo.url())
    with NodeClient(gw.url(token()), ca=ca_file, protocols=["game.v1"]) as ws:
        open_echo_close(ws, "hello over wss")
    rec = tls_echo.wait_record()
    assert rec.closed.wait(3)
    assert (rec.close_code, rec.close_reason) == (4001, "bye")
