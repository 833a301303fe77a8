"""Shared pieces of the end-to-end tests: threads running event loops, real peers, raw clients.

Everything here talks over real sockets on 127.0.0.1. The gateway under test runs through
``gaia_gateway.app.serve`` on its own event loop (uvloop or asyncio) in a background thread;
each upstream runs on its own asyncio loop in another thread; the test body drives clients
from the main thread (``websockets.sync``, the raw :class:`RawWS`, or the Node ``ws`` client).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
import trustme
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as sync_connect

from gaia_gateway.__main__ import make_token
from gaia_gateway.app import serve
from gaia_gateway.config import load_settings
from gaia_gateway.transports import GatewayServer, new_event_loop

SECRET = "e2e-secret-0123456789abcdef0123456789abcdef"  # >= 32 bytes: no PyJWT key warning
USER = "user-42"
HOST = "127.0.0.1"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def token(sub: str = USER, **kwargs: Any) -> str:
    return make_token(SECRET, sub, **kwargs)


def bad_tokens() -> dict[str, str]:
    """Tokens the gateway must refuse with 403, by reason."""
    now = int(time.time())
    return {
        "wrong secret": make_token("not-the-secret-0123456789abcdef0123456789", USER),
        "expired": make_token(SECRET, USER, ttl=-60),
        "wrong audience": make_token(SECRET, USER, audience="anon"),
        "no sub": jwt.encode({"aud": "authenticated", "exp": now + 600}, SECRET, "HS256"),
        "no exp": jwt.encode({"aud": "authenticated", "sub": USER}, SECRET, "HS256"),
        "garbage": "not.a.jwt",
    }


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def open_fds() -> dict[int, str]:
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- loops


class LoopThread:
    """An event loop of the given kind running forever in a daemon thread."""

    def __init__(self, kind: str = "asyncio", name: str = "loop") -> None:
        self.kind = kind
        self.errors: list[dict[str, Any]] = []
        self._started = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._started.wait(5)
        assert self.loop is not None

    def _main(self) -> None:
        loop = new_event_loop(self.kind)
        asyncio.set_event_loop(loop)
        self.loop = loop
        self._started.set()
        loop.run_forever()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        loop = self.loop
        if loop is None:
            return

        async def cleanup() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await loop.shutdown_asyncgens()
            await loop.shutdown_default_executor()

        try:
            self.run(cleanup(), 10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)
            loop.close()
            self.loop = None


# --------------------------------------------------------------------------- gateway


class GatewayHandle:
    """``gaia_gateway.app.serve`` on its own event loop in a background thread."""

    def __init__(self, kind: str, **overrides: Any) -> None:
        values = {
            "host": HOST, "port": 0, "jwt_secret": SECRET, "shutdown_grace": 5.0,
            "close_timeout": 1.0, "connect_timeout": 3.0, "handshake_timeout": 5.0,
        }
        values.update(overrides)
        self.kind = kind
        self.settings = load_settings(environ={}, overrides=values)
        self.tls = bool(self.settings.certfile)
        self.server: GatewayServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.serve_task: asyncio.Task[Any] | None = None
        self.error: BaseException | None = None
        self.loop_errors: list[dict[str, Any]] = []  # the loop's exception handler calls
        self.leftover_tasks: list[str] = []  # tasks still pending once serve() returned
        self.stop_requested_at: float | None = None
        self.returned_at: float | None = None
        self._port = 0
        self._ready = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"gateway-{kind}", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> GatewayHandle:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("gateway did not start")
        if self.error is not None:
            raise self.error
        return self

    def _main(self) -> None:
        loop = new_event_loop(self.kind)
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        self.loop = loop

        async def main() -> None:
            self.stop_event = asyncio.Event()
            self.serve_task = asyncio.current_task()
            await serve(self.settings, ready=self._on_ready, stop=self.stop_event)

        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self.error = exc
        finally:
            self.returned_at = time.monotonic()
            self.leftover_tasks = [repr(t) for t in asyncio.all_tasks(loop) if not t.done()]
            try:
                for task in asyncio.all_tasks(loop):
                    task.cancel()
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
                asyncio.set_event_loop(None)
                self._ready.set()
                self.done.set()

    def _on_ready(self, server: GatewayServer) -> None:
        self.server = server
        self._port = server.port
        self._ready.set()

    def request_stop(self) -> None:
        """What SIGTERM does: set ``stop`` (from another thread)."""
        if self.done.is_set() or self.stop_requested_at is not None:
            return
        assert self.loop is not None and self.stop_event is not None
        self.stop_requested_at = time.monotonic()
        self.loop.call_soon_threadsafe(self.stop_event.set)

    def stop(self, timeout: float = 15.0) -> None:
        self.request_stop()
        if not self.done.wait(timeout):
            raise AssertionError("serve() did not return after stop was set")
        self._thread.join(timeout)

    # -- introspection -----------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def metrics_port(self) -> int:
        """The ``/metrics`` listener's port (the gateway was given ``metrics_port``)."""
        metrics = self.server.metrics if self.server is not None else None
        assert metrics is not None and metrics.port is not None, "no metrics listener"
        return metrics.port

    def url(self, token: str | None = None, experience: str | None = "e2e", *,
            path: str = "/ws/experience", query: str | None = None) -> str:
        scheme = "wss" if self.tls else "ws"
        if query is None:
            params = {}
            if token is not None:
                params["token"] = token
            if experience is not None:
                params["experience"] = experience
            query = urlencode(params)
        return f"{scheme}://{HOST}:{self.port}{path}" + (f"?{query}" if query else "")

    def call(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``fn()`` on the gateway's loop and return its result."""
        assert self.loop is not None

        async def call() -> Any:
            return fn()

        coro = call()
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is closed: serve() has returned
            coro.close()
            raise AssertionError("the gateway loop is closed") from None
        return future.result(timeout)

    def pending_tasks(self) -> list[str]:
        def tasks() -> list[str]:
            current = asyncio.current_task()
            return [repr(t) for t in asyncio.all_tasks()
                    if t is not current and t is not self.serve_task and not t.done()]

        return self.call(tasks)

    def write_buffers(self) -> list[tuple[int, int]]:
        """(client transport, upstream transport) write-buffer sizes of every client."""
        def sizes() -> list[tuple[int, int]]:
            assert self.server is not None
            out = []
            for client in self.server.clients:
                ct = client.transport
                up = client.upstream.transport if client.upstream is not None else None
                out.append((ct.get_write_buffer_size() if ct is not None else 0,
                            up.get_write_buffer_size() if up is not None else 0))
            return out

        return self.call(sizes)

    def idle(self) -> bool:
        assert self.server is not None
        return self.server.gateway.open_connections == 0 and not self.server.clients

    def assert_clean(self, timeout: float = 2.0) -> None:
        """No open connection, no client protocol, no task but serve(); polled up to timeout."""
        assert self.server is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.done.is_set():
                return  # serve() returned: assert_no_loop_errors covers what it left
            try:
                tasks = self.pending_tasks()
            except AssertionError:
                continue
            if self.idle() and not tasks:
                break
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"gateway not clean: open_connections={self.server.gateway.open_connections} "
                    f"clients={len(self.server.clients)} tasks={tasks}")
            time.sleep(0.02)

    def assert_no_loop_errors(self) -> None:
        assert not self.loop_errors, f"gateway loop reported errors: {self.loop_errors}"
        assert not self.leftover_tasks, f"tasks left after serve(): {self.leftover_tasks}"


