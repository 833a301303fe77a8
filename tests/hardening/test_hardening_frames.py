"""Hostile frames after a successful handshake (case 8), a ping flood (case 9) and a client
that vanishes in the middle of a message (case 11)."""

from __future__ import annotations

import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from _support import (
    ALLOWANCE,
    CountingEcho,
    EchoBackendProcess,
    Guard,
    MiB,
    RawUpstream,
    frame_header,
    masked,
    parse_frames,
)
from helpers import RawWS, close_payload, token
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(60)

MAX = 64 * 1024  # max_message_size of these gateways


def target(tok: str) -> str:
    return f"/ws/experience?token={tok}&experience=hardening"


MARK = b"AFTER-THE-ATTACK"
AFTER = masked(0x1, MARK)  # sent right behind each attack: must never arrive

# (name, attack bytes, close code the client gets)
FRAME_ATTACKS: list[tuple[str, Callable[[], bytes], int]] = [
    ("length-2^63", lambda: frame_header(0x2, 2**63), 1009),
    ("length-2^63-1", lambda: frame_header(0x2, 2**63 - 1), 1009),
    ("length-2^64-1-text", lambda: frame_header(0x1, 2**64 - 1), 1009),
    ("fragments-past-max-message-size",
     lambda: masked(0x2, b"a" * 40000, fin=False) + masked(0x0, b"b" * 40000), 1009),
    ("many-small-fragments-past-max",
     lambda: b"".join([masked(0x1, b"c" * 1000, fin=False)]
                      + [masked(0x0, b"c" * 1000, fin=False) for _ in range(70)]), 1009),
    ("unmasked-client-frame", lambda: masked(0x1, b"unmasked", mask=False), 1002),
    ("unmasked-after-fragment",
     lambda: masked(0x1, b"part", fin=False) + masked(0x0, b"rest", mask=False), 1002),
    ("control-frame-over-125", lambda: masked(0x9, b"p" * 126), 1002),
    ("close-frame-over-125", lambda: masked(0x8, close_payload(1000, "r" * 124)), 1002),
    ("fragmented-ping", lambda: masked(0x9, b"ping", fin=False), 1002),
    ("fragmented-close", lambda: masked(0x8, close_payload(1000), fin=False), 1002),
    ("reserved-opcode-3", lambda: masked(0x3, b"x"), 1002),
    ("reserved-opcode-7", lambda: masked(0x7, b"x"), 1002),
    ("reserved-opcode-0xB", lambda: masked(0xB, b"x"), 1002),
    ("reserved-opcode-0xF", lambda: masked(0xF, b"x"), 1002),
    ("rsv1-without-extension", lambda: masked(0x1, b"x", rsv=0x40), 1002),
    ("rsv2-without-extension", lambda: masked(0x2, b"x", rsv=0x20), 1002),
    ("rsv3-on-ping", lambda: masked(0x9, b"x", rsv=0x10), 1002),
    ("continuation-without-start", lambda: masked(0x0, b"x"), 1002),
    ("new-message-inside-fragmented", lambda: masked(0x1, b"a", fin=False) + masked(0x1, b"b"),
     1002),
    ("close-1-byte-payload", lambda: masked(0x8, b"\x03"), 1002),
    *[(f"close-code-{code}", (lambda code=code: masked(0x8, close_payload(code))), 1002)
      for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)],
    ("close-reason-not-utf8", lambda: masked(0x8, struct.pack("!H", 1000) + b"\xff\xfe\xc0"),
     1007),
    ("close-reason-truncated-utf8", lambda: masked(0x8, struct.pack("!H", 1000) + b"ok\xe2\x82"),
     1007),
]


@pytest.mark.parametrize(("attack", "build", "code"), FRAME_ATTACKS,
                         ids=[a[0] for a in FRAME_ATTACKS])
def test_case_08_frame_attacks(harden: Callable[..., Guard], attack: str,
                               build: Callable[[], bytes], code: int) -> None:
    # The upstream records every frame as it comes off its socket (and echoes data frames):
    # "nothing forwarded" is checked at the wire, not through a server library.
    upstream = RawUpstream(echo=True)
    try:
        g = harden(upstream.url(), max_message_size=MAX)
        with RawWS(g.port, target(g.secret(token()))) as ws:
            assert ws.status == 101
            ws.send_frame(0x1, b"before")  # a normal message first: the relay is running
            assert ws.recv_frame().payload == b"before"
            t0 = time.monotonic()
            attack_bytes = build()
            ws.send(attack_bytes + AFTER)
            frame = ws.recv_frame(timeout=5)
            while frame.opcode != 0x8:  # echoes of fragments forwarded before the violation
                assert frame.opcode == 0x0 or not frame.fin, frame
                frame = ws.recv_frame(timeout=5)
            took = time.monotonic() - t0
            assert frame.close[0] == code, frame.close
            assert took < ALLOWANCE, f"the close came after {took:.2f}s"
            ws.send_close(code)
            assert ws.drain_to_eof(3) is not None, "the gateway did not close the connection"
        conn = upstream.conns[0]
        assert conn.eof.wait(3), "the upstream connection was not closed"
        first, *rest = conn.frames
        assert (first.opcode, first.payload) == (0x1, b"before")
        *forwarded, close = rest
        # Only the gateway's own 1001 close, after at most the data fragments that preceded the
        # offending frame (cut-through), none of them ending a message.
        assert close.opcode == 0x8 and close.close[0] == 1001, rest[-3:]
        assert all(f.opcode in (0x0, 0x1, 0x2) and not f.fin for f in forwarded), forwarded[-3:]
        assert sum(len(f.payload) for f in forwarded) < len(attack_bytes)
        assert all(MARK not in f.payload for f in conn.frames)
        g.check()
    finally:
        upstream.stop()


