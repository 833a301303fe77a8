"""Handshake outcomes over real sockets: 403, 426, 404, /health, 502, 504."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from helpers import (
    HOST,
    EchoServer,
    GatewayHandle,
    RawWS,
    SilentListener,
    bad_tokens,
    free_port,
    handshake_status,
    http_request,
    token,
)
from websockets.sync.client import connect

from gaia_gateway import __version__

pytestmark = pytest.mark.timeout(30)


def test_bad_token_403_and_no_upstream_attempt(gateway_factory: Callable[..., GatewayHandle],
                                               silent: SilentListener) -> None:
    gw = gateway_factory(silent.url())
    for reason, bad in bad_tokens().items():
        assert handshake_status(gw.url(bad)) == 403, reason
    assert handshake_status(gw.url(None)) == 403, "missing token"
    assert handshake_status(gw.url(None), additional_headers={"Authorization": "Bearer nope"}) == 403
    assert handshake_status(gw.url(None), subprotocols=["bearer.nope"]) == 403
    time.sleep(0.1)  # an attempt, had there been one, would have been accepted by now
    assert silent.accepted == 0


def test_bad_token_403_echo_upstream_untouched(gateway: GatewayHandle, echo: EchoServer) -> None:
    assert handshake_status(gateway.url(bad_tokens()["wrong secret"])) == 403
    with connect(gateway.url(token()), open_timeout=5) as ws:  # the good one gets through
        ws.send("ok")
        assert ws.recv(timeout=3) == "ok"
    assert echo.requests == 1 and len(echo.records) == 1


def test_plain_get_426(gateway: GatewayHandle, echo: EchoServer) -> None:
    status, headers, _ = http_request(
        gateway.port, f"GET /ws/experience?token={token()} HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
    assert status == 426
    assert headers.get("upgrade", "").lower() == "websocket"
    assert echo.requests == 0


def test_unknown_path_404(gateway: GatewayHandle, echo: EchoServer) -> None:
    with RawWS(gateway.port, f"/nope?token={token()}") as ws:
        assert ws.status == 404
        ws.read_rest()
    status, _, _ = http_request(gateway.port, f"GET /other HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
    assert status == 404
    assert echo.requests == 0


def test_health(gateway: GatewayHandle) -> None:
    status, headers, body = http_request(gateway.port, f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["status"] == "ok"
    assert doc["version"] == __version__
    assert doc["connections"] == 1  # this very request
    with connect(gateway.url(token()), open_timeout=5) as ws:
        ws.send("x")
        ws.recv(timeout=3)
        _, _, body = http_request(gateway.port, f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
        assert json.loads(body)["connections"] == 2


def test_upstream_down_502(gateway_factory: Callable[..., GatewayHandle]) -> None:
    gw = gateway_factory(f"ws://{HOST}:{free_port()}/ws/experience")  # nobody listens there
    t0 = time.monotonic()
    assert handshake_status(gw.url(token())) == 502
    assert time.monotonic() - t0 < 2


def test_upstream_silent_504(gateway_factory: Callable[..., GatewayHandle],
                             silent: SilentListener) -> None:
    gw = gateway_factory(silent.url(), connect_timeout=0.5)
    t0 = time.monotonic()
    assert handshake_status(gw.url(token())) == 504
    elapsed = time.monotonic() - t0
    assert 0.4 < elapsed < 1.5, elapsed
    assert silent.accepted == 1


def _echo_once(gw: GatewayHandle) -> None:
    with connect(gw.url(token()), open_timeout=5) as ws:
        ws.send("hello")
        assert ws.recv(timeout=3) == "hello"


def test_upstream_name_is_resolved_once_per_ttl(gateway_factory: Callable[..., GatewayHandle],
                                                echo: EchoServer) -> None:
    # localhost may resolve to ::1 first, where nobody listens: the next address is tried
    gw = gateway_factory(f"ws://localhost:{echo.port}/ws/experience", upstream_dns_ttl=60)
    _echo_once(gw)
    assert gw.server is not None
    entry = gw.server._dns[("localhost", echo.port)]
    assert isinstance(entry, tuple)
    assert any(addr[1][0] == HOST for addr in entry[1]), entry
    _echo_once(gw)
    _echo_once(gw)
    assert gw.server._dns[("localhost", echo.port)] is entry  # not looked up again


def test_upstream_dns_ttl_zero_resolves_every_connection(
        gateway_factory: Callable[..., GatewayHandle], echo: EchoServer) -> None:
    gw = gateway_factory(f"ws://localhost:{echo.port}/ws/experience", upstream_dns_ttl=0)
    _echo_once(gw)
    _echo_once(gw)
    assert gw.server is not None and gw.server._dns == {}


def test_a_refusing_upstream_name_is_looked_up_again(
        gateway_factory: Callable[..., GatewayHandle]) -> None:
    port = free_port()  # nobody listens there, on any of localhost's addresses
    gw = gateway_factory(f"ws://localhost:{port}/ws/experience", upstream_dns_ttl=60)
    assert handshake_status(gw.url(token())) == 502
    assert gw.server is not None and ("localhost", port) not in gw.server._dns
