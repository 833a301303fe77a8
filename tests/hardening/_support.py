"""Shared pieces of the adversarial suite (tests/hardening).

Everything talks to the real gateway over real sockets on 127.0.0.1, in front of real upstreams:
the ``websockets`` echo server of ``tests/helpers.py``, hand-written raw upstreams (below), or
``scripts/echo_backend.py`` in a subprocess. The building blocks of ``tests/helpers.py`` are
reused as they are; what the attacks need on top lives here:

* :class:`Guard`, the checks every case ends with (:meth:`Guard.check`): a normal client still
  completes an echo, memory stayed under a bound, the file descriptors and the gateway's
  connections and tasks are released, and no token reached a log line;
* :class:`LogCapture`, the ``gaia_gateway`` (and ``asyncio``) log records rendered as the text
  and JSON log lines, *without* the redacting filter, so the check proves the records
  themselves hold no token;
* :class:`CountingEcho`, the echo upstream that also counts TCP connections it accepted;
* :class:`RawUpstream`, an upstream that answers the handshake as told and then sends whatever
  bytes it is given (invalid frames, garbage);
* :class:`JwksServer`, a JWKS document on a real ``http.server`` counting its fetches;
* :class:`EchoBackendProcess`, a subprocess upstream for the cases that need signals (SIGKILL
  of the upstream; the gateway's own, :class:`GatewayProcess`, is ``tests/helpers.py``'s);
* raw HTTP helpers (:func:`exchange`, :func:`parse_responses`; the request itself is
  ``helpers.upgrade_request``) and token forgeries (:func:`forge_jwt`, :func:`rsa_keys`);
* :func:`read_until_closed`, for the cases that hold many raw sockets and wait for the
  gateway to close them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import hmac
import json
import logging
import os
import selectors
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from helpers import (
    HOST,
    SECRET,
    WS_GUID,
    EchoServer,
    Frame,
    GatewayHandle,
    LoopThread,
    clean_env,
    connect_tls,
    encode_frame,
    open_fds,
    proc_rss,
    rss_bytes,
    token,
    wait_until,
)
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.sync.client import connect

from gaia_gateway.logs import _JsonFormatter, _TextFormatter

ROOT = Path(__file__).resolve().parents[2]
CONTROL_PATH = "/ws/control"  # the extra route every hardened gateway has, to the control echo
ALLOWANCE = 1.5  # "within 1 s" checks allow 1.5 s on a noisy 2-core machine
MiB = 1024 * 1024


# ------------------------------------------------------------------------------ logs


class LogCapture(logging.Handler):
    """Every record of the ``gaia_gateway`` and ``asyncio`` loggers, rendered at emit time as
    the gateway's text and JSON lines (plus any traceback), with no redaction applied."""

    LOGGERS = ("gaia_gateway", "asyncio")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._text = _TextFormatter()
        self._json = _JsonFormatter()
        self._saved: list[tuple[logging.Logger, int]] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        parts = []
        for fmt in (self._text, self._json):
            try:
                parts.append(fmt.format(record))
            except Exception as exc:  # noqa: BLE001 - a formatting failure is a finding too
                parts.append(f"<unformattable record {record.msg!r}: {exc!r}>")
        if record.exc_info:
            parts.append(logging.Formatter().formatException(record.exc_info))
        parts.append(repr(getattr(record, "fields", None)))
        with self._lock2:
            self.lines.append("\n".join(parts))

    def install(self) -> LogCapture:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.level))
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)
        return self

    def remove(self) -> None:
        for logger, level in self._saved:
            logger.removeHandler(self)
            logger.setLevel(level)
        self._saved.clear()

    def text(self) -> str:
        with self._lock2:
            return "\n".join(self.lines)

    def messages(self, message: str) -> list[str]:
        """The text lines with this message (``<time> <level> <message> ...``)."""
        with self._lock2:
            lines = [entry.split("\n", 1)[0] for entry in self.lines]
        return [line for line in lines if line.split(" ", 3)[2:3] == [message]]

    def assert_no_secrets(self, secrets: Iterable[str]) -> None:
        assert_no_secrets(self.text(), secrets, where="gateway log records")


