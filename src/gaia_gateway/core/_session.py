"""One proxied connection: the client's handshake, the upstream's, the relay, the close.

Theory of operation
-------------------
A :class:`Session` is fed what happens to its two sockets (bytes, end of stream, the upstream
connect result, timers) together with the current time, and answers with a list of
:mod:`actions <gaia_gateway.core._actions>`. It never does I/O and never reads a clock.

1. ``REQUEST``: h11 parses the client's request. Routing, method, upgrade headers (wsproto
   validates them), origin and the JWT are all decided here, so a bad request is refused with
   an HTTP status before anything reaches the upstream.
2. ``AUTH_WAIT``: only when the token names a JWKS key id we do not hold yet; the transport
   refreshes the key set and calls :meth:`Session.keys_updated`.
3. ``CONNECTING`` and ``UPSTREAM_HANDSHAKE``: the upstream's 101 must arrive before the client
   gets its own, so a refusing or unreachable upstream is a 4xx/502/504, never a dangling 101.
4. ``OPEN``: two :class:`~gaia_gateway.core._frames.FrameRelay` objects forward frames
   byte-for-byte. The transport's hot path calls ``relay.feed`` itself and comes back here only
   when a relay raises its ``signal`` (a close frame or a violation).
5. ``CLOSING``: close frames are carried across unchanged, so codes and reasons survive both
   ways. When a side breaks the protocol or vanishes, the gateway closes the other side itself
   (1001 toward the upstream when the client left, 1011 toward the client when the upstream
   died) at a frame boundary. When the client breaks the protocol, the upstream is closed first
   and the client's close is sent once the upstream has answered, so replies to messages the
   client sent before its error still reach it, as they would without the gateway.
   Once the close frames are exchanged, the client's socket is closed at once (toward the
   client the gateway is the server, which closes first) and the upstream's when the
   upstream's end of stream arrives (there the gateway is the client, which waits for the
   server to close first: RFC 6455 7.1.1). ``close_timeout`` bounds every wait.
6. ``CLOSED``: both sockets are closed; :meth:`Session.info` has the accounting.
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import h11

from ._actions import (
    Accepted,
    Action,
    CloseClient,
    CloseUpstream,
    ConnectUpstream,
    FetchKeys,
    Rejected,
    SendToClient,
    SendToUpstream,
)
from ._auth import Authenticator, AuthFailure, NeedKeys, token_from_request
from ._frames import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CloseFrame,
    FrameRelay,
    Violation,
    build_close,
)
from ._http import Upstream, UpstreamAnswer, UpstreamRequest, http_response, query_pairs
from ._limits import Limits
from ._upgrade import (
    UpgradeRefused,
    UpgradeRequest,
    check_upgrade,
    header_list,
    switching_protocols,
)

__all__ = ["Gateway", "Session", "State"]


class State(enum.Enum):
    REQUEST = "request"
    AUTH_WAIT = "auth-wait"
    CONNECTING = "connecting"
    UPSTREAM_HANDSHAKE = "upstream-handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Gateway:
    """What all sessions of one process share: routes, keys, limits, counters, drain flag."""

    def __init__(
        self,
        routes: Mapping[str, Upstream],
        auth: Authenticator,
        limits: Limits | None = None,
        *,
        allowed_origins: frozenset[str] | None = None,
        max_connections: int | None = None,
        max_connections_per_ip: int | None = None,
        version: str = "0",
    ) -> None:
        if not routes:
            raise ValueError("at least one route is needed")
        for path in routes:
            if not path.startswith("/") or path == "/health":
                raise ValueError(f"route path {path!r} must start with '/' and not be /health")
        self.routes = dict(routes)
        self.auth = auth
        self.limits = limits or Limits()
        self.allowed_origins = allowed_origins
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.version = version
        self.draining = False
        # kept by the transport (``connection_opened``, ``connection_closed``): accepted
        # client sockets, and with a per-address limit, how many each address holds
        self.open_connections = 0
        self.by_address: dict[str, int] = {}

    def connection_opened(self, address: str) -> None:
        self.open_connections += 1
        if self.max_connections_per_ip is not None:
            self.by_address[address] = self.by_address.get(address, 0) + 1

    def connection_closed(self, address: str) -> None:
        self.open_connections -= 1
        if self.max_connections_per_ip is not None:
            left = self.by_address[address] - 1
            if left:
                self.by_address[address] = left
            else:
                del self.by_address[address]

    def health(self) -> bytes:
        body = json.dumps(
            {
                "status": "draining" if self.draining else "ok",
                "connections": self.open_connections,
                "version": self.version,
            },
            separators=(",", ":"),
        )
        status = 503 if self.draining else 200
        return http_response(status, body, content_type="application/json")


# Where an h11 error message starts quoting the peer's bytes.
_QUOTED = re.compile(r":| b'| b\"| bytearray\(")


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


class Session:
    """The state machine of one client connection and its upstream connection."""

    __slots__ = (
        "_blocked_since",
        "_client_close_rcvd",
        "_client_close_sent",
        "_client_closed",
        "_client_gone",
        "_closing_deadline",
        "_early",
        "_h11",
        "_idle_deadline",
        "_idle_mark",
        "_owed_client_close",
        "_random",
        "_raw_head",
        "_saw_newline",
        "_target",
        "_token",
        "_token_entry",
        "_up_blocked_since",
        "_up_close_rcvd",
        "_up_close_sent",
        "_up_closed",
        "_up_gone",
        "_upgrade",
        "_upstream",
        "_upstream_req",
        "c2u",
        "client_addr",
        "client_close",
        "deadline",
        "ended",
        "experience",
        "extensions",
        "gateway",
        "gateway_close",
        "initiator",
        "limits",
        "reason",
        "request_id",
        "started",
        "state",
        "status",
        "subprotocol",
        "tls",
        "u2c",
        "upstream_close",
        "user_id",
    )


    def __init__(
        self,
        gateway: Gateway,
        *,
        client_addr: str,
        tls: bool,
        request_id: str,
        now: float,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.gateway = gateway
        self.limits = gateway.limits
        self.client_addr = client_addr
        self.tls = tls
        self.request_id = request_id
        self.state = State.REQUEST
        self.started = now
        self.ended: float | None = None
        self.deadline: float | None = now + self.limits.handshake_timeout
        self._random = random
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        self._saw_newline = False
        self._raw_head = b""  # the request as received, until it is routed
        self._early = b""  # client bytes received before the relay runs
        self._upgrade: UpgradeRequest | None = None
        self._upstream: Upstream | None = None
        self._target = ""
        self._upstream_req: UpstreamRequest | None = None
        self._token_entry: str | None = None
        self._token: str | None = None
        self.user_id: str | None = None
        self.experience: str | None = None
        self.status: int | None = None  # HTTP status answered to the client
        self.reason = ""
        self.subprotocol: str | None = None
        self.extensions: str | None = None
        # The relays exist once the upgrade is done; the transport feeds them directly.
        self.c2u: FrameRelay | None = None
        self.u2c: FrameRelay | None = None
        # Closing bookkeeping, per side.
        self._client_close_sent = False
        self._client_close_rcvd = False
        self._client_gone = False
        self._client_closed = False
        self._up_close_sent = False
        self._up_close_rcvd = False
        self._up_gone = False
        self._up_closed = False
        self._owed_client_close: tuple[int, str] | None = None
        self.initiator: str | None = None
        self.client_close: tuple[int | None, str] | None = None  # what the client sent
        self.upstream_close: tuple[int | None, str] | None = None  # what the upstream sent
        self.gateway_close: tuple[int, str] | None = None  # what the gateway sent, if anything
        self._closing_deadline: float | None = None
        self._blocked_since: float | None = None  # the client's writes blocked since
        self._up_blocked_since: float | None = None  # the upstream's
        self._idle_mark = -1
        self._idle_deadline: float | None = None

    # ------------------------------------------------------------------ inputs

    def receive_client(self, data: bytes, now: float) -> list[Action]:
        state = self.state
        if state is State.OPEN or state is State.CLOSING:
            relay = self.c2u
            assert relay is not None
            out = relay.feed(data)
            actions: list[Action] = [SendToUpstream(out)] if out else []
            if relay.signal is not None:
                actions.extend(self.client_signal(now))
            return actions
        if state is State.REQUEST:
            return self._read_request(data, now)
        if state is State.CLOSED:
            return []
        self._early += data
        if len(self._early) > self.limits.max_early_bytes:
            actions = [CloseUpstream(abort=True)] if state is not State.AUTH_WAIT else []
            return actions + self._reject(400, "too much data before the upgrade completed", now)
        return []

    def receive_upstream(self, data: bytes, now: float) -> list[Action]:
        state = self.state
        if state is State.OPEN or state is State.CLOSING:
            relay = self.u2c
            assert relay is not None
            out = relay.feed(data)
            actions: list[Action] = [SendToClient(out)] if out else []
            if relay.signal is not None:
                actions.extend(self.upstream_signal(now))
            return actions
        if state is State.UPSTREAM_HANDSHAKE:
            assert self._upstream_req is not None
            answer = self._upstream_req.receive_data(data)
            return [] if answer is None else self._upstream_answered(answer, now)
        return []

    def client_eof(self, now: float) -> list[Action]:
        """The client's socket ended (FIN, reset or error), with or without a close frame."""
        self._client_gone = True
        state = self.state
        if state is State.CLOSED:
            return []
        if state not in (State.OPEN, State.CLOSING):
            self.reason = self.reason or "client left during the handshake"
            connecting = state in (State.CONNECTING, State.UPSTREAM_HANDSHAKE)
            return ([CloseUpstream(abort=True)] if connecting else []) + self._respond(b"", now)
        if self._client_closed:
            return self._finish([], now)
        actions: list[Action] = []
        self._begin_closing("client", now)
        if not self._client_close_rcvd:
            self.client_close = self.client_close or (1006, "connection lost")
        assert self.c2u is not None
        if not self._up_close_sent and not self._up_gone:
            if self.c2u.at_frame_boundary:
                actions += self._close_upstream_with(CLOSE_GOING_AWAY, "client went away")
            else:
                # Mid-frame: a close frame now would land inside the payload. Dropping the
                # connection is the only way to keep the partial message from being delivered.
                self._up_gone = True
                self._up_closed = True
                actions.append(CloseUpstream(abort=True))
        self.c2u.stop()
        return actions + self._finish([], now)

    def upstream_eof(self, now: float) -> list[Action]:
        self._up_gone = True
        state = self.state
        if state in (State.CONNECTING, State.UPSTREAM_HANDSHAKE):
            return self._reject(502, "upstream closed during the handshake", now)
        if state not in (State.OPEN, State.CLOSING):
            return []
        if self._up_closed:
            return self._finish([], now)
        actions: list[Action] = []
        self._begin_closing("upstream", now)
        if not self._up_close_rcvd:
            self.upstream_close = self.upstream_close or (1006, "connection lost")
        assert self.u2c is not None
        if self._owed_client_close is not None:
            actions += self._pay_client_close()
        elif not self._client_close_sent and not self._client_gone:
            if self.u2c.at_frame_boundary:
                actions += self._close_client_with(CLOSE_INTERNAL_ERROR, "upstream connection lost")
            else:
                self._client_gone = True
                self._client_closed = True
                actions.append(CloseClient(abort=True))
        self.u2c.stop()
        return actions + self._finish([], now)

    def upstream_connected(self, now: float) -> list[Action]:
        if self.state is not State.CONNECTING:
            return [CloseUpstream(abort=True)]
        assert self._upstream_req is not None
        self.state = State.UPSTREAM_HANDSHAKE
        return [SendToUpstream(self._upstream_req.bytes)]

    def upstream_failed(self, reason: str, *, timeout: bool, now: float) -> list[Action]:
        if self.state not in (State.CONNECTING, State.UPSTREAM_HANDSHAKE):
            return []
        return [CloseUpstream(abort=True)] + self._reject(
            504 if timeout else 502, f"upstream {reason}", now
        )

    def keys_updated(self, now: float) -> list[Action]:
        if self.state is not State.AUTH_WAIT:
            return []
        verdict = self.gateway.auth.verify(self._token, now)
        if isinstance(verdict, NeedKeys):  # still unknown after the refresh
            verdict = AuthFailure("unknown key id")
        return self._authorized(verdict, now)

    def handle_timer(self, now: float) -> list[Action]:
        deadline = self.deadline
        if deadline is None or now < deadline:
            return []
        state = self.state
        if state is State.REQUEST or state is State.AUTH_WAIT:
            return self._reject(408, "handshake timeout", now)
        if state is State.CONNECTING or state is State.UPSTREAM_HANDSHAKE:
            return self.upstream_failed("timed out", timeout=True, now=now)
        if state is State.CLOSED:
            self.deadline = None
            return []
        if self._closing_deadline is not None and now >= self._closing_deadline:
            return self._close_timeout(now)
        blocked = self._blocked_since
        if blocked is not None and now - blocked >= self.limits.send_timeout:
            return self._client_too_slow(now)
        blocked = self._up_blocked_since
        if blocked is not None and now - blocked >= self.limits.send_timeout:
            return self._upstream_too_slow(now)
        if self._idle_deadline is not None and now >= self._idle_deadline:
            assert self.c2u is not None and self.u2c is not None
            mark = self.c2u.bytes + self.u2c.bytes
            if mark == self._idle_mark:
                return self._gateway_closes(CLOSE_GOING_AWAY, "idle timeout", now)
            self._idle_mark = mark
            assert self.limits.idle_timeout is not None
            self._idle_deadline = now + self.limits.idle_timeout
        self._set_deadline()
        return []

    def client_write_blocked(self, now: float) -> None:
        """The client's write buffer passed the high-water mark (it is not reading)."""
        if self._blocked_since is None:
            self._blocked_since = now
            self._set_deadline()

    def client_write_unblocked(self) -> None:
        if self._blocked_since is not None:
            self._blocked_since = None
            self._set_deadline()

    def upstream_write_blocked(self, now: float) -> None:
        """The upstream's write buffer passed the high-water mark (it is not reading).

        The client is not read meanwhile, so a client that leaves would go unnoticed: the
        same ``send_timeout`` bounds this direction too.
        """
        if self._up_blocked_since is None:
            self._up_blocked_since = now
            self._set_deadline()

    def upstream_write_unblocked(self) -> None:
        if self._up_blocked_since is not None:
            self._up_blocked_since = None
            self._set_deadline()

    def shutdown(self, now: float) -> list[Action]:
        """The process is draining: close this session with 1001 (or refuse it if not open)."""
        state = self.state
        if state is State.OPEN:
            return self._gateway_closes(CLOSE_GOING_AWAY, "gateway shutting down", now,
                                        upstream_too=False)
        if state in (State.REQUEST, State.AUTH_WAIT):
            return self._reject(503, "gateway shutting down", now)
        if state in (State.CONNECTING, State.UPSTREAM_HANDSHAKE):
            return [CloseUpstream(abort=True)] + self._reject(503, "gateway shutting down", now)
        return []

    # ------------------------------------------------------------- relay signals

    def client_signal(self, now: float) -> list[Action]:
        """The client relay stopped: a close frame from the client, or a violation."""
        assert self.c2u is not None
        signal, self.c2u.signal = self.c2u.signal, None
        self._begin_closing("client", now)
        self._client_close_rcvd = True
        actions: list[Action] = []
        if isinstance(signal, CloseFrame):
            self.client_close = (signal.code, signal.reason)
            if not self._up_close_sent and not self._up_gone:
                self._up_close_sent = True
                actions.append(SendToUpstream(signal.raw))
        elif isinstance(signal, Violation):
            self.client_close = (signal.code, f"client error: {signal.reason}")
            self._owed_client_close = (signal.code, signal.reason)
            if self._up_close_rcvd or self._up_gone or self._client_close_sent:
                actions += self._pay_client_close()
            if not self._up_close_sent:  # also when the upstream's own close is unanswered
                actions += self._close_upstream_with(CLOSE_GOING_AWAY, "client protocol error")
        return actions + self._finish([], now)

    def upstream_signal(self, now: float) -> list[Action]:
        assert self.u2c is not None
        signal, self.u2c.signal = self.u2c.signal, None
        self._begin_closing("upstream", now)
        self._up_close_rcvd = True
        actions: list[Action] = []
        if isinstance(signal, CloseFrame):
            self.upstream_close = (signal.code, signal.reason)
            if self._owed_client_close is not None:
                actions += self._pay_client_close()
            elif not self._client_close_sent and not self._client_gone:
                self._client_close_sent = True
                actions.append(SendToClient(signal.raw))
        elif isinstance(signal, Violation):
            self.upstream_close = (signal.code, f"upstream error: {signal.reason}")
            if not self._up_close_sent:
                actions += self._close_upstream_with(signal.code, signal.reason)
            self._up_gone = True  # a broken upstream gets no second chance
            if self._owed_client_close is not None:
                actions += self._pay_client_close()
            else:
                actions += self._close_client_with(CLOSE_INTERNAL_ERROR, "upstream protocol error")
        return actions + self._finish([], now)

    # ------------------------------------------------------------------- queries

    @property
    def open(self) -> bool:
        return self.state is State.OPEN

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def info(self) -> dict[str, Any]:
        """The accounting for the connection's log line (no token, no query string)."""
        c2u, u2c = self.c2u, self.u2c
        info: dict[str, Any] = {
            "request_id": self.request_id,
            "client": self.client_addr,
            "user_id": self.user_id,
            "experience": self.experience,
            "status": self.status,
        }
        if self.reason:
            info["reason"] = self.reason
        if self.subprotocol:
            info["subprotocol"] = self.subprotocol
        if c2u is not None and u2c is not None and self.state is not State.OPEN:
            info.update(
                initiator=self.initiator,
                client_close=_fmt_close(self.client_close),
                upstream_close=_fmt_close(self.upstream_close),
                gateway_close=_fmt_close(self.gateway_close),
                msgs_in=c2u.messages,
                msgs_out=u2c.messages,
                bytes_in=c2u.bytes,
                bytes_out=u2c.bytes,
            )
        if self.ended is not None:
            info["duration_ms"] = round((self.ended - self.started) * 1000, 1)
        return info

    # ---------------------------------------------------------------- handshake

    def _read_request(self, data: bytes, now: float) -> list[Action]:
        conn = self._h11
        self._raw_head += data  # bounded: h11 refuses a head over max_header_bytes
        if b"\n" in data:
            self._saw_newline = True
        try:
            conn.receive_data(data)
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if status == 431 and not self._saw_newline:
                return self._reject(414, "request line too long", now)
            if status == 431:
                return self._reject(431, "request headers too large", now)
            # h11 quotes the offending bytes (e.g. a request line with ?token=): keep them out
            # of the reason, which goes to the log line and the response body.
            detail = _QUOTED.split(str(exc), maxsplit=1)[0]
            return self._reject(status if 400 <= status < 500 else 400,
                                f"bad request: {detail}", now)
        if event is h11.NEED_DATA:
            return []
        if isinstance(event, h11.Request):
            # h11 bounds only a head that is still incomplete; one that arrived whole in a
            # single chunk is measured here.
            limit = self.limits.max_header_bytes
            line = len(event.method) + len(event.target) + 11  # "M T HTTP/1.1\r\n"
            if line > limit:
                return self._reject(414, "request line too long", now)
            headers = header_list(event)
            if line + sum(len(k) + len(v) + 4 for k, v in headers) + 2 > limit:
                return self._reject(431, "request headers too large", now)
            return self._route(event, headers, now)
        return self._reject(400, "bad request", now)

    def _route(self, req: h11.Request, headers: list[tuple[bytes, bytes]], now: float
               ) -> list[Action]:
        if len(headers) > self.limits.max_headers:
            return self._reject(431, "too many headers", now)
        target = req.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        if path == "/health":
            if req.method not in (b"GET", b"HEAD"):
                return self._reject(405, "method not allowed", now, [("Allow", "GET, HEAD")])
            self.status = 503 if self.gateway.draining else 200
            response = self.gateway.health()
            if req.method == b"HEAD":  # the headers a GET would get, no body
                response = response[: response.index(b"\r\n\r\n") + 4]
            return self._respond(response, now)
        upstream = self.gateway.routes.get(path)
        if upstream is None:
            return self._reject(404, "no such route", now)
        if req.method != b"GET":
            return self._reject(405, "websocket upgrade needs GET", now, [("Allow", "GET")])
        if not any(b"websocket" in v.lower() for v in _header(headers, b"upgrade")):
            return self._reject(426, "websocket upgrade required", now,
                                [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                 ("Sec-WebSocket-Version", "13")])
        lengths = _header(headers, b"content-length")
        # h11 merges identical Content-Length copies (RFC 9112 allows it); a duplicate on an
        # upgrade request is a smuggling probe all the same, so count the raw lines.
        repeated = self._raw_head.lower().count(b"\ncontent-length:") > 1
        self._raw_head = b""
        if repeated or len(lengths) > 1 or _header(headers, b"transfer-encoding") or any(
            v.strip() != b"0" for v in lengths
        ):
            return self._reject(400, "an upgrade request must not have a body", now)
        if self.gateway.draining:
            return self._reject(503, "gateway shutting down", now, [("Retry-After", "1")])
        gw = self.gateway
        if gw.max_connections is not None and gw.open_connections > gw.max_connections:
            return self._reject(503, "too many connections", now, [("Retry-After", "1")])
        per_ip = gw.max_connections_per_ip
        if per_ip is not None and gw.by_address.get(self.client_addr, 0) > per_ip:
            return self._reject(429, "too many connections from this address", now)
        upgrade = check_upgrade(req, headers)
        if isinstance(upgrade, UpgradeRefused):
            return self._reject(upgrade.status, upgrade.reason, now, list(upgrade.headers))
        # Bytes after the head (frames sent before our 101). The request has no body (checked
        # above), so they are h11's unparsed buffer as it stands.
        early = bytes(self._h11.trailing_data[0])
        origins = gw.allowed_origins
        if origins is not None:
            origin = _header(headers, b"origin")
            if any(o.decode("latin-1") not in origins for o in origin):  # every copy
                return self._reject(403, "origin not allowed", now)
        self._upgrade = upgrade
        self._upstream = upstream
        self._early = early
        if len(self._early) > self.limits.max_early_bytes:  # sent in the request's own chunk
            return self._reject(400, "too much data before the upgrade completed", now)
        pairs = query_pairs(query)
        for name, value in pairs:
            if name == "experience":
                self.experience = value[:64]
                break
        auth_header = _header(headers, b"authorization")
        token, entry = token_from_request(
            pairs, auth_header[0].decode("latin-1") if auth_header else None,
            upgrade.subprotocols,
        )
        self._token, self._token_entry = token, entry
        self._target = upstream.path + ("?" + query if query else "")
        verdict = gw.auth.verify(token, now)
        if isinstance(verdict, NeedKeys):
            self.state = State.AUTH_WAIT
            return [FetchKeys()]
        return self._authorized(verdict, now)

    def _authorized(self, verdict: Any, now: float) -> list[Action]:
        if isinstance(verdict, AuthFailure):
            return self._reject(403, verdict.reason, now)
        self._token = None  # not needed any more; keep secrets short-lived
        self.user_id = verdict.user_id
        assert self._upgrade is not None and self._upstream is not None
        req = self._upgrade
        # Any bearer.<JWT> entry, also one not used for authentication, is a token: never
        # forward it (nor, therefore, let the upstream choose and echo it).
        offered = [p for p in req.subprotocols
                   if p != self._token_entry and not p.startswith("bearer.")]
        raw_ext = req.extensions
        proto = "https" if self.tls else "http"
        identity = [
            ("X-Forwarded-For", self.client_addr),
            ("X-Forwarded-Proto", proto),
            ("X-Request-ID", self.request_id),
            ("X-User-Id", verdict.user_id),
        ]
        client_headers = req.headers
        self._upstream_req = UpstreamRequest(
            self._upstream, self._target, client_headers,
            nonce=self._random(16), subprotocols=offered, extensions=raw_ext,
            identity_headers=identity, max_response_size=self.limits.max_header_bytes,
        )
        self.state = State.CONNECTING
        self.deadline = now + self.limits.connect_timeout
        return [ConnectUpstream(self._upstream)]

    def _upstream_answered(self, answer: UpstreamAnswer, now: float) -> list[Action]:
        if answer.status != 101:
            status = answer.status if 400 <= answer.status < 500 else 502
            return [CloseUpstream(abort=True)] + self._reject(status, answer.error or "refused", now)
        assert self._upgrade is not None and self._upstream_req is not None
        rsv_first = rsv_cont = 0
        if answer.extensions:
            names = {e.split(";", 1)[0].strip().lower() for e in answer.extensions.split(",")}
            if names - {"permessage-deflate"}:
                rsv_first = rsv_cont = 0x70  # unknown extensions: their bits are theirs
            else:
                rsv_first = 0x40  # RFC 7692 6: RSV1 on the first frame of a compressed message
        self.subprotocol = answer.subprotocol
        self.extensions = answer.extensions
        response = switching_protocols(self._upgrade.key, answer.subprotocol, answer.extensions,
                                       (("X-Request-ID", self.request_id),))
        limit = self.limits.max_message_size
        self.c2u = FrameRelay(masked=True, max_message_size=limit,
                              rsv_first=rsv_first, rsv_cont=rsv_cont)
        self.u2c = FrameRelay(masked=False, max_message_size=limit,
                              rsv_first=rsv_first, rsv_cont=rsv_cont)
        self.state = State.OPEN
        self.status = 101
        self._upgrade = None
        self._h11 = None  # type: ignore[assignment]
        if self.limits.idle_timeout is not None:
            self._idle_deadline = now + self.limits.idle_timeout
        self._set_deadline()
        actions: list[Action] = [SendToClient(response), Accepted()]
        early, self._early = self._early, b""
        trailing = self._upstream_req.trailing
        self._upstream_req = None
        if trailing:
            actions += self.receive_upstream(trailing, now)
        if early and self.state is not State.CLOSED:
            actions += self.receive_client(early, now)
        return actions

    def _respond(self, response: bytes, now: float) -> list[Action]:
        self.state = State.CLOSED
        self.deadline = None
        self.ended = now
        self._client_closed = self._up_closed = True
        if self._client_gone:
            return [CloseClient(abort=True)]
        return [SendToClient(response), CloseClient()]

    def _reject(
        self, status: int, reason: str, now: float, headers: list[tuple[str, str]] | None = None
    ) -> list[Action]:
        """Refuse the handshake with an HTTP status and a one-line reason body."""
        if self.state is State.CLOSED:
            return []
        self.status = status
        self.reason = reason
        response = http_response(status, f"{status} {reason}\n", headers or ())
        return [Rejected(status, reason)] + self._respond(response, now)

    # ------------------------------------------------------------------ closing

    def _begin_closing(self, who: str, now: float) -> None:
        if self.initiator is None:
            self.initiator = who
        if self.state is State.OPEN:
            self.state = State.CLOSING
            self._closing_deadline = now + self.limits.close_timeout
            self._idle_deadline = None  # close_timeout bounds the rest
            self._set_deadline()

    def _close_client_with(self, code: int, reason: str) -> list[Action]:
        if self._client_close_sent or self._client_gone:
            return []
        self._client_close_sent = True
        self.gateway_close = (code, reason)
        assert self.u2c is not None
        data = self.u2c.inject(build_close(code, reason))
        return [SendToClient(data)] if data else []

    def _close_upstream_with(self, code: int, reason: str) -> list[Action]:
        if self._up_close_sent or self._up_gone:
            return []
        self._up_close_sent = True
        assert self.c2u is not None
        data = self.c2u.inject(build_close(code, reason, mask=self._random(4)))
        return [SendToUpstream(data)] if data else []

    def _pay_client_close(self) -> list[Action]:
        owed, self._owed_client_close = self._owed_client_close, None
        assert owed is not None
        return self._close_client_with(*owed)

    def _gateway_closes(
        self, code: int, reason: str, now: float, *, upstream_too: bool = True
    ) -> list[Action]:
        """Close both sides ourselves (idle timeout, shutdown)."""
        self._begin_closing("gateway", now)
        actions = self._close_client_with(code, reason)
        if upstream_too:
            actions += self._close_upstream_with(code, reason)
        return actions + self._finish([], now)

    def _client_too_slow(self, now: float) -> list[Action]:
        self._begin_closing("gateway", now)
        self.gateway_close = (CLOSE_GOING_AWAY, "client not reading")
        self._blocked_since = None  # handled: else the deadline stays in the past
        self._client_gone = True
        self._client_closed = True
        actions: list[Action] = [CloseClient(abort=True)]
        actions += self._close_upstream_with(CLOSE_GOING_AWAY, "client not reading")
        return actions + self._finish([], now)

    def _upstream_too_slow(self, now: float) -> list[Action]:
        self._begin_closing("gateway", now)
        self._up_blocked_since = None
        self.upstream_close = self.upstream_close or (1006, "upstream not reading")
        self._up_gone = True
        self._up_closed = True
        actions: list[Action] = [CloseUpstream(abort=True)]
        actions += self._close_client_with(CLOSE_INTERNAL_ERROR, "upstream not reading")
        return actions + self._finish([], now)

    def _close_timeout(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if self._owed_client_close is not None:
            actions += self._pay_client_close()
        if not self._client_closed:
            self._client_closed = True
            actions.append(CloseClient(abort=not self._client_close_sent))
        if not self._up_closed:
            self._up_closed = True
            actions.append(CloseUpstream(abort=True))
        return self._finish(actions, now)

    def _finish(self, actions: list[Action], now: float) -> list[Action]:
        if not self._client_closed and (
            self._client_gone or (self._client_close_sent and self._client_close_rcvd)
        ):
            self._client_closed = True
            actions.append(CloseClient())
        # The upstream's socket closes only after its end of stream (step 5 above: the
        # gateway is its client, and the side that closes first keeps the TIME_WAIT, which on
        # the gateway would hold an ephemeral port toward that upstream for a minute).
        if not self._up_closed and self._up_gone:
            self._up_closed = True
            actions.append(CloseUpstream())
        # Nothing may be relayed to a side once it is closed (the transport half-closed it:
        # a write after write_eof raises), even the rest of a frame in flight.
        if self._client_closed and self.u2c is not None:
            self.u2c.mute()
        if self._up_closed and self.c2u is not None:
            self.c2u.mute()
        if self._client_closed and self._up_closed:
            self.state = State.CLOSED
            self.ended = now
        self._set_deadline()
        return actions

    def _set_deadline(self) -> None:
        if self.state is State.CLOSED:
            self.deadline = None
            return
        candidates = [self._closing_deadline, self._idle_deadline]
        for since in (self._blocked_since, self._up_blocked_since):
            if since is not None:
                candidates.append(since + self.limits.send_timeout)
        self.deadline = min((c for c in candidates if c is not None), default=None)


def _fmt_close(close: tuple[int | None, str] | None) -> str | None:
    if close is None:
        return None
    code, reason = close
    return f"{code if code is not None else 1005} {reason}".strip()
