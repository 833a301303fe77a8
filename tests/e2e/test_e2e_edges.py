"""Less travelled paths: pipelined frames, half-closes, protocol errors, limits, upstream
refusals, clients leaving mid-connect, closing during a flood, idle timeout, concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable

import pytest
from helpers import (
    EchoServer,
    GatewayHandle,
    RawWS,
    SilentListener,
    StallingUpstream,
    encode_frame,
    handshake_status,
    token,
    wait_until,
)
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(30)


def target(**extra: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"token": token(), **extra}.items())
    return f"/ws/experience?{query}"


def test_frames_pipelined_before_101_are_delivered(gateway: GatewayHandle,
                                                   echo: EchoServer) -> None:
    early = encode_frame(0x1, b"early-1") + encode_frame(0x2, b"early-2")
    with RawWS(gateway.port, target(), early=early) as ws:
        assert ws.status == 101
        assert ws.recv_frame().payload == b"early-1"
        frame = ws.recv_frame()
        assert (frame.opcode, frame.payload) == (0x2, b"early-2")
        ws.send_close(1000)
        assert ws.recv_frame().close == (1000, "")
    assert echo.wait_record().messages == [["early-1"], [b"early-2"]]


def test_client_half_close_without_close_frame(gateway: GatewayHandle, echo: EchoServer) -> None:
    with RawWS(gateway.port, target()) as ws:
        ws.send_frame(0x1, b"x")
        assert ws.recv_frame().payload == b"x"
        t0 = time.monotonic()
        ws.sock.shutdown(socket.SHUT_WR)
        rec = echo.wait_record()
        assert rec.closed.wait(3)
        assert rec.close_code == 1001
        assert rec.closed_at - t0 < 1.5
        assert ws.drain_to_eof(3) is not None


def test_client_protocol_error(gateway: GatewayHandle, echo: EchoServer) -> None:
    with RawWS(gateway.port, target()) as ws:
        ws.send_frame(0x1, b"before")
        assert ws.recv_frame().payload == b"before"
        ws.send(encode_frame(0x1, b"unmasked", mask=False))
        frame = ws.recv_frame()
        assert frame.opcode == 0x8 and frame.close[0] == 1002, frame
        ws.send_close(1002)
        assert ws.drain_to_eof(3) is not None
    rec = echo.wait_record()
    assert rec.closed.wait(3)
    assert rec.close_code == 1001
    assert rec.messages == [["before"]]


def test_message_too_big_1009(gateway_factory: Callable[..., GatewayHandle],
                              echo: EchoServer) -> None:
    gw = gateway_factory(echo.url(), max_message_size=4096)
    with connect(gw.url(token()), open_timeout=5, max_size=None) as ws:
        ws.send(b"a" * 4096)
        assert ws.recv(timeout=3) == b"a" * 4096
        ws.send(b"b" * 4097)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=3)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    rec = echo.wait_record()
    assert rec.closed.wait(3)
    assert rec.close_code == 1001
    assert rec.messages == [[b"a" * 4096]]


@pytest.mark.parametrize(("upstream_status", "client_status"), [(403, 403), (404, 404),
                                                                 (500, 502)])
def test_upstream_refuses_handshake(gateway: GatewayHandle, echo: EchoServer,
                                    upstream_status: int, client_status: int) -> None:
    with RawWS(gateway.port, target(reject=str(upstream_status))) as ws:
        assert ws.status == client_status
        ws.read_rest()
    assert echo.requests == 1 and echo.records == []


def test_client_leaves_while_upstream_connects(gateway_factory: Callable[..., GatewayHandle],
                                               silent: SilentListener) -> None:
    gw = gateway_factory(silent.url(), connect_timeout=5)
    ws = RawWS(gw.port, target(), read_response=False)
    assert wait_until(lambda: silent.accepted == 1, 3)
    t0 = time.monotonic()
    ws.reset()
    assert wait_until(lambda: silent.ended == 1, 3), "the upstream attempt was not dropped"
    assert time.monotonic() - t0 < 1.5


def test_stop_while_upstream_connects(gateway_factory: Callable[..., GatewayHandle],
                                      silent: SilentListener) -> None:
    gw = gateway_factory(silent.url(), connect_timeout=5, shutdown_grace=3)
    with RawWS(gw.port, target(), read_response=False) as ws:
        assert wait_until(lambda: silent.accepted == 1, 3)
        gw.request_stop()
        ws.read_response()
        assert ws.status == 503
        assert gw.done.wait(3)
        assert gw.returned_at - gw.stop_requested_at < 1.5
    assert wait_until(lambda: silent.ended == 1, 3)


def test_client_close_during_flood(gateway: GatewayHandle, echo: EchoServer) -> None:
    with RawWS(gateway.port, target()) as ws:
        ws.send_frame(0x1, f"cmd:flood {50 * 1024 * 1024} 16384".encode())
        for _ in range(10):
            frame = ws.recv_frame()
            assert frame.opcode == 0x2 and len(frame.payload) == 16384
        ws.send_close(4003, "enough")
        received = 0
        while (frame := ws.recv_frame()).opcode == 0x2:  # what was in flight, then the close
            assert len(frame.payload) == 16384
            received += 1
        assert frame.close == (4003, "enough")
        assert ws.drain_to_eof(3) == 0
    rec = echo.wait_record()
    assert rec.closed.wait(3)
    assert rec.close_code == 4003
    assert rec.flood_sent < 50 * 1024 * 1024


def test_idle_timeout(gateway_factory: Callable[..., GatewayHandle], echo: EchoServer) -> None:
    gw = gateway_factory(echo.url(), idle_timeout=0.3)
    with connect(gw.url(token()), open_timeout=5) as ws:
        ws.send("keep")
        assert ws.recv(timeout=3) == "keep"
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=3)
        elapsed = time.monotonic() - t0
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        assert 0.3 <= elapsed < 1.5, elapsed
    rec = echo.wait_record()
    assert rec.closed.wait(3)
    assert rec.close_code == 1001


def test_many_concurrent_sessions(gateway: GatewayHandle, echo: EchoServer) -> None:
    n = 40

    async def one(i: int) -> None:
        async with aconnect(gateway.url(token(f"user-{i}")), open_timeout=10) as ws:
            for j in range(5):
                await ws.send(f"{i}:{j}")
                assert await asyncio.wait_for(ws.recv(), 5) == f"{i}:{j}"
            await ws.send(bytes([i]) * 70000)
            assert await asyncio.wait_for(ws.recv(), 5) == bytes([i]) * 70000

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(n)))

    asyncio.run(main())
    assert wait_until(lambda: len(echo.records) == n and all(r.closed.is_set()
                                                             for r in echo.records), 3)
    assert sorted(r.header("X-User-Id")[0] for r in echo.records) == sorted(
        f"user-{i}" for i in range(n))
    assert {r.close_code for r in echo.records} == {1000}


def test_handshake_timeout_408(gateway_factory: Callable[..., GatewayHandle],
                               echo: EchoServer) -> None:
    gw = gateway_factory(echo.url(), handshake_timeout=0.3)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=3) as sock:
        sock.sendall(b"GET /ws/experience HTTP/1.1\r\n")  # and then nothing
        t0 = time.monotonic()
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 408"), data[:80]
        assert time.monotonic() - t0 < 1.5
    assert echo.requests == 0


def test_spoofed_request_id_replaced(gateway: GatewayHandle, echo: EchoServer) -> None:
    with connect(gateway.url(token()), open_timeout=5,
                 additional_headers={"X-Request-ID": "spoofed", "Forwarded": "for=6.6.6.6"}) as ws:
        ws.send("x")
        ws.recv(timeout=3)
    rec = echo.wait_record()
    assert rec.header("X-Request-ID") != ["spoofed"] and len(rec.header("X-Request-ID")) == 1
    assert rec.header("Forwarded") == []
    assert handshake_status(gateway.url(token(), path="/health")) == 200


# While the upstream reads nothing the client socket is paused, so the gateway cannot see the
# client leave; send_timeout bounds that direction too.
def test_client_reset_while_upstream_not_reading(gateway_factory: Callable[..., GatewayHandle]
                                                 ) -> None:
    upstream = StallingUpstream()  # accepts the handshake, then never reads
    try:
        gw = gateway_factory(upstream.url(), send_timeout=1.0, close_timeout=1.0)
        ws = RawWS(gw.port, f"/ws/experience?token={token()}")
        ws.sock.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            for _ in range(5000):  # until the gateway stops reading us
                ws.send_frame(0x2, b"u" * 16384)
        ws.reset()
        assert wait_until(gw.idle, 3), "the session outlived its client"
    finally:
        upstream.release()  # let the session end, for the leak checks
        upstream.stop()