# ----------------------------------------------------------------------------- case 9


@pytest.fixture
def backend() -> Iterator[EchoBackendProcess]:
    proc = EchoBackendProcess().start()
    yield proc
    proc.kill()


def test_case_09_ping_flood(harden: Callable[..., Guard], backend: EchoBackendProcess) -> None:
    # The upstream is scripts/echo_backend.py in its own process: the RSS measured here is the
    # gateway's (and the test clients'), not the upstream's pong queue.
    g = harden(backend.url())
    n_pings, batch = 100_000, 1000
    payload = b"p" * 125  # the largest control frame
    one = masked(0x9, payload)
    chunk = one * batch
    victim = RawWS(g.port, target(g.secret(token("pinger"))))
    assert victim.status == 101
    pongs = 0
    other_frames: list[int] = []
    reader_error: list[BaseException] = []
    done_sending = threading.Event()

    def reader() -> None:  # reads slowly: nothing for 0.5 s, then 64 KiB every 2 ms
        nonlocal pongs
        buf = victim.buf
        victim.sock.settimeout(10)
        time.sleep(0.5)
        try:
            while pongs < n_pings:
                data = victim.sock.recv(65536)
                if not data:
                    break
                frames, buf = parse_frames(buf + data)
                for b0, length, _ in frames:
                    if b0 == 0x8A and length == len(payload):
                        pongs += 1
                    else:
                        other_frames.append(b0)
                time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001
            reader_error.append(exc)

    latencies: list[float] = []
    with victim, connect(g.url(), open_timeout=5) as other:
        t = threading.Thread(target=reader, daemon=True)
        t.start()

        def sender() -> None:
            for _ in range(n_pings // batch):
                victim.sock.sendall(chunk)
            done_sending.set()

        s = threading.Thread(target=sender, daemon=True)
        t0 = time.monotonic()
        s.start()
        # Meanwhile another client on the same gateway echoes, with normal latency.
        while (not done_sending.is_set() or pongs < n_pings) and time.monotonic() - t0 < 30:
            t1 = time.monotonic()
            other.send("still here")
            assert other.recv(timeout=5) == "still here"
            latencies.append(time.monotonic() - t1)
            g.sample()
            time.sleep(0.02)
        s.join(5)
        t.join(10)
        took = time.monotonic() - t0
        assert not reader_error, reader_error
        assert done_sending.is_set(), "the pings could not all be sent"
        assert pongs == n_pings, f"{pongs} pongs for {n_pings} pings in {took:.1f}s"
        assert other_frames == [], other_frames
        victim.send_close(1000)
        frame = victim.recv_frame(5)
        while frame.opcode != 0x8:
            frame = victim.recv_frame(5)
        assert frame.close == (1000, "")
        assert victim.drain_to_eof(3) is not None
    print(f"ping flood: {n_pings} pings/pongs in {took:.2f}s; other client: "
          f"{len(latencies)} echoes, median {statistics.median(latencies) * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms; peaks {g.peaks}")
    assert len(latencies) >= 5
    assert statistics.median(latencies) < 0.2, statistics.median(latencies)
    assert max(latencies) < ALLOWANCE, max(latencies)
    g.check(rss_bound=40 * MiB, buffer_bound=512 * 1024, main_route=True)


# ---------------------------------------------------------------------------- case 11


@pytest.mark.parametrize(("cut", "upstream_close"), [
    ("after-first-fragment", 1001),  # at a frame boundary: the gateway closes with 1001
    ("after-fragments-and-ping", 1001),
    ("half-a-frame", 1006),  # mid-frame: the upstream's TCP connection is dropped, no close
    ("fragment-then-half-a-continuation", 1006),
    ("half-a-frame-header", 1001),  # nothing of that frame was forwarded: still a boundary
])
def test_case_11_client_vanishes_mid_message(harden: Callable[..., Guard], echo: CountingEcho,
                                             cut: str, upstream_close: int) -> None:
    g = harden(echo.url())
    ws = RawWS(g.port, target(g.secret(token())))
    try:
        assert ws.status == 101
        ws.send_frame(0x1, b"complete")
        assert ws.recv_frame().payload == b"complete"
        if cut == "after-first-fragment":
            ws.send(masked(0x1, b"first fragment", fin=False))
        elif cut == "after-fragments-and-ping":
            ws.send(masked(0x2, b"1" * 3000, fin=False) + masked(0x9, b"hi")
                    + masked(0x0, b"2" * 3000, fin=False))
        elif cut == "half-a-frame":
            ws.send(masked(0x2, b"h" * 2000)[:1000])
        elif cut == "fragment-then-half-a-continuation":
            ws.send(masked(0x1, b"first", fin=False) + masked(0x0, b"s" * 5000, fin=True)[:2000])
        else:
            ws.send(masked(0x2, b"x" * 70000)[:5])  # 5 of its 14 header bytes
        time.sleep(0.1)  # let the gateway forward what it may
        rec = echo.wait_record()
        assert not rec.closed.is_set()
        t0 = time.monotonic()
    finally:
        ws.reset()  # RST: SO_LINGER 0
    assert rec.closed.wait(ALLOWANCE + 1), "the upstream was never closed"
    took = rec.closed_at - t0
    assert took < ALLOWANCE, f"the upstream was closed after {took:.2f}s"
    assert rec.close_code == upstream_close, (rec.close_code, rec.close_reason)
    assert rec.messages == [["complete"]], "a partial message was delivered as complete"
    g.check(main_route=True)
