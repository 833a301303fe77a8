"""``--metrics-port``: Prometheus metrics over real sockets, read with prometheus_client's own
parser, on both loops; with ``--workers`` in a subprocess (one scrape sums every worker)."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    HOST,
    SECRET,
    EchoServer,
    GatewayHandle,
    GatewayProcess,
    Samples,
    bad_tokens,
    clean_env,
    free_port,
    gateway_args,
    handshake_status,
    http_request,
    metric,
    scrape,
    token,
    wait_until,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from gaia_gateway.metrics import MAX_SCRAPES

pytestmark = pytest.mark.timeout(60)

C = "gaia_gateway_"


def test_metrics_count_requests_sessions_messages_and_closes(
        gateway_factory: Callable[..., GatewayHandle], echo: EchoServer) -> None:
    gw = gateway_factory(echo.url(), metrics_port=0)
    port = gw.metrics_port
    s = scrape(port)
    assert metric(s, C + "connections") == 0 and metric(s, C + "sessions") == 0
    assert metric(s, C + "requests_total", status="101") == 0
    assert metric(s, "process_open_fds") > 0  # the process collector, on its own registry

    assert handshake_status(gw.url(bad_tokens()["wrong secret"])) == 403
    assert handshake_status(gw.url(None)) == 403
    assert http_request(gw.port, f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n")[0] == 200
    assert http_request(gw.port, f"GET /nope HTTP/1.1\r\nHost: {HOST}\r\n\r\n")[0] == 404

    user_token = token("metrics-user")
    with connect(gw.url(user_token), open_timeout=5, compression=None) as ws:
        for _ in range(3):
            ws.send("hello")
            assert ws.recv(timeout=3) == "hello"
        # An open session's relayed counts are read when the metrics are scraped.
        s = scrape(port)
        assert metric(s, C + "sessions") == 1 and metric(s, C + "connections") == 1
        assert metric(s, C + "requests_total", status="101") == 1
        assert metric(s, C + "handshake_seconds_count") == 1
        assert metric(s, C + "messages_total", direction="from_client") == 3
        assert metric(s, C + "messages_total", direction="to_client") == 3
        # Frames as on the wire: a masked "hello" is 2 + 4 + 5 bytes, an unmasked one 2 + 5.
        assert metric(s, C + "bytes_total", direction="from_client") == 3 * 11
        assert metric(s, C + "bytes_total", direction="to_client") == 3 * 7
        ws.close(4001, "bye")
    assert wait_until(lambda: metric(scrape(port), C + "session_seconds_count") == 1, 5)
    s = scrape(port)
    assert metric(s, C + "sessions") == 0 and metric(s, C + "connections") == 0
    # The session's counts moved to the totals once, not twice; its close frames added.
    assert metric(s, C + "messages_total", direction="from_client") == 3
    assert metric(s, C + "messages_total", direction="to_client") == 3
    assert metric(s, C + "bytes_total", direction="from_client") == 3 * 11 + 2 + 4 + 5
    assert metric(s, C + "bytes_total", direction="to_client") == 3 * 7 + 2 + 5
    assert metric(s, C + "sessions_ended_total", initiator="client") == 1
    assert metric(s, C + "closes_total", side="client", code="4001") == 1
    assert metric(s, C + "closes_total", side="upstream", code="4001") == 1  # echoed
    assert metric(s, C + "requests_total", status="101") == 1
    assert metric(s, C + "requests_total", status="403") == 2
    assert metric(s, C + "requests_total", status="200") == 1
    assert metric(s, C + "requests_total", status="404") == 1
    # What the labels may hold: statuses, codes, directions; never a user or a token.
    _, _, body = http_request(port, f"GET /metrics HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
    text = body.decode()
    assert "metrics-user" not in text and "eyJ" not in text and "127.0.0.1" not in text


def test_metrics_gateway_close_codes(gateway_factory: Callable[..., GatewayHandle],
                                     echo: EchoServer) -> None:
    """The gateway's own closes are counted apart: an upstream that drops without a close
    frame is 1006 from the upstream, and the gateway's 1011 to the client."""
    gw = gateway_factory(echo.url(), metrics_port=0)
    port = gw.metrics_port
    with connect(gw.url(token()), open_timeout=5) as ws:
        ws.send("cmd:drop")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=3)
        assert ws.close_code == 1011
    assert wait_until(lambda: metric(scrape(port), C + "sessions_ended_total",
                                     initiator="upstream") == 1, 5)
    s = scrape(port)
    assert metric(s, C + "closes_total", side="upstream", code="1006") == 1
    assert metric(s, C + "closes_total", side="gateway", code="1011") == 1


