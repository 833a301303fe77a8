"""Case 23: one client address takes as many connections as it can (``--max-connections-per-ip``).

Without a per-address limit one address can hold every one of ``--max-connections``: with good
tokens as sessions, or without any as sockets that stay silent until ``handshake_timeout``.
With it, the address gets 429 past its share, and every other address is served as before.
The clients here connect from other loopback addresses (127.0.0.2, 127.0.0.3) than the
Guard's normal client (127.0.0.1), over ws:// and wss://.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from _support import CountingEcho, Guard, Tls, read_until_closed, sockets_closed, tls_gateway
from helpers import (
    HOST,
    GatewayProcess,
    clean_env,
    connect_tls,
    free_port,
    gateway_args,
    metric,
    scrape,
    token,
    upgrade_request,
    wait_until,
)
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from gaia_gateway.config import load_settings

pytestmark = pytest.mark.timeout(60)

LIMIT = 3
ATTACKER = "127.0.0.2"


def gateway(harden: Callable[..., Guard], echo: CountingEcho, tls: Tls, scheme: str) -> Guard:
    settings = {"max_connections_per_ip": LIMIT, "metrics_port": 0}
    if scheme == "wss":
        return tls_gateway(harden, echo, tls, **settings)
    return harden(echo.url(), **settings)


def raw_from(g: Guard, source: str) -> socket.socket:
    """A TCP connection to the gateway from ``source`` (over TLS for a wss:// gateway)."""
    sock = socket.create_connection((HOST, g.port), timeout=5, source_address=(source, 0))
    if g.client_ssl is not None:
        return g.client_ssl.wrap_socket(sock, server_hostname=HOST)
    return sock


def session_from(g: Guard, source: str) -> ClientConnection:
    """A websocket session with a good token, from ``source``."""
    if g.client_ssl is not None:
        return connect_tls(g.url(), g.client_ssl, source=source, close_timeout=3)
    return connect(g.url(), sock=raw_from(g, source), open_timeout=5, close_timeout=3)


def held(g: Guard, address: str) -> int:
    assert g.gw.server is not None
    return g.gw.server.gateway.by_address.get(address, 0)


def refusals(g: Guard) -> list[str]:
    return [line for line in g.logs.messages("reject") if "status=429" in line]


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_case_23_an_address_past_its_share_gets_429(
        harden: Callable[..., Guard], echo: CountingEcho, tls: Tls, scheme: str) -> None:
    g = gateway(harden, echo, tls, scheme)
    burst: list[socket.socket] = []
    with contextlib.ExitStack() as held_sessions:
        sessions = [held_sessions.enter_context(session_from(g, ATTACKER)) for _ in range(LIMIT)]
        for i, ws in enumerate(sessions):
            ws.send(f"m{i}")
            assert ws.recv(timeout=5) == f"m{i}"
        with pytest.raises(InvalidStatus) as refused:
            session_from(g, ATTACKER)
        assert refused.value.response.status_code == 429
        assert b"too many connections from this address" in refused.value.response.body
        # 40 more at once, each a complete upgrade request with a good token: all 429, and
        # the gateway closes them
        with sockets_closed(burst):
            for _ in range(40):
                burst.append(raw_from(g, ATTACKER))
            for s in burst:
                s.sendall(upgrade_request(f"/ws/experience?token={g.secret(token())}"))
            answers, closed = read_until_closed(burst, time.monotonic() + 10)
        assert len(closed) == 40
        assert all(a.startswith(b"HTTP/1.1 429 Too Many Requests\r\n") for a in answers), \
            {a[:40] for a in answers}
        assert echo.contacted == LIMIT  # no refused one reached the upstream
        # everyone else is served meanwhile (the Guard's client comes from 127.0.0.1)
        g.echo("/ws/experience")
        # a session that ends gives its place back
        sessions[0].close()
        assert wait_until(lambda: held(g, ATTACKER) == LIMIT - 1, 3)
        with session_from(g, ATTACKER) as again:
            again.send("again")
            assert again.recv(timeout=5) == "again"
        assert echo.contacted == LIMIT + 2  # the Guard's session and the new one
    lines = refusals(g)
    assert len(lines) == 41, lines
    assert all(f"client={ATTACKER}" in line and "too many connections from this address"
               in line for line in lines), lines[:3]
    assert metric(scrape(g.gw.metrics_port), "gaia_gateway_requests_total", status="429") == 41
    g.check(main_route=True)
    assert g.gw.server is not None and g.gw.server.gateway.by_address == {}


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_case_23_silent_sockets_count_against_their_address(
        harden: Callable[..., Guard], echo: CountingEcho, tls: Tls, scheme: str) -> None:
    """Sockets that send nothing (over wss://: not even a ClientHello) hold their address's
    places until ``handshake_timeout``, as they hold ``max_connections``' places."""
    g = gateway(harden, echo, tls, scheme)
    silent = "127.0.0.3"
    socks = [socket.create_connection((HOST, g.port), timeout=5, source_address=(silent, 0))
             for _ in range(LIMIT)]
    with sockets_closed(socks):
        assert wait_until(lambda: held(g, silent) == LIMIT, 3)
        with pytest.raises(InvalidStatus) as refused:
            session_from(g, silent)
        assert refused.value.response.status_code == 429
        g.echo("/ws/experience")
    assert wait_until(lambda: held(g, silent) == 0, 3)
    with session_from(g, silent) as ws:
        ws.send("back")
        assert ws.recv(timeout=5) == "back"
    assert len(refusals(g)) == 1
    g.check(main_route=True)


def test_case_23_the_limit_from_the_environment_and_bad_values(echo: CountingEcho) -> None:
    """The CLI in a subprocess: ``GAIA_MAX_CONNECTIONS_PER_IP``; a value that is not a count
    stops start-up with one line and status 2; 0 or off means no limit."""
    port = free_port()
    gw = GatewayProcess(gateway_args(port, echo.url()), env={"GAIA_MAX_CONNECTIONS_PER_IP": "1"})
    url = f"ws://{HOST}:{port}/ws/experience?token={token()}"
    try:
        assert wait_until(lambda: gw.count("listening") == 1, 10), gw.log
        with connect(url, open_timeout=5) as ws:
            ws.send("x")
            assert ws.recv(timeout=3) == "x"
            with pytest.raises(InvalidStatus) as refused:
                connect(url, open_timeout=5)
            assert refused.value.response.status_code == 429
        with connect(url, open_timeout=5) as ws:  # its place is free again
            ws.send("y")
            assert ws.recv(timeout=3) == "y"
    finally:
        assert gw.stop() == 0
    assert "status=429" in gw.log and "eyJ" not in gw.log
    for value, error in (("-1", "invalid max_connections_per_ip '-1': must be positive"),
                         ("many", "invalid max_connections_per_ip 'many'")):
        bad = subprocess.run(
            [sys.executable, "-m", "gaia_gateway", *gateway_args(free_port(), echo.url())],
            check=False, capture_output=True, text=True, timeout=30,
            env={**clean_env(), "GAIA_MAX_CONNECTIONS_PER_IP": value})
        assert bad.returncode == 2, bad.stderr
        assert error in bad.stderr, bad.stderr
    for off in ("0", "off"):
        settings = load_settings(environ={"GAIA_MAX_CONNECTIONS_PER_IP": off}, overrides={})
        assert settings.max_connections_per_ip is None
