"""Prometheus metrics: what the gateway counts, and the listener that serves ``/metrics``.

Nothing here runs per message. The relay already counts messages and bytes per session (for
the close log line); those counts are read when metrics are scraped (and, with
``--workers``, every ``--metrics-interval`` seconds), by walking the open sessions. Events
that happen once per connection (the answer to a request, a session's end and its close
codes, a failed TLS handshake) are counted as they happen: about 4 us per session in all
(9 us with the multiprocess files of ``--workers``), against 600 us for the handshake.

With ``--workers N`` the workers share one ``/metrics`` port (SO_REUSEPORT): each writes its
values to prometheus_client's multiprocess files and the worker that answers a scrape sums
them all, so every scrape sees the whole gateway. The other workers' counts are at most
``--metrics-interval`` seconds old.

The metrics port speaks plain HTTP, one request per connection, and is meant for the
internal network (``--metrics-host`` defaults to 127.0.0.1): labels carry statuses, close
codes and directions only, never a user, a token or an address.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import h11
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from .core import Session
from .core._http import http_response
from .transports.protocol import linger_close, peer_address

if TYPE_CHECKING:
    from .transports.server import GatewayServer

__all__ = ["Metrics", "MetricsProtocol"]

log = logging.getLogger("gaia_gateway.metrics")

_HANDSHAKE_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0)
_SESSION_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
                    86400.0)
_MAX_REQUEST_HEAD = 8192
# Metrics connections open at once. Each holds a file descriptor, from the same 20,000 as the
# gateway's sessions, for up to --handshake-timeout: beyond this many, a new one gets 503.
MAX_SCRAPES = 16


def _relayed(session: Session) -> tuple[int, int, int, int]:
    """An open session's messages from and to the client, then its bytes from and to it."""
    c2u, u2c = session.c2u, session.u2c
    assert c2u is not None and u2c is not None
    return c2u.messages, u2c.messages, c2u.bytes, u2c.bytes


def _child(cache: dict[Any, Any], key: Any, metric: Any, *labels: str) -> Any:
    """``metric``'s child for ``labels``, looked up once per ``key``: ``labels()`` takes a lock
    and builds a key each time."""
    child = cache.get(key)
    if child is None:
        child = cache[key] = metric.labels(*labels)
    return child


class Metrics:
    """One process's metrics, fed by the transport at connection events."""

    def __init__(self, server: GatewayServer, *, multiprocess: bool = False) -> None:
        self.server = server
        self.port: int | None = None  # the listener's, once it listens
        # With prometheus_client's multiprocess directory set (by ``--workers``, or by the
        # user), values live in its files and a scrape sums every process's; else in this
        # registry alone.
        own = CollectorRegistry()
        if multiprocess:
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        else:
            self.registry = own
            ProcessCollector(registry=own)  # CPU, RSS and open file descriptors
        self.requests = Counter(
            "gaia_gateway_requests", "Requests answered on the gateway's port, by HTTP status "
            "(101: a websocket session opened; none: the client left before an answer)",
            ["status"], registry=own)
        self.tls_failures = Counter(
            "gaia_gateway_tls_failures", "wss:// connections that failed before a request: "
            "timeout, plain_http, handshake (refused by OpenSSL), error (after the handshake)",
            ["kind"], registry=own)
        self.sessions_ended = Counter(
            "gaia_gateway_sessions_ended", "Websocket sessions ended, by the side that began "
            "the close (client, upstream, gateway)", ["initiator"], registry=own)
        self.closes = Counter(
            "gaia_gateway_closes", "Close codes of ended sessions, by sender: the client's and "
            "the upstream's (1006: its connection ended without a close frame) and the "
            "gateway's own", ["side", "code"], registry=own)
        self.messages = Counter(
            "gaia_gateway_messages", "Websocket messages relayed, from_client (to the upstream) "
            "and to_client (from the upstream)", ["direction"], registry=own)
        self.bytes = Counter(
            "gaia_gateway_bytes", "Bytes relayed after the upgrade, frame headers included",
            ["direction"], registry=own)
        self.handshake_seconds = Histogram(
            "gaia_gateway_handshake_seconds", "From the client's connection (after TLS) to its "
            "101: the request, the JWT, the upstream's connect and 101",
            buckets=_HANDSHAKE_BUCKETS, registry=own)
        self.session_seconds = Histogram(
            "gaia_gateway_session_seconds", "Websocket session lengths, handshake included",
            buckets=_SESSION_BUCKETS, registry=own)
        self.connections = Gauge(
            "gaia_gateway_connections", "Open client connections, TLS handshakes included",
            registry=own, multiprocess_mode="livesum")
        self.sessions = Gauge(
            "gaia_gateway_sessions", "Open websocket sessions (relaying or closing)",
            registry=own, multiprocess_mode="livesum")
        # Label children (``_child``), by status, by (side, code), by initiator.
        self._status_children: dict[int | None, Any] = {}
        self._close_children: dict[tuple[str, int | None], Any] = {}
        self._ended_children: dict[str | None, Any] = {}
        # Totals of the sessions already released, and what the counters have been given.
        self._done = [0, 0, 0, 0]  # messages from/to the client, bytes from/to the client
        self._given = [0, 0, 0, 0]
        self._relayed = (self.messages.labels("from_client"), self.messages.labels("to_client"),
                         self.bytes.labels("from_client"), self.bytes.labels("to_client"))
        self._timer: asyncio.TimerHandle | None = None
        self._listener: asyncio.Server | None = None
        self.scrapes: set[MetricsProtocol] = set()  # metrics connections under way

    # ------------------------------------------------------------ connection events

    def answered(self, status: int | None) -> None:
        _child(self._status_children, status, self.requests,
               "none" if status is None else str(status)).inc()

    def opened(self, session: Session) -> None:
        self.answered(101)
        self.handshake_seconds.observe(time.time() - session.started)

    def finished(self, session: Session) -> None:
        """A client connection is released; a session's counts move to the totals."""
        if session.status == 101:
            self._done = [done + n for done, n in zip(self._done, _relayed(session), strict=True)]
            initiator = session.initiator
            _child(self._ended_children, initiator, self.sessions_ended,
                   initiator or "gateway").inc()
            for side, close in (("client", session.client_close),
                                ("upstream", session.upstream_close),
                                ("gateway", session.gateway_close)):
                if close is not None:  # codes are bounded: 1000-1015, 3000-4999
                    code = close[0]
                    _child(self._close_children, (side, code), self.closes, side,
                           str(code if code is not None else 1005)).inc()
            if session.ended is not None:
                self.session_seconds.observe(session.ended - session.started)
        else:  # refused, /health, or left: 101s are counted when they happen
            self.answered(session.status)

    def tls_failed(self, kind: str) -> None:
        self.tls_failures.labels(kind).inc()

    # -------------------------------------------------------------------- exposing

    def publish(self) -> None:
        """Bring the live figures up to date: relayed counts, open connections and sessions."""
        m_in, m_out, b_in, b_out = self._done
        sessions = 0
        for client in self.server.clients:
            session = client.session
            if session is not None and session.status == 101:
                a, b, c, d = _relayed(session)
                m_in += a
                m_out += b
                b_in += c
                b_out += d
                sessions += not session.closed
        totals = (m_in, m_out, b_in, b_out)
        given = self._given
        for i, child in enumerate(self._relayed):
            if totals[i] > given[i]:
                child.inc(totals[i] - given[i])
                given[i] = totals[i]
        self.connections.set(self.server.gateway.open_connections)
        self.sessions.set(sessions)

    def exposition(self) -> bytes:
        self.publish()
        return generate_latest(self.registry)

    def start_publishing(self, interval: float) -> None:
        """Publish every ``interval`` seconds (for the other workers' scrapes)."""
        def tick() -> None:
            self.publish()
            self._timer = self.server.loop.call_later(interval, tick)

        self._timer = self.server.loop.call_later(interval, tick)

    async def listen(self, host: str, port: int, *, reuse_port: bool) -> int:
        """Serve ``/metrics`` on ``host:port`` (OSError if it cannot); the port listened on.

        A request has ``handshake_timeout`` to arrive; after the answer, the client has
        ``close_timeout`` to close, as on the gateway's port."""
        limits = self.server.gateway.limits
        self._listener = await self.server.loop.create_server(
            lambda: MetricsProtocol(self, limits.handshake_timeout, limits.close_timeout),
            host, port, reuse_port=reuse_port or None)
        self.port = int(self._listener.sockets[0].getsockname()[1])
        return self.port

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for scrape in list(self.scrapes):
            if scrape.transport is not None:
                scrape.transport.abort()
        self.publish()  # the last counts of this process


