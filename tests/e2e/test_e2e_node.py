"""The npm ``ws`` client (Node.js) against the gateway: a second, independent implementation."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest
from helpers import EchoServer, GatewayHandle, bad_tokens, token

if shutil.which("node") is None or shutil.which("npm") is None:
    pytest.skip("Node.js and npm are needed for the Node client tests", allow_module_level=True)

from nodeclient import NodeClient, open_echo_close

pytestmark = pytest.mark.timeout(60)


def test_node_open_echo_close(gateway: GatewayHandle, echo: EchoServer) -> None:
    with NodeClient(gateway.url(token()), protocols=["game.v1"]) as ws:
        open_echo_close(ws, "hello from node")
    rec = echo.wait_record()
    assert rec.closed.wait(3)
    assert (rec.close_code, rec.close_reason) == (4001, "bye")


def test_node_upstream_close_codes(gateway: GatewayHandle) -> None:
    with NodeClient(gateway.url(token())) as ws:
        ws.wait_for("open", 10)
        ws.send_text("cmd:close 4002 srv")
        assert ws.wait_closed() == (4002, "srv")
    with NodeClient(gateway.url(token())) as ws:
        ws.wait_for("open", 10)
        ws.send_text("cmd:drop")
        code, _ = ws.wait_closed()
        assert code == 1011


def test_node_bad_token_403(gateway: GatewayHandle, echo: EchoServer) -> None:
    with NodeClient(gateway.url(bad_tokens()["expired"])) as ws:
        event = ws.next_event(10)
        assert event["event"] == "unexpected-response", event
        assert event["status"] == 403
    assert echo.requests == 0


@pytest.fixture
def deflate_echo() -> Iterator[EchoServer]:
    server = EchoServer(compression="deflate").start()
    yield server
    server.stop()


def test_node_permessage_deflate_passes_through(
    gateway_factory: Callable[..., GatewayHandle], deflate_echo: EchoServer
) -> None:
    gw = gateway_factory(deflate_echo.url())
    with NodeClient(gw.url(token())) as ws:
        opened = ws.wait_for("open", 10)
        assert "permessage-deflate" in opened["extensions"]
        text = "compressible " * 5000
        ws.send_text(text)
        assert ws.next_message() == text
        ws.close(1000, "")
        assert ws.wait_closed()[0] == 1000
    assert deflate_echo.records[0].messages == [[text]]
