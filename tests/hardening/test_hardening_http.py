"""Adversarial HTTP before the upgrade (cases 1-5): slowloris, oversized heads, request
smuggling shapes, malformed upgrades, Origin allow-list. Every refusal is one HTTP response,
then the connection ends; nothing reaches the upstream."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Callable

import pytest
from _support import (
    ALLOWANCE,
    CountingEcho,
    Guard,
    MiB,
    exchange,
    one_response,
    parse_responses,
    read_until_closed,
    sockets_closed,
)
from helpers import HOST, RawWS, token, upgrade_request, wait_until
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(60)


def target(tok: str) -> str:
    return f"/ws/experience?token={tok}&experience=hardening"


# ----------------------------------------------------------------------------- case 1


def _trickle(port: int, request: bytes, interval: float, deadline: float) -> tuple[bytes, float]:
    """Send ``request`` one byte every ``interval`` s until the gateway answers or closes;
    (what it sent back, seconds from connect to its close)."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        t0 = time.monotonic()
        got = b""
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sel = selectors.DefaultSelector()
            sel.register(sock, selectors.EVENT_READ)
            ready = sel.select(interval)
            sel.close()
            if ready:
                break
            assert time.monotonic() < deadline, "the trickled request was never cut off"
        sock.settimeout(5)
        try:
            while data := sock.recv(65536):
                got += data
        except ConnectionResetError:
            pass
        return got, time.monotonic() - t0


@pytest.mark.parametrize("mode", ["trickle", "thousand"])
def test_case_01_slowloris(harden: Callable[..., Guard], echo: CountingEcho, mode: str) -> None:
    timeout = 1.0
    g = harden(echo.url(), handshake_timeout=timeout)
    tok = g.secret(token("slow-user"))
    request = upgrade_request(target(tok))
    if mode == "trickle":
        got, took = _trickle(g.port, request, 0.5, time.monotonic() + 10)
        assert got == b"" or one_response(got).status == 408, got[:200]
        assert timeout - 0.1 <= took < timeout + ALLOWANCE, f"cut off after {took:.2f}s"
        assert echo.contacted == 0
        g.check(main_route=True)
        return

    # 1000 connections at once, each with a partial request line, one more byte at ~0.5 s.
    n = 1000
    socks: list[socket.socket] = []
    latencies: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def legit() -> None:  # handshakes + one echo, back to back, while the slowloris runs
        try:
            while not stop.is_set():
                t = time.monotonic()
                with connect(g.url(), open_timeout=5) as ws:
                    ws.send("legit")
                    assert ws.recv(timeout=5) == "legit"
                latencies.append(time.monotonic() - t)
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with sockets_closed(socks):
        t_open = time.monotonic()
        for _ in range(n):
            s = socket.create_connection((HOST, g.port), timeout=5)
            s.sendall(request[:12])  # "GET /ws/expe"
            socks.append(s)
        opened = time.monotonic() - t_open
        worker = threading.Thread(target=legit, daemon=True)
        worker.start()
        if opened < timeout / 2:  # all of them wait in the gateway while legit clients run
            assert wait_until(lambda: g.gw.server.gateway.open_connections >= n, 0.4), \
                g.gw.server.gateway.open_connections
        time.sleep(0.5)
        for s in socks:
            try:
                s.sendall(request[12:13])
            except OSError:
                pass
        g.sample()
        # Every slowloris connection gets its 408 and is closed, at the handshake timeout.
        answers, ended = read_until_closed(socks, t_open + opened + timeout + ALLOWANCE + 1.0)
        done_at = time.monotonic()
        g.sample()
        stop.set()
        worker.join(10)
    assert not errors, f"a legitimate client failed during the slowloris: {errors[0]!r}"
    assert len(ended) == n, f"{n - len(ended)} slowloris connections still open"
    statuses = {one_response(a).status if a else None for a in answers}
    assert statuses <= {408, None}, statuses
    assert done_at - t_open < opened + timeout + ALLOWANCE, "the 408s came late"
    assert len(latencies) >= 3
    assert max(latencies) < 1.0 * ALLOWANCE, f"legit handshake+echo took {max(latencies):.2f}s"
    assert echo.contacted == len(latencies)  # only the legitimate clients reached it
    assert g.peaks.fds < 5000
    g.check(rss_bound=64 * MiB, fd_bound=5000, main_route=True)


# ----------------------------------------------------------------------------- case 2


@pytest.mark.parametrize("delivery", ["whole", "pieces"])
@pytest.mark.parametrize(("attack", "statuses"), [
    ("header-over-limit", {431}),
    ("too-many-headers", {431}),
    ("request-line-over-limit", {414, 431}),
], ids=["header-over-limit", "too-many-headers", "request-line-over-limit"])
def test_case_02_oversized_head(harden: Callable[..., Guard], echo: CountingEcho, attack: str,
                                statuses: set[int], delivery: str) -> None:
    g = harden(echo.url())
    tok = g.secret(token())
    limit = 16 * 1024  # the default max_header_bytes
    if attack == "header-over-limit":
        request = upgrade_request(target(tok), headers=[("X-Big", "a" * (limit + 1))])
    elif attack == "too-many-headers":
        request = upgrade_request(target(tok), headers=[(f"X-H{i}", "v") for i in range(101)])
    else:
        request = upgrade_request(target(tok) + "&pad=" + "a" * (limit + 1))
    chunks = [request] if delivery == "whole" else [request[i:i + 1024]
                                                    for i in range(0, len(request), 1024)]
    resp = one_response(exchange(g.port, chunks, pause=0.005))
    assert resp.status in statuses, (resp.status, resp.body)
    assert echo.contacted == 0
    g.check(main_route=True)


