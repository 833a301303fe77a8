"""The server side of the WebSocket opening handshake (RFC 6455 4.2), on h11's parsed request.

wsproto's ``H11Handshake`` does the same checks, but only on bytes it parses itself with a
second h11 connection, and it writes the 101 through h11 as well. Measured here, those two
steps cost more CPU than verifying the JWT: about 40% of the core's handshake. The gateway
has already parsed the request with h11 (it must, to route /health, 404, 405 and 426), so it
validates the parsed request here and writes the 101 itself, with wsproto's own helpers for
the accept token and for header lists.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

import h11
from wsproto.utilities import generate_accept_token, split_comma_header

__all__ = ["UpgradeRefused", "UpgradeRequest", "check_upgrade", "switching_protocols"]


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    key: bytes
    subprotocols: list[str]
    extensions: str | None  # the raw Sec-WebSocket-Extensions offer, joined
    headers: list[tuple[bytes, bytes]]  # every header, names lower-cased by h11


@dataclass(frozen=True, slots=True)
class UpgradeRefused:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()


_VERSION_HEADERS = (("Sec-WebSocket-Version", "13"),)
_GOOD_HOSTS: set[bytes] = set()  # Host values that passed the IDNA check (the codec is slow)


def header_list(req: h11.Request) -> list[tuple[bytes, bytes]]:
    """The request's (lower-case name, value) pairs.

    ``list(req.headers)`` goes through the generic ``Sequence`` iterator, one
    ``__getitem__`` call per header (about a tenth of the core's handshake CPU here); the
    items behind it are read directly when this h11 has them.
    """
    full = getattr(req.headers, "_full_items", None)
    if isinstance(full, list):
        return [(name, value) for _raw, name, value in full]
    return list(req.headers)


def check_upgrade(req: h11.Request, headers: list[tuple[bytes, bytes]] | None = None
                  ) -> UpgradeRequest | UpgradeRefused:
    """RFC 6455 4.2.1: what a server must find in the client's opening handshake."""
    if req.http_version != b"1.1":
        return UpgradeRefused(400, "websocket needs HTTP/1.1")
    host = key = version = None
    connection: list[bytes] = []
    subprotocols: list[str] = []
    extensions: list[bytes] = []
    if headers is None:
        headers = header_list(req)
    try:
        for name, value in headers:
            if name == b"host":
                if value not in _GOOD_HOSTS:
                    value.decode("idna")  # as wsproto does: a Host that is no hostname is a 400
                    if len(_GOOD_HOSTS) < 256:  # clients name the same few hosts
                        _GOOD_HOSTS.add(value)
                host = value
            elif name == b"connection":
                value.decode("ascii")
                connection.extend(t.strip().lower() for t in value.split(b","))
            elif name == b"sec-websocket-key":
                key = value
            elif name == b"sec-websocket-version":
                version = value
            elif name == b"sec-websocket-protocol":
                subprotocols.extend(split_comma_header(value))
            elif name == b"sec-websocket-extensions":
                value.decode("ascii")
                extensions.append(value)
    except UnicodeError:
        return UpgradeRefused(400, "undecodable websocket handshake header")
    if b"upgrade" not in connection:
        return UpgradeRefused(400, "missing header 'Connection: Upgrade'")
    if version != b"13":
        # 4.2.2: "If this version does not match a version understood by the server, the
        # server MUST abort the WebSocket handshake ... and send ... |Sec-WebSocket-Version|"
        if version is None:
            return UpgradeRefused(400, "missing header 'Sec-WebSocket-Version'", _VERSION_HEADERS)
        return UpgradeRefused(426, "unsupported websocket version", _VERSION_HEADERS)
    if key is None:
        return UpgradeRefused(400, "missing header 'Sec-WebSocket-Key'")
    try:
        nonce = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:  # "a randomly selected 16-byte value that has been base64-encoded"
        return UpgradeRefused(400, "invalid 'Sec-WebSocket-Key'")
    if host is None:
        return UpgradeRefused(400, "missing header 'Host'")
    raw_ext = b", ".join(extensions).decode("ascii") if extensions else None
    return UpgradeRequest(key, subprotocols, raw_ext, headers)


def switching_protocols(
    key: bytes,
    subprotocol: str | None,
    extensions: str | None,
    extra: Sequence[tuple[str, str]] = (),
) -> bytes:
    """The 101 response (4.2.2, step 5)."""
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + generate_accept_token(key),
    ]
    if subprotocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("ascii"))
    if extensions:
        lines.append(b"Sec-WebSocket-Extensions: " + extensions.encode("latin-1"))
    lines.extend(f"{name}: {value}".encode("latin-1") for name, value in extra)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)
