"""Relay behaviour over real sockets: the demo contract, echo, fragments, pings, close codes,
abrupt disconnects (also with bytes still buffered for the other side), what the upstream sees
of the request, subprotocols."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from helpers import (
    USER,
    DemoBackendThread,
    EchoServer,
    GatewayHandle,
    RawWS,
    StallingUpstream,
    encode_frame,
    token,
    wait_until,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(30)

SIZES = (0, 125, 126, 65535, 65536, 1024 * 1024 - 1024)


def recv_json(ws, timeout: float = 3.0) -> dict:
    raw = ws.recv(timeout=timeout)
    assert isinstance(raw, str)
    return json.loads(raw)


def test_demo_backend_contract(gateway_factory: Callable[..., GatewayHandle],
                               demo_backend: DemoBackendThread) -> None:
    gw = gateway_factory(demo_backend.url)
    with connect(gw.url(token(), "sunken-city"), open_timeout=5) as ws:
        hello = recv_json(ws)
        assert hello["type"] == "connected"
        assert hello["user_id"] == USER
        assert hello["experience"] == "sunken-city"
        ws.send(json.dumps({"type": "ping", "timestamp": 12345}))
        assert recv_json(ws) == {"type": "pong", "timestamp": 12345}
        ws.send(json.dumps({"type": "action", "action": "collect_item", "instance_id": "i-1"}))
        reply = recv_json(ws)
        assert reply["type"] == "action_response" and reply["success"] is True
        assert reply["metadata"]["user_id"] == USER
        ws.send("{not json")
        error = recv_json(ws)
        assert error["type"] == "error" and error["code"] == "invalid_json"
        # The connection stays open after the error.
        ws.send(json.dumps({"type": "ping", "timestamp": 7}))
        assert recv_json(ws) == {"type": "pong", "timestamp": 7}
        ws.close(1000, "done")
        assert ws.close_code == 1000


def test_echo_text_and_binary_sizes(gateway: GatewayHandle) -> None:
    with connect(gateway.url(token()), open_timeout=5, max_size=None) as ws:
        for size in SIZES:
            text = "x" * size
            ws.send(text)
            got = ws.recv(timeout=5)
            assert isinstance(got, str) and got == text, f"text of {size} bytes"
            data = bytes(i % 251 for i in range(size))
            ws.send(data)
            got = ws.recv(timeout=5)
            assert isinstance(got, bytes) and got == data, f"binary of {size} bytes"


def test_fragmented_message_passes_as_fragments(gateway: GatewayHandle, echo: EchoServer) -> None:
    with RawWS(gateway.port, f"/ws/experience?token={token()}") as ws:
        assert ws.status == 101
        ws.send_frame(0x1, b"Hel", fin=False)
        ws.send_frame(0x9, b"between")  # a control frame between fragments is allowed
        ws.send_frame(0x0, b"lo ", fin=False)
        ws.send_frame(0x0, b"world", fin=True)
        frames = [ws.recv_frame()]
        while not (frames[-1].fin and frames[-1].opcode in (0x0, 0x1)):
            frames.append(ws.recv_frame())
        pongs = [f for f in frames if f.opcode == 0xA]
        data = [f for f in frames if f.opcode in (0x0, 0x1)]
        assert [p.payload for p in pongs] == [b"between"]
        # The upstream saw the three fragments, not one reassembled message.
        assert echo.wait_record().messages == [["Hel", "lo ", "world"]]
        # Its fragmented echo reaches the client as fragments too (websockets ends an
        # iterable with an empty final continuation frame).
        assert data[0].opcode == 0x1 and not data[0].fin
        assert all(f.opcode == 0x0 for f in data[1:])
        assert [f.payload for f in data if f.payload] == [b"Hel", b"lo ", b"world"]
        assert len(data) >= 3
        ws.send_close(1000)
        assert ws.recv_frame().close == (1000, "")


def test_ping_answered(gateway: GatewayHandle) -> None:
    with connect(gateway.url(token()), open_timeout=5) as ws:
        for payload in (b"", b"abc", b"p" * 125):
            assert ws.ping(payload).wait(3), f"no pong for {payload!r}"


def test_client_close_code_carried_both_ways(gateway: GatewayHandle, echo: EchoServer) -> None:
    with connect(gateway.url(token()), open_timeout=5) as ws:
        ws.send("hi")
        assert ws.recv(timeout=3) == "hi"
        ws.close(4001, "bye")
        assert (ws.close_code, ws.close_reason) == (4001, "bye")
    rec = echo.wait_record()
    assert rec.closed.wait(3)
    assert (rec.close_code, rec.close_reason) == (4001, "bye")


def test_upstream_close_code_reaches_client(gateway: GatewayHandle, echo: EchoServer) -> None:
    with connect(gateway.url(token()), open_timeout=5) as ws:
        ws.send("cmd:close 4002 srv")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=3)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4002, "srv")
    rec = echo.wait_record()
    assert rec.closed.wait(3)
    assert rec.close_code == 4002  # the client's reply, carried back


def test_client_reset_closes_upstream_with_1001(gateway: GatewayHandle, echo: EchoServer) -> None:
    ws = RawWS(gateway.port, f"/ws/experience?token={token()}")
    assert ws.status == 101
    ws.send_frame(0x1, b"ping me")
    assert ws.recv_frame().payload == b"ping me"  # relay running, at a frame boundary
    rec = echo.wait_record()
    t0 = time.monotonic()
    ws.reset()
    assert rec.closed.wait(3), "upstream never saw the connection end"
    elapsed = rec.closed_at - t0
    assert rec.close_code == 1001, (rec.close_code, rec.close_reason)
    assert elapsed < 1.5, f"upstream closed after {elapsed:.2f}s"


def test_client_reset_mid_frame_drops_upstream(gateway: GatewayHandle, echo: EchoServer) -> None:
    ws = RawWS(gateway.port, f"/ws/experience?token={token()}")
    assert ws.status == 101
    ws.send_frame(0x1, b"ok")
    assert ws.recv_frame().payload == b"ok"
    # Half a frame, then a reset: the partial message must not be delivered as complete.
    full = b"\x81\xfe\x10\x00" + b"\x00\x00\x00\x00" + b"y" * 100  # 4096-byte frame, 100 sent
    ws.send(full)
    time.sleep(0.05)
    ws.reset()
    rec = echo.wait_record()
    assert rec.closed.wait(3)
    assert rec.close_code == 1006  # no close frame could be sent mid-frame
    assert rec.messages == [["ok"]]


def test_upstream_drop_gives_client_1011(gateway: GatewayHandle) -> None:
    with connect(gateway.url(token()), open_timeout=5) as ws:
        ws.send("before")
        assert ws.recv(timeout=3) == "before"
        t0 = time.monotonic()
        ws.send("cmd:drop")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=3)
        elapsed = time.monotonic() - t0
        assert info.value.rcvd is not None, "no close frame from the gateway"
        assert info.value.rcvd.code == 1011
        assert elapsed < 1.5, f"client closed after {elapsed:.2f}s"


def test_query_and_identity_headers_forwarded(gateway: GatewayHandle, echo: EchoServer) -> None:
    tok = token()
    query = f"token={tok}&experience=a%26token%3Dx"
    with connect(gateway.url(query=query), open_timeout=5,
                 additional_headers={"X-User-Id": "evil", "X-Forwarded-For": "6.6.6.6",
                                     "X-Custom": "kept"}) as ws:
        ws.send("x")
        assert ws.recv(timeout=3) == "x"
        request_id = ws.response.headers.get("X-Request-ID")
    rec = echo.wait_record()
    assert rec.path == f"/ws/experience?{query}"
    assert rec.header("X-User-Id") == [USER]
    assert rec.header("X-Forwarded-For") == ["127.0.0.1"]
    assert rec.header("X-Custom") == ["kept"]
    ids = rec.header("X-Request-ID")
    assert len(ids) == 1 and len(ids[0]) >= 16
    assert request_id == ids[0]


def test_subprotocol_negotiated(gateway: GatewayHandle, echo: EchoServer) -> None:
    with connect(gateway.url(token()), open_timeout=5, subprotocols=["game.v1"]) as ws:
        assert ws.subprotocol == "game.v1"
        ws.send("x")
        assert ws.recv(timeout=3) == "x"
    rec = echo.wait_record()
    assert rec.subprotocol == "game.v1"
    assert rec.header("Sec-WebSocket-Protocol") == ["game.v1"]


@pytest.mark.parametrize("others", [["game.v1"], []])
def test_bearer_subprotocol_token_not_echoed_nor_forwarded(
    gateway: GatewayHandle, echo: EchoServer, others: list[str]
) -> None:
    tok = token()
    with connect(gateway.url(None), open_timeout=5,
                 subprotocols=[f"bearer.{tok}", *others]) as ws:
        assert ws.subprotocol == (others[0] if others else None)
        response_headers = list(ws.response.headers.raw_items())
        ws.send("x")
        assert ws.recv(timeout=3) == "x"
    assert not any(tok in value or "bearer." in value for _, value in response_headers)
    rec = echo.wait_record()
    assert not any(tok in value or "bearer." in value for _, value in rec.headers), rec.headers
    assert rec.header("Sec-WebSocket-Protocol") == ([", ".join(others)] if others else [])
    assert rec.header("X-User-Id") == [USER]


def test_client_reset_with_upstream_backlog_delivers_1001(
    gateway_factory: Callable[..., GatewayHandle],
) -> None:
    """The client resets while the gateway still holds bytes for a slow upstream: everything
    the gateway accepted, then the 1001, must still reach the upstream (not a torn frame)."""
    upstream = StallingUpstream()
    try:
        gw = gateway_factory(upstream.url(), close_timeout=3.0)
        message = b"z" * 16384
        with RawWS(gw.port, f"/ws/experience?token={token()}") as ws:
            assert ws.status == 101
            sent = 0
            while True:  # complete messages, one at a time, until the upstream backs up
                ws.send_frame(0x2, message)
                sent += 1
                assert sent < 3000, "the upstream never backed up"
                time.sleep(0.002)
                buffers = gw.write_buffers()
                if buffers and buffers[0][1] > 0:
                    break
            ws.reset()
        t0 = time.monotonic()
        upstream.release()
        assert upstream.done.wait(5)
        frames = upstream.frames
        assert frames and frames[-1].opcode == 0x8, f"no close frame last: {frames[-1:]}"
        assert frames[-1].close == (1001, "client went away")
        assert [(f.opcode, f.length) for f in frames[:-1]] == [(0x2, len(message))] * sent
        # The close handshake completed; close_timeout (3 s) was not needed.
        assert wait_until(gw.idle, 2)
        assert time.monotonic() - t0 < 2
    finally:
        upstream.stop()


def test_upstream_drop_with_client_backlog_delivers_all_then_1011(gateway: GatewayHandle,
                                                                  echo: EchoServer) -> None:
    """The upstream vanishes while the gateway still holds bytes for a slow client: the client
    gets every message the upstream sent, then 1011."""
    total, chunk = 4 * 1024 * 1024, 16384
    with RawWS(gateway.port, f"/ws/experience?token={token()}", rcvbuf=4096) as ws:
        assert ws.status == 101
        ws.send_frame(0x1, f"cmd:flood-drop {total} {chunk}".encode())
        rec = echo.wait_record()
        assert rec.closed.wait(5), "the upstream did not finish its flood"
        assert rec.close_code == 1006 and rec.flood_sent == total
        time.sleep(0.1)  # the gateway has seen the upstream's end by now
        received = 0
        while (frame := ws.recv_frame()).opcode == 0x2:
            assert len(frame.payload) == chunk
            received += chunk
        assert received == total
        assert frame.close[0] == 1011
        ws.send_close(1011)
        assert ws.drain_to_eof(3) == 0


def test_upstream_frames_in_the_101_packet_are_relayed(
    gateway_factory: Callable[..., GatewayHandle],
) -> None:
    greeting = encode_frame(0x1, b"welcome", mask=False) + encode_frame(0x9, b"hb", mask=False)
    upstream = StallingUpstream(greeting=greeting, stalled=False)
    try:
        gw = gateway_factory(upstream.url())
        with RawWS(gw.port, f"/ws/experience?token={token()}") as ws:
            assert ws.status == 101
            first, second = ws.recv_frame(), ws.recv_frame()
            assert (first.opcode, first.payload) == (0x1, b"welcome")
            assert (second.opcode, second.payload) == (0x9, b"hb")
            ws.send_close(1000, "ok")
            assert ws.recv_frame().close == (1000, "ok")
        assert upstream.done.wait(3)
        assert upstream.frames[-1].close == (1000, "ok")
    finally:
        upstream.stop()


def test_client_data_after_upstream_vanished(gateway: GatewayHandle, echo: EchoServer) -> None:
    """The client keeps sending after the upstream died (before it answers the 1011): the
    gateway discards those frames and still completes the close handshake with the client."""
    with RawWS(gateway.port, f"/ws/experience?token={token()}") as ws:
        ws.send_frame(0x1, b"cmd:drop")
        rec = echo.wait_record()
        assert rec.closed.wait(3)
        frame = ws.recv_frame()
        assert frame.close == (1011, "upstream connection lost")
        ws.send_frame(0x1, b"late")
        ws.send_frame(0x2, b"\x00" * 70000)
        ws.send_close(1011)
        assert ws.drain_to_eof(3) == 0, "the gateway dropped the connection"
