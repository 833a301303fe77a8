"""A hostile or failing upstream: refusing, silent or broken during the handshake (case 12),
SIGKILLed under load (case 13), sending invalid frames (case 15). The client always gets a
definite answer (an HTTP status before the upgrade, 1011 after it) and never a dangling 101."""

from __future__ import annotations

import signal
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
    RawUpstream,
    exchange,
    frame_header,
    one_response,
)
from helpers import (
    HOST,
    RawWS,
    SilentListener,
    encode_frame,
    free_port,
    token,
    upgrade_request,
    wait_until,
)
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(60)


def target(tok: str, **extra: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"token": tok, "experience": "hardening",
                                               **extra}.items())
    return f"/ws/experience?{query}"


# ---------------------------------------------------------------------------- case 12


def _bad_accept(key: bytes) -> bytes:
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n")


@pytest.mark.parametrize(("upstream", "status"), [
    ("refused", 502),
    ("accepts-tcp-never-answers", 504),
    ("refuses-upgrade-403", 403),
    ("refuses-upgrade-500", 502),
    ("answers-garbage", 502),
    ("answers-101-with-wrong-accept", 502),
    ("answers-200", 502),
])
def test_case_12_upstream_handshake_failures(harden: Callable[..., Guard], echo: CountingEcho,
                                             upstream: str, status: int) -> None:
    connect_timeout = 1.0
    silent = raw = None
    extra: dict[str, str] = {}
    try:
        if upstream == "refused":
            url = f"ws://{HOST}:{free_port()}/ws/experience"  # nobody listens there
        elif upstream == "accepts-tcp-never-answers":
            silent = SilentListener().start()
            url = silent.url()
        elif upstream.startswith("refuses-upgrade"):
            url = echo.url()
            extra["reject"] = upstream.rsplit("-", 1)[1]
        else:
            answer = {
                "answers-garbage": lambda key: b"\x16\x03\x01 not http at all\r\n\r\n",
                "answers-101-with-wrong-accept": _bad_accept,
                "answers-200": lambda key: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            }[upstream]
            raw = RawUpstream(answer=answer)
            url = raw.url()
        g = harden(url, connect_timeout=connect_timeout)
        t0 = time.monotonic()
        got = exchange(g.port, upgrade_request(target(g.secret(token()), **extra)))
        took = time.monotonic() - t0
        resp = one_response(got)  # exactly one answer, and it is not a 101
        assert resp.status == status, (resp.status, resp.body)
        assert b"101" not in got.split(b"\r\n", 1)[0]
        if status == 504:
            assert connect_timeout - 0.1 <= took < connect_timeout + ALLOWANCE, took
            assert silent is not None and silent.accepted == 1
            assert wait_until(lambda: silent.ended == 1, 3), "the upstream attempt was not closed"
        else:
            assert took < ALLOWANCE, took
        if raw is not None:
            assert raw.conns and raw.conns[0].eof.wait(3)
        if upstream.startswith("refuses-upgrade"):
            assert echo.requests == 1 and echo.records == []
        g.check()
    finally:
        if silent is not None:
            silent.stop()
        if raw is not None:
            raw.stop()


# ---------------------------------------------------------------------------- case 13


@pytest.fixture
def backend() -> Iterator[EchoBackendProcess]:
    proc = EchoBackendProcess().start()
    yield proc
    proc.kill()


