"""The gateway's own TLS termination for wss:// clients, the same on both event loops.

The listener is a plain TCP one; :class:`TlsProtocol` runs TLS over memory buffers
(:class:`ServerTls`) and presents a transport to the gateway's :class:`ClientProtocol`, which
does not know the difference. The loops' own TLS protocols (``create_server(ssl=...)``) did
the same job, but out of the gateway's reach:

- **A failed handshake left no log line and got no answer.** They log handshake errors only
  in the loop's debug mode, so a client with the wrong CA, no common TLS version, or a plain
  ws:// URL on the wss:// port was dropped in silence. Here each gets a log line with
  OpenSSL's reason, and a plain HTTP request gets ``400`` in plain HTTP, as nginx answers.
- **Connections in their handshake were not counted.** The gateway's protocol, and so its
  connection count, started only after the handshake, so ``max_connections`` did not see
  sockets still in it. Here a connection counts from the moment it is accepted.
- **The close waited for the client's close_notify.** Here the gateway sends its
  close_notify, then closes as it does over plain TCP (a half-close and a linger bounded by
  ``close_timeout``): RFC 8446 6.1 does not ask the side that closes to wait for the other's.
- **The client's end reached the gateway twice**, at its close_notify and again when the
  socket closed; here once.
- On asyncio's loop its TLS protocol held 256 KiB per socket (``tls.py``).

:class:`ServerTls` does no I/O and reads no clock: bytes in, bytes out, like the core, so it is
tested byte for byte against an in-memory client (``tests/test_server_tls.py``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any

from ..core._http import http_response
from .protocol import ClientProtocol, linger_close, peer_address
from .tls import read_records

if TYPE_CHECKING:
    from .server import GatewayServer

__all__ = ["ServerTls", "TlsFailure", "TlsProtocol"]

log = logging.getLogger("gaia_gateway.access")

# A TLS connection opens with a record of type 22 (or an SSLv2-style hello, >= 0x80); an HTTP
# request opens with its method, in capitals.
_HTTP_FIRST = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
PLAIN_HTTP_ANSWER = http_response(
    400, "This port speaks TLS: use wss:// (or https:// for /health).\n")


class TlsFailure(Exception):
    """The connection cannot go on: say ``reason`` in the log, send ``answer``, close.

    ``kind`` is the metrics' label: plain_http, handshake (refused by OpenSSL), or error (a
    bad record after the handshake).
    """

    def __init__(self, reason: str, answer: bytes = b"", status: int | None = None,
                 kind: str = "handshake") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.answer = answer  # a TLS alert, or a plain HTTP answer; may be empty
        self.status = status  # the HTTP status of ``answer``, if it is one


class ServerTls:
    """Server-side TLS over memory buffers: ciphertext in, plaintext out, and back."""

    __slots__ = ("_in", "_obj", "_started", "eof", "established", "outgoing")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()  # bytes for the peer: check ``pending`` after each call
        self._obj = context.wrap_bio(self._in, self.outgoing, server_side=True)
        self._started = False
        self.established = False  # the handshake is done
        self.eof = False  # the peer's close_notify came, or the connection failed

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._obj

    def receive(self, data: bytes) -> bytes:
        """Take bytes from the peer; return the application data they complete (maybe b"").

        Raises :class:`TlsFailure` when the connection cannot go on; after that, and after the
        peer's close_notify, bytes are taken and dropped.
        """
        if not self.established:
            return self._handshake(data)
        if self.eof:
            return b""
        incoming = self._in
        incoming.write(data)
        try:
            data, eof = read_records(self._obj, incoming)
        except ssl.SSLError as exc:
            raise self._failure("TLS error", exc, "error") from None
        if eof:
            self.eof = True
        return data

    def _handshake(self, data: bytes) -> bytes:
        if self._started:
            if self.eof:  # failed
                return b""
        else:
            self._started = True
            if data[0] in _HTTP_FIRST:
                self.eof = True
                raise TlsFailure("plain HTTP request on the TLS port", PLAIN_HTTP_ANSWER, 400,
                                 "plain_http")
        self._in.write(data)
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return b""
        except ssl.SSLError as exc:
            raise self._failure("TLS handshake failed", exc, "handshake") from None
        self.established = True
        # what came with the client's last flight, if anything
        return self.receive(b"") if self._in.pending else b""

    def send(self, data: bytes) -> bytes:
        """The bytes that carry ``data`` to the peer."""
        self._obj.write(data)
        return self.outgoing.read()

    def close(self) -> bytes:
        """The bytes of our close_notify (nothing before the handshake is done)."""
        if self.established:
            try:
                self._obj.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: the peer's close_notify, which we do not wait for
        return self.outgoing.read()

    def _failure(self, what: str, exc: ssl.SSLError, kind: str) -> TlsFailure:
        self.eof = True
        reason = exc.reason or type(exc).__name__
        return TlsFailure(f"{what}: {reason}", self.outgoing.read(), kind=kind)


class TlsProtocol(asyncio.Protocol):
    """A wss:// client's socket: TLS here, and the gateway's :class:`ClientProtocol` above.

    To the event loop it is the socket's protocol; to the ``ClientProtocol`` it is the
    transport, with the part of the transport API that the gateway uses.
    """

    __slots__ = ("_app_made", "_eof_given", "_linger", "_shut", "_timer", "address", "app",
                 "raw", "server", "tls")

    def __init__(self, server: GatewayServer) -> None:
        assert server.server_ssl is not None
        self.server = server
        self.app = ClientProtocol(server)
        self.tls = ServerTls(server.server_ssl)
        self.raw: asyncio.Transport | None = None
        self.address = "unknown"  # the client's, once connected
        self._app_made = False
        self._eof_given = False  # the client's end was passed to the app
        self._shut = False  # our close_notify is out: nothing more to send
        self._timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ the socket's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw: asyncio.Transport = transport  # type: ignore[assignment]
        self.raw = raw
        server = self.server
        limits = server.gateway.limits
        raw.set_write_buffer_limits(limits.write_buffer_high, limits.write_buffer_low)
        self.address = peer_address(raw)
        server.gateway.connection_opened(self.address)  # the app counts it once it has it
        server.handshaking.add(self)
        self._timer = server.loop.call_later(limits.handshake_timeout, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        tls = self.tls
        try:
            plain = tls.receive(data)
        except TlsFailure as failure:
            self._fail(failure)
            return
        if tls.outgoing.pending:  # the handshake's flights, session tickets, key updates
            self.raw.write(tls.outgoing.read())  # type: ignore[union-attr]
        if not self._app_made:
            if not tls.established:
                return
            self._hand_over()
        if plain:
            self.app.data_received(plain)
        if tls.eof and not self._eof_given:
            self._eof_given = True
            self.app.eof_received()

    def eof_received(self) -> bool | None:
        if self._app_made and not self._eof_given:
            self._eof_given = True
            return self.app.eof_received()
        return False  # the socket closes, as ClientProtocol's does over plain TCP

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._app_made:
            self.app.connection_lost(exc)
        else:
            self.server.gateway.connection_closed(self.address)
            self.server.handshaking.discard(self)

    def pause_writing(self) -> None:
        if self._app_made:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self._app_made:
            self.app.resume_writing()

    def _hand_over(self) -> None:
        self._cancel_timers()
        server = self.server
        server.handshaking.discard(self)
        # ClientProtocol.connection_made counts it again
        server.gateway.connection_closed(self.address)
        self._app_made = True
        self.app.connection_made(self)  # type: ignore[arg-type]  # the transport API it uses

    def _handshake_timeout(self) -> None:
        self._timer = None
        self._report("TLS handshake timeout", None, "timeout")
        if self.raw is not None:
            self.raw.abort()

    def _fail(self, failure: TlsFailure) -> None:
        self._report(failure.reason, failure.status, failure.kind)
        raw = self.raw
        if raw is None or raw.is_closing():
            return
        self._shut = True
        if not failure.answer:
            raw.abort()
            return
        raw.write(failure.answer)
        # Let the client read the answer before the socket closes.
        self._linger = linger_close(self.server.loop, raw,
                                    self.server.gateway.limits.close_timeout)

    def _cancel_timers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def _report(self, reason: str, status: int | None, kind: str) -> None:
        metrics = self.server.metrics
        if metrics is not None:
            metrics.tls_failed(kind)
        if log.isEnabledFor(logging.WARNING):
            log.warning("tls", extra={"fields": {"client": self.address,
                                                 "status": status,
                                                 "reason": reason}})

    # ------------------------------------------------- the transport, for the app

    def write(self, data: bytes) -> None:
        if not self._shut:
            self.raw.write(self.tls.send(data))  # type: ignore[union-attr]

    def is_closing(self) -> bool:
        raw = self.raw
        return raw is None or raw.is_closing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Our close_notify, then a half-close: the client can read all that came before."""
        raw = self.raw
        if self._shut or raw is None or raw.is_closing():
            return
        self._shut = True
        raw.write(self.tls.close())
        raw.write_eof()

    def close(self) -> None:
        raw = self.raw
        if raw is None or raw.is_closing():
            return
        if not self._shut:
            self._shut = True
            raw.write(self.tls.close())
        raw.close()

    def abort(self) -> None:
        self._shut = True
        if self.raw is not None:
            self.raw.abort()

    def pause_reading(self) -> None:
        raw = self.raw
        if raw is not None and not raw.is_closing():
            raw.pause_reading()

    def resume_reading(self) -> None:
        raw = self.raw
        if raw is not None and not raw.is_closing():
            raw.resume_reading()

    def is_reading(self) -> bool:
        return self.raw is not None and self.raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.raw is not None:
            self.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size() if self.raw is not None else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.tls.ssl_object
        if name == "cipher":
            return self.tls.ssl_object.cipher()
        if name == "peercert":
            return self.tls.ssl_object.getpeercert()
        return self.raw.get_extra_info(name, default) if self.raw is not None else default
