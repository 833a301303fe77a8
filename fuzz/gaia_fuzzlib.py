"""Shared by the hypothesis properties (tests/fuzz/) and the atheris harnesses (fuzz/).

Everything here is deterministic: an explicit clock (``NOW`` plus small steps) and a "random"
source that returns zeros, so a failing input replays exactly.

The contract checked (the core's, see ``gaia_gateway.core._session``):

* no exception escapes ``Session.receive_client`` / ``receive_upstream`` / ``FrameRelay.feed``
  (nor the timer and end-of-stream inputs) on any peer bytes;
* every action is one of the documented types for the phase it is returned in;
* a refused handshake is ``[CloseUpstream(abort)]? + [Rejected, SendToClient(response),
  CloseClient]`` with a status from the documented set and a response whose status line says
  the same, after which the session is CLOSED with no deadline and answers nothing more;
* a session that is not refused is either waiting with a deadline (so a timer will end it) or
  has asked for its upstream (``ConnectUpstream``);
* once the relay runs, every byte sent to one side is the other side's own bytes, in order,
  optionally followed by *one* close frame of the gateway's own, which starts at a frame
  boundary of the peer's stream and is the last thing sent (see :func:`check_relayed`);
* the forwarded prefix and the signal (close frame or violation, and its close code) agree
  with an independent RFC 6455 reference scanner (:func:`ref_scan`);
* a violation's close code is 1002, 1007 or 1009, and is what the offending peer is sent;
* nothing is sent to a side after the core asked to close it (``CloseClient`` /
  ``CloseUpstream``): the transport half-closes that socket, and a write after write_eof
  raises;
* after an end of stream or a far timer the session reaches CLOSED with no deadline, and each
  socket was closed exactly once (``CloseClient`` always, ``CloseUpstream`` iff the upstream
  was asked for). Each timer that fires makes progress (the deadline moves on or goes away).

A broken invariant raises :class:`InvariantError` (an ``AssertionError``), so hypothesis
shrinks it and atheris records a crash.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
from wsproto.utilities import generate_accept_token

from gaia_gateway.core import (
    Accepted,
    Action,
    AuthConfig,
    Authenticator,
    CloseClient,
    CloseUpstream,
    ConnectUpstream,
    FrameRelay,
    Gateway,
    Limits,
    Rejected,
    SendToClient,
    SendToUpstream,
    Session,
    State,
    Upstream,
)

# --------------------------------------------------------------------------- constants

NOW = 1_700_000_000.0
STEP = 0.001  # the clock moves this much between two inputs (well under every timeout)
SECRET = "gaia-fuzz-secret-0123456789abcdef-xyz"
ROUTE = "/ws/experience"
UPSTREAM = Upstream("127.0.0.1", 8001, "/ws/experience", False)
MASK = b"\x37\xfa\x21\x3d"
ZERO_MASK = b"\x00\x00\x00\x00"
CLIENT_KEY = "dGhlIHNhbXBsZSBub25jZQ=="

#: every status a client's bytes can earn (plus 408 from the handshake timer)
REJECT_STATUSES = frozenset({400, 403, 404, 405, 408, 414, 426, 431, 503})
#: the close codes a peer's protocol violation earns
VIOLATION_CODES = frozenset({1002, 1007, 1009})
_WIRE_CODES = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015))


def zeros(n: int) -> bytes:
    """The session's ``random``: deterministic, so gateway close frames are predictable."""
    return b"\x00" * n


class InvariantError(AssertionError):
    """The core produced an outcome its contract does not document."""


def check(cond: object, msg: str, *context: object) -> None:
    if not cond:
        detail = "; ".join(repr(c)[:600] for c in context)
        raise InvariantError(f"{msg}" + (f" [{detail}]" if detail else ""))


def _tok(**over: Any) -> str:
    claims = {"sub": "user-42", "aud": "authenticated", "exp": int(NOW) + 3600}
    claims.update(over)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, SECRET, "HS256")


TOKEN = _tok()
EXPIRED_TOKEN = _tok(exp=int(NOW) - 1)
NO_SUB_TOKEN = _tok(sub=None)
WRONG_AUD_TOKEN = _tok(aud="anon")
BAD_SIG_TOKEN = TOKEN[:-4] + ("AAAA" if not TOKEN.endswith("AAAA") else "BBBB")

# ------------------------------------------------------------------------- gateways


def _auth() -> Authenticator:
    return Authenticator(AuthConfig(), secret=SECRET)


def make_gateway(variant: int = 0) -> Gateway:
    """A few gateway configurations; ``variant`` is taken modulo :data:`GATEWAY_VARIANTS`."""
    v = variant % GATEWAY_VARIANTS
    routes = {ROUTE: UPSTREAM, "/other": Upstream("::1", 443, "/", True)}
    if v == 0:
        return Gateway(routes, _auth())
    if v == 1:  # tight limits: 431/414/early-bytes paths with small inputs
        limits = Limits(max_header_bytes=512, max_headers=8, max_early_bytes=48,
                        max_message_size=64)
        return Gateway(routes, _auth(), limits)
    if v == 2:
        return Gateway(routes, _auth(), allowed_origins=frozenset({"https://game.example"}))
    if v == 3:
        gw = Gateway(routes, _auth())
        gw.draining = True
        return gw
    gw = Gateway(routes, _auth(), max_connections=10)  # full: 503
    gw.open_connections = 11
    return gw


GATEWAY_VARIANTS = 5


def new_session(gateway: Gateway, now: float = NOW) -> Session:
    return Session(gateway, client_addr="198.51.100.7", tls=False, request_id="fuzz-1",
                   now=now, random=zeros)


# ------------------------------------------------------------------------ handshakes