def test_case_13_upstream_sigkill_under_load(harden: Callable[..., Guard],
                                             backend: EchoBackendProcess) -> None:
    g = harden(backend.url())
    n = 20
    results: dict[int, tuple[int | None, float]] = {}
    round_trips = [0] * n
    errors: list[BaseException] = []
    all_going = threading.Barrier(n + 1)

    def client(i: int) -> None:
        try:
            with connect(g.url(tok=token(f"load-{i}")), open_timeout=5, close_timeout=2) as ws:
                all_going.wait(10)
                try:
                    k = 0
                    while True:
                        ws.send(f"{i}:{k}")
                        assert ws.recv(timeout=10) == f"{i}:{k}"
                        round_trips[i] += 1
                        k += 1
                except ConnectionClosed as exc:
                    code = exc.rcvd.code if exc.rcvd is not None else None
                    results[i] = (code, time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for i in range(n):
        g.secret(token(f"load-{i}"))
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    all_going.wait(10)
    assert wait_until(lambda: min(round_trips) >= 50, 15), round_trips
    port = backend.port
    t_kill = time.monotonic()
    backend.kill(signal.SIGKILL)
    for t in threads:
        t.join(ALLOWANCE + 3)
    assert not errors, errors[:3]
    assert sorted(results) == list(range(n)), f"clients not closed: {set(range(n)) - set(results)}"
    codes = {code for code, _ in results.values()}
    assert codes == {1011}, codes
    slowest = max(at for _, at in results.values()) - t_kill
    assert slowest < ALLOWANCE, f"the last client got its 1011 after {slowest:.2f}s"
    print(f"SIGKILL: {n} clients got 1011 within {slowest * 1000:.0f} ms "
          f"(after {min(round_trips)}-{max(round_trips)} round trips each)")
    g.sample()
    # While it is down: 502, quickly.
    for _ in range(3):
        t0 = time.monotonic()
        with pytest.raises(InvalidStatus) as info, connect(g.url(), open_timeout=5):
            pass
        assert info.value.response.status_code == 502
        assert time.monotonic() - t0 < ALLOWANCE
    # Restarted on the same port: the same gateway (no restart) serves again.
    backend.port = port
    backend.start()
    assert backend.port == port
    with connect(g.url(), open_timeout=5) as ws:
        ws.send("back")
        assert ws.recv(timeout=5) == "back"
    g.check(main_route=True)


# ---------------------------------------------------------------------------- case 15

GARBAGE: list[tuple[str, bytes, int]] = [
    ("masked-server-frame", encode_frame(0x1, b"masked by the server", mask=True), 1002),
    ("reserved-opcode-3", encode_frame(0x3, b"x", mask=False), 1002),
    ("reserved-opcode-0xC", encode_frame(0xC, b"x", mask=False), 1002),
    ("rsv1-without-extension", encode_frame(0x1, b"x", mask=False, rsv=0x40), 1002),
    ("control-frame-over-125", encode_frame(0x9, b"p" * 200, mask=False), 1002),
    ("fragmented-ping", encode_frame(0x9, b"x", mask=False, fin=False), 1002),
    ("continuation-without-start", encode_frame(0x0, b"x", mask=False), 1002),
    ("length-2^63", frame_header(0x2, 2**63, mask=False), 1009),
    ("invalid-close-code-1005", encode_frame(0x8, struct.pack("!H", 1005), mask=False), 1002),
    ("close-reason-not-utf8", encode_frame(0x8, struct.pack("!H", 1000) + b"\xff", mask=False),
     1007),
    ("random-garbage", bytes(range(255, 0, -1)) * 4, 1002),
    ("http-response-again", b"HTTP/1.1 200 OK\r\n\r\n", 1002),
]


@pytest.mark.parametrize(("garbage", "data", "upstream_code"), GARBAGE,
                         ids=[x[0] for x in GARBAGE])
def test_case_15_upstream_sends_invalid_frames(harden: Callable[..., Guard], garbage: str,
                                               data: bytes, upstream_code: int) -> None:
    # A valid frame first (it must reach the client), then the garbage, in one write.
    raw = RawUpstream(on_first_frame=encode_frame(0x1, b"valid first", mask=False) + data)
    try:
        g = harden(raw.url())
        with RawWS(g.port, target(g.secret(token()))) as ws:
            assert ws.status == 101
            t0 = time.monotonic()
            ws.send_frame(0x1, b"hello")
            first = ws.recv_frame(5)
            assert (first.opcode, first.payload) == (0x1, b"valid first")
            frame = ws.recv_frame(5)
            took = time.monotonic() - t0
            assert frame.opcode == 0x8, frame
            assert frame.close[0] == 1011, frame.close
            assert took < ALLOWANCE, took
            ws.send_close(1011)
            assert ws.drain_to_eof(3) is not None
        conn = raw.conns[0]
        assert conn.eof.wait(3), "the broken upstream was not closed"
        assert conn.close_code == upstream_code, conn.frames
        # The gateway stays up.
        g.check()
    finally:
        raw.stop()


# ------------------------------------------------------- the TCP close toward the upstream
# Once the close frames are exchanged, the server closes the TCP connection first, so that the
# TIME_WAIT is its own (RFC 6455 7.1.1). Toward the upstream the gateway is the client: had it
# closed first, each session would hold one of its ephemeral ports toward that upstream for a
# minute after it ended, and a busy gateway runs out of them (connect() fails with
# EADDRNOTAVAIL) long before it runs out of anything else.

UPSTREAM_HOLD = 1.0  # how long the upstream below waits after its close reply


@pytest.mark.parametrize("who", ["client-closes", "client-vanishes"])
def test_the_upstream_closes_its_socket_first(harden: Callable[..., Guard], who: str) -> None:
    raw = RawUpstream(echo=True, close_after=UPSTREAM_HOLD)
    try:
        g = harden(raw.url(), close_timeout=5)
        with RawWS(g.port, target(g.secret(token()))) as ws:
            assert ws.status == 101
            ws.send_frame(0x1, b"hello")
            assert ws.recv_frame().payload == b"hello"
            if who == "client-closes":
                ws.send_close(1000, "bye")
                assert ws.recv_frame().close == (1000, "bye")
                # the client's own socket is not held for the upstream's
                assert ws.drain_to_eof(UPSTREAM_HOLD / 2) is not None
        # (a vanished client gets the upstream 1001 from the gateway, answered the same way)
        conn = raw.conns[0]
        assert conn.eof.wait(UPSTREAM_HOLD + 3), "the upstream connection never ended"
        assert conn.close_code == (1000 if who == "client-closes" else 1001), conn.frames
        assert conn.after_close is None, "the gateway closed its side before the upstream"
        # ...and it closes its own once the upstream's end of stream comes
        assert wait_until(g.gw.idle, 3), "the gateway kept the upstream socket"
        g.check()
    finally:
        raw.stop()


def test_an_upstream_that_keeps_its_socket_is_dropped_at_close_timeout(
        harden: Callable[..., Guard]) -> None:
    raw = RawUpstream(echo=True, close_after=None)  # answers the close, never closes the socket
    try:
        g = harden(raw.url(), close_timeout=0.5)
        with RawWS(g.port, target(g.secret(token()))) as ws:
            assert ws.status == 101
            ws.send_close(1000, "bye")
            assert ws.recv_frame().close == (1000, "bye")
            assert ws.drain_to_eof(3) is not None
        conn = raw.conns[0]
        assert conn.eof.wait(3), "the gateway never dropped the upstream connection"
        assert conn.close_code == 1000, conn.frames
        assert wait_until(g.gw.idle, 3)
        g.check()
    finally:
        raw.stop()