class MetricsProtocol(asyncio.Protocol):
    """``GET /metrics`` on the metrics port: one request per connection, bounded in size
    (8 KiB of head), in time (``--handshake-timeout``) and in number (``MAX_SCRAPES``)."""

    def __init__(self, metrics: Metrics, timeout: float, linger: float) -> None:
        self.metrics = metrics
        self.timeout = timeout
        self.linger = linger
        self.transport: asyncio.Transport | None = None
        self._h11 = h11.Connection(h11.SERVER)  # the head's size: ``_received``
        self._timer: asyncio.TimerHandle | None = None
        self._peer = "unknown"
        self._received = 0
        self._answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._peer = peer_address(transport)
        scrapes = self.metrics.scrapes
        over = len(scrapes) >= MAX_SCRAPES
        scrapes.add(self)  # refused or not, until it is gone
        if over:
            self._refuse(503, f"over {MAX_SCRAPES} metrics connections at once")
            return
        self._timer = self.metrics.server.loop.call_later(self.timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        self._received += len(data)
        if self._received > _MAX_REQUEST_HEAD:  # the head, whether whole or not
            self._refuse(431, "request head over 8 KiB")
            return
        try:
            self._h11.receive_data(data)
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
            self._refuse(status, "bad request")
            return
        if event is h11.NEED_DATA:
            return
        if not isinstance(event, h11.Request):
            self._refuse(400, "bad request")
            return
        path = event.target.split(b"?", 1)[0]
        if path != b"/metrics":
            self._refuse(404, "no such path: the metrics are at /metrics")
            return
        if event.method not in (b"GET", b"HEAD"):
            self._refuse(405, "method not allowed", [("Allow", "GET, HEAD")])
            return
        response = http_response(200, self.metrics.exposition().decode("utf-8"),
                                 content_type=CONTENT_TYPE_LATEST)
        if event.method == b"HEAD":  # the headers a GET would get, no body
            response = response[: response.index(b"\r\n\r\n") + 4]
        self._send(response)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport = None
        self.metrics.scrapes.discard(self)

    def _refuse(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None
                ) -> None:
        log.warning("metrics request refused", extra={"fields": {
            "client": self._peer, "status": status, "reason": reason}})
        self._send(http_response(status, f"{status} {reason}\n", headers or ()))

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse(408, "request timeout")

    def _send(self, response: bytes) -> None:
        self._answered = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(response)
        # A half-close: closing with the client's request bytes unread (a refusal can come
        # before them) would be an RST, which can lose the answer.
        self._timer = linger_close(self.metrics.server.loop, t, self.linger)