def test_metrics_port_answers_only_get_metrics(gateway_factory: Callable[..., GatewayHandle],
                                               echo: EchoServer,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gaia_gateway.metrics")
    gw = gateway_factory(echo.url(), metrics_port=0, handshake_timeout=0.5)
    port = gw.metrics_port
    status, headers, body = http_request(port, f"HEAD /metrics HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, _, body = http_request(port, f"GET /other HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
    assert status == 404 and b"/metrics" in body
    status, headers, _ = http_request(port, f"POST /metrics HTTP/1.1\r\nHost: {HOST}\r\n"
                                      "Content-Length: 0\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert http_request(port, "NOT HTTP\r\n\r\n")[0] == 400
    status, _, body = http_request(port, f"GET /metrics HTTP/1.1\r\nHost: {HOST}\r\n"
                                   + "X: y\r\n" * 2000 + "\r\n")
    assert status == 431 and body == b"431 request head over 8 KiB\n"
    t0 = time.monotonic()
    assert http_request(port, "GET /metrics HTTP/1.1\r\n")[0] == 408  # never finished
    assert 0.4 < time.monotonic() - t0 < 3
    assert http_request(gw.port, f"GET /metrics HTTP/1.1\r\nHost: {HOST}\r\n\r\n")[0] == 404
    s = scrape(port)  # still serving; none of the above is a gateway request
    assert metric(s, C + "requests_total", status="404") == 1
    # Each refusal on the metrics port has its log line, with the status.
    refused = [r for r in caplog.records if r.getMessage() == "metrics request refused"]
    assert [r.fields["status"] for r in refused] == [404, 405, 400, 431, 408]  # type: ignore[attr-defined]


def test_metrics_with_workers_sum_every_worker() -> None:
    """Two workers share the port and the metrics port: whichever answers a scrape sums
    both; a worker killed leaves the live gauges (and is replaced); the parent removes its
    directory."""
    pattern = os.path.join(tempfile.gettempdir(), "gaia-metrics-*")
    before = set(glob.glob(pattern))
    echo = EchoServer().start()
    port, mport = free_port(), free_port()
    gw = GatewayProcess(gateway_args(port, echo.url(), "--workers", "2", "--metrics-port",
                                     str(mport), "--metrics-interval", "0.2"))
    try:
        assert wait_until(lambda: gw.count("metrics") == 2 and gw.count("listening") == 2, 10)
        assert len(set(glob.glob(pattern)) - before) == 1
        with contextlib.ExitStack() as stack:
            url = f"ws://{HOST}:{port}/ws/experience?token=" + token()
            clients = [stack.enter_context(connect(url, open_timeout=5)) for _ in range(8)]
            for i, ws in enumerate(clients):
                ws.send(f"m{i}")
                assert ws.recv(timeout=3) == f"m{i}"
            _killed_worker_leaves_the_gauges(gw, mport, clients)
    finally:
        assert gw.stop() == 0  # the killed worker was replaced: the stop is clean
        echo.stop()
    assert not set(glob.glob(pattern)) - before


def _killed_worker_leaves_the_gauges(gw: GatewayProcess, mport: int,
                                     clients: list[ClientConnection]) -> None:
    def all_seen(s: Samples) -> bool:
        return (metric(s, C + "sessions") == 8 and metric(s, C + "connections") == 8
                and metric(s, C + "messages_total", direction="from_client") == 8
                and metric(s, C + "requests_total", status="101") == 8)

    assert wait_until(lambda: all_seen(scrape(mport)), 5)
    # Every scrape, whichever worker takes it, sees all eight.
    assert all(all_seen(scrape(mport)) for _ in range(10))
    # SIGKILL one worker: its sessions end with it, and its live gauges leave the sums.
    os.kill(gw.worker_pids()[0], signal.SIGKILL)
    alive = 0
    for ws in clients:
        with contextlib.suppress(ConnectionClosed):  # its worker is gone
            ws.send("still?")
            alive += ws.recv(timeout=2) == "still?"
    print(f"{alive} of 8 sessions on the worker that lives")
    assert wait_until(lambda: metric(scrape(mport), C + "connections") == alive
                      and metric(scrape(mport), C + "sessions") == alive, 5), alive
    # Counters keep what the dead worker counted: totals never go down.
    assert metric(scrape(mport), C + "requests_total", status="101") == 8


def test_metrics_from_the_config_file_and_bad_values(tmp_path: Path, echo: EchoServer) -> None:
    """The CLI in a subprocess: ``metrics_port`` from the TOML file; a bad port or one the
    gateway itself listens on stops start-up with one line and status 2."""
    port, mport = free_port(), free_port()
    conf = tmp_path / "gateway.toml"
    conf.write_text(f'metrics_port = {mport}\nmetrics_host = "{HOST}"\n')
    gw = GatewayProcess(gateway_args(port, echo.url(), "--config", str(conf)))
    try:
        assert wait_until(lambda: gw.count("listening") == 1, 10), gw.log
        with connect(f"ws://{HOST}:{port}/ws/experience?token={token()}", open_timeout=5) as ws:
            ws.send("x")
            assert ws.recv(timeout=3) == "x"
            assert metric(scrape(mport), C + "sessions") == 1
    finally:
        assert gw.stop() == 0
    assert f"url=http://{HOST}:{mport}/metrics" in gw.log, gw.log
    for value, error in ((70000, "invalid metrics_port '70000': must be 0-65535"),
                         (port, f"cannot listen for metrics on {HOST}:{port}")):
        conf.write_text(f"metrics_port = {value}\n")
        with socket.create_server((HOST, port)):  # taken, for the second case
            bad = subprocess.run(
                [sys.executable, "-m", "gaia_gateway", "--port", str(free_port()), "--host",
                 HOST, "--jwt-secret", SECRET, "--config", str(conf)],
                check=False, capture_output=True, text=True, env=clean_env(), timeout=30)
        assert bad.returncode == 2, bad.stderr
        assert error in bad.stderr, bad.stderr


def test_metrics_in_a_given_multiproc_dir_start_from_zero(tmp_path: Path,
                                                          echo: EchoServer) -> None:
    """With ``PROMETHEUS_MULTIPROC_DIR`` set, even one process keeps its values in that
    directory, and a scrape sums every file there: a restart must not count the previous
    run's sessions again. The directory itself is the user's and stays."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for run in range(2):
        port, mport = free_port(), free_port()
        gw = GatewayProcess(gateway_args(port, echo.url(), "--metrics-port", str(mport)),
                            env=env)
        try:
            assert wait_until(lambda: gw.count("listening") == 1, 10), gw.log  # noqa: B023
            assert metric(scrape(mport), C + "requests_total", status="101") == 0, run
            with connect(f"ws://{HOST}:{port}/ws/experience?token={token()}",
                         open_timeout=5) as ws:
                ws.send("x")
                assert ws.recv(timeout=3) == "x"
            assert metric(scrape(mport), C + "requests_total", status="101") == 1
        finally:
            assert gw.stop() == 0
        assert list(tmp_path.glob("*.db")), "the values were not in the directory"
    assert tmp_path.is_dir()


def test_metrics_port_bounds_its_connections(gateway_factory: Callable[..., GatewayHandle],
                                             echo: EchoServer) -> None:
    """Metrics connections share the process's file descriptors with the sessions: past
    MAX_SCRAPES open at once, a new one gets 503 at once, and the gateway serves on."""
    gw = gateway_factory(echo.url(), metrics_port=0)
    port = gw.metrics_port
    assert gw.server is not None and gw.server.metrics is not None
    scrapes = gw.server.metrics.scrapes
    held = [socket.create_connection((HOST, port), timeout=5) for _ in range(MAX_SCRAPES)]
    try:
        assert wait_until(lambda: len(scrapes) == MAX_SCRAPES, 3)
        status, _, body = http_request(port, f"GET /metrics HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
        assert status == 503, body
        assert body == f"503 over {MAX_SCRAPES} metrics connections at once\n".encode()
        with connect(gw.url(token()), open_timeout=5) as ws:
            ws.send("served")
            assert ws.recv(timeout=3) == "served"
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: not scrapes, 3)
    assert metric(scrape(port), C + "requests_total", status="101") == 1


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("'prometheus' not found on PATH: this test has a real Prometheus server "
                    "scrape the gateway (Debian: `apt-get install prometheus`)")
    return path


def test_a_real_prometheus_scrapes_the_workers(tmp_path: Path, echo: EchoServer) -> None:
    """Prometheus itself (Debian's server) scrapes a two-worker gateway, and its query API
    gives the gateway's figures: what an operator's dashboards would read."""
    binary = _prometheus_binary()
    port, mport, pport = free_port(), free_port(), free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text("global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\n"
                    "scrape_configs:\n  - job_name: gaia\n    static_configs:\n"
                    f"      - targets: ['{HOST}:{mport}']\n")
    gw = GatewayProcess(gateway_args(port, echo.url(), "--workers", "2", "--metrics-port",
                                     str(mport), "--metrics-interval", "0.2"))
    prom = subprocess.Popen(
        [binary, f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address={HOST}:{pport}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def query(expr: str) -> list[float]:
        url = f"http://{HOST}:{pport}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                doc = json.load(resp)
        except OSError:
            return []  # not up yet
        return [float(r["value"][1]) for r in doc["data"]["result"]]

    try:
        assert wait_until(lambda: gw.count("listening") == 2, 10), gw.log
        with contextlib.ExitStack() as stack:
            url = f"ws://{HOST}:{port}/ws/experience?token={token()}"
            for i in range(5):
                ws = stack.enter_context(connect(url, open_timeout=5))
                for n in range(2):
                    ws.send(f"{i}.{n}")
                    assert ws.recv(timeout=3) == f"{i}.{n}"
            want = {'up{job="gaia"}': [1.0],
                    "sum(gaia_gateway_sessions)": [5.0],
                    'sum(gaia_gateway_messages_total{direction="from_client"})': [10.0],
                    'sum(gaia_gateway_requests_total{status="101"})': [5.0],
                    "sum(gaia_gateway_handshake_seconds_count)": [5.0]}
            seen: dict[str, list[float]] = {}

            def scraped() -> bool:
                seen.update({expr: query(expr) for expr in want})
                return seen == want

            assert wait_until(scraped, 30, interval=0.25), seen
    finally:
        prom.terminate()
        _, err = prom.communicate(timeout=10)
        assert gw.stop() == 0
    assert prom.returncode == 0, err[-2000:]
