"""HTTP/1.1 pieces of the handshake: routes, upstream URLs, responses, the upstream request.

The client's request is parsed by h11 (in the session); this module holds the pure helpers
around it. The upstream handshake is written and read with h11 directly rather than through
wsproto's client: the gateway must pass the client's ``Sec-WebSocket-Extensions`` offer
upstream verbatim and hand the upstream's answer back verbatim (it never inflates a frame),
while wsproto's client would negotiate extensions itself and refuse an answer it did not offer.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

import h11
from wsproto.utilities import generate_accept_token, split_comma_header

__all__ = [
    "Upstream",
    "UpstreamAnswer",
    "UpstreamRequest",
    "http_response",
    "parse_upstream_url",
]

# Hop-by-hop headers (RFC 9110 7.6.1), the handshake's own, and the identity headers the
# gateway sets itself: none of the client's copies go upstream.
_NOT_FORWARDED = frozenset(
    (
        b"connection", b"upgrade", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"content-length", b"proxy-authorization", b"proxy-authenticate",
        b"host", b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-accept",
        b"sec-websocket-extensions", b"sec-websocket-protocol",
        b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip",
        b"x-request-id", b"x-user-id", b"forwarded",
    )
)


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a route's websocket goes: ``ws://host:port/path`` or ``wss://...``."""

    host: str
    port: int
    path: str
    tls: bool

    @property
    def url(self) -> str:
        scheme = "wss" if self.tls else "ws"
        return f"{scheme}://{self.host}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def parse_upstream_url(url: str) -> Upstream:
    """Parse ``ws://`` / ``wss://`` URLs (``http(s)://`` accepted as synonyms)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss", "http", "https"):
        raise ValueError(f"upstream URL must start with ws:// or wss://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"upstream URL has no host: {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"upstream URL must not carry a query or fragment: {url!r}")
    tls = scheme in ("wss", "https")
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        raise ValueError(f"upstream URL has an invalid port: {url!r}") from None
    return Upstream(parts.hostname, port, parts.path or "/", tls)


def http_response(
    status: int, body: str = "", headers: Iterable[tuple[str, str]] = (), *,
    content_type: str = "text/plain; charset=utf-8", keep_alive: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response (the connection closes after it unless ``keep_alive``)."""
    payload = body.encode("utf-8")
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:  # a status the stdlib does not name (an upstream's 499, say)
        phrase = ""
    lines = [f"HTTP/1.1 {status} {phrase}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if payload:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(payload)}")
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """The upstream's verdict on our handshake."""

    status: int  # 101 on success
    subprotocol: str | None = None
    extensions: str | None = None  # the raw Sec-WebSocket-Extensions answer
    error: str | None = None  # why the answer is unacceptable (then status is not 101)


class UpstreamRequest:
    """Writes the upstream handshake and reads its answer, with h11 in the client role."""

    def __init__(
        self,
        upstream: Upstream,
        target: str,
        client_headers: Sequence[tuple[bytes, bytes]],
        *,
        nonce: bytes,
        subprotocols: Sequence[str],
        extensions: str | None,
        identity_headers: Sequence[tuple[str, str]],
        max_response_size: int = 16 * 1024,
    ) -> None:
        self._key = base64.b64encode(nonce)
        self._subprotocols = tuple(subprotocols)
        self._offered_extensions = frozenset(
            e.split(";", 1)[0].strip().lower() for e in split_comma_header(extensions.encode())
        ) if extensions else frozenset()
        headers: list[tuple[bytes | str, bytes | str]] = [
            ("Host", upstream.host_header),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", self._key),
            ("Sec-WebSocket-Version", "13"),
        ]
        if subprotocols:
            headers.append(("Sec-WebSocket-Protocol", ", ".join(subprotocols)))
        if extensions:
            headers.append(("Sec-WebSocket-Extensions", extensions))
        headers.extend(identity_headers)
        headers.extend(
            (name, value) for name, value in client_headers if name.lower() not in _NOT_FORWARDED
        )
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_response_size)
        self.bytes = self._conn.send(h11.Request(method="GET", target=target, headers=headers))
        self.trailing = b""

    def receive_data(self, data: bytes) -> UpstreamAnswer | None:
        """Feed the upstream's bytes; ``None`` until its response head is complete."""
        conn = self._conn
        try:
            conn.receive_data(data)
            event = conn.next_event()
            while isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                event = conn.next_event()  # 1xx other than 101: skip (RFC 9110 15.2)
        except h11.RemoteProtocolError as exc:
            return UpstreamAnswer(502, error=f"malformed upstream response: {exc}")
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.InformationalResponse):
            self.trailing = conn.trailing_data[0]
            return self._check_101(event.headers)
        if isinstance(event, h11.Response):
            return UpstreamAnswer(event.status_code, error=f"upstream answered {event.status_code}")
        return UpstreamAnswer(502, error="upstream closed during the handshake")

    def _check_101(self, headers: Iterable[tuple[bytes, bytes]]) -> UpstreamAnswer:
        upgrade = connection = accept = b""
        protocol: str | None = None
        extensions: list[bytes] = []
        for name, value in headers:
            if name == b"upgrade":
                upgrade = value
            elif name == b"connection":
                connection = value
            elif name == b"sec-websocket-accept":
                accept = value
            elif name == b"sec-websocket-protocol":
                protocol = value.decode("latin-1")
            elif name == b"sec-websocket-extensions":
                extensions.append(value)
        if upgrade.lower() != b"websocket" or b"upgrade" not in connection.lower():
            return UpstreamAnswer(502, error="upstream 101 without Upgrade: websocket")
        if accept != generate_accept_token(self._key):
            return UpstreamAnswer(502, error="upstream sent a wrong Sec-WebSocket-Accept")
        if protocol is not None and protocol not in self._subprotocols:
            return UpstreamAnswer(502, error="upstream chose a subprotocol nobody offered")
        raw_ext = b", ".join(extensions).decode("latin-1") if extensions else None
        if raw_ext:
            try:
                answered = split_comma_header(raw_ext.encode("latin-1"))
            except UnicodeDecodeError:  # wsproto splits it as ASCII
                return UpstreamAnswer(502, error="upstream sent a non-ASCII extension header")
            for ext in answered:
                if ext.split(";", 1)[0].strip().lower() not in self._offered_extensions:
                    return UpstreamAnswer(502, error="upstream chose an extension nobody offered")
        return UpstreamAnswer(101, subprotocol=protocol, extensions=raw_ext)
