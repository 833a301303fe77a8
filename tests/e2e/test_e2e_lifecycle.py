"""Graceful shutdown with sessions open, and the real CLI in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from helpers import (
    HOST,
    SECRET,
    EchoServer,
    GatewayHandle,
    GatewayProcess,
    RawWS,
    bad_tokens,
    clean_env,
    connect_tls,
    free_port,
    gateway_args,
    gateway_cert_files,
    handshake_status,
    http_request,
    token,
    trusting,
    wait_until,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gaia_gateway.core import SPEEDUPS

pytestmark = pytest.mark.timeout(60)


def test_stop_closes_sessions_with_1001(gateway_factory: Callable[..., GatewayHandle],
                                        echo: EchoServer) -> None:
    grace = 4.0
    gw = gateway_factory(echo.url(), shutdown_grace=grace, close_timeout=1.0)
    with contextlib.ExitStack() as stack:
        clients = []
        for i in range(3):
            ws = stack.enter_context(connect(gw.url(token()), open_timeout=5))
            clients.append(ws)
            ws.send(f"m{i}")
            assert ws.recv(timeout=3) == f"m{i}"
        # One client that never answers the gateway's close frame: it holds the drain open
        # until close_timeout.
        mute = stack.enter_context(RawWS(gw.port, f"/ws/experience?token={token()}"))
        assert mute.status == 101
        gw.request_stop()
        for ws in clients:
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=3)
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "gateway shutting down")
        frame = mute.recv_frame(3)
        assert frame.close[0] == 1001
        # While the drain runs, new connections are refused with 503. (The gateway answers
        # as soon as it accepts, before the request arrives, so a client may see the
        # connection end before it could send its request: read the answer raw.)
        status, _, _ = http_request(gw.port, f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
        assert status == 503
        status, _, _ = http_request(gw.port, (
            f"GET /ws/experience?token={token()} HTTP/1.1\r\nHost: {HOST}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"))
        assert status == 503
        assert gw.done.wait(grace + 2), "serve() did not return"
        assert gw.error is None
        took = gw.returned_at - gw.stop_requested_at
        assert took < grace, f"serve() returned {took:.2f}s after stop"
        assert mute.drain_to_eof(2) is not None
    assert wait_until(lambda: all(r.closed.is_set() for r in echo.records), 3)
    assert len(echo.records) == 4
    assert [r.close_code for r in echo.records[:3]] == [1001, 1001, 1001]
    with pytest.raises(ConnectionRefusedError):
        http_request(gw.port, f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
    gw.assert_no_loop_errors()


def test_cli_subprocess(loop_kind: str, echo: EchoServer) -> None:
    port = free_port()
    log_format = "json" if loop_kind == "uvloop" else "text"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gaia_gateway", "--host", HOST, "--port", str(port),
         "--jwt-secret", SECRET, "--upstream", echo.url(), "--loop", loop_kind,
         "--log-level", "debug", "--log-format", log_format, "--shutdown-grace", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
    )
    good = token()
    bad = bad_tokens()["wrong secret"]
    try:
        def healthy() -> bool:
            try:
                return http_request(port, f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n",
                                    timeout=1)[0] == 200
            except OSError:
                assert proc.poll() is None, "the gateway exited early"
                return False

        assert wait_until(healthy, 15, 0.05), "the CLI gateway never became healthy"
        status, _, body = http_request(port, f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
        doc = json.loads(body)
        assert status == 200 and doc["status"] == "ok" and "version" in doc
        base = f"ws://{HOST}:{port}/ws/experience"
        with connect(f"{base}?token={good}&experience=cli", open_timeout=5) as ws:
            ws.send("through the CLI")
            assert ws.recv(timeout=3) == "through the CLI"
        with connect(base, open_timeout=5, subprotocols=[f"bearer.{good}", "game.v1"]) as ws:
            assert ws.subprotocol == "game.v1"
        for kwargs in ({}, {"additional_headers": {"Authorization": f"Bearer {bad}"}},
                       {"subprotocols": [f"bearer.{bad}"]}):
            url = f"{base}?token={bad}" if not kwargs else base
            assert handshake_status(url, **kwargs) == 403
        # a HUP, which reloads a TLS certificate, is harmless without one
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert http_request(port, f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n")[0] == 200
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=10)
        assert time.monotonic() - t0 < 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    log = stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, log
    assert "listening" in log and "stopped" in log, log
    assert "SIGHUP: nothing to reload (no --certfile)" in log, log
    # the start line says which frame walk runs: the C one where it was built
    if log_format == "json":
        start = next(json.loads(x) for x in log.splitlines() if '"msg":"listening"' in x)
        assert start["frame_walk"] == SPEEDUPS, start
    else:
        assert f" frame_walk={SPEEDUPS}\n" in log, log
    assert "reject" in log and "open" in log, log  # the handshakes were logged...
    assert good not in log and bad not in log  # ...without their tokens
    assert "eyJ" not in log, log
    assert SECRET not in log


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_the_tls_certificate(loop_kind: str, workers: int, echo: EchoServer,
                                            tmp_path: Path) -> None:
    """A renewed certificate without a restart: SIGHUP makes every worker read the files
    again. New connections get the new certificate, the session opened before keeps going,
    and a file that does not load leaves the current certificate with an error line."""
    old_ca, new_ca = trustme.CA(), trustme.CA()
    certfile, keyfile = gateway_cert_files(old_ca, tmp_path)
    port = free_port()
    cli = GatewayProcess(gateway_args(port, echo.url(), "--loop", loop_kind,
                                      "--workers", str(workers), "--certfile", certfile,
                                      "--keyfile", keyfile, "--log-level", "info"))
    url = f"wss://{HOST}:{port}/ws/experience?token={token()}"

    def echoes(ca: trustme.CA, text: str) -> bool:
        try:
            with connect_tls(url, trusting(ca), open_timeout=3) as ws:
                ws.send(text)
                return ws.recv(timeout=3) == text
        except ssl.SSLCertVerificationError:
            raise
        except OSError:
            assert cli.proc.poll() is None, cli.log
            return False

    try:
        assert wait_until(lambda: cli.count("listening") == workers, 15, 0.05), cli.log
        assert wait_until(lambda: echoes(old_ca, "before"), 5, 0.05)
        with connect_tls(url, trusting(old_ca), open_timeout=3) as before:
            gateway_cert_files(new_ca, tmp_path)  # the renewed certificate, same files
            cli.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: cli.count("TLS certificate reloaded") == workers, 5), \
                cli.log
            for i in range(3 * workers):  # whichever worker accepts it
                assert echoes(new_ca, f"after {i}")
                with pytest.raises(ssl.SSLCertVerificationError):
                    echoes(old_ca, "the old CA")
            before.send("opened before the reload")
            assert before.recv(timeout=3) == "opened before the reload"
            # a certificate file caught half written: the current certificate stays
            Path(certfile).write_text("-----BEGIN CERTIFICATE-----\nnot yet\n")
            cli.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: cli.count("TLS certificate reload failed") == workers,
                              5), cli.log
            assert echoes(new_ca, "still served")
            before.send("still open")
            assert before.recv(timeout=3) == "still open"
    finally:
        code = cli.stop()
    log = cli.log
    assert code == 0, log
    assert "eyJ" not in log


def _workers(echo: EchoServer, port: int) -> GatewayProcess:
    gw = GatewayProcess(gateway_args(port, echo.url(), "--workers", "2"))
    assert wait_until(lambda: gw.count("listening") == 2, 10), gw.log
    return gw


def test_a_dead_worker_is_replaced(echo: EchoServer) -> None:
    """A worker killed (a crash, the OOM killer) is replaced, with a log line, and the new
    one takes its share of the port; the gateway still stops cleanly."""
    port = free_port()
    gw = _workers(echo, port)
    try:
        first = gw.worker_pids()
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)
        assert wait_until(lambda: gw.count("listening") == 3, 10), gw.log
        now = gw.worker_pids()
        assert len(now) == 2 and first[0] not in now and first[1] in now, (first, now)
        new = next(pid for pid in now if pid != first[1])
        line = next(x for x in gw.log.splitlines() if "worker exited" in x)
        assert "error worker exited; starting another" in line, line
        assert f"pid={first[0]}" in line and 'exit="signal 9"' in line, line
        # SO_REUSEPORT spreads 20 sessions over both: the new worker holds some of them.
        fds = len(os.listdir(f"/proc/{new}/fd"))
        with contextlib.ExitStack() as stack:
            for i in range(20):
                ws = stack.enter_context(connect(
                    f"ws://{HOST}:{port}/ws/experience?token={token()}", open_timeout=5))
                ws.send(f"m{i}")
                assert ws.recv(timeout=3) == f"m{i}"
            assert len(os.listdir(f"/proc/{new}/fd")) >= fds + 2  # a client and its upstream
    finally:
        status = gw.stop()
    assert status == 0, gw.log


def test_workers_that_keep_dying_stop_the_gateway(echo: EchoServer) -> None:
    """Workers that die again and again are not replaced forever: after 5 replacements, the
    sixth death within a minute stops the gateway with status 1 and says why."""
    gw = _workers(echo, free_port())
    try:
        killed: set[int] = set()
        deadline = time.monotonic() + 30
        while gw.proc.poll() is None and time.monotonic() < deadline:
            for pid in gw.worker_pids():
                if pid not in killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            time.sleep(0.02)
        assert gw.proc.wait(10) == 1, gw.log
    finally:
        gw.close()
    assert gw.count("worker exited; starting another") == 5, gw.log
    assert gw.count("workers keep dying: stopping the gateway") == 1, gw.log


def test_workers_that_cannot_listen_are_not_replaced() -> None:
    """A worker that exits with status 2 (here: the port is taken) said why, and another
    would fail alike: the gateway stops with status 2, replacing none."""
    with socket.create_server((HOST, 0)) as taken:
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "gaia_gateway", "--host", HOST, "--port", str(port),
             "--jwt-secret", SECRET, "--workers", "2"],
            check=False, capture_output=True, text=True, env=clean_env(), timeout=30)
    assert run.returncode == 2, run.stderr
    assert f"gaia-gateway: error: cannot listen on {HOST}:{port}" in run.stderr, run.stderr
    assert "starting another" not in run.stderr, run.stderr


def test_a_stop_while_a_worker_starts_is_clean(echo: EchoServer) -> None:
    """SIGTERM reaching a worker before its event loop has its handlers (here: right after
    it replaced a dead one) waits for them and stops it cleanly; it does not kill it."""
    for _ in range(3):
        gw = _workers(echo, free_port())
        try:
            first = set(gw.worker_pids())
            os.kill(min(first), signal.SIGKILL)
            assert wait_until(lambda: len(set(gw.worker_pids()) - first) == 1,  # noqa: B023
                              10, interval=0.0005), gw.log
            gw.proc.send_signal(signal.SIGTERM)  # the new worker is still starting
            assert gw.proc.wait(10) == 0, gw.log
        finally:
            gw.close()
