"""Backpressure: a client that stops reading while the upstream floods holds bounded memory,
and is dropped after ``send_timeout`` with 1001 toward the upstream."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import pytest
from helpers import EchoServer, GatewayHandle, RawWS, rss_bytes, token

pytestmark = pytest.mark.timeout(40)

FLOOD = 50 * 1024 * 1024
CHUNK = 64 * 1024
BUFFER_BOUND = 512 * 1024  # high-water mark 64 KiB + at most one read of the other side
RSS_BOUND = 20 * 1024 * 1024


def stalled_client(gw: GatewayHandle) -> RawWS:
    """A client with a tiny receive buffer that asks for the flood and then reads nothing."""
    ws = RawWS(gw.port, f"/ws/experience?token={token()}", rcvbuf=4096)
    assert ws.status == 101
    ws.send_frame(0x1, f"cmd:flood {FLOOD} {CHUNK}".encode())
    return ws


def test_stalled_client_memory_bounded(gateway_factory: Callable[..., GatewayHandle],
                                       echo: EchoServer) -> None:
    gw = gateway_factory(echo.url())  # send_timeout 30 s: stays blocked during the test
    gc.collect()
    rss0 = rss_bytes()
    with stalled_client(gw) as ws:
        _measure_stalled(gw, echo, ws, rss0)


def _measure_stalled(gw: GatewayHandle, echo: EchoServer, ws: RawWS, rss0: int) -> None:
    rec = echo.wait_record()
    peak_rss = peak_client = peak_up = 0
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        for client_buf, up_buf in gw.write_buffers():
            peak_client = max(peak_client, client_buf)
            peak_up = max(peak_up, up_buf)
        peak_rss = max(peak_rss, rss_bytes() - rss0)
        time.sleep(0.05)
    sent = rec.flood_sent
    assert rec.flood_sent > 0, "the upstream never flooded"
    # The flood stalls: sockets' kernel buffers plus one gateway buffer, far from 50 MB.
    time.sleep(0.2)
    assert rec.flood_sent - sent <= CHUNK * 2, "the upstream is still sending freely"
    assert rec.flood_sent < FLOOD // 2, rec.flood_sent
    assert peak_client <= BUFFER_BOUND, f"client write buffer reached {peak_client} bytes"
    assert peak_up <= BUFFER_BOUND, f"upstream write buffer reached {peak_up} bytes"
    assert peak_rss < RSS_BOUND, f"RSS grew by {peak_rss / 1e6:.1f} MB"
    assert not rec.closed.is_set()
    ws.reset()
    assert rec.closed.wait(3)


def test_stalled_client_dropped_after_send_timeout(gateway_factory: Callable[..., GatewayHandle],
                                                   echo: EchoServer) -> None:
    gw = gateway_factory(echo.url(), send_timeout=1.0)
    t0 = time.monotonic()
    with stalled_client(gw) as ws:
        rec = echo.wait_record()
        assert rec.closed.wait(5), "the stalled client was never dropped"
        elapsed = rec.closed_at - t0
        assert rec.close_code == 1001, (rec.close_code, rec.close_reason)
        assert 0.9 <= elapsed < 2.5, f"dropped after {elapsed:.2f}s"
        assert rec.flood_sent < FLOOD // 2
        # What the gateway had handed to the kernel before the drop may still arrive.
        drained = ws.drain_to_eof(5)
        assert drained is not None, "the gateway did not close the stalled client"
        assert drained < FLOOD // 2
