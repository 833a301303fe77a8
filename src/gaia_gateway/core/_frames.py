"""Header-level WebSocket frame relay: the hot path.

Theory of operation
-------------------
A client's frames arrive masked and a client-role sender must mask; a server's frames arrive
unmasked and a server-role sender must not mask. So a frame that passes validation can be
forwarded as the very same bytes in both directions: nothing is unmasked, decoded or re-encoded.

:class:`FrameRelay` watches one direction of a proxied connection. ``feed(data)`` returns the
bytes to forward right away (usually ``data`` itself, the same object) and keeps only what it
must: an incomplete frame header (at most 14 bytes) or an incomplete close frame (at most 131
bytes). Payload bytes pass through as they arrive ("cut-through"), so a 1 MiB frame is never
buffered and costs one length check.

From the headers alone it enforces RFC 6455 section 5: masking by role, reserved bits,
reserved opcodes, control frame rules, fragmentation order, and the message size limit (the
limit is checked when a header *declares* a size, so a frame announcing 2**63 bytes is refused
before one byte of it is read or allocated). Close frames are held until complete and parsed
fully (code and reason), because the session needs them to carry close codes across.

When the stream must stop (a close frame, or a violation), ``feed`` returns everything before
the offending frame, sets :attr:`FrameRelay.signal` and discards whatever follows. The relay
never raises on peer bytes.

A read often carries a batch of small frames (game messages sent back to back). Their headers
are walked by one call, ``_scan_small``: the C function ``_speedups.scan_small`` where that
module was built, else ``_scan_small_py``, the same walk in Python. It only steps over final
text and binary frames under 126 bytes with the right mask bit; every rule and everything
else stays in this module.

Where ``_speedups`` was built, ``feed``'s common cases run in C too (``RelayHead``): a read
that is payload of the frame in flight, one that starts with a final text or binary frame,
and a batch walk. The C ``feed`` hands every other case to this class's Python methods, so
the rules live here once. At one connection the Python ``feed``, run twice per round trip
with cold caches, cost about 5 µs of it; the C call costs under 1 (bench/RESULTS.md).

UTF-8 of text messages is *not* checked here: like nginx, the gateway leaves message payloads
to the endpoints (the backend answers 1007), which keeps it transparent and cheap. The size
limit counts payload bytes as sent, i.e. compressed bytes when permessage-deflate is in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_INVALID_DATA",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "SPEEDUPS",
    "CloseFrame",
    "FrameRelay",
    "Violation",
    "build_close",
    "parse_close_payload",
]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

# RFC 6455 7.4.1 and the IANA registry: codes a peer may put on the wire. 1004 is reserved,
# 1005, 1006 and 1015 "MUST NOT be set as a status code in a Close control frame by an
# endpoint", 1016-2999 are reserved for future protocol use, 3000-4999 belong to
# libraries and applications.
_WIRE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))


def _valid_code(code: int) -> bool:
    return code in _WIRE_CODES or 3000 <= code <= 4999


@dataclass(frozen=True, slots=True)
class CloseFrame:
    """A complete, valid close frame seen on the stream (``raw`` is the frame as received)."""

    code: int | None
    reason: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Violation:
    """The peer broke the protocol; ``code`` is the close code it has earned."""

    code: int
    reason: str


def _unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def parse_close_payload(payload: bytes) -> tuple[int | None, str] | Violation:
    """Decode a close frame's payload, or say why it is invalid (RFC 6455 5.5.1, 7.4)."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        return Violation(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not _valid_code(code):
        return Violation(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        # RFC 6455 8.1: a byte stream that is not valid UTF-8 fails the connection; 1007 is
        # the code for data inconsistent with its type, and what backends answer here.
        return Violation(CLOSE_INVALID_DATA, "close reason is not valid UTF-8")
    return code, reason


def build_close(code: int | None, reason: str = "", mask: bytes | None = None) -> bytes:
    """A close frame; ``mask`` (4 bytes) for the client role, ``None`` for the server role."""
    if code is None:
        payload = b""
    else:
        body = reason.encode("utf-8")
        while len(body) > 123:  # 125 minus the code; cut on a character boundary
            reason = reason[:-1]
            body = reason.encode("utf-8")
        payload = code.to_bytes(2, "big") + body
    if mask is None:
        return bytes((0x88, len(payload))) + payload
    return bytes((0x88, 0x80 | len(payload))) + mask + _unmask(payload, mask)


def _scan_small_py(data: bytes, pos: int, lo: int, hi: int, step: int) -> tuple[int, int]:
    """Walk small final text/binary frames back to back from ``pos``; ``(pos, count)``.

    A frame matches when its first byte is 0x81 or 0x82 and its second lies in ``[lo, hi]``
    (the direction's mask bit plus a length up to 125); it is then ``step`` plus its second
    byte long. The walk stops at the first header that does not match or is incomplete, and
    the position it returns lies past ``len(data)`` when the last frame is cut.
    ``_speedups.scan_small`` is this function in C, the one the relay uses when it is built.
    """
    count = 0
    last = len(data) - 1
    while pos < last:
        b0 = data[pos]
        if b0 != 0x82 and b0 != 0x81:
            break
        b1 = data[pos + 1]
        if b1 < lo or b1 > hi:
            break
        pos += step + b1
        count += 1
    return pos, count


try:
    from ._speedups import RelayHead as _RelayHead
    from ._speedups import scan_small as _scan_small
except ImportError:  # not built (no C compiler at install time): the same code in Python
    _RelayHead = None  # type: ignore[misc,assignment]  # the class, or None: tested below
    _scan_small = _scan_small_py

#: "C" when the relay's hot path (``feed``'s common cases and the batch walk) runs in the
#: compiled ``_speedups`` module, else "Python".
SPEEDUPS = "Python" if _RelayHead is None else "C"

# The largest message size limit the relay keeps: frame lengths and positions then fit in the
# C head's 64-bit fields. No frame may declare 2**63 bytes or more (RFC 6455 5.2).
_LIMIT_CAP = 1 << 62


class FrameRelay:
    """Validates one direction of a proxied WebSocket stream at frame-header level.

    ``masked`` says whether frames on this direction must be masked (client to upstream) or
    must not be (upstream to client). ``rsv_first`` holds the RSV bits allowed on the first
    frame of a data message (0x40 with permessage-deflate), ``rsv_cont`` those allowed on
    continuation frames (0 for permessage-deflate, whose RSV1 marks a whole message).

    ``FrameRelay(...)`` makes the C-headed relay where ``_speedups`` was built: its ``feed``
    takes the common cases in C and calls this class's methods for everything else (see
    ``_speedups.c``). Else it makes the relay whose ``feed`` is the Python one below.
    """

    if not TYPE_CHECKING:  # its fields are its subclasses' slots (_HEAD_FIELDS, _OWN_FIELDS)
        __slots__ = ()

    def __new__(cls, **kwargs: object) -> Self:
        if cls is FrameRelay:
            return _Relay.__new__(_Relay)  # type: ignore[return-value]
        return super().__new__(cls)

    def __init__(
        self, *, masked: bool, max_message_size: int, rsv_first: int = 0, rsv_cont: int = 0
    ) -> None:
        self._remaining = 0  # payload bytes of the current frame not seen yet
        self._held = b""  # an incomplete header or close frame, not forwarded yet
        self._in_message = False
        self._message_size = 0
        self._expect_mask = 0x80 if masked else 0
        self._max_message = min(max_message_size, _LIMIT_CAP)
        self._rsv_first = rsv_first
        self._rsv_cont = rsv_cont
        self._inject: bytes | None = None
        self._watch = False  # stopped forwarding, still looking for the peer's close frame
        self.signal: CloseFrame | Violation | None = None
        self.stopped = False
        self.messages = 0  # complete data messages seen
        self.bytes = 0  # bytes received on this direction

    @property
    def at_frame_boundary(self) -> bool:
        """True when everything forwarded so far ends on a frame boundary."""
        return self._remaining == 0

    @property
    def mid_message(self) -> bool:
        return self._in_message or self._remaining != 0

    def inject(self, frame: bytes) -> bytes:
        """End this direction with ``frame`` (our own close) at the next frame boundary.

        Returns the bytes to send now: ``frame`` if the stream is at a boundary, else ``b""``
        and ``feed`` appends it once the frame in flight is complete. Either way the relay
        forwards nothing after it, but keeps watching for the peer's close frame. A stream
        stopped by a signal is at a boundary by construction.
        """
        if self._inject is not None or self._watch:
            return b""  # already ending
        if self.stopped:
            return frame  # stopped by a signal, at a boundary; nothing more to watch
        if self._remaining == 0:
            # A partial header held here is never forwarded, but the watch needs it.
            self.stopped = self._watch = True
            return frame
        self._inject = frame
        return b""

    def mute(self) -> None:
        """Forward nothing more (the receiving side was closed) but keep watching for the
        sender's close frame; a close still waiting to be injected is dropped."""
        self._inject = None
        if not self.stopped:
            self.stopped = self._watch = True

    def stop(self) -> None:
        """Forward and watch nothing more on this direction."""
        self.stopped = True
        self._watch = False
        self._held = b""
        self._inject = None

    def feed(self, data: bytes) -> bytes:
        """Take bytes received on this direction; return the bytes to forward now."""
        if self.stopped:
            if self._watch:
                self._watch_for_close(data)
            return b""
        n = len(data)
        self.bytes += n
        rem = self._remaining
        # The fast path: all of it is payload of the frame in flight (unless it ends the frame
        # and a close waits to be injected right behind it).
        if rem > n or (rem == n and self._inject is None):
            self._remaining = rem - n
            return data
        if rem == 0 and not self._held and self._inject is None and n > 3:
            # The common case, kept short: the chunk starts with a complete, final, unfragmented
            # text or binary frame header (FIN set, RSV clear) and holds that frame or its start.
            b0 = data[0]
            if (b0 == 0x81 or b0 == 0x82) and not self._in_message:
                b1 = data[1]
                mask = b1 & 0x80
                if mask == self._expect_mask:
                    length = b1 & 0x7F
                    if length == 126:
                        length = (data[2] << 8) | data[3]
                        end = 8 + length if mask else 4 + length
                    elif length < 126:
                        end = 6 + length if mask else 2 + length
                    else:
                        end = 0
                    if end >= n and length <= self._max_message:
                        self.messages += 1
                        self._remaining = end - n
                        return data
        if self._held:
            data = self._held + data
            self._held = b""
            n = len(data)
        if self._inject is not None:
            frame, self._inject = self._inject, None
            self.stopped = self._watch = True
            self._remaining = 0
            self._scan(data, rem)
            return data[:rem] + frame
        upto = self._scan(data, rem)
        return data if upto == n else data[:upto]

    _feed_py = feed  # the C feed hands the cases it does not take to this one

    def _watch_for_close(self, data: bytes) -> None:
        n = len(data)
        rem = self._remaining
        if rem >= n:
            self._remaining = rem - n
            return
        if self._held:
            data = self._held + data
            self._held = b""
        self._scan(data, rem)

    def _scan(self, data: bytes, pos: int) -> int:
        """Walk the frame headers from ``pos``; return how far the bytes may be forwarded."""
        expect_mask = self._expect_mask
        # Small final text/binary frames back to back (a batch of game messages in one read)
        # are walked in one call (in C when built): FIN set, RSV clear, the right mask bit,
        # under 126 bytes. The second byte of such a frame is the mask bit plus a length up
        # to 125, so one range check covers both; the frame is (2 or 6) + length bytes long.
        # ``_walk`` takes whatever that walk stopped at.
        if self._max_message >= 125 and not self._in_message:
            pos, count = _scan_small(
                data, pos, expect_mask, expect_mask + 125, (6 if expect_mask else 2) - expect_mask)
            self.messages += count
        return self._walk(data, pos)

    def _feed_tail(self, data: bytes, pos: int) -> bytes:
        """The C ``feed``'s way back: walk on from ``pos``, where its batch walk stopped."""
        upto = self._walk(data, pos)
        return data if upto == len(data) else data[:upto]

    def _walk(self, data: bytes, pos: int) -> int:
        """Walk every kind of frame header from ``pos``, applying every rule; see ``_scan``."""
        n = len(data)
        expect_mask = self._expect_mask
        while pos < n:
            left = n - pos
            if left < 2:
                break
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            if length < 126:
                hlen = 2
            elif length == 126:
                if left < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                hlen = 4
            else:
                if left < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                hlen = 10
            opcode = b0 & 0x0F
            if opcode < 8:
                if opcode == 0:
                    if not self._in_message:
                        return self._fail(pos, CLOSE_PROTOCOL_ERROR,
                                          "continuation frame without a message to continue")
                    size = self._message_size + length
                    rsv_ok = self._rsv_cont
                elif opcode < 3:
                    if self._in_message:
                        return self._fail(pos, CLOSE_PROTOCOL_ERROR,
                                          "new data frame before the fragmented message ended")
                    size = length
                    rsv_ok = self._rsv_first
                else:
                    return self._fail(pos, CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode}")
                if size > self._max_message:
                    return self._fail(pos, CLOSE_MESSAGE_TOO_BIG,
                                      f"message exceeds {self._max_message} bytes")
                if b0 & 0x70 & ~rsv_ok:
                    return self._fail(pos, CLOSE_PROTOCOL_ERROR,
                                      "reserved bits set without a negotiated extension")
                if (b1 & 0x80) != expect_mask:
                    return self._fail(pos, CLOSE_PROTOCOL_ERROR, self._mask_reason())
                if b0 & 0x80:
                    self._in_message = False
                    self._message_size = 0
                    self.messages += 1
                else:
                    self._in_message = True
                    self._message_size = size
            else:
                if opcode > 10:
                    return self._fail(pos, CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode}")
                if length > 125:
                    return self._fail(pos, CLOSE_PROTOCOL_ERROR,
                                      "control frame payload over 125 bytes")
                if not b0 & 0x80:
                    return self._fail(pos, CLOSE_PROTOCOL_ERROR, "fragmented control frame")
                if b0 & 0x70:
                    return self._fail(pos, CLOSE_PROTOCOL_ERROR,
                                      "reserved bits set on a control frame")
                if (b1 & 0x80) != expect_mask:
                    return self._fail(pos, CLOSE_PROTOCOL_ERROR, self._mask_reason())
                if opcode == 8:
                    end = pos + hlen + (4 if expect_mask else 0) + length
                    if end > n:
                        break  # hold the close frame until it is complete
                    return self._close(data, pos, hlen, end)
            if expect_mask:
                hlen += 4
            pos += hlen + length
        if pos >= n:
            self._remaining = pos - n
            return n
        self._remaining = 0
        self._held = data[pos:]
        return pos

    def _mask_reason(self) -> str:
        if self._expect_mask:
            return "unmasked frame from a client"
        return "masked frame from a server"

    def _fail(self, pos: int, code: int, reason: str) -> int:
        self.signal = Violation(code, reason)
        self.stop()
        return pos

    def _close(self, data: bytes, pos: int, hlen: int, end: int) -> int:
        if self._expect_mask:
            mask = data[pos + hlen : pos + hlen + 4]
            payload = _unmask(data[pos + hlen + 4 : end], mask)
        else:
            payload = data[pos + hlen : end]
        parsed = parse_close_payload(payload)
        if isinstance(parsed, Violation):
            self.signal = parsed
        else:
            self.signal = CloseFrame(parsed[0], parsed[1], bytes(data[pos:end]))
        self.stop()
        return pos


# Both relays' fields. The C head holds those ``feed`` reads on every read; the rest stay in
# Python slots in both.
_HEAD_FIELDS = ("_expect_mask", "_held", "_in_message", "_inject", "_max_message",
                "_remaining", "bytes", "messages", "stopped")
_OWN_FIELDS = ("_message_size", "_rsv_cont", "_rsv_first", "_watch", "signal")


class _PyFrameRelay(FrameRelay):
    """The relay all in Python: where ``_speedups`` was not built, and in the tests."""

    __slots__ = _HEAD_FIELDS + _OWN_FIELDS


_Relay: type[FrameRelay] = _PyFrameRelay
if _RelayHead is not None:

    class _CFrameRelay(_RelayHead, FrameRelay):
        """The relay with its ``feed`` and hot fields in C (``_speedups.RelayHead``)."""

        __slots__ = _OWN_FIELDS

    _Relay = _CFrameRelay
