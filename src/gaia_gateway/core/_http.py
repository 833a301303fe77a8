"""HTTP/1.1 pieces of the handshake: routes, upstream URLs, responses, the upstream request.

The client's request is parsed by h11 (in the session); this module holds the pure helpers
around it. The upstream handshake is not wsproto's client: the gateway must pass the client's
``Sec-WebSocket-Extensions`` offer upstream verbatim and hand the upstream's answer back
verbatim (it never inflates a frame), while wsproto's client would negotiate extensions itself
and refuse an answer it did not offer.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

from wsproto.utilities import generate_accept_token, split_comma_header

__all__ = [
    "Upstream",
    "UpstreamAnswer",
    "UpstreamRequest",
    "http_response",
    "parse_upstream_url",
    "query_pairs",
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
    # ``Host: ...`` for the upstream request, encoded on first use: the IDNA codec is slow,
    # and a route's upstream is one object for the life of the process
    _host_line: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def url(self) -> str:
        scheme = "wss" if self.tls else "ws"
        return f"{scheme}://{self.host}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def host_line(self) -> bytes:
        line = self._host_line
        if line is None:
            line = b"Host: " + self.host_header.encode("idna")
            object.__setattr__(self, "_host_line", line)  # frozen: a cache, not a field's value
        return line


# Control characters have no place in a header value (RFC 9110 5.5).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def query_pairs(query: str) -> list[tuple[str, str]]:
    """``urllib.parse.parse_qsl(query, keep_blank_values=True)``, in a third of its time.

    Empty fields are skipped, a field without ``=`` has the value ``""``, and only a name or
    value that holds ``+`` or ``%`` is decoded, exactly as parse_qsl does.
    """
    pairs = []
    for item in query.split("&"):
        if item:
            name, _, value = item.partition("=")
            if "%" in name or "+" in name:
                name = unquote(name.replace("+", " "))
            if "%" in value or "+" in value:
                value = unquote(value.replace("+", " "))
            pairs.append((name, value))
    return pairs


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
    """Writes the upstream handshake and reads the head of its answer.

    Both are done by hand rather than with an h11 client connection: the request is built
    from values that are already validated (the client's headers passed h11 on the way in,
    our own are generated), and the answer we need is a status line and a few headers. Doing
    so took a third off the gateway's CPU per handshake, measured with ``bench/e2e``.
    """

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
        lines = [
            b"GET " + target.encode("ascii") + b" HTTP/1.1",
            upstream.host_line,
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Key: " + self._key,
            b"Sec-WebSocket-Version: 13",
        ]
        if subprotocols:
            lines.append(b"Sec-WebSocket-Protocol: " + ", ".join(subprotocols).encode("latin-1"))
        if extensions:
            lines.append(b"Sec-WebSocket-Extensions: " + extensions.encode("latin-1"))
        for name, value in identity_headers:
            if not value.isprintable():  # control characters are not printable: mask them
                value = _CONTROL.sub("?", value)
            lines.append(f"{name}: {value}".encode())
        lines.extend(
            name + b": " + value
            for name, value in client_headers
            if name.lower() not in _NOT_FORWARDED
        )
        lines.append(b"\r\n")
        self.bytes = b"\r\n".join(lines)
        self._max = max_response_size
        self._buf = b""
        self.trailing = b""

    def receive_data(self, data: bytes) -> UpstreamAnswer | None:
        """Feed the upstream's bytes; ``None`` until its response head is complete."""
        buf = self._buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                if len(buf) > self._max:
                    return UpstreamAnswer(502, error="upstream response head too large")
                return None
            head, buf = buf[:end], buf[end + 4 :]
            lines = head.split(b"\r\n")
            version, _, rest = lines[0].partition(b" ")
            code = rest[:3]
            if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
                return UpstreamAnswer(502, error="malformed upstream response")
            status = int(code)
            if 100 <= status < 200 and status != 101:
                continue  # 1xx other than 101: skip it (RFC 9110 15.2)
            if status != 101:
                return UpstreamAnswer(status, error=f"upstream answered {status}")
            headers: list[tuple[bytes, bytes]] = []
            for line in lines[1:]:
                name, colon, value = line.partition(b":")
                if not colon or not name or name.strip() != name or b" " in name:
                    return UpstreamAnswer(502, error="malformed upstream response header")
                headers.append((name.lower(), value.strip(b" \t")))
            self.trailing = buf
            return self._check_101(headers)

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
