"""Tests for the demo KB-service backend (gaia_gateway.demo.backend) and the Node e2e client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gaia_gateway.demo.backend import MAX_MESSAGE_SIZE, DemoBackend, serve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nodeclient import NodeClient

SRC = Path(__file__).resolve().parents[1] / "src"


def run(test: Callable[[DemoBackend], Awaitable[None]], **backend_kwargs: Any) -> None:
    """Start a backend on 127.0.0.1:0, run ``test(backend)`` with a 5 s budget, shut down."""

    async def main() -> None:
        async with DemoBackend("127.0.0.1", 0, **backend_kwargs) as backend:
            await asyncio.wait_for(test(backend), 5)

    asyncio.run(main())


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), 2)
    assert isinstance(raw, str)
    obj = json.loads(raw)
    assert raw == json.dumps(obj, separators=(",", ":")), "replies must be compact JSON"
    assert isinstance(obj, dict)
    return obj


async def request(ws: ClientConnection, message: str | dict[str, Any]) -> dict[str, Any]:
    await ws.send(message if isinstance(message, str) else json.dumps(message))
    return await recv_json(ws)


@contextlib.asynccontextmanager
async def client(backend: DemoBackend, query: str = "",
                 **kwargs: Any) -> AsyncIterator[ClientConnection]:
    async with connect(backend.url + query, open_timeout=2, close_timeout=2, **kwargs) as ws:
        connected = await recv_json(ws)
        assert connected["type"] == "connected"
        yield ws


def assert_recent_ms(value: Any) -> None:
    assert isinstance(value, int) and not isinstance(value, bool)
    assert abs(value - time.time() * 1000) < 10_000


# --- websockets client ------------------------------------------------------------------------


def test_connected_message(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gaia_gateway.demo")

    async def test(backend: DemoBackend) -> None:
        url = backend.url + "?experience=sunken-city&token=s3cr3t-token"
        async with connect(url, additional_headers={"X-User-Id": "user-42"}) as ws:
            msg = await recv_json(ws)
        assert list(msg) == ["type", "connection_id", "user_id", "experience", "timestamp",
                             "message"]
        assert msg["type"] == "connected"
        assert uuid.UUID(msg["connection_id"]).version == 4
        assert msg["user_id"] == "user-42"
        assert msg["experience"] == "sunken-city"
        assert_recent_ms(msg["timestamp"])
        assert msg["message"] == "Connected to sunken-city experience"

    run(test)
    lines = [r.getMessage() for r in caplog.records if r.name == "gaia_gateway.demo"]
    assert any(line.startswith("open ") for line in lines)
    assert any(line.startswith("close ") for line in lines)
    assert not any("s3cr3t" in line or "token" in line for line in lines)


def test_connected_defaults_and_any_path() -> None:
    async def test(backend: DemoBackend) -> None:
        for path in ("/ws/experience", "/", "/some/other/path?x=1"):
            async with connect(f"ws://127.0.0.1:{backend.port}{path}") as ws:
                msg = await recv_json(ws)
                assert (msg["user_id"], msg["experience"]) == ("anonymous", "wylding-woods")
                assert msg["message"] == "Connected to wylding-woods experience"

    run(test)


def test_ping_pong() -> None:
    async def test(backend: DemoBackend) -> None:
        async with client(backend) as ws:
            assert await request(ws, {"type": "ping", "timestamp": 1234567}) == {
                "type": "pong", "timestamp": 1234567}
            pong = await request(ws, {"type": "ping"})
            assert pong["type"] == "pong"
            assert_recent_ms(pong["timestamp"])
            # websocket-level ping is answered too
            await asyncio.wait_for(await ws.ping(b"hi"), 2)

    run(test)


def test_action() -> None:
    async def test(backend: DemoBackend) -> None:
        async with client(backend, "?experience=ww",
                          additional_headers={"X-User-Id": "u1"}) as ws:
            msg = await request(ws, {"type": "action", "action": "collect_item",
                                     "instance_id": "bottle-7"})
            assert list(msg) == ["type", "action", "success", "message", "timestamp", "metadata"]
            assert msg["type"] == "action_response" and msg["action"] == "collect_item"
            assert msg["success"] is True and "bottle-7" in msg["message"]
            assert msg["metadata"] == {"experience": "ww", "user_id": "u1",
                                       "instance_id": "bottle-7"}
            assert_recent_ms(msg["timestamp"])

            msg = await request(ws, {"type": "action", "action": "collect_item"})
            assert msg["success"] is False and "instance_id" in msg["message"]

            msg = await request(ws, {"type": "action", "action": "wave"})
            assert (msg["action"], msg["success"]) == ("wave", True)

            msg = await request(ws, {"type": "action"})
            assert msg["type"] == "action_response"
            assert msg["action"] is None and msg["success"] is False and msg["message"]

    run(test)


def test_update_location() -> None:
    async def test(backend: DemoBackend) -> None:
        async with client(backend) as ws:
            msg = await request(ws, {"type": "update_location", "lat": 37.9, "lng": -122.5})
            assert msg["type"] == "area_of_interest"
            assert msg["location"] == {"lat": 37.9, "lng": -122.5}
            assert msg["experience"] == "wylding-woods"
            assert isinstance(msg["items"], list)
            for bad in ({"lat": "x", "lng": 1}, {"lat": 91, "lng": 0}, {"lat": True, "lng": 0}, {}):
                err = await request(ws, {"type": "update_location", **bad})
                assert (err["type"], err["code"]) == ("error", "invalid_location")

    run(test)


@pytest.mark.parametrize(("payload", "code"), [
    ("{not json", "invalid_json"),
    ("", "invalid_json"),
    ('{"type":"echo","x":NaN}', "invalid_json"),
    ('{"type":"echo","x":1e999}', "invalid_json"),
    ("[" * 100_000, "invalid_json"),
    ("[1,2]", "missing_type"),
    ('"ping"', "missing_type"),
    ('{"timestamp":1}', "missing_type"),
    ('{"type":7}', "missing_type"),
    ('{"type":"teleport"}', "unknown_message_type"),
])
def test_errors_keep_connection_open(payload: str, code: str) -> None:
    async def test(backend: DemoBackend) -> None:
        async with client(backend) as ws:
            err = await request(ws, payload)
            assert list(err) == ["type", "code", "message", "timestamp"]
            assert (err["type"], err["code"]) == ("error", code)
            assert err["message"]
            assert_recent_ms(err["timestamp"])
            assert await request(ws, {"type": "ping", "timestamp": 1}) == {
                "type": "pong", "timestamp": 1}

    run(test)


def test_echo_text_and_binary() -> None:
    async def test(backend: DemoBackend) -> None:
        async with client(backend) as ws:
            obj = {"type": "echo", "nested": {"a": [1, 2.5, None, True]}, "s": "héllo \ud800"}
            assert await request(ws, obj) == obj
            for data in (b"", b"\x00\x01\xff", os.urandom(70_000)):
                await ws.send(data)
                assert await asyncio.wait_for(ws.recv(), 2) == data

    run(test)


def test_close_code_is_echoed() -> None:
    async def test(backend: DemoBackend) -> None:
        async with client(backend) as ws:
            await ws.close(4001, "bye")
            assert ws.protocol.close_rcvd is not None
            assert (ws.protocol.close_rcvd.code, ws.protocol.close_rcvd.reason) == (4001, "bye")

    run(test)


@pytest.mark.parametrize("compression", [None, "deflate"])
def test_message_too_big_closes_1009(compression: str | None) -> None:
    async def test(backend: DemoBackend) -> None:
        async with client(backend, compression=compression, max_size=2 * MAX_MESSAGE_SIZE) as ws:
            limit = b"\x00" * MAX_MESSAGE_SIZE
            await ws.send(limit)
            assert await asyncio.wait_for(ws.recv(), 2) == limit
            await ws.send(limit + b"\x00")
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 2)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009

    run(test)


UPGRADE = (b"GET /ws/experience HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")


def test_frame_pipelined_with_the_upgrade_request_is_served() -> None:
    async def test(backend: DemoBackend) -> None:
        payload = b'{"type":"ping","timestamp":1}'
        frame = b"\x81" + bytes([0x80 | len(payload)]) + b"\x00" * 4 + payload  # zero mask
        reader, writer = await asyncio.open_connection("127.0.0.1", backend.port)
        writer.write(UPGRADE + frame)
        data = b""
        while b'{"type":"pong","timestamp":1}' not in data:
            chunk = await asyncio.wait_for(reader.read(4096), 2)
            assert chunk, data
            data += chunk
        writer.close()

    run(test)


@pytest.mark.parametrize(("frame", "code"), [
    (b"\x81\x82\x00\x00\x00\x00\xff\xfe", 1007),  # masked text frame, invalid UTF-8
    (b"\x81\x02hi", 1002),  # unmasked client frame
    (b"\x83\x80\x00\x00\x00\x00", 1002),  # reserved opcode
])
def test_protocol_errors_close_the_connection(frame: bytes, code: int) -> None:
    async def test(backend: DemoBackend) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", backend.port)
        writer.write(UPGRADE + frame)
        data = await asyncio.wait_for(reader.read(), 2)  # server closes the TCP connection
        writer.close()
        assert data.startswith(b"HTTP/1.1 101 ")
        close_frame = data[data.rindex(b"\x88"):]
        assert int.from_bytes(close_frame[2:4], "big") == code
        async with client(backend):  # still serving
            pass

    run(test)


def test_non_websocket_requests_get_http_errors() -> None:
    async def test(backend: DemoBackend) -> None:
        for raw, status in ((b"GET /ws/experience HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
                            (b"\x16\x03\x01garbage\r\n\r\n", b"400"),
                            (b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n", b"400"),
                            (b"\r\n\r\n", b"400"),
                            # head without an end, just past the limit (all of it gets read)
                            (b"GET / HTTP/1.1\r\nx-pad: ".ljust(64 * 1024 + 1, b"a"), b"400"),
                            (UPGRADE.replace(b"Version: 13", b"Version: 8"), b"426")):
            reader, writer = await asyncio.open_connection("127.0.0.1", backend.port)
            writer.write(raw)
            response = await asyncio.wait_for(reader.read(), 2)
            writer.close()
            assert response.startswith(b"HTTP/1.1 " + status), response
        async with client(backend):  # still serving
            pass

    run(test)


def test_backend_close_sends_going_away(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        backend = DemoBackend()
        await backend.start()
        async with connect(backend.url) as ws:
            await recv_json(ws)
            await asyncio.wait_for(backend.close(), 2)
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 2)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001

    asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_serve_function() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def main() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(serve("127.0.0.1", port, ready=ready))
        await asyncio.wait_for(ready.wait(), 2)
        async with connect(f"ws://127.0.0.1:{port}/ws/experience") as ws:
            assert (await recv_json(ws))["type"] == "connected"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_main_cli() -> None:
    pythonpath = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "gaia_gateway.demo.backend", "--host", "127.0.0.1", "--port", "0"]
    with subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": pythonpath},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            line = proc.stdout.readline()
            match = re.fullmatch(
                r"demo backend listening on (ws://127\.0\.0\.1:\d+/ws/experience)\n", line)
            assert match, line

            async def talk() -> None:
                async with connect(match.group(1)) as ws:
                    assert (await recv_json(ws))["type"] == "connected"

            asyncio.run(talk())
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        stderr = proc.stderr.read()
    assert "open connection_id=" in stderr and "Traceback" not in stderr


# --- Node.js ws client (tests/e2e/node) --------------------------------------------------------


@contextlib.contextmanager
def backend_in_thread(**kwargs: Any) -> Iterator[DemoBackend]:
    """A DemoBackend on its own event loop thread, for blocking (synchronous) clients."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    backend = DemoBackend("127.0.0.1", 0, **kwargs)
    try:
        asyncio.run_coroutine_threadsafe(backend.start(), loop).result(5)
        yield backend
    finally:
        asyncio.run_coroutine_threadsafe(backend.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_node_client_against_backend() -> None:
    with backend_in_thread() as backend, NodeClient(
            backend.url + "?experience=node-exp", protocols=["gaia.v1", "other"],
            headers={"X-User-Id": "node-user"}) as node:
        opened = node.next_event()
        assert opened == {"event": "open", "protocol": "gaia.v1",
                          "extensions": "permessage-deflate"}
        connected = node.next_json()
        assert connected["type"] == "connected"
        assert (connected["user_id"], connected["experience"]) == ("node-user", "node-exp")

        node.send_json({"type": "ping", "timestamp": 99})
        assert node.next_json() == {"type": "pong", "timestamp": 99}
        node.ping("are-you-there")
        assert node.next_event() == {"event": "pong", "data": "are-you-there"}
        node.send_binary(b"\x00\xffbin")
        assert node.next_message() == b"\x00\xffbin"
        node.send_text("{oops")
        assert node.next_json()["code"] == "invalid_json"

        node.close(4001, "bye")
        assert node.wait_closed() == (4001, "bye")
        with pytest.raises(EOFError):
            node.next_event(2)
    assert node.returncode == 0


def test_node_client_async_same_loop_without_deflate() -> None:
    async def test(backend: DemoBackend) -> None:
        with NodeClient(backend.url, permessage_deflate=False) as node:
            assert await node.wait_for_async("open") == {"event": "open", "protocol": "",
                                                          "extensions": ""}
            assert (await node.next_json_async())["user_id"] == "anonymous"
            node.send_json({"type": "echo", "n": 1})
            assert await node.next_json_async() == {"type": "echo", "n": 1}
            node.close(1000)
            assert await node.wait_closed_async() == (1000, "")

    run(test)


def test_node_client_reports_rejected_upgrade() -> None:
    async def forbid(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\n"
                     b"content-length: 9\r\nconnection: close\r\n\r\nforbidden")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(forbid, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            with NodeClient(f"ws://127.0.0.1:{port}/ws/experience",
                            headers={"Authorization": "Bearer nope"}) as node:
                event = await node.next_event_async()
                assert event["event"] == "unexpected-response"
                assert (event["status"], event["body"]) == (403, "forbidden")
                assert (await node.wait_closed_async())[0] == 1006

    asyncio.run(main())


def test_node_client_wss_with_ca(tmp_path: Path) -> None:
    import trustme  # a test dependency: a missing one must fail, not skip
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with backend_in_thread(ssl_context=server_ctx) as backend:
        url = backend.url
        with NodeClient(url, ca=ca_file) as node:
            assert node.next_event()["event"] == "open"
            assert node.next_json()["type"] == "connected"
            node.close(1000, "done")
            assert node.wait_closed() == (1000, "done")
