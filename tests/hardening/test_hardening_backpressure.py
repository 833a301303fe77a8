"""Peers that stop reading: a client that never reads while the upstream floods (case 10), an
upstream that never reads while the client floods (case 14). Memory stays bounded by the
write-buffer high-water marks, not by the flood."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from _support import ALLOWANCE, CountingEcho, Guard, MiB, masked
from helpers import RawWS, StallingUpstream, token, wait_until

pytestmark = pytest.mark.timeout(60)

FLOOD = 200 * 1024 * 1024
CHUNK = 64 * 1024
BUFFER_BOUND = 512 * 1024  # 64 KiB high-water mark + at most one read of the other side


def target(tok: str) -> str:
    return f"/ws/experience?token={tok}&experience=hardening"


# ---------------------------------------------------------------------------- case 10


def test_case_10_client_stops_reading(harden: Callable[..., Guard], echo: CountingEcho) -> None:
    send_timeout = 1.0
    g = harden(echo.url(), send_timeout=send_timeout)
    ws = RawWS(g.port, target(g.secret(token("never-reads"))), rcvbuf=4096)
    with ws:
        assert ws.status == 101
        ws.send_frame(0x1, f"cmd:flood {FLOOD} {CHUNK}".encode())
        t0 = time.monotonic()
        rec = echo.wait_record()
        # The client reads nothing; sample the gateway until the upstream is told 1001.
        g.sample_for(send_timeout + ALLOWANCE + 1, interval=0.02, until=rec.closed.is_set)
        assert rec.closed.wait(3), "the client that stopped reading was never dropped"
        took = rec.closed_at - t0
        assert rec.close_code == 1001, (rec.close_code, rec.close_reason)
        assert send_timeout - 0.1 <= took < send_timeout + ALLOWANCE, f"dropped after {took:.2f}s"
        assert rec.flood_sent < 32 * MiB, f"the upstream could send {rec.flood_sent} bytes"
        # The gateway closed the client (what it had handed the kernel may still arrive).
        drained = ws.drain_to_eof(5)
        assert drained is not None, "the gateway did not close the stalled client"
    print(f"client stops reading: dropped after {took:.2f}s, upstream sent "
          f"{rec.flood_sent / MiB:.1f} MiB; peaks {g.peaks}")
    g.check(rss_bound=24 * MiB, buffer_bound=BUFFER_BOUND, main_route=True)


# ---------------------------------------------------------------------------- case 14


def _flood_until_blocked(ws: RawWS, frame: bytes, g: Guard) -> int:
    """Send ``frame`` over and over until a send stays blocked for 0.5 s; the bytes the
    kernel took (the last frame may be partial)."""
    ws.sock.settimeout(0.5)
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20:
        try:
            sent += ws.sock.send(frame[sent % len(frame):])  # times out after 0.5 s blocked
        except TimeoutError:
            return sent
        if sent // len(frame) % 16 == 0:
            g.sample()
    raise AssertionError(f"the client could send {sent / MiB:.0f} MiB without blocking")


@pytest.mark.parametrize("mode", ["released", "stuck-past-send-timeout", "client-resets"])
def test_case_14_upstream_stops_reading(harden: Callable[..., Guard], mode: str) -> None:
    """The upstream completes the handshake, then reads nothing while the client floods: the
    gateway stops reading the client (its sends block) and holds bounded memory. Then, by mode:
    released: the upstream reads again, every frame arrives in order, the close goes through;
    stuck-past-send-timeout: the upstream is dropped after send_timeout, the client gets 1011;
    client-resets: the client RSTs while blocked; the session still ends by send_timeout."""
    send_timeout = 1.0 if mode != "released" else 30.0
    upstream = StallingUpstream()  # completes the handshake, then reads nothing
    try:
        g = harden(upstream.url(), send_timeout=send_timeout)
        frame = masked(0x2, b"u" * 16384)
        ws = RawWS(g.port, target(g.secret(token("flooder"))))
        with ws:
            assert ws.status == 101
            sent = _flood_until_blocked(ws, frame, g)
            t_blocked = time.monotonic()
            assert sent < 64 * MiB, f"{sent / MiB:.0f} MiB sent before the client was blocked"
            if mode == "client-resets":
                ws.reset()
                assert wait_until(g.gw.idle, send_timeout + ALLOWANCE), \
                    "the session outlived its client"
                assert time.monotonic() - t_blocked < send_timeout + ALLOWANCE
            elif mode == "stuck-past-send-timeout":
                ws.sock.settimeout(send_timeout + ALLOWANCE)
                close = ws.recv_frame(send_timeout + ALLOWANCE)
                assert close.close == (1011, "upstream not reading"), close
                assert time.monotonic() - t_blocked < send_timeout + ALLOWANCE
                assert ws.drain_to_eof(3) is not None, "the gateway did not close the client"
            else:
                # Blocked: the gateway stopped reading this client. It stays blocked.
                g.sample_for(1.0, interval=0.05)
                before = sent
                with pytest.raises(TimeoutError):
                    sent += ws.sock.send(frame[sent % len(frame):])
                assert sent == before
                upstream.release()  # it reads again: everything arrives, the close goes through
                ws.sock.settimeout(10)
                if sent % len(frame):
                    ws.sock.sendall(frame[sent % len(frame):])  # finish the frame in flight
                frames_sent = -(-sent // len(frame))
                ws.send_close(1000, "done")
                reply = ws.recv_frame(10)
                assert reply.close == (1000, "done")
                assert ws.drain_to_eof(3) is not None
        upstream.release()
        assert upstream.done.wait(5)
        if mode == "released":
            data = [f for f in upstream.frames if f.opcode != 0x8]
            assert len(data) == frames_sent, (len(data), frames_sent)
            assert all(f.opcode == 0x2 and f.length == 16384 for f in data)
            assert upstream.frames[-1].close == (1000, "done")
        else:  # dropped without a close frame: no frame the client sent was lost silently
            assert all(f.opcode == 0x2 for f in upstream.frames)
        print(f"upstream stops reading ({mode}): client blocked after {sent / MiB:.1f} MiB; "
              f"peaks {g.peaks}")
        # (The main route's upstream does not echo: the control route shows the gateway serves.)
        g.check(rss_bound=24 * MiB, buffer_bound=BUFFER_BOUND)
    finally:
        upstream.release()
        upstream.stop()