# ------------------------------------------------------------------------- upstreams


@dataclass
class UpRecord:
    """What an upstream saw of one websocket connection."""

    path: str
    headers: list[tuple[str, str]]
    subprotocol: str | None
    messages: list[list[str | bytes]] = field(default_factory=list)  # fragments per message
    flood_sent: int = 0
    close_code: int | None = None
    close_reason: str | None = None
    closed_at: float | None = None
    closed: threading.Event = field(default_factory=threading.Event)

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def _aiter(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


class EchoServer:
    """A ``websockets`` upstream: echoes text and binary, keeping fragmentation.

    A single-fragment text message ``cmd:...`` is a command instead:
    ``cmd:close CODE REASON`` closes with that code; ``cmd:flood TOTAL CHUNK`` sends TOTAL
    bytes of binary messages of CHUNK bytes as fast as it is allowed to; ``cmd:drop`` drops
    the TCP connection without a close frame; ``cmd:flood-drop TOTAL CHUNK`` floods, then
    drops the connection once all of it was handed to the kernel.
    It selects the subprotocol ``game.v1`` when offered and none otherwise.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None,
                 compression: str | None = None) -> None:
        self.ssl_context = ssl_context
        self.compression = compression
        self.records: list[UpRecord] = []
        self.requests = 0  # HTTP requests seen (before any handshake check)
        self.port = 0
        self._server: Server | None = None
        self._thread: LoopThread | None = None

    def start(self) -> EchoServer:
        self._thread = LoopThread("asyncio", "echo-upstream")
        self.port = self._thread.run(self._start())
        return self

    async def _start(self) -> int:
        def select(_conn: ServerConnection, offered: Any) -> str | None:
            return "game.v1" if "game.v1" in offered else None

        def on_request(conn: ServerConnection, request: Any) -> Any:
            self.requests += 1
            query = parse_qs(urlsplit(request.path).query)
            if "reject" in query:  # ?reject=STATUS: refuse the handshake with that status
                return conn.respond(HTTPStatus(int(query["reject"][0])), "refused by upstream\n")
            return None

        self._server = await ws_serve(
            self._handler, HOST, 0, ssl=self.ssl_context, compression=self.compression,
            max_size=None, select_subprotocol=select, process_request=on_request,
            ping_interval=None, close_timeout=2,
        )
        return int(next(iter(self._server.sockets)).getsockname()[1])

    def url(self, path: str = "/ws/experience") -> str:
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://{HOST}:{self.port}{path}"

    def stop(self) -> None:
        if self._thread is None:
            return

        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), 5)

        try:
            self._thread.run(stop())
        finally:
            self._thread.close()
            self._thread = None

    def wait_record(self, index: int = -1, timeout: float = 3.0) -> UpRecord:
        assert wait_until(lambda: len(self.records) > (max(index, 0)), timeout), \
            "the upstream saw no connection"
        return self.records[index]

    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        rec = UpRecord(ws.request.path, list(ws.request.headers.raw_items()), ws.subprotocol)
        self.records.append(rec)
        try:
            while True:
                fragments = [f async for f in ws.recv_streaming()]
                rec.messages.append(fragments)
                if len(fragments) == 1 and isinstance(fragments[0], str) \
                        and fragments[0].startswith("cmd:"):
                    if not await self._command(ws, rec, fragments[0][4:].split(" ", 2)):
                        break
                elif len(fragments) > 1:
                    await ws.send(_aiter(fragments))
                else:
                    await ws.send(fragments[0] if fragments else b"")
        except ConnectionClosed:
            pass
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.wait_closed(), 5)
            rec.close_code, rec.close_reason = ws.close_code, ws.close_reason
            rec.closed_at = time.monotonic()
            rec.closed.set()

    async def _command(self, ws: ServerConnection, rec: UpRecord, cmd: list[str]) -> bool:
        if cmd[0] == "close":
            await ws.close(int(cmd[1]), cmd[2] if len(cmd) > 2 else "")
            return False
        if cmd[0] in ("flood", "flood-drop"):
            total, size = int(cmd[1]), int(cmd[2])
            chunk = os.urandom(size)
            while rec.flood_sent < total:
                await ws.send(chunk)
                rec.flood_sent += size
                await asyncio.sleep(0)  # send() does not yield while the socket takes it all
            if cmd[0] == "flood-drop":  # once all is in the kernel: vanish, no close frame
                while ws.transport.get_write_buffer_size():
                    await asyncio.sleep(0.005)
                ws.transport.abort()
                return False
            return True
        if cmd[0] == "drop":
            ws.transport.abort()
            return False
        raise ValueError(f"unknown command {cmd}")


class SilentListener:
    """A raw TCP listener that accepts, counts and never says a word."""

    def __init__(self) -> None:
        self.accepted = 0
        self.ended = 0  # connections the peer (the gateway) closed
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._thread: LoopThread | None = None
        self._server: asyncio.Server | None = None

    def start(self) -> SilentListener:
        self._thread = LoopThread("asyncio", "silent-upstream")

        async def start() -> int:
            self._server = await asyncio.start_server(self._on_client, HOST, 0)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = self._thread.run(start())
        return self

    def url(self, path: str = "/ws/experience") -> str:
        return f"ws://{HOST}:{self.port}{path}"

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass  # (a cancelled handler task makes asyncio.start_server log an error)
        finally:
            self.ended += 1
            writer.close()

    def stop(self) -> None:
        if self._thread is None:
            return

        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for writer in self._writers:
                writer.close()
            await asyncio.sleep(0)

        try:
            self._thread.run(stop())
        finally:
            self._thread.close()
            self._thread = None


class StallingUpstream:
    """A raw websocket upstream that accepts the handshake and reads nothing until
    :meth:`release`; then it reads, parses the frames (keeping only opcodes, lengths and close
    payloads), answers a close frame with the same close, and ends the connection."""

    def __init__(self, *, greeting: bytes = b"", stalled: bool = True) -> None:
        self.greeting = greeting  # bytes sent in the same write as the 101
        self.frames: list[Frame] = []  # data frames keep only their length
        self.done = threading.Event()
        self._thread = LoopThread("asyncio", "stalling-upstream")
        self._server: asyncio.Server | None = None
        self._released: asyncio.Event | None = None

        async def start() -> int:
            self._released = asyncio.Event()
            if not stalled:
                self._released.set()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            sock.bind((HOST, 0))
            self._server = await asyncio.start_server(self._on_client, sock=sock)
            return int(sock.getsockname()[1])

        self.port = self._thread.run(start())

    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws/experience"

    def release(self) -> None:
        assert self._thread.loop is not None and self._released is not None
        self._thread.loop.call_soon_threadsafe(self._released.set)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID.encode()).digest())
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                         + self.greeting)
            assert self._released is not None
            await self._released.wait()
            while True:
                b0, b1 = await reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", await reader.readexactly(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", await reader.readexactly(8))[0]
                key = await reader.readexactly(4) if b1 & 0x80 else b""
                payload = await reader.readexactly(n)
                if b0 & 0x0F != 0x8:
                    self.frames.append(Frame(bool(b0 & 0x80), b0 & 0x0F, b"", length=n))
                    continue
                payload = bytes(x ^ key[i % 4] for i, x in enumerate(payload)) if key else payload
                self.frames.append(Frame(True, 0x8, payload))
                writer.write(encode_frame(0x8, payload, mask=False))
                await writer.drain()
                break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # (a cancelled handler task makes asyncio.start_server log an error)
        finally:
            writer.close()
            self.done.set()

    def stop(self) -> None:
        async def stop() -> None:
            assert self._server is not None and self._released is not None
            self._released.set()
            self._server.close()

        try:
            self._thread.run(stop())
        finally:
            self._thread.close()


class DemoBackendThread:
    """The demo KB backend (gaia_gateway.demo.backend) on its own loop in a thread."""

    def __init__(self) -> None:
        from gaia_gateway.demo.backend import DemoBackend

        self._thread = LoopThread("asyncio", "demo-backend")
        self.backend = DemoBackend(HOST, 0)
        self.port = self._thread.run(self.backend.start())

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws/experience"

    def stop(self) -> None:
        try:
            self._thread.run(self.backend.close())
        finally:
            self._thread.close()


# --------------------------------------------------------------------------- clients


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes
    rsv: int = 0
    length: int = -1  # set where the payload itself is not kept

    @property
    def close(self) -> tuple[int | None, str]:
        assert self.opcode == 0x8
        if len(self.payload) < 2:
            return None, ""
        return struct.unpack("!H", self.payload[:2])[0], self.payload[2:].decode()


def encode_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True,
                 rsv: int = 0) -> bytes:
    head = bytearray([(0x80 if fin else 0) | rsv | opcode])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 65536:
        head.append(mbit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mbit | 127)
        head += struct.pack("!Q", n)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    head += key
    if n:
        repeated = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")
    return bytes(head) + payload


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


def upgrade_request(target: str, *, method: str = "GET", key: bool = True, version: str = "13",
                    headers: Sequence[tuple[str, str]] = (), host: str = HOST) -> bytes:
    """A client's upgrade request for ``target``, with a fresh key (or none)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade"]
    if key:
        lines.append("Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode())
    if version:
        lines.append(f"Sec-WebSocket-Version: {version}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def gateway_cert_files(ca: trustme.CA, directory: Path) -> tuple[str, str]:
    """A certificate from ``ca`` for the gateway's address, written to ``directory`` as
    ``gw.pem`` and ``gw.key``: its ``certfile`` and ``keyfile`` settings."""
    cert = ca.issue_cert(HOST, "localhost")
    certfile, keyfile = directory / "gw.pem", directory / "gw.key"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    return str(certfile), str(keyfile)


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts ``ca`` (and only it)."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def connect_tls(url: str, ctx: ssl.SSLContext, *, source: str | None = None,
                open_timeout: float = 5, **kwargs: Any) -> ClientConnection:
    """websockets' sync client for a ``wss://`` URL, with the TLS handshake done here, and the
    server's TLS 1.3 session tickets read before websockets takes the socket.

    The sync client reads in a thread of its own while it writes from the caller's, and an
    SSL socket is not safe for that (python/cpython#137583): a ticket read while the upgrade
    request is written can lose the request, and the gateway then answers 408 to nothing.
    That happened about once in 200 handshakes with two test runs at once
    (docs/HARDENING.md, Findings). With the tickets read first, nothing arrives until the
    answer to the request.
    """
    parts = urlsplit(url)
    assert parts.scheme == "wss" and parts.hostname and parts.port, url
    sock = socket.create_connection((parts.hostname, parts.port), timeout=open_timeout,
                                    source_address=(source, 0) if source else None)
    tls: ssl.SSLSocket | None = None
    try:
        tls = ctx.wrap_socket(sock, server_hostname=parts.hostname)
        deadline = time.monotonic() + open_timeout
        tls.settimeout(0.01)
        while tls.version() == "TLSv1.3" and not (tls.session and tls.session.has_ticket):
            if time.monotonic() > deadline:
                raise TimeoutError("no TLS session ticket from the server")
            with contextlib.suppress(TimeoutError, ssl.SSLWantReadError):
                if tls.recv(1):
                    raise AssertionError("the server sent data before the upgrade request")
        tls.settimeout(open_timeout)
    except BaseException:
        (tls or sock).close()  # the SSL socket owns the descriptor once it exists
        raise
    return sync_connect(parts._replace(scheme="ws").geturl(), sock=tls,
                        open_timeout=open_timeout, **kwargs)


class RawWS:
    """A blocking, hand-written websocket client on a plain socket: exact control of frames."""

    def __init__(self, port: int, target: str, *, headers: Mapping[str, str] | None = None,
                 rcvbuf: int | None = None, timeout: float = 5.0, upgrade: bool = True,
                 early: bytes = b"", read_response: bool = True,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        try:
            sock.connect((HOST, port))
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=HOST)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {target} HTTP/1.1", f"Host: {HOST}:{port}"]
        if upgrade:
            lines += ["Upgrade: websocket", "Connection: Upgrade",
                      f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + early)
        self._key = key
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        if read_response:
            self.read_response()

    def read_response(self) -> None:
        key = self._key
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status_line, *header_lines = head.split("\r\n")
        self.status = int(status_line.split()[1])
        pairs = [h.split(":", 1) for h in header_lines if h]
        self.headers = [(k.strip().lower(), v.strip()) for k, v in pairs]
        if self.status == 101:
            accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            assert (("sec-websocket-accept", accept) in self.headers), self.headers

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    def _read_until(self, marker: bytes) -> bytes:
        while (end := self.buf.find(marker)) < 0:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"connection closed; got {self.buf[:200]!r}")
            self.buf += data
        head, self.buf = self.buf[:end], self.buf[end + len(marker):]
        return head

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(max(65536, n - len(self.buf)))
            if not data:
                raise EOFError("connection closed mid-frame")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_rest(self) -> bytes:
        """Everything until the peer closes (an HTTP response body, say)."""
        chunks = [self.buf]
        self.buf = b""
        while data := self.sock.recv(65536):
            chunks.append(data)
        return b"".join(chunks)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes = b"", *, fin: bool = True) -> None:
        self.sock.sendall(encode_frame(opcode, payload, fin=fin))

    def send_close(self, code: int, reason: str = "") -> None:
        self.send_frame(0x8, close_payload(code, reason))

    def recv_frame(self, timeout: float | None = 5.0) -> Frame:
        self.sock.settimeout(timeout)
        b0, b1 = self._read_exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read_exact(8))[0]
        assert not b1 & 0x80, "server frames must not be masked"
        return Frame(bool(b0 & 0x80), b0 & 0x0F, self._read_exact(n), b0 & 0x70)

    def drain_to_eof(self, timeout: float = 3.0) -> int | None:
        """Read and discard until the peer has closed (FIN or reset): the number of bytes
        discarded, or None if the connection is still open after ``timeout``."""
        deadline = time.monotonic() + timeout
        n, self.buf = len(self.buf), b""
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                data = self.sock.recv(1 << 20)
                if not data:
                    return n
                n += len(data)
        except ConnectionResetError:
            return n
        except TimeoutError:
            pass
        return None

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0) instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawWS:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def handshake_status(url: str, **kwargs: Any) -> int:
    """The HTTP status of a refused websocket handshake (AssertionError if it succeeds)."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    kwargs.setdefault("open_timeout", 5)
    try:
        with connect(url, **kwargs):
            pass
    except InvalidStatus as exc:
        return int(exc.response.status_code)
    raise AssertionError(f"the handshake to {url} succeeded")


def http_request(port: int, request: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send a raw HTTP/1.1 request, read the response until the server closes."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request.encode("latin-1"))
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """``GET /metrics`` on a gateway's metrics port, read with prometheus_client's own parser:
    ``{(sample name, sorted labels): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = http_request(port, f"GET /metrics HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
    assert status == 200, (status, body[:200])
    assert headers["content-type"].startswith("text/plain; version="), headers
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when it is absent (a labelled counter not yet incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# ------------------------------------------------------------------- the CLI in a subprocess


def clean_env() -> dict[str, str]:
    """This environment without the gateway's settings (``GAIA_*``, the old secret's name)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GAIA_") and k != "SUPABASE_JWT_SECRET"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def gateway_args(port: int, upstream: str, *extra: str) -> list[str]:
    """``python -m gaia_gateway`` arguments: ``port`` on HOST, ``upstream``, the tests' secret."""
    return ["--host", HOST, "--port", str(port), "--upstream", upstream, "--jwt-secret", SECRET,
            *extra]


class GatewayProcess:
    """``python -m gaia_gateway ARGS`` in a subprocess; stderr (its log) collected by a thread."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.args = list(args)
        self.port = int(self.args[self.args.index("--port") + 1])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gaia_gateway", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**clean_env(), **(env or {})},
        )
        self._err: list[bytes] = []
        self._reader = threading.Thread(target=self._read_err, daemon=True)
        self._reader.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err.append(line)

    @property
    def log(self) -> str:
        return b"".join(self._err).decode("utf-8", "replace")

    def count(self, text: str) -> int:
        """How many log lines so far contain ``text``."""
        return sum(text.encode() in line for line in list(self._err))

    def rss(self) -> int:
        return proc_rss(self.proc.pid)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def worker_pids(self) -> list[int]:
        """The processes it forked (``--workers``)."""
        pid = self.proc.pid
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then its exit status (SIGKILL if it is still running after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.close()
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
