"""Demo "KB service" experience websocket backend (asyncio streams + wsproto).

Accepts upgrades on any path (canonically ``/ws/experience``); compact JSON text frames.
On accept it sends ``{"type":"connected",...}`` (``user_id`` from the gateway's ``X-User-Id``
header, else ``"anonymous"``; ``experience`` from the query, else ``wylding-woods``).
``ping`` -> ``pong``, ``action`` -> ``action_response``, ``update_location`` ->
``area_of_interest``, ``echo`` -> the same object, binary -> echoed binary.  Bad input gets
``{"type":"error","code":...}`` and the connection stays open; messages over 1 MiB close
with 1009; a client's close code is echoed.  Run it standalone with
``python -m gaia_gateway.demo.backend --host 127.0.0.1 --port 8001``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import signal
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any, Self, TypeGuard
from urllib.parse import parse_qs, urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.utilities import RemoteProtocolError

__all__ = ["DEFAULT_EXPERIENCE", "MAX_MESSAGE_SIZE", "DemoBackend", "main", "serve"]

log = logging.getLogger("gaia_gateway.demo")

DEFAULT_EXPERIENCE = "wylding-woods"
MAX_MESSAGE_SIZE = 1 << 20
READ_SIZE = 16 * 1024  # also bounds what one inflate step can expand at once
HANDSHAKE_TIMEOUT = 10.0
MAX_REQUEST_HEAD = 64 * 1024
CLOSE_TIMEOUT = 5.0

JSON = dict[str, Any]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _dumps(obj: Any) -> str:
    # ensure_ascii (the default) keeps lone surrogates from "\ud800" encodable.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _finite_float(text: str) -> float:
    value = float(text)  # NaN/Infinity literals and overflow (1e999) are not JSON numbers
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {text[:20]}")
    return value


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _error(code: str, message: str) -> JSON:
    return {"type": "error", "code": code, "message": message, "timestamp": _now_ms()}


class _Session:
    """One websocket connection: handshake, message loop, close handshake."""

    def __init__(self, backend: DemoBackend, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.backend, self.reader, self.writer = backend, reader, writer
        self.ws = WSConnection(ConnectionType.SERVER)
        self.connection_id = str(uuid.uuid4())
        self.user_id = "anonymous"
        self.experience = backend.default_experience
        self.close_code: int | None = None
        self._parts: list[Any] = []
        self._size = 0
        self._handlers: dict[str, Callable[[JSON], JSON]] = {
            "ping": self._on_ping, "action": self._on_action,
            "update_location": self._on_location, "echo": lambda msg: msg,
        }

    async def run(self) -> None:
        opened = False
        try:
            if not await asyncio.wait_for(self._handshake(), HANDSHAKE_TIMEOUT):
                return
            opened = True
            log.info("open connection_id=%s user_id=%s experience=%s peer=%s", self.connection_id,
                     self.user_id, self.experience, self.writer.get_extra_info("peername"))
            await self._send_json({
                "type": "connected", "connection_id": self.connection_id,
                "user_id": self.user_id, "experience": self.experience, "timestamp": _now_ms(),
                "message": f"Connected to {self.experience} experience"})
            await self._pump()
        except asyncio.CancelledError:
            self._send_close_nowait(1001, "server shutting down")
            raise
        except (ConnectionError, TimeoutError):
            pass
        except Exception:  # a bug here must not take the server down
            log.exception("connection_id=%s failed", self.connection_id)
            self._send_close_nowait(1011, "internal error")
        finally:
            if opened:
                log.info("close connection_id=%s code=%s", self.connection_id, self.close_code)
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _handshake(self) -> bool:
        # wsproto's server-side AcceptConnection drops bytes that arrived after the request
        # head (a client may pipeline frames), so feed it only the head and keep the rest.
        buffer = b""
        while (end := buffer.find(b"\r\n\r\n")) < 0 and len(buffer) <= MAX_REQUEST_HEAD:
            data = await self.reader.read(READ_SIZE)
            if not data:
                return False
            buffer += data
        head, rest = (buffer, b"") if end < 0 else (buffer[:end + 4], buffer[end + 4:])
        try:  # an oversized head makes h11 raise: answered with a 400
            self.ws.receive_data(head)
            for event in self.ws.events():
                if isinstance(event, Request):
                    await self._accept(event)
                    if rest:
                        self.ws.receive_data(rest)
                    return True
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            await self._reject(hint.status_code if isinstance(hint, RejectConnection) else 400,
                               str(exc))
            return False
        await self._reject(400, "Incomplete HTTP request")  # e.g. a head of bare CRLFs
        return False

    async def _accept(self, request: Request) -> None:
        for name, value in request.extra_headers:
            key = name.decode("latin-1") if isinstance(name, bytes) else name
            if key.lower() == "x-user-id":
                text = value.decode("latin-1") if isinstance(value, bytes) else value
                self.user_id = text.strip() or self.user_id
        url = urlsplit(request.target)
        experience = parse_qs(url.query).get("experience", [""])[0].strip()
        self.experience = experience or self.backend.default_experience
        extensions: list[Extension] = []
        if self.backend.permessage_deflate:
            extensions.append(PerMessageDeflate())
        subprotocol = request.subprotocols[0] if request.subprotocols else None
        await self._write(self.ws.send(AcceptConnection(subprotocol=subprotocol,
                                                        extensions=extensions)))

    async def _reject(self, status: int, message: str) -> None:
        body = f"{message}\n".encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nsec-websocket-version: 13\r\n"
                f"content-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n")
        await self._write(head.encode() + body)

    async def _pump(self) -> None:
        while True:
            for event in self.ws.events():
                if not await self._on_event(event):
                    return
            if self.ws.state is ConnectionState.CLOSED:
                return
            timeout = None if self.ws.state is ConnectionState.OPEN else CLOSE_TIMEOUT
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), timeout)
            self.ws.receive_data(data or None)

    async def _on_event(self, event: Event) -> bool:
        """Handle one event; False once the connection is finished."""
        state = self.ws.state
        if isinstance(event, CloseConnection):
            self.close_code = event.code
            if state is not ConnectionState.CLOSED:  # peer close, or wsproto protocol failure
                await self._write(self.ws.send(event.response()))
            return False
        if state is not ConnectionState.OPEN:  # we are closing: drop data
            return True
        if isinstance(event, Ping):
            await self._write(self.ws.send(event.response()))
        elif isinstance(event, Message):
            data = event.data
            self._size += len(data.encode()) if isinstance(data, str) else len(data)
            if self._size > self.backend.max_message_size:
                self.close_code = 1009
                await self._write(self.ws.send(CloseConnection(1009, "message too big")))
                return True
            self._parts.append(data)
            if event.message_finished:
                parts, self._parts, self._size = self._parts, [], 0
                if isinstance(event, TextMessage):
                    await self._on_text("".join(parts))
                else:
                    await self._write(self.ws.send(BytesMessage(data=b"".join(parts))))
        return True

    async def _on_text(self, text: str) -> None:
        try:
            msg = json.loads(text, parse_float=_finite_float, parse_constant=_finite_float)
        except (ValueError, RecursionError):
            await self._send_json(_error("invalid_json", "Message is not valid JSON"))
            return
        mtype = msg.get("type") if isinstance(msg, dict) else None
        if not isinstance(mtype, str) or not mtype:
            reply = _error("missing_type", "Message must be a JSON object with a string 'type'")
        elif (handler := self._handlers.get(mtype)) is None:
            reply = _error("unknown_message_type", f"Unknown message type '{mtype[:64]}'")
        else:
            reply = handler(msg)
        await self._send_json(reply)

    def _on_ping(self, msg: JSON) -> JSON:
        timestamp = msg.get("timestamp")
        return {"type": "pong", "timestamp": _now_ms() if timestamp is None else timestamp}

    def _on_action(self, msg: JSON) -> JSON:
        action = msg.get("action")
        metadata: JSON = {"experience": self.experience, "user_id": self.user_id}
        success, message = True, f"Action '{action}' processed"
        if not isinstance(action, str) or not action:
            success, message, metadata = False, "Missing or invalid 'action' field", {}
        elif action == "collect_item":
            instance_id = msg.get("instance_id")
            if (isinstance(instance_id, str) and instance_id) or _is_number(instance_id):
                message = f"Collected item {instance_id}"
                metadata["instance_id"] = instance_id
            else:
                success, message = False, "collect_item requires 'instance_id'"
        return {"type": "action_response", "action": action, "success": success,
                "message": message, "timestamp": _now_ms(), "metadata": metadata}

    def _on_location(self, msg: JSON) -> JSON:
        lat, lng = msg.get("lat"), msg.get("lng")
        if not (_is_number(lat) and _is_number(lng) and -90 <= lat <= 90 and -180 <= lng <= 180):
            return _error("invalid_location", "update_location needs numeric 'lat' and 'lng'")
        items = [{"instance_id": f"{self.experience}-item-1", "template_id": "dream_bottle",
                  "lat": lat, "lng": lng}]
        return {"type": "area_of_interest", "experience": self.experience,
                "location": {"lat": lat, "lng": lng}, "radius_m": 100, "items": items,
                "timestamp": _now_ms()}

    async def _send_json(self, obj: JSON) -> None:
        try:
            text = _dumps(obj)
        except (ValueError, RecursionError):
            text = _dumps(_error("invalid_json", "Message cannot be re-encoded"))
        await self._write(self.ws.send(TextMessage(data=text)))

    async def _write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def _send_close_nowait(self, code: int, reason: str) -> None:
        if self.ws.state is ConnectionState.OPEN and not self.writer.is_closing():
            self.close_code = code
            with contextlib.suppress(Exception):
                self.writer.write(self.ws.send(CloseConnection(code, reason)))


class DemoBackend:
    """The demo backend server; ``await start()`` returns the bound port (``port=0`` is fine).

    Also an async context manager.  With ``ssl_context`` it serves ``wss://``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 default_experience: str = DEFAULT_EXPERIENCE,
                 max_message_size: int = MAX_MESSAGE_SIZE,
                 permessage_deflate: bool = True,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.default_experience = default_experience
        self.max_message_size = max_message_size
        self.permessage_deflate = permessage_deflate
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "wss" if self.ssl_context else "ws"
        return f"{scheme}://{host}:{self.port}/ws/experience"

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._on_client, self.host, self.port,
                                                  ssl=self.ssl_context)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening, close open connections with 1001 and wait for them."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await _Session(self, reader, writer).run()
        except asyncio.CancelledError:
            pass  # close() cancelled us; re-raising would make asyncio log the handler as failed
        finally:
            self._tasks.discard(task)


async def serve(host: str, port: int, *, ready: asyncio.Event | None = None) -> None:
    """Run a :class:`DemoBackend` until cancelled; ``ready`` is set once it listens."""
    async with DemoBackend(host, port):
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gaia_gateway.demo.backend",
                                     description="Demo KB-service experience websocket backend.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--experience", default=DEFAULT_EXPERIENCE, help="default experience id")
    parser.add_argument("--no-deflate", action="store_true", help="refuse permessage-deflate")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        main_task = asyncio.current_task()
        assert main_task is not None
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
        async with DemoBackend(args.host, args.port, default_experience=args.experience,
                               permessage_deflate=not args.no_deflate) as backend:
            print(f"demo backend listening on {backend.url}", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(run())


if __name__ == "__main__":
    main()