def handshake(
    target: str = ROUTE + "?token=" + TOKEN,
    *,
    method: str = "GET",
    version: str = "HTTP/1.1",
    headers: Sequence[tuple[str, str]] = (),
    upgrade: bool = True,
    key: str | None = CLIENT_KEY,
    ws_version: str | None = "13",
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {target} {version}", "Host: gateway.example"]
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if ws_version is not None:
        lines.append(f"Sec-WebSocket-Version: {ws_version}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def handshake_seeds() -> list[bytes]:
    """Valid and almost-valid handshakes that reach every branch of the request path."""
    ok = handshake()
    return [
        ok,
        handshake(ROUTE, headers=[("Authorization", "Bearer " + TOKEN)]),
        handshake(ROUTE + "?experience=wylding-woods",
                  headers=[("Sec-WebSocket-Protocol", f"bearer.{TOKEN}, chat.v1")]),
        handshake(headers=[("Sec-WebSocket-Extensions",
                            "permessage-deflate; client_max_window_bits"),
                           ("Origin", "https://game.example"), ("Cookie", "a=b; c=d")]),
        handshake("/health", upgrade=False, key=None, ws_version=None),
        handshake("/health", method="HEAD", upgrade=False, key=None, ws_version=None),
        handshake(method="POST", headers=[("Content-Length", "0")]),
        handshake("/nope?token=" + TOKEN),
        handshake(upgrade=False),
        handshake(ws_version="8"),
        handshake(key=None),
        handshake(ROUTE + "?token=" + EXPIRED_TOKEN),
        handshake(ROUTE + "?token=" + BAD_SIG_TOKEN),
        handshake(ROUTE + "?token=" + WRONG_AUD_TOKEN + "&experience=x"),
        handshake(ROUTE + "?token=" + NO_SUB_TOKEN),
        handshake(ROUTE),
        handshake(headers=[("Content-Length", "5")], body=b"hello"),
        handshake(headers=[("Transfer-Encoding", "chunked")], body=b"0\r\n\r\n"),
        handshake(version="HTTP/1.0"),
        handshake(headers=[("Origin", "https://evil.example")]),
        ok + cframe(1, b"early hello") + cframe(9, b"p"),
        ok + ok,
        handshake(headers=[(f"X-Pad-{i}", "v" * 40) for i in range(12)]),
        handshake(ROUTE + "?token=" + TOKEN + "&pad=" + "a" * 600),
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on a plain port
    ]


def upstream_101(request_bytes: bytes, *, protocol: str | None = None,
                 extensions: str | None = None, extra: bytes = b"") -> bytes:
    """The upstream's 101 for the request the gateway sent it (accept key computed)."""
    key = b""
    for line in request_bytes.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + generate_accept_token(key),
    ]
    if protocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + protocol.encode())
    if extensions is not None:
        lines.append(b"Sec-WebSocket-Extensions: " + extensions.encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + extra


#: the Sec-WebSocket-Key the gateway sends upstream when ``random`` is :func:`zeros`
UPSTREAM_KEY = base64.b64encode(zeros(16))


def upstream_answer_seeds() -> list[bytes]:
    """Upstream answers to the gateway's handshake: good, refusing, lying, 1xx, junk."""
    ok = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: " + generate_accept_token(UPSTREAM_KEY) + b"\r\n")
    return [
        ok + b"\r\n",
        ok + b"Sec-WebSocket-Protocol: chat.v2\r\n\r\n",
        ok + b"Sec-WebSocket-Protocol: nobody-offered-this\r\n\r\n",
        ok + b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n",
        ok + b"Sec-WebSocket-Extensions: x-custom-ext\r\n\r\n",
        ok + b"\r\n" + sframe(1, b"hello") + sframe(2, b"x", rsv=0x40) + sframe(8, b"\x03\xe8"),
        b"HTTP/1.1 100 Continue\r\n\r\n" + ok + b"\r\n",
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 499 Client Closed Request\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
        ok.replace(b"Sec-WebSocket-Accept: ", b"Sec-WebSocket-Accept: x") + b"\r\n",
        ok.replace(b"Upgrade: websocket", b"Upgrade: h2c") + b"\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nbody",
        b"SSH-2.0-OpenSSH_9.6\r\n",
    ]


# --------------------------------------------------------------------------- frames


def _xor(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
          mask: bytes | None = None, length: int | None = None, wide: int = 0) -> bytes:
    """One frame; ``length`` lies about the size, ``wide`` forces the 16- (1) or 64-bit (2)
    length form (legal on the relay, which does not insist on minimal encodings)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv & 0x70) | (opcode & 0x0F)
    mbit = 0x80 if mask is not None else 0
    if n < 126 and not wide:
        head = bytes((b0, mbit | n))
    elif n < 1 << 16 and wide != 2:
        head = bytes((b0, mbit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + _xor(payload, mask)


def cframe(opcode: int, payload: bytes = b"", **kw: Any) -> bytes:
    kw.setdefault("mask", MASK)
    return frame(opcode, payload, **kw)


def sframe(opcode: int, payload: bytes = b"", **kw: Any) -> bytes:
    return frame(opcode, payload, mask=None, **kw)


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    return b"" if code is None else code.to_bytes(2, "big") + reason


@dataclass(frozen=True)
class Msg:
    """A data message for :func:`build_stream`: fragments, control frames in between."""

    opcode: int  # 1 or 2
    fragments: tuple[bytes, ...]
    pings: tuple[int, ...] = ()  # after which fragment indices a ping goes
    mask: bytes = MASK
    compressed: bool = False  # RSV1 on the first frame (permessage-deflate)


def build_stream(msgs: Iterable[Msg], *, masked: bool, close: tuple[int, bytes] | None = None,
                 close_mask: bytes = MASK) -> bytes:
    """A valid stream: each message's fragments with pings between, then a close if given."""
    out = bytearray()
    for m in msgs:
        frags = m.fragments or (b"",)
        for i, payload in enumerate(frags):
            op = m.opcode if i == 0 else 0
            rsv = 0x40 if (m.compressed and i == 0) else 0
            mask = m.mask if masked else None
            out += frame(op, payload, fin=i == len(frags) - 1, rsv=rsv, mask=mask)
            if i in m.pings:
                out += frame(9 + (i & 1), b"ping%d" % i, mask=m.mask if masked else None)
    if close is not None:
        out += frame(8, close_payload(*close), mask=close_mask if masked else None)
    return bytes(out)


def frame_seeds(masked: bool) -> list[bytes]:
    """Valid and broken client (``masked``) or server frame streams."""
    f = cframe if masked else sframe
    big = bytes(range(256)) * 2
    return [
        f(1, b"hello") + f(2, b"\x00\x01\x02") + f(9, b"") + f(10, b"pong"),
        f(1, b"frag-", fin=False) + f(9, b"x") + f(0, b"ment", fin=False) + f(0, b"ed"),
        f(2, big) + f(2, big[:130], wide=2),
        f(1, b"x" * 70) + f(8, close_payload(1000, b"bye")),
        f(8, close_payload(4000, "ünïcode".encode())),
        f(8, b""),
        f(8, b"\x03"),  # 1-byte close payload
        f(8, close_payload(1005)),  # a code no endpoint may send
        f(8, close_payload(1000, b"\xff\xfe")),  # reason not UTF-8: 1007
        f(1, b"a", fin=False) + f(1, b"b"),  # new message inside a message
        f(0, b"stray"),  # continuation with nothing to continue
        f(3, b"reserved"),
        f(11, b"reserved control"),
        f(9, b"p" * 126),  # control payload too long
        f(9, b"p", fin=False),  # fragmented control
        f(1, b"rsv", rsv=0x40),  # RSV1 without (or with) permessage-deflate
        f(1, b"rsv", rsv=0x40) + f(0, b"x", rsv=0x40, fin=False),
        f(1, b"", length=2**63 - 1, wide=2),  # absurd declared size: 1009 before any payload
        f(2, b"z" * 40, fin=False) + f(0, b"z" * 40),  # over a 64-byte limit across fragments
        frame(1, b"wrong mask", mask=None if masked else MASK),
        f(1, b"short", length=200),  # a header promising more than the stream holds
        f(9, b"") * 3 + f(8, close_payload(1001)) + f(1, b"after close"),
    ]


# ------------------------------------------------------------------------- mutations

DICTIONARY: tuple[bytes, ...] = (
    b"\r\n", b"\n", b"\r\n\r\n", b":", b" ", b"\t", b"\x00", b"\xff", b"%", b"%00", b"?", b"&",
    b"&token=", b"?token=", b"Content-Length: 1\r\n", b"Content-Length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Upgrade: websocket\r\n", b"Connection: close\r\n",
    b"Sec-WebSocket-Version: 13\r\n", b"Sec-WebSocket-Protocol: bearer.\r\n",
    b"Sec-WebSocket-Extensions: permessage-deflate\r\n", b"Origin: null\r\n",
    b"Expect: 100-continue\r\n", b"Authorization: Bearer x\r\n", b"HTTP/1.0", b"HTTP/2.0",
    b"/health", b"/other", b"GET ", b"POST ", b"\x81\x85", b"\x88\x80", b"\x88\x82\x00\x00\x00\x00",
    b"\x7f", b"\x7e\xff\xff", b"\xff" * 8, b"\x80", b"\x00" * 4, TOKEN.encode()[:40],
)


def mutate(data: bytes, ops: Iterable[tuple[int, int, int]]) -> bytes:
    """Apply byte-level mutations; each op is ``(kind, where, arg)`` of plain integers, so
    hypothesis shrinks them and a fuzzer can encode them."""
    buf = bytearray(data)
    for kind, where, arg in ops:
        n = len(buf)
        pos = where % (n + 1)
        kind %= 8
        if kind == 0 and n:  # flip bits of one byte
            buf[pos % n] ^= (arg % 255) + 1
        elif kind == 1 and n:  # set a byte
            buf[pos % n] = arg % 256
        elif kind == 2:  # truncate
            del buf[pos:]
        elif kind == 3 and n:  # duplicate a slice
            end = min(n, pos + 1 + arg % 64)
            buf[pos:pos] = buf[pos:end]
        elif kind == 4:  # insert a dictionary token
            buf[pos:pos] = DICTIONARY[arg % len(DICTIONARY)]
        elif kind == 5:  # insert a run of one byte
            buf[pos:pos] = bytes((arg % 256,)) * (1 + (arg >> 8) % 32)
        elif kind == 6 and n:  # delete a slice
            del buf[pos : pos + 1 + arg % 32]
        elif kind == 7 and n > 1:  # swap two bytes
            other = arg % n
            p = pos % n
            buf[p], buf[other] = buf[other], buf[p]
    return bytes(buf)


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (taken modulo its length); no empty chunks."""
    n = len(data)
    points = sorted({c % (n + 1) for c in cuts} | {0, n})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def split_on(data: bytes, sep: int) -> list[bytes]:
    """The fuzzers' splitting: ``sep`` marks the chunk boundaries and is dropped."""
    return [c for c in data.split(bytes((sep,))) if c]


# ------------------------------------------------------------------- reference scanner


@dataclass
class Ref:
    """What RFC 6455 says about a stream, scanned independently of FrameRelay.

    ``upto``: bytes a cut-through relay may have forwarded (everything before an incomplete
    header or an incomplete close frame; a frame whose header is complete is forwardable even
    if its payload is not). ``kind``: ``"open"`` (no signal), ``"close"`` (a valid close frame
    at ``pos``..``end``) or ``"violation"`` (the frame at ``pos`` breaks a rule; ``codes``
    holds the close code of every rule it breaks, any of which the relay may report).
    ``boundaries``: the offsets where a frame starts (or the stream ends after one).
    """

    upto: int
    kind: str = "open"
    pos: int = 0
    end: int = 0
    codes: frozenset[int] = frozenset()
    close_code: int | None = None
    messages: int = 0
    boundaries: list[int] = field(default_factory=lambda: [0])


def _close_problem(payload: bytes) -> int | None:
    if not payload:
        return None
    if len(payload) == 1:
        return 1002
    code = int.from_bytes(payload[:2], "big")
    if code not in _WIRE_CODES and not 3000 <= code <= 4999:
        return 1002
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return 1007
    return None


def ref_scan(data: bytes, *, masked: bool, max_message: int, rsv_first: int = 0,
             rsv_cont: int = 0) -> Ref:
    n = len(data)
    pos = 0
    in_msg = False
    msg_size = 0
    messages = 0
    boundaries = [0]
    while pos < n:
        left = n - pos
        if left < 2:
            return Ref(pos, messages=messages, boundaries=boundaries)
        b0, b1 = data[pos], data[pos + 1]
        length = b1 & 0x7F
        hlen = 2
        if length == 126:
            if left < 4:
                return Ref(pos, messages=messages, boundaries=boundaries)
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            hlen = 4
        elif length == 127:
            if left < 10:
                return Ref(pos, messages=messages, boundaries=boundaries)
            length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            hlen = 10
        fin, rsv, op, has_mask = b0 & 0x80, b0 & 0x70, b0 & 0x0F, bool(b1 & 0x80)
        codes: set[int] = set()
        if has_mask != masked:
            codes.add(1002)
        if op < 8:
            if op == 0:
                if not in_msg:
                    codes.add(1002)
                size, allowed = msg_size + length, rsv_cont
            elif op in (1, 2):
                if in_msg:
                    codes.add(1002)
                size, allowed = length, rsv_first
            else:
                codes.add(1002)
                size, allowed = length, 0x70
            if size > max_message:
                codes.add(1009)
            if rsv & ~allowed:
                codes.add(1002)
        else:
            if op > 10 or length > 125 or not fin or rsv:
                codes.add(1002)
        if codes:
            return Ref(pos, "violation", pos, pos, frozenset(codes), messages=messages,
                       boundaries=boundaries)
        end = pos + hlen + (4 if masked else 0) + length
        if op == 8:
            if end > n:
                return Ref(pos, messages=messages, boundaries=boundaries)
            body = data[pos + hlen + (4 if masked else 0) : end]
            if masked:
                body = _xor(body, data[pos + hlen : pos + hlen + 4])
            problem = _close_problem(body)
            if problem is not None:
                return Ref(pos, "violation", pos, pos, frozenset({problem}), messages=messages,
                           boundaries=boundaries)
            code = int.from_bytes(body[:2], "big") if body else None
            return Ref(pos, "close", pos, end, close_code=code, messages=messages,
                       boundaries=boundaries)
        if op < 8:
            if fin:
                in_msg, msg_size = False, 0
                messages += 1
            else:
                in_msg, msg_size = True, size
        pos = end
        if pos <= n:
            boundaries.append(pos)
    return Ref(n, messages=messages, boundaries=boundaries)


def parse_one_close(data: bytes, *, masked: bool) -> tuple[int | None, bytes]:
    """(code, reason) of ``data``, which must be exactly one close frame."""
    check(len(data) >= 2 and data[0] == 0x88, "not a close frame", data)
    check(bool(data[1] & 0x80) == masked, "close frame masking is wrong", data)
    length = data[1] & 0x7F
    head = 6 if masked else 2
    check(length <= 125 and len(data) == head + length, "close frame length is wrong", data)
    body = data[head:]
    if masked:
        body = _xor(body, data[2:6])
    if not body:
        return None, b""
    return int.from_bytes(body[:2], "big"), body[2:]


# ---------------------------------------------------------------------------- drivers

HANDSHAKE_ACTIONS = (SendToClient, CloseClient, CloseUpstream, Rejected, ConnectUpstream)
OPEN_ACTIONS = (SendToClient, SendToUpstream, CloseClient, CloseUpstream)
WAITING = (State.REQUEST, State.AUTH_WAIT, State.CONNECTING, State.UPSTREAM_HANDSHAKE,
           State.CLOSING)


class Driver:
    """Feeds one session and checks, after every input, what every input must satisfy."""

    def __init__(self, session: Session, now: float = NOW) -> None:
        self.s = session
        self.t = now
        self.actions: list[Action] = []
        self.to_client = bytearray()
        self.to_upstream = bytearray()
        self.client_closes = 0
        self.upstream_closes = 0
        self.connects = 0
        self.rejections: list[Rejected] = []
        self.upstream_eof = False  # the upstream's socket ended on its own
        self.request_len = 0  # the gateway's own handshake request at the head of to_upstream
        self.allowed: tuple[type, ...] = HANDSHAKE_ACTIONS

    def tick(self) -> float:
        self.t += STEP
        return self.t

    def call(self, name: str, *args: Any, **kw: Any) -> list[Action]:
        s = self.s
        was_closed = s.state is State.CLOSED
        if name == "upstream_eof" and self.connects:
            self.upstream_eof = True
        try:
            out = getattr(s, name)(*args, **kw)
        except InvariantError:
            raise
        except Exception as exc:  # the contract: nothing escapes
            raise InvariantError(f"{type(exc).__name__} escaped Session.{name}: {exc}",
                                 s.state) from exc
        check(isinstance(out, list), f"{name} returned {type(out).__name__}, not a list")
        if was_closed:
            check(not out, f"a CLOSED session answered {name}", out)
        for a in out:
            check(isinstance(a, self.allowed),
                  f"undocumented action from {name} in this phase", a, s.state)
            if isinstance(a, SendToClient):
                check(isinstance(a.data, bytes) and a.data, "empty or non-bytes SendToClient", a)
                check(not self.client_closes, "SendToClient after CloseClient", a, s.state)
                self.to_client += a.data
            elif isinstance(a, SendToUpstream):
                check(isinstance(a.data, bytes) and a.data, "empty or non-bytes SendToUpstream",
                      a)
                check(not self.upstream_closes, "SendToUpstream after CloseUpstream", a, s.state)
                self.to_upstream += a.data
            elif isinstance(a, CloseClient):
                self.client_closes += 1
            elif isinstance(a, CloseUpstream):
                self.upstream_closes += 1
            elif isinstance(a, ConnectUpstream):
                self.connects += 1
                check(a.upstream in s.gateway.routes.values(), "connect to an unknown upstream")
        check(self.client_closes <= 1, "CloseClient twice", out)
        check(self.upstream_closes <= 1, "CloseUpstream twice", out)
        check(self.upstream_closes <= self.connects, "CloseUpstream without an upstream", out)
        if any(isinstance(a, Rejected) for a in out):
            self._check_rejection(out)
        self._check_state()
        self.actions += out
        return out

    def _upstream_closed_ok(self) -> bool:
        """CloseUpstream once iff an upstream was asked for; an upstream whose socket ended
        during its handshake may be left to the transport (which closes a socket at EOF)."""
        if self.upstream_closes == self.connects:
            return True
        return self.upstream_eof and self.upstream_closes < self.connects

    def _check_rejection(self, out: list[Action]) -> None:
        s = self.s
        rej = [a for a in out if isinstance(a, Rejected)]
        check(len(rej) == 1 and not self.rejections, "more than one Rejected", out)
        i = out.index(rej[0])
        head, tail = out[:i], out[i + 1 :]
        check(all(isinstance(a, CloseUpstream) and a.abort for a in head),
              "only CloseUpstream(abort) may precede Rejected", out)
        check(len(tail) == 2 and isinstance(tail[0], SendToClient)
              and isinstance(tail[1], CloseClient) and not tail[1].abort,
              "Rejected must be followed by the response and CloseClient()", out)
        status = rej[0].status
        response = tail[0].data  # type: ignore[union-attr]
        check(response.startswith(b"HTTP/1.1 %d " % status) and b"\r\n\r\n" in response,
              "the response's status line does not match Rejected", status, response[:80])
        check(s.state is State.CLOSED and s.deadline is None and s.status == status,
              "a rejected session must be CLOSED with no deadline", s.state, s.deadline)
        self.rejections.append(rej[0])

    def _check_state(self) -> None:
        s = self.s
        if s.state is State.CLOSED:
            check(s.deadline is None, "CLOSED with a deadline", s.deadline)
            check(self.client_closes == 1, "CLOSED but the client socket was never closed")
            check(self._upstream_closed_ok(), "CLOSED but the upstream socket was never closed")
        elif s.state in WAITING:
            check(s.deadline is not None, f"{s.state} with no deadline: nothing would end it")
        if s.state not in (State.OPEN, State.CLOSING):
            check(not self.to_upstream or self.connects,
                  "bytes sent upstream before a connect")

    # -- endings ------------------------------------------------------------------------

    def fire_timers(self, limit: int = 8) -> None:
        """Fire each deadline as it comes due; each must make progress."""
        for _ in range(limit):
            d = self.s.deadline
            if d is None:
                return
            self.t = max(self.t, d)
            self.call("handle_timer", self.t)
            nd = self.s.deadline
            check(nd is None or nd > d, "a due timer made no progress", d, nd, self.s.state)
        check(self.s.deadline is None, "timers kept firing", self.s.state)

    def end(self, how: int) -> None:
        """End the session: ``how`` % 3 picks client EOF, upstream EOF or a far timer first.
        Then the session must reach CLOSED (no dangling state)."""
        how %= 3
        if how == 0:
            self.call("client_eof", self.tick())
        elif how == 1:
            self.call("upstream_eof", self.tick())
        else:
            self.t += 100.0
            self.call("handle_timer", self.t)
        self.t += 100.0
        self.call("handle_timer", self.t)
        self.fire_timers()
        if self.s.state is State.OPEN:  # legitimately open: no timer runs on an OPEN session
            self.call("client_eof", self.tick())
            self.t += 100.0
            self.call("handle_timer", self.t)
            self.fire_timers()
        if self.s.state is not State.CLOSED and how != 1:
            self.call("upstream_eof", self.tick())
            self.fire_timers()
        if self.s.state is not State.CLOSED:
            self.call("client_eof", self.tick())
            self.fire_timers()
        s = self.s
        check(s.state is State.CLOSED and s.deadline is None,
              "the session did not reach CLOSED after both ends went away", s.state, s.deadline)
        check(self.client_closes == 1, "the client socket was not closed exactly once")
        check(self._upstream_closed_ok(), "the upstream socket was not closed exactly once")
        check(s.ended is not None, "CLOSED without an end time")
        s.info()  # the log line must build


# ------------------------------------------------------------------------- HTTP path


def run_http(data_chunks: Sequence[bytes], *, variant: int = 0, end: int = 0) -> Driver:
    """Feed a client's handshake bytes in chunks; check every step and the ending."""
    gw = make_gateway(variant)
    d = Driver(new_session(gw))
    s = d.s
    start_deadline = s.deadline
    connected_at = None
    for chunk in data_chunks:
        if not chunk:
            continue
        out = d.call("receive_client", chunk, d.tick())
        if s.state is State.CLOSED:
            rejected = bool(d.rejections)
            # GET/HEAD /health: 200, or 503 while draining (a health answer, not a Rejected;
            # HEAD gets no body)
            health = (not rejected and s.status in (200, 503) and d.client_closes == 1
                      and bytes(d.to_client).startswith(
                          b"HTTP/1.1 503 " if gw.draining else b"HTTP/1.1 200 "))
            check(rejected or health, "CLOSED without a rejection or a health answer", out)
            if rejected:
                check(d.rejections[0].status in REJECT_STATUSES,
                      "undocumented rejection status", d.rejections[0])
        elif any(isinstance(a, ConnectUpstream) for a in out):
            check(len(out) == 1, "ConnectUpstream must come alone", out)
            check(s.state is State.CONNECTING and s.user_id == "user-42",
                  "ConnectUpstream but not CONNECTING as the token's user", s.state)
            check(s.deadline == d.t + s.limits.connect_timeout, "connect deadline not set")
            connected_at = d.t
        elif s.state is State.REQUEST:
            check(not out, "a waiting REQUEST session emitted actions", out)
            check(s.deadline == start_deadline, "the handshake deadline moved", s.deadline)
        else:
            check(s.state is State.CONNECTING and connected_at is not None and not out,
                  "unexpected state during the handshake", s.state, out)
    d.end(0 if end % 2 == 0 else 2)  # the client leaves, or the timer fires
    if d.rejections:  # 408 in REQUEST, 504 while CONNECTING: the timer's own statuses
        check(d.rejections[0].status in REJECT_STATUSES | {504},
              "undocumented rejection status", d.rejections[0])
    return d


# -------------------------------------------------------------------- upstream handshake

EXTENSION_VARIANTS: tuple[tuple[str | None, str | None], ...] = (
    # (what the client offers, what the upstream answers)
    (None, None),
    ("permessage-deflate; client_max_window_bits", "permessage-deflate"),
    ("x-custom-ext, permessage-deflate", "x-custom-ext"),
)


def connecting_session(gw: Gateway, ext: int = 0, early: bytes = b"",
                       protocols: str | None = None) -> tuple[Driver, bytes]:
    """A session through its own handshake and ``upstream_connected``; returns the request
    it sent upstream."""
    offer, _ = EXTENSION_VARIANTS[ext % len(EXTENSION_VARIANTS)]
    headers = []
    if offer:
        headers.append(("Sec-WebSocket-Extensions", offer))
    if protocols:
        headers.append(("Sec-WebSocket-Protocol", protocols))
    d = Driver(new_session(gw))
    out = d.call("receive_client", handshake(headers=headers) + early, d.tick())
    if early and len(early) > gw.limits.max_early_bytes and d.rejections:
        # Too many frames sent ahead of the 101: a documented 400 (checked by call()).
        check(d.rejections[0].status == 400, "early-bytes refusal must be 400", out)
        return d, b""
    check(out and isinstance(out[0], ConnectUpstream), "the seed handshake was refused", out,
          d.s.reason)
    d.allowed = OPEN_ACTIONS + (Rejected, Accepted)
    (send,) = d.call("upstream_connected", d.tick())
    d.request_len = len(d.to_upstream)
    check(isinstance(send, SendToUpstream) and d.s.state is State.UPSTREAM_HANDSHAKE,
          "upstream_connected must send the request", send)
    return d, send.data  # type: ignore[union-attr]


def run_upstream_handshake(chunks: Sequence[bytes], *, ext: int = 0, end: int = 0,
                           variant: int = 0) -> Driver:
    """Feed the upstream's (mutated) handshake answer in chunks."""
    gw = make_gateway(variant % 3)  # the variants that accept a handshake
    d, _ = connecting_session(gw, ext, protocols="chat.v1, chat.v2")
    s = d.s
    for chunk in chunks:
        if not chunk:
            continue
        state = s.state
        out = d.call("receive_upstream", chunk, d.tick())
        if state is State.UPSTREAM_HANDSHAKE and s.state is not State.UPSTREAM_HANDSHAKE:
            if d.rejections:
                st = d.rejections[0].status
                check(400 <= st < 500 or st == 502, "upstream refusal must be 4xx or 502", st)
                check(isinstance(out[0], CloseUpstream) and out[0].abort,
                      "a refused upstream must be aborted", out)
            else:
                check(len(out) >= 2 and isinstance(out[0], SendToClient)
                      and out[0].data.startswith(b"HTTP/1.1 101 ")
                      and isinstance(out[1], Accepted),
                      "an accepted upstream must give the client its 101 then Accepted", out)
                check(s.c2u is not None and s.u2c is not None, "OPEN without relays")
        elif state is State.UPSTREAM_HANDSHAKE:
            check(not out and s.deadline is not None, "waiting for the upstream's answer", out)
    d.end(end)
    return d


# ------------------------------------------------------------------------- frame path


def open_session(variant: int = 0, ext: int = 0, early: bytes = b"",
                 trailing: bytes = b"") -> Driver:
    """A session driven to OPEN (the upstream's 101 simulated); ``early`` client bytes ride
    with the request, ``trailing`` upstream bytes with the 101."""
    gw = make_gateway(variant % 2)
    d, request = connecting_session(gw, ext, early)
    if not request:
        return d  # refused before the upstream was asked for
    _, answer = EXTENSION_VARIANTS[ext % len(EXTENSION_VARIANTS)]
    d.call("receive_upstream", upstream_101(request, extensions=answer, extra=trailing),
           d.tick())
    check(d.s.state is not State.UPSTREAM_HANDSHAKE and not d.rejections,
          "the simulated upstream 101 was refused", d.s.state, d.s.reason)
    d.allowed = OPEN_ACTIONS
    return d


def _relay_params(d: Driver) -> tuple[int, int, int]:
    s = d.s
    ext = s.extensions
    if not ext:
        return s.limits.max_message_size, 0, 0
    names = {e.split(";", 1)[0].strip().lower() for e in ext.split(",")}
    if names - {"permessage-deflate"}:
        return s.limits.max_message_size, 0x70, 0x70
    return s.limits.max_message_size, 0x40, 0


def common_prefix(a: bytes, b: bytes) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    limit = min(len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    lo, hi = 0, limit  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def check_relayed(sent: bytes, source: bytes, ref: Ref, *, masked: bool) -> tuple[int, bytes]:
    """``sent`` (all bytes one side was sent) = a prefix of ``source`` (the other side's
    bytes) + at most one gateway close frame that starts on a frame boundary of ``source``.
    Returns (length of the prefix, the gateway's close frame or b"")."""
    k = common_prefix(sent, source)
    # The gateway's close may coincide byte-for-byte with the source's next frame start;
    # prefer the split that leaves a well-formed close frame on a boundary.
    for j in range(k, -1, -1):
        tail = sent[j:]
        if not tail:
            return j, b""
        if j in ref.boundaries and len(tail) >= 2 and tail[0] == 0x88:
            head = 6 if masked else 2
            if (tail[1] & 0x7F) <= 125 and len(tail) == head + (tail[1] & 0x7F):
                parse_one_close(tail, masked=masked)
                if masked:
                    check(tail[2:6] == ZERO_MASK, "gateway close not masked with random()")
                return j, tail
        if j < k - 140:  # a close frame is at most 131 bytes
            break
    raise InvariantError(
        f"bytes sent are not the peer's own bytes plus one gateway close frame "
        f"(common prefix {k}, sent {len(sent)}, source {len(source)})",
    )


def run_client_frames(client_chunks: Sequence[bytes], *, variant: int = 0, ext: int = 0,
                      early: int = 0, end: int = 0) -> Driver:
    """An OPEN session fed client frames; checks the relay against :func:`ref_scan`."""
    stream = b"".join(client_chunks)
    chunks = [c for c in client_chunks if c]
    early_bytes = b""
    if early and chunks:  # the first chunk arrives before the 101 (kept, replayed)
        early_bytes = chunks.pop(0)
    d = open_session(variant, ext, early=early_bytes)
    s = d.s
    if s.state is State.CLOSED:  # refused: too many bytes ahead of the 101
        d.end(end)
        return d
    max_message, rsv_first, rsv_cont = _relay_params(d)
    request_part = d.request_len  # the upstream handshake request
    for chunk in chunks:
        d.call("receive_client", chunk, d.tick())
    ref = ref_scan(stream, masked=True, max_message=max_message, rsv_first=rsv_first,
                   rsv_cont=rsv_cont)
    forwarded = bytes(d.to_upstream[request_part:])
    k, gateway_close = check_relayed(forwarded, stream, ref, masked=True)
    check(not d.to_client[d.to_client.index(b"\r\n\r\n") + 4 :],
          "the client was sent something while the upstream was silent", bytes(d.to_client))
    if ref.kind == "open":
        check(s.state is State.OPEN, "no signal expected, but the session left OPEN", s.state,
              s.client_close)
        check(k == ref.upto and not gateway_close, "forwarded prefix differs from RFC 6455",
              k, ref.upto)
    elif ref.kind == "close":
        check(s.state is State.CLOSING and k == ref.end and not gateway_close,
              "a client close frame must be forwarded as is", k, ref.end, s.state)
        check(s.client_close is not None and s.client_close[0] == ref.close_code,
              "recorded client close code differs", s.client_close, ref.close_code)
    else:
        check(s.state is State.CLOSING and k == ref.pos, "a violation must stop forwarding at "
              "the offending frame", k, ref.pos, s.state)
        check(s.client_close is not None and s.client_close[0] in ref.codes
              and s.client_close[0] in VIOLATION_CODES,
              "violation code differs from RFC 6455", s.client_close, ref.codes)
        check(parse_one_close(gateway_close, masked=True)[0] == 1001,
              "the upstream must get the gateway's 1001 on a client violation", gateway_close)
        code = s.client_close[0]
        # The upstream answers the gateway's close: the client gets its violation code.
        if end % 2:
            d.call("upstream_eof", d.tick())
        else:
            d.call("receive_upstream", sframe(8, close_payload(1001)), d.tick())
        tail = bytes(d.to_client[d.to_client.index(b"\r\n\r\n") + 4 :])
        check(parse_one_close(tail, masked=False)[0] == code,
              "the client was not sent its violation code", tail, code)
    if s.state is State.OPEN:
        check(s.c2u is not None and s.c2u.bytes == len(stream), "relay byte count is wrong",
              s.c2u.bytes if s.c2u else None, len(stream))
    d.end(end)
    return d


def run_upstream_frames(upstream_chunks: Sequence[bytes], *, variant: int = 0, ext: int = 0,
                        trailing: int = 0, end: int = 0) -> Driver:
    """An OPEN session fed upstream (unmasked) frames; the mirror of run_client_frames."""
    stream = b"".join(upstream_chunks)
    chunks = [c for c in upstream_chunks if c]
    trailing_bytes = b""
    if trailing and chunks:  # the first chunk arrives in the same read as the 101
        trailing_bytes = chunks.pop(0)
    d = open_session(variant, ext, trailing=trailing_bytes)
    s = d.s
    max_message, rsv_first, rsv_cont = _relay_params(d)
    head_end = d.to_client.index(b"\r\n\r\n") + 4
    request_part = d.request_len
    for chunk in chunks:
        d.call("receive_upstream", chunk, d.tick())
    ref = ref_scan(stream, masked=False, max_message=max_message, rsv_first=rsv_first,
                   rsv_cont=rsv_cont)
    forwarded = bytes(d.to_client[head_end:])
    k, gateway_close = check_relayed(forwarded, stream, ref, masked=False)
    to_up = bytes(d.to_upstream[request_part:])
    if ref.kind == "open":
        check(s.state is State.OPEN and k == ref.upto and not gateway_close and not to_up,
              "forwarded prefix differs from RFC 6455", k, ref.upto, s.state)
    elif ref.kind == "close":
        check(s.state is State.CLOSING and k == ref.end and not gateway_close and not to_up,
              "an upstream close frame must be forwarded as is", k, ref.end, s.state)
    else:
        check(k == ref.pos, "a violation must stop forwarding at the offending frame", k,
              ref.pos)
        check(parse_one_close(gateway_close, masked=False)[0] == 1011,
              "the client must get 1011 when the upstream breaks the protocol", gateway_close)
        code, _ = parse_one_close(to_up, masked=True)
        check(code in ref.codes and code in VIOLATION_CODES,
              "the upstream's violation code differs from RFC 6455", code, ref.codes)
        check(d.upstream_closes == 1, "a broken upstream must be closed at once")
    d.end(end)
    return d


# ---------------------------------------------------------------------------- mixed


def run_mixed(ops: Sequence[tuple[int, bytes]], *, variant: int = 0, ext: int = 0,
              end: int = 0) -> Driver:
    """Interleave client bytes, upstream bytes, ends, timers, write-blocking and shutdown on
    an OPEN session; check the generic invariants and the relayed-bytes shape both ways."""
    d = open_session(variant, ext)
    s = d.s
    head_end = d.to_client.index(b"\r\n\r\n") + 4
    request_part = d.request_len
    client_stream = bytearray()
    upstream_stream = bytearray()
    for kind, data in ops:
        kind %= 10
        if kind <= 3:
            if data:
                if s.state in (State.OPEN, State.CLOSING):
                    client_stream += data  # what the client relay was fed
                d.call("receive_client", data, d.tick())
        elif kind <= 6:
            if data:
                if s.state in (State.OPEN, State.CLOSING):
                    upstream_stream += data
                d.call("receive_upstream", data, d.tick())
        elif kind == 7:
            d.t += data[0] / 10 if data else 0.5
            d.call("handle_timer", d.t)
        elif kind == 8:
            if data and data[0] & 1:
                s.client_write_blocked(d.tick())
            else:
                s.client_write_unblocked()
            d.call("handle_timer", d.tick())  # re-check the deadline bookkeeping
        else:
            which = data[0] % 3 if data else 0
            name = ("client_eof", "upstream_eof", "shutdown")[which]
            d.call(name, d.tick())
    d.end(end)
    for sent, source, masked in (
        (bytes(d.to_upstream[request_part:]), bytes(client_stream), True),
        (bytes(d.to_client[head_end:]), bytes(upstream_stream), False),
    ):
        max_message, rsv_first, rsv_cont = _relay_params(d)
        ref = ref_scan(source, masked=masked, max_message=max_message, rsv_first=rsv_first,
                       rsv_cont=rsv_cont)
        k, _ = check_relayed(sent, source, ref, masked=masked)
        check(k <= (ref.end if ref.kind == "close" else ref.upto),
              "forwarded past what RFC 6455 allows", k, ref.kind, ref.upto)
    return d


# ---------------------------------------------------------------------- FrameRelay only


def relay_run(chunks: Sequence[bytes], *, masked: bool, max_message: int, rsv_first: int = 0,
              rsv_cont: int = 0) -> tuple[bytes, object, int]:
    """Feed a bare FrameRelay; returns (forwarded, signal, messages)."""
    relay = FrameRelay(masked=masked, max_message_size=max_message, rsv_first=rsv_first,
                       rsv_cont=rsv_cont)
    out = bytearray()
    signal = None
    for chunk in chunks:
        try:
            got = relay.feed(chunk)
        except Exception as exc:
            raise InvariantError(f"{type(exc).__name__} escaped FrameRelay.feed: {exc}") from exc
        check(isinstance(got, bytes), "feed must return bytes", type(got))
        out += got
        if relay.signal is not None:
            check(signal is None, "a second signal without being consumed")
            signal = relay.signal
            check(relay.stopped, "a signal must stop the relay")
            relay.signal = None
    return bytes(out), signal, relay.messages


def check_relay(stream: bytes, chunks: Sequence[bytes], *, masked: bool, max_message: int,
                rsv_first: int = 0, rsv_cont: int = 0) -> None:
    """Split feeding = whole feeding = the reference scanner."""
    kw: dict[str, Any] = {"masked": masked, "max_message": max_message,
                          "rsv_first": rsv_first, "rsv_cont": rsv_cont}
    whole = relay_run([stream], **kw)
    parts = relay_run(chunks, **kw)
    ref = ref_scan(stream, **kw)
    check(whole[0] == parts[0], "split feeding forwarded different bytes than whole feeding",
          len(whole[0]), len(parts[0]))
    check(whole[2] == parts[2], "split feeding counted different messages", whole[2], parts[2])
    check(repr(whole[1]) == repr(parts[1]), "split feeding signalled differently", whole[1],
          parts[1])
    forwarded, signal, _ = whole
    if ref.kind == "open":
        check(signal is None and forwarded == stream[: ref.upto],
              "relay forwarded other than RFC 6455's prefix", len(forwarded), ref.upto, signal)
    elif ref.kind == "close":
        check(type(signal).__name__ == "CloseFrame" and forwarded == stream[: ref.pos]
              and signal.raw == stream[ref.pos : ref.end]  # type: ignore[attr-defined]
              and signal.code == ref.close_code,  # type: ignore[attr-defined]
              "relay close frame differs from RFC 6455", signal, ref.pos)
    else:
        check(type(signal).__name__ == "Violation" and forwarded == stream[: ref.pos]
              and signal.code in ref.codes,  # type: ignore[attr-defined]
              "relay violation differs from RFC 6455", signal, ref.pos, ref.codes)
    check(whole[2] == ref.messages, "message count differs from RFC 6455", whole[2],
          ref.messages)


# ----------------------------------------------------------------- atheris input formats
#
# Plain byte layouts (no FuzzedDataProvider), so make_corpus.py can write seeds that mean
# something and a crash file can be read by eye.
#
# fuzz_http:   [cfg][end][sep] payload
#   cfg % 5 = gateway variant; (cfg >> 3) & 3 == 3 selects the upstream-answer target (the
#   payload is the upstream's answer to the gateway's handshake, ext = (cfg >> 5) % 3),
#   otherwise the payload is the client's handshake. ``sep`` splits the payload into the
#   chunks fed one by one (the separator bytes are dropped). ``end`` picks the ending.
# fuzz_frames: [cfg][end][sep][len_hi][len_lo] client-bytes upstream-bytes
#   cfg & 1 = variant (1: 64-byte message limit), (cfg >> 1) & 3 = extension (3 -> none),
#   cfg & 8 = early client bytes / trailing upstream bytes ride with the handshake,
#   cfg >> 4 = mode: 0-4 client frames, 5-8 upstream frames, 9-13 both interleaved with
#   events (a chunk starting ``EVENT`` is an event: its next byte is the kind, the one after
#   its argument), 14-15 a bare FrameRelay (whole vs split vs ref_scan).

EVENT = b"\xee\xee"


def encode_http(payload_chunks: Sequence[bytes], *, variant: int = 0, end: int = 0,
                upstream: bool = False, ext: int = 0) -> bytes:
    sep = _free_byte(b"".join(payload_chunks))
    cfg = (variant % GATEWAY_VARIANTS) | (0x18 if upstream else 0) | ((ext % 3) << 5)
    return bytes((cfg, end, sep)) + bytes((sep,)).join(payload_chunks)


def run_http_input(data: bytes) -> None:
    if len(data) < 3:
        return
    cfg, end, sep = data[0], data[1], data[2]
    chunks = split_on(data[3:], sep)
    if (cfg >> 3) & 3 == 3:
        run_upstream_handshake(chunks, ext=(cfg >> 5) % 3, end=end, variant=cfg % 3)
    else:
        run_http(chunks, variant=cfg % GATEWAY_VARIANTS, end=end)


def encode_frames(client_chunks: Sequence[bytes], upstream_chunks: Sequence[bytes] = (), *,
                  mode: int = 0, variant: int = 0, ext: int = 0, early: bool = False,
                  end: int = 0) -> bytes:
    sep = _free_byte(b"".join(client_chunks) + b"".join(upstream_chunks))
    client = bytes((sep,)).join(client_chunks)
    upstream = bytes((sep,)).join(upstream_chunks)
    cfg = (variant & 1) | ((ext & 3) << 1) | (8 if early else 0) | ((mode & 15) << 4)
    return bytes((cfg, end, sep)) + len(client).to_bytes(2, "big") + client + upstream


def run_frames_input(data: bytes) -> None:
    if len(data) < 5:
        return
    cfg, end, sep = data[0], data[1], data[2]
    n = int.from_bytes(data[3:5], "big")
    client, upstream = data[5 : 5 + n], data[5 + n :]
    variant, ext, flag, mode = cfg & 1, (cfg >> 1) & 3, bool(cfg & 8), cfg >> 4
    ext = 0 if ext == 3 else ext
    if mode <= 4:
        run_client_frames(split_on(client, sep), variant=variant, ext=ext, early=flag, end=end)
    elif mode <= 8:
        run_upstream_frames(split_on(upstream, sep), variant=variant, ext=ext, trailing=flag,
                            end=end)
    elif mode <= 13:
        ops: list[tuple[int, bytes]] = []
        c = [_as_op(x, 0) for x in split_on(client, sep)]
        u = [_as_op(x, 4) for x in split_on(upstream, sep)]
        while c or u:
            for queue in (c, u):
                if queue:
                    ops.append(queue.pop(0))
        run_mixed(ops, variant=variant, ext=ext, end=end)
    else:
        chunks = split_on(client if mode == 14 else upstream, sep)
        rsv = ((0, 0), (0x40, 0), (0x70, 0x70))[ext]
        check_relay(b"".join(chunks), chunks, masked=mode == 14,
                    max_message=64 if variant else 1 << 20, rsv_first=rsv[0],
                    rsv_cont=rsv[1])
        return


def _as_op(chunk: bytes, kind: int) -> tuple[int, bytes]:
    if chunk.startswith(EVENT) and len(chunk) >= 3:
        return 7 + chunk[2] % 3, chunk[3:4] or b"\x00"  # timer, blocking, an end/shutdown
    return kind, chunk


def _free_byte(data: bytes) -> int:
    """A byte value absent from ``data`` (to use as the chunk separator)."""
    present = set(data)
    for b in (0x01, 0xF1, 0x02, 0xAB, *range(256)):
        if b not in present:
            return b
    return 0x01  # every value occurs: the chunks merge here and there, harmlessly


__all__ = [name for name in dir() if not name.startswith("_")]