# ----------------------------------------------------------------------------- case 3

SECOND = f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()

SMUGGLING = [
    ("cl-and-te", [("Content-Length", "5"), ("Transfer-Encoding", "chunked")], b"0\r\n\r\n"),
    ("te-and-cl-0", [("Transfer-Encoding", "chunked"), ("Content-Length", "0")], b"0\r\n\r\n"),
    ("te-only", [("Transfer-Encoding", "chunked")], b"0\r\n\r\n"),
    ("te-gzip-chunked", [("Transfer-Encoding", "gzip, chunked")], b"0\r\n\r\n"),
    ("te-space-before-colon", [("Transfer-Encoding ", "chunked")], b"0\r\n\r\n"),
    ("te-unknown-coding", [("Transfer-Encoding", "x-custom")], b""),
    ("dup-cl-differing", [("Content-Length", "0"), ("Content-Length", "5")], b"hello"),
    ("dup-cl-same", [("Content-Length", "5"), ("Content-Length", "5")], b"hello"),
    ("cl-list", [("Content-Length", "5, 6")], b"hello"),
    ("cl-plus-sign", [("Content-Length", "+5")], b"hello"),
    ("huge-cl", [("Content-Length", "99999999999999999999999")], b""),
    ("big-cl", [("Content-Length", str(2**62))], b""),
    # Content-Length: 0 twice: h11 merges identical values (RFC 9112 6.3 allows it), but a
    # duplicate on an upgrade request is refused all the same.
    ("dup-cl-zero", [("Content-Length", "0"), ("Content-Length", "0")], b""),
]


@pytest.mark.parametrize(("attack", "headers", "body"), SMUGGLING,
                         ids=[a[0] for a in SMUGGLING])
def test_case_03_smuggling_shapes(harden: Callable[..., Guard], echo: CountingEcho, attack: str,
                                  headers: list[tuple[str, str]], body: bytes) -> None:
    g = harden(echo.url())
    tok = g.secret(token())
    raw = exchange(g.port, upgrade_request(target(tok), headers=headers) + body + SECOND)
    responses, rest = parse_responses(raw)
    assert [r.status for r in responses] == [400], raw[:400]  # /health: never parsed
    assert rest == b"", rest[:200]
    assert echo.contacted == 0
    g.check(main_route=True)


# ----------------------------------------------------------------------------- case 4


@pytest.mark.parametrize("attack", ["no-key", "version-12", "post-with-upgrade"])
def test_case_04_malformed_upgrade(harden: Callable[..., Guard], echo: CountingEcho,
                                   attack: str) -> None:
    g = harden(echo.url())
    tok = g.secret(token())
    if attack == "no-key":
        resp = one_response(exchange(g.port, upgrade_request(target(tok), key=False)))
        assert resp.status == 400
    elif attack == "version-12":
        resp = one_response(exchange(g.port, upgrade_request(target(tok), version="12")))
        assert resp.status == 426
        assert resp.header("sec-websocket-version") == ["13"]
    else:
        resp = one_response(exchange(g.port, upgrade_request(target(tok), method="POST")))
        assert resp.status == 405
        assert resp.header("allow") == ["GET"]
    assert echo.contacted == 0
    g.check(main_route=True)


# ----------------------------------------------------------------------------- case 5


@pytest.mark.parametrize(("allowed", "origins", "status"), [
    (("https://game.example",), ["https://evil.example"], 403),
    (("https://game.example",), ["https://game.example.evil.example"], 403),
    (("https://game.example",), ["null"], 403),
    # Two Origin headers, the allowed one first: every value must be allowed.
    (("https://game.example",), ["https://game.example", "https://evil.example"], 403),
    (("https://game.example",), ["https://game.example"], 101),
    (("https://game.example",), [], 101),  # no Origin (native clients): not checked
    (None, ["https://evil.example"], 101),  # no list configured: any Origin (the default)
    (None, [], 101),
], ids=["evil", "suffix-trick", "null", "allowed-then-evil", "allowed", "absent",
        "no-list-evil", "no-list-absent"])
def test_case_05_origin_allow_list(harden: Callable[..., Guard], echo: CountingEcho,
                                   allowed: tuple[str, ...] | None, origins: list[str],
                                   status: int) -> None:
    g = harden(echo.url(), allowed_origins=allowed)
    tok = g.secret(token())
    if status == 101:
        assert len(origins) <= 1
        headers = {"Origin": origins[0]} if origins else {}
        with RawWS(g.port, target(tok), headers=headers) as ws:
            assert ws.status == 101
            ws.send_frame(0x1, b"hello")
            assert ws.recv_frame().payload == b"hello"
            ws.send_close(1000)
            assert ws.recv_frame().close == (1000, "")
        rec = echo.wait_record()
        assert rec.closed.wait(3)
        assert rec.header("Origin") == origins
    else:
        raw = exchange(g.port, upgrade_request(target(tok),
                                               headers=[("Origin", o) for o in origins]))
        assert one_response(raw).status == status
        assert echo.contacted == 0, "the upstream was contacted for a refused Origin"
    g.check(main_route=True)