def assert_no_secrets(text: str, secrets: Iterable[str], where: str) -> None:
    """No token (nor any run of 20+ characters of one) and no ``eyJ`` in ``text``."""
    assert "eyJ" not in text, f"'eyJ' (a JWT) appears in the {where}:\n{_around(text, 'eyJ')}"
    for secret in secrets:
        if not secret:
            continue
        probes = {secret}
        if len(secret) > 40:  # a log line may cut a long token: look for pieces of it too
            probes |= {secret[i:i + 20] for i in range(0, len(secret) - 20, max(1, len(secret) // 8))}
        for probe in probes:
            assert probe not in text, \
                f"a token appears in the {where}:\n{_around(text, probe)}"


def _around(text: str, needle: str) -> str:
    i = text.find(needle)
    return text[max(0, i - 300): i + 300]


# ------------------------------------------------------------------------------ guard


@dataclass
class Peaks:
    rss: int = 0  # bytes over the baseline
    fds: int = 0  # open descriptors in this process
    client_buffer: int = 0  # gateway write buffers, bytes
    upstream_buffer: int = 0


class Guard:
    """The common end-of-case checks of the adversarial suite.

    Created once the gateway and every upstream of the case are running: it warms the path
    up with one control echo, then records the baseline (open file descriptors of the
    process, RSS). :meth:`sample` records peaks during an attack; :meth:`check` then asserts

    1. the gateway keeps serving: a normal client completes an echo on the control route (and
       on the main route too when ``main_route=True``), each round trip under ``ALLOWANCE``;
    2. memory stayed bounded: RSS over the baseline (now and at every sample) under
       ``rss_bound``, and the gateway's write buffers (sampled) under ``buffer_bound``;
    3. everything is released: ``gateway.open_connections == 0``, no client protocol, no task
       but ``serve()``, and the process's file descriptors back to the baseline;
    4. no token appears in any log line (the tokens passed in, the control tokens, ``eyJ``).
    """

    def __init__(self, gw: GatewayHandle, control: EchoServer, logs: LogCapture, *,
                 good_token: Callable[[], str] = lambda: token("control-user"),
                 warm: bool = True, client_ssl: ssl.SSLContext | None = None) -> None:
        self.gw = gw
        self.client_ssl = client_ssl  # a wss:// gateway: what its normal clients trust
        self.control = control
        self.logs = logs
        self.good_token = good_token
        self.secrets: list[str] = []
        self.peaks = Peaks()
        if warm:
            self.echo(CONTROL_PATH)
        assert wait_until(gw.idle, 3), "the warm-up connection was not released"
        gc.collect()
        self.fds0 = open_fds()
        self.rss0 = rss_bytes()
        self.peaks.fds = len(self.fds0)

    @property
    def port(self) -> int:
        return self.gw.port

    def secret(self, value: str) -> str:
        """Remember a token that must never be logged; returns it."""
        self.secrets.append(value)
        return value

    def url(self, path: str = "/ws/experience", tok: str | None = None) -> str:
        tok = self.secret(tok if tok is not None else self.good_token())
        return self.gw.url(tok, path=path)

    def echo(self, path: str = CONTROL_PATH, n: int = 3) -> float:
        """A normal client completes ``n`` echoes on ``path``; the slowest round trip."""
        slowest = 0.0
        t0 = time.monotonic()
        url = self.url(path)
        with (connect_tls(url, self.client_ssl, close_timeout=3) if self.client_ssl is not None
              else connect(url, open_timeout=5, close_timeout=3)) as ws:
            opened = time.monotonic() - t0
            assert opened < ALLOWANCE, f"a normal handshake took {opened:.2f}s"
            for i in range(n):
                t = time.monotonic()
                ws.send(f"control {i}")
                assert ws.recv(timeout=5) == f"control {i}"
                slowest = max(slowest, time.monotonic() - t)
        assert slowest < ALLOWANCE, f"a normal echo took {slowest:.2f}s"
        return max(opened, slowest)

    def sample(self) -> None:
        self.peaks.rss = max(self.peaks.rss, rss_bytes() - self.rss0)
        self.peaks.fds = max(self.peaks.fds, len(open_fds()))
        with contextlib.suppress(AssertionError, TimeoutError):
            for client_buf, up_buf in self.gw.write_buffers():
                self.peaks.client_buffer = max(self.peaks.client_buffer, client_buf)
                self.peaks.upstream_buffer = max(self.peaks.upstream_buffer, up_buf)

    def sample_for(self, seconds: float, interval: float = 0.05,
                   until: Callable[[], bool] | None = None) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sample()
            if until is not None and until():
                return
            time.sleep(interval)

    def check(self, *, secrets: Iterable[str] = (), rss_bound: int = 40 * MiB,
              buffer_bound: int | None = None, fd_bound: int | None = None,
              main_route: bool = False) -> None:
        self.sample()
        # 1. still serving
        self.echo(CONTROL_PATH)
        if main_route:
            self.echo("/ws/experience")
        # 3. released (before the memory reading: buffers of closed sockets are gone)
        self.gw.assert_clean(timeout=3.0)
        assert self.gw.server is not None and self.gw.server.gateway.open_connections == 0
        if not wait_until(lambda: len(open_fds()) <= len(self.fds0), timeout=3.0):
            after = open_fds()
            added = {fd: p for fd, p in after.items() if self.fds0.get(fd) != p}
            raise AssertionError(f"file descriptors not released: {added}")
        # 2. bounded
        self.sample()
        assert self.peaks.rss < rss_bound, \
            f"RSS grew by {self.peaks.rss / MiB:.1f} MiB (bound {rss_bound / MiB:.0f} MiB)"
        if buffer_bound is not None:
            assert self.peaks.client_buffer <= buffer_bound, \
                f"client write buffer reached {self.peaks.client_buffer} bytes"
            assert self.peaks.upstream_buffer <= buffer_bound, \
                f"upstream write buffer reached {self.peaks.upstream_buffer} bytes"
        if fd_bound is not None:
            assert self.peaks.fds < fd_bound, f"{self.peaks.fds} file descriptors in use"
        # 4. no token in the logs
        assert self.logs.lines, "no log line was captured: the capture is not working"
        self.logs.assert_no_secrets([*self.secrets, *secrets, SECRET])


@dataclass
class Tls:
    """A wss:// gateway's certificate files, and a client context that trusts them."""

    certfile: str
    keyfile: str
    client_ssl: ssl.SSLContext


def tls_gateway(harden: Callable[..., Guard], echo: CountingEcho, tls: Tls,
                **settings: Any) -> Guard:
    """``harden`` for a wss:// gateway whose main route goes to ``echo``."""
    return harden(echo.url(), certfile=tls.certfile, keyfile=tls.keyfile,
                  client_ssl=tls.client_ssl, **settings)


# -------------------------------------------------------------------------- upstreams


class CountingEcho(EchoServer):
    """The echo upstream of tests/helpers.py, also counting the TCP connections it accepted
    (``tcp_accepts``), before any HTTP is read."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tcp_accepts = 0

    async def _start(self) -> int:
        from http import HTTPStatus
        from urllib.parse import parse_qs, urlsplit

        owner = self

        class Counting(ServerConnection):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                owner.tcp_accepts += 1
                super().connection_made(transport)  # type: ignore[arg-type]

        def select(_conn: ServerConnection, offered: Any) -> str | None:
            return "game.v1" if "game.v1" in offered else None

        def on_request(conn: ServerConnection, request: Any) -> Any:
            self.requests += 1
            query = parse_qs(urlsplit(request.path).query)
            if "reject" in query:
                return conn.respond(HTTPStatus(int(query["reject"][0])), "refused by upstream\n")
            return None

        self._server = await ws_serve(
            self._handler, HOST, 0, ssl=self.ssl_context, compression=self.compression,
            max_size=None, select_subprotocol=select, process_request=on_request,
            ping_interval=None, close_timeout=2, create_connection=Counting,
        )
        return int(next(iter(self._server.sockets)).getsockname()[1])

    @property
    def contacted(self) -> int:
        """How many times the upstream was reached (TCP accepts, HTTP requests, sessions)."""
        return max(self.tcp_accepts, self.requests, len(self.records))


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID.encode()).digest())


def switching(key: bytes) -> bytes:
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n")


@dataclass
class RawConn:
    """What a :class:`RawUpstream` saw of one connection."""

    request: bytes = b""
    frames: list[Frame] = field(default_factory=list)  # payloads unmasked
    eof: threading.Event = field(default_factory=threading.Event)
    eof_at: float | None = None
    close_sent: bool = False
    # What the upstream read from the gateway while it waited, after its close reply, before
    # closing its socket: None when nothing came, b"" if the gateway had closed its side first.
    after_close: bytes | None = None

    def header(self, name: str) -> list[str]:
        prefix = name.lower().encode() + b":"
        return [line.split(b":", 1)[1].strip().decode("latin-1")
                for line in self.request.split(b"\r\n") if line.lower().startswith(prefix)]

    @property
    def data_frames(self) -> list[bytes]:
        """The payloads of the text and binary frames received, in order."""
        return [f.payload for f in self.frames if f.opcode in (0x1, 0x2)]

    @property
    def close_code(self) -> int | None:
        for frame in self.frames:
            if frame.opcode == 0x8:
                return frame.close[0]
        return None


class RawUpstream:
    """A hand-written upstream: answers the handshake with ``answer(key)`` (a correct 101 by
    default), sends ``on_first_frame`` once the first data frame arrives from the gateway,
    and records every frame it gets until the connection ends. With ``echo`` it echoes data
    frames, answers pings and answers a close frame with the same close: a minimal server
    that records, at the socket, every frame that reached it. After its close reply it closes
    its socket ``close_after`` seconds later, as a server does (RFC 6455 7.1.1), noting in
    ``RawConn.after_close`` whether the gateway ended its side meanwhile; with
    ``close_after=None`` it never closes it, and reads on until the gateway ends it."""

    def __init__(self, *, answer: Callable[[bytes], bytes] = switching,
                 on_first_frame: bytes = b"", echo: bool = False,
                 close_after: float | None = 0.0) -> None:
        self.answer = answer
        self.on_first_frame = on_first_frame
        self.echo = echo
        self.close_after = close_after
        self.conns: list[RawConn] = []
        self._thread = LoopThread("asyncio", "raw-upstream")
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

        async def start() -> int:
            self._server = await asyncio.start_server(self._on_client, HOST, 0)
            return int(self._server.sockets[0].getsockname()[1])

        self.port: int = self._thread.run(start())

    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws/experience"

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RawConn()
        self.conns.append(conn)
        self._writers.append(writer)
        try:
            conn.request = await reader.readuntil(b"\r\n\r\n")
            key = next(line.split(b":", 1)[1].strip() for line in conn.request.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            writer.write(self.answer(key))
            sent = False
            while True:
                b0, b1 = await reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", await reader.readexactly(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", await reader.readexactly(8))[0]
                mask = await reader.readexactly(4) if b1 & 0x80 else b""
                payload = await reader.readexactly(n)
                if mask:
                    payload = bytes(x ^ mask[i % 4] for i, x in enumerate(payload))
                opcode = b0 & 0x0F
                conn.frames.append(Frame(bool(b0 & 0x80), opcode, payload, b0 & 0x70))
                if not sent and opcode in (0x1, 0x2) and self.on_first_frame:
                    sent = True
                    writer.write(self.on_first_frame)
                if self.echo and not conn.close_sent:
                    if opcode in (0x0, 0x1, 0x2, 0x9, 0x8):
                        reply = 0xA if opcode == 0x9 else opcode
                        writer.write(encode_frame(reply, payload, fin=bool(b0 & 0x80),
                                                  mask=False))
                    if opcode == 0x8:
                        conn.close_sent = True
                        await writer.drain()
                        if self.close_after is not None:
                            try:
                                conn.after_close = await asyncio.wait_for(reader.read(1),
                                                                          self.close_after)
                            except TimeoutError:
                                pass
                            break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                StopIteration, asyncio.CancelledError):
            pass
        finally:
            conn.eof_at = time.monotonic()
            conn.eof.set()
            writer.close()

    def stop(self) -> None:
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


class JwksServer:
    """A JWKS document served by ``http.server`` in a thread; ``fetches`` counts the GETs.
    ``delay`` slows every answer down, so that concurrent handshakes join the fetch."""

    def __init__(self, document: dict[str, Any], delay: float = 0.0) -> None:
        body = json.dumps(document).encode()
        owner = self
        self.fetches = 0
        self.fetch_times: list[float] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                owner.fetch_times.append(time.monotonic())
                time.sleep(delay)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer((HOST, 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="jwks", daemon=True)
        self._thread.start()

    def url(self) -> str:
        return f"http://{HOST}:{self.port}/.well-known/jwks.json"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


# ------------------------------------------------------------------------ subprocesses


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError("no line from the subprocess in time")
        return proc.stdout.readline().decode()
    finally:
        sel.close()


class EchoBackendProcess:
    """``scripts/echo_backend.py`` in a subprocess (websockets echo, no compression)."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> EchoBackendProcess:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "echo_backend.py"), "--host", HOST,
             "--port", str(self.port), "--no-compression"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=clean_env(),
        )
        line = _read_line(self.proc, timeout)
        assert line.startswith("ready "), line
        self.port = int(line.split()[2])
        return self

    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws/experience"

    def rss(self) -> int:
        assert self.proc is not None
        return proc_rss(self.proc.pid)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        self.proc = None


# ----------------------------------------------------------------------------- raw HTTP


def exchange(port: int, data: bytes | Sequence[bytes], *, timeout: float = 5.0,
             pause: float = 0.0) -> bytes:
    """Connect, send ``data`` (chunks separated by ``pause``), read until the gateway closes;
    every byte the gateway sent. A reset after the answer counts as the close."""
    chunks = [data] if isinstance(data, bytes) else list(data)
    out = bytearray()
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        try:
            for i, chunk in enumerate(chunks):
                if i and pause:
                    time.sleep(pause)
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before all was sent: read what came
        deadline = time.monotonic() + timeout
        try:
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data_in = sock.recv(65536)
                if not data_in:
                    break
                out += data_in
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"the gateway did not close the connection; got {bytes(out[:200])!r}")
    return bytes(out)


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


def parse_responses(raw: bytes) -> tuple[list[Response], bytes]:
    """Split the bytes into HTTP/1.1 responses (by Content-Length); the rest after them."""
    out: list[Response] = []
    while raw.startswith(b"HTTP/1."):
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            break
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = []
        for line in lines:
            k, _, v = line.partition(":")
            headers.append((k.strip().lower(), v.strip()))
        resp = Response(int(status_line.split()[1]), headers, b"")
        length = int(next((v for k, v in headers if k == "content-length"), "0"))
        if resp.status == 101:
            length = 0
        resp.body, raw = rest[:length], rest[length:]
        out.append(resp)
        if resp.status == 101:
            break
    return out, raw


def one_response(raw: bytes) -> Response:
    """The single HTTP response in ``raw`` (nothing after it), which is not a 101."""
    responses, rest = parse_responses(raw)
    assert len(responses) == 1, f"{len(responses)} responses in {raw[:400]!r}"
    assert rest == b"", f"bytes after the response: {rest[:200]!r}"
    assert responses[0].status != 101
    assert b" 101 " not in raw.split(b"\r\n", 1)[0]
    return responses[0]


# ------------------------------------------------------------------------------ frames


def parse_frames(data: bytes) -> tuple[list[tuple[int, int, bytes]], bytes]:
    """Complete unmasked frames in ``data``: [(b0, length, payload)], and the rest."""
    frames = []
    pos = 0
    n = len(data)
    while n - pos >= 2:
        b0, b1 = data[pos], data[pos + 1]
        length = b1 & 0x7F
        hlen = 2
        if length == 126:
            if n - pos < 4:
                break
            length = struct.unpack("!H", data[pos + 2:pos + 4])[0]
            hlen = 4
        elif length == 127:
            if n - pos < 10:
                break
            length = struct.unpack("!Q", data[pos + 2:pos + 10])[0]
            hlen = 10
        if n - pos < hlen + length:
            break
        frames.append((b0, length, data[pos + hlen:pos + hlen + length]))
        pos += hlen + length
    return frames, data[pos:]


def frame_header(opcode: int, length: int, *, fin: bool = True, mask: bool = True,
                 rsv: int = 0, length_bytes: int | None = None) -> bytes:
    """A frame header declaring ``length`` (no payload), masked with a key if ``mask``."""
    head = bytearray([(0x80 if fin else 0) | rsv | opcode])
    mbit = 0x80 if mask else 0
    if length_bytes == 8 or length >= 65536:
        head.append(mbit | 127)
        head += struct.pack("!Q", length)
    elif length_bytes == 2 or length >= 126:
        head.append(mbit | 126)
        head += struct.pack("!H", length)
    else:
        head.append(mbit | length)
    if mask:
        head += os.urandom(4)
    return bytes(head)


# ------------------------------------------------------------------------------ tokens


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_jwt(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT signed by hand: HMAC-SHA256 with ``key`` (whatever ``alg`` claims), or no
    signature at all when ``key`` is None (``alg: none``)."""
    signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + b64url(json.dumps(claims, separators=(",", ":")).encode()))
    sig = b""
    if key is not None:
        sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


def claims(sub: str | None = "attacker", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"aud": "authenticated", "iat": now, "exp": now + 600}
    if sub is not None:
        out["sub"] = sub
    out.update(extra)
    return out


_RSA: dict[str, Any] = {}


def rsa_keys() -> tuple[Any, bytes]:
    """(private key object, public key PEM), generated once per process."""
    if not _RSA:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        _RSA["private"], _RSA["pem"] = private, pem
    return _RSA["private"], _RSA["pem"]


def rs256(sub: str = "rsa-user", kid: str | None = None, **extra: Any) -> str:
    import jwt

    private, _ = rsa_keys()
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(sub, **extra), private, algorithm="RS256", headers=headers)


def jwks_document(kid: str) -> dict[str, Any]:
    from jwt.algorithms import RSAAlgorithm

    private, _ = rsa_keys()
    jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk.update(kid=kid, alg="RS256", use="sig")
    return {"keys": [jwk]}


# ------------------------------------------------------------------------------ misc


def read_until_closed(socks: Sequence[socket.socket],
                      deadline: float) -> tuple[list[bytes], set[int]]:
    """Read every socket until its peer closes it (a reset counts as the close) or the
    ``time.monotonic()`` deadline passes: what each one received, and which were closed.
    TLS sockets' application data counts, and their close_notify as a close."""
    answers = [b""] * len(socks)
    ended: set[int] = set()
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    try:
        while len(ended) < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(0.1):
                i = key.data
                try:
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                except ConnectionResetError:
                    data = b""
                except ssl.SSLWantReadError:  # a TLS record with no data: a session ticket
                    continue
                if data:
                    answers[i] += data
                else:
                    ended.add(i)
                    sel.unregister(key.fileobj)
    finally:
        sel.close()
    return answers, ended


@contextlib.contextmanager
def sockets_closed(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def masked(opcode: int, payload: bytes = b"", **kwargs: Any) -> bytes:
    return encode_frame(opcode, payload, **kwargs)
