"""Byte builders and drivers shared by the core tests.

Frames, close payloads, tokens, handshake requests and a few functions that run a
:class:`~gaia_gateway.core.Session` to a known state. Everything is deterministic: a fixed
clock (``NOW``) and a fixed "random" source (``RANDOM``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import h11
import jwt
from wsproto.utilities import generate_accept_token

from gaia_gateway.core import (
    Action,
    AuthConfig,
    Authenticator,
    Gateway,
    Limits,
    SendToClient,
    SendToUpstream,
    Session,
    State,
    Upstream,
)

NOW = 1_700_000_000.0
SECRET = "gaia-test-secret-0123456789abcdef-xyz"  # >= 32 bytes: no PyJWT key-length warning
MASK = b"\x37\xfa\x21\x3d"
CLIENT_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample nonce
CLIENT_ADDR = "203.0.113.7"
REQUEST_ID = "req-0001"
UPSTREAM = Upstream("backend.internal", 8000, "/kb/ws", False)
ROUTE = "/ws"


def RANDOM(n: int) -> bytes:
    return b"\x01" * n


# ------------------------------------------------------------------------ frames

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def _xor(payload: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """One frame. ``length`` overrides the declared payload length (for lying headers)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv & 0x70) | opcode
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 1 << 16:
        head = bytes((b0, mbit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + _xor(payload, mask)


def cframe(opcode: int, payload: bytes = b"", **kw: Any) -> bytes:
    """A client frame: masked (with ``MASK`` unless another mask is given)."""
    kw.setdefault("mask", MASK)
    return frame(opcode, payload, **kw)


def sframe(opcode: int, payload: bytes = b"", **kw: Any) -> bytes:
    """A server frame: unmasked."""
    return frame(opcode, payload, mask=None, **kw)


def close_payload(code: int | None, reason: str | bytes = b"") -> bytes:
    if code is None:
        return b""
    body = reason.encode() if isinstance(reason, str) else reason
    return code.to_bytes(2, "big") + body


def cclose(code: int | None, reason: str | bytes = b"") -> bytes:
    return cframe(OP_CLOSE, close_payload(code, reason))


def sclose(code: int | None, reason: str | bytes = b"") -> bytes:
    return sframe(OP_CLOSE, close_payload(code, reason))


@dataclass(frozen=True)
class Frame:
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes  # unmasked

    @property
    def close(self) -> tuple[int | None, str]:
        assert self.opcode == OP_CLOSE
        if not self.payload:
            return None, ""
        return int.from_bytes(self.payload[:2], "big"), self.payload[2:].decode()


def parse_frames(data: bytes) -> list[Frame]:
    """Split a byte stream into complete frames; fails on a trailing partial frame."""
    frames: list[Frame] = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        n = b1 & 0x7F
        pos += 2
        if n == 126:
            n = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        elif n == 127:
            n = int.from_bytes(data[pos : pos + 8], "big")
            pos += 8
        mask = None
        if b1 & 0x80:
            mask = data[pos : pos + 4]
            pos += 4
        payload = data[pos : pos + n]
        assert len(payload) == n, "partial frame at the end of the stream"
        pos += n
        frames.append(
            Frame(bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F, mask is not None,
                  _xor(payload, mask) if mask else payload)
        )
    return frames


def parse_close(data: bytes, *, masked: bool) -> tuple[int | None, str]:
    """The (code, reason) of ``data``, which must be exactly one close frame."""
    (f,) = parse_frames(data)
    assert f.opcode == OP_CLOSE and f.fin and f.masked is masked
    return f.close


# ------------------------------------------------------------------------ tokens


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid Supabase-like claims at ``NOW``; an override of ``None`` removes the claim."""
    c: dict[str, Any] = {
        "sub": "user-42",
        "aud": "authenticated",
        "role": "authenticated",
        "iat": int(NOW) - 10,
        "exp": int(NOW) + 3600,
    }
    c.update(overrides)
    return {k: v for k, v in c.items() if v is not None}


def token(key: Any = SECRET, alg: str = "HS256", headers: dict[str, Any] | None = None,
          **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


def raw_token(header: dict[str, Any], payload: dict[str, Any], sign_key: bytes | None) -> str:
    """A JWT assembled by hand (HS256 over any key bytes, or unsigned when ``sign_key`` is None)."""
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(payload, separators=(",", ":")).encode())
    )
    if sign_key is None:
        return signing_input + "."
    sig = hmac.new(sign_key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


def hs_authenticator(**config: Any) -> Authenticator:
    return Authenticator(AuthConfig(**config), secret=SECRET)


# ----------------------------------------------------------------------- requests


def request(
    path: str = ROUTE,
    query: str | None = None,
    *,
    tok: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    method: str = "GET",
    key: str | None = CLIENT_KEY,
    version: str | None = "13",
    upgrade: bool = True,
    host: str = "gateway.example",
) -> bytes:
    """A client handshake request; ``tok`` goes in ``?token=`` (after ``query`` if any)."""
    target = path
    params = [p for p in (query, f"token={tok}" if tok is not None else None) if p]
    if params:
        target += "?" + "&".join(params)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class Parsed:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased, as h11 gives them

    def get(self, name: str) -> list[bytes]:
        return [v for k, v in self.headers if k == name.lower().encode()]

    def one(self, name: str) -> str:
        (value,) = self.get(name)
        return value.decode("latin-1")


def parse_request(data: bytes) -> Parsed:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    assert conn.next_event() == h11.EndOfMessage()
    return Parsed(event.method, event.target, list(event.headers))


def parse_response(data: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) of a response the gateway sent to the client."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return status, headers, body


def header(headers: Iterable[tuple[bytes, bytes]], name: str) -> list[bytes]:
    return [v for k, v in headers if k == name.lower().encode()]


def upstream_101(
    upstream_request: bytes,
    *,
    protocol: str | None = None,
    extensions: str | None = None,
    accept: bytes | None = None,
    extra: bytes = b"",
) -> bytes:
    """The upstream's 101 for the gateway's request (correct accept key unless given)."""
    key = parse_request(upstream_request).get("sec-websocket-key")[0]
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + (accept if accept is not None else generate_accept_token(key)),
    ]
    if protocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + protocol.encode())
    if extensions is not None:
        lines.append(b"Sec-WebSocket-Extensions: " + extensions.encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + extra


# ----------------------------------------------------------------------- sessions


def make_gateway(
    auth: Authenticator | None = None,
    limits: Limits | None = None,
    *,
    routes: dict[str, Upstream] | None = None,
    **kw: Any,
) -> Gateway:
    return Gateway(routes or {ROUTE: UPSTREAM}, auth or hs_authenticator(), limits, **kw)


def make_session(gateway: Gateway | None = None, *, tls: bool = True,
                 now: float = NOW) -> Session:
    return Session(gateway or make_gateway(), client_addr=CLIENT_ADDR, tls=tls,
                   request_id=REQUEST_ID, now=now, random=RANDOM)


def to_client(actions: Iterable[Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendToClient))


def to_upstream(actions: Iterable[Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendToUpstream))


def kinds(actions: Iterable[Action]) -> list[type]:
    return [type(a) for a in actions]


@dataclass
class Opened:
    session: Session
    upstream_request: bytes  # what the gateway sent upstream
    actions: list[Action]  # the actions returned for the upstream's 101


def open_session(
    gateway: Gateway | None = None,
    req: bytes | None = None,
    *,
    protocol: str | None = None,
    extensions: str | None = None,
    now: float = NOW,
) -> Opened:
    """Run a session through the handshake to OPEN, checking each step's actions."""
    s = make_session(gateway, now=now)
    actions = s.receive_client(req if req is not None else request(tok=token()), now)
    assert [type(a).__name__ for a in actions] == ["ConnectUpstream"], actions
    actions = s.upstream_connected(now)
    (send,) = actions
    assert isinstance(send, SendToUpstream)
    actions = s.receive_upstream(
        upstream_101(send.data, protocol=protocol, extensions=extensions), now
    )
    assert s.state is State.OPEN, (s.state, s.reason)
    return Opened(s, send.data, actions)


# ----------------------------------------------------------------------- RSA / JWKS


@functools.cache
def rsa_key(name: str = "a") -> Any:
    """A 2048-bit RSA private key, made once per name per test run."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(name: str = "a") -> bytes:
    from cryptography.hazmat.primitives import serialization

    return rsa_key(name).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(name: str, kid: str) -> dict[str, Any]:
    from jwt.algorithms import RSAAlgorithm

    d = RSAAlgorithm.to_jwk(rsa_key(name).public_key(), as_dict=True)
    d.update(kid=kid, alg="RS256", use="sig")
    return d


def jwks(*pairs: tuple[str, str]) -> dict[str, Any]:
    """A JWKS document from (key name, kid) pairs."""
    return {"keys": [jwk(name, kid) for name, kid in pairs]}


def rs_token(name: str = "a", kid: str | None = None, **overrides: Any) -> str:
    return token(rsa_key(name), "RS256", {"kid": kid} if kid else None, **overrides)
