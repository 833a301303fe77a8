"""FrameRelay on its own: cut-through forwarding, every RFC 6455 section 5 verdict, close frames."""

from __future__ import annotations

import random

import pytest
from wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    cclose,
    cframe,
    close_payload,
    parse_frames,
    sclose,
    sframe,
)

from gaia_gateway.core import CloseFrame, FrameRelay, Violation, build_close, parse_close_payload

LIMIT = 1024 * 1024

# Every test here runs twice: with the relay's hot path in C, and all in Python (the
# relay_impl fixture of the root conftest.py).
pytestmark = pytest.mark.usefixtures("relay_impl")


def relay(masked: bool = True, *, limit: int = LIMIT, deflate: bool = False) -> FrameRelay:
    return FrameRelay(masked=masked, max_message_size=limit,
                      rsv_first=0x40 if deflate else 0, rsv_cont=0)


def mk(masked: bool):
    return cframe if masked else sframe


def stream(masked: bool) -> bytes:
    """A valid stream with every header size, fragments and interleaved control frames."""
    f = mk(masked)
    return b"".join(
        [
            f(OP_TEXT, b"hello"),
            f(OP_BINARY, b""),
            f(OP_BINARY, bytes(range(256)) * 2),  # 16-bit length
            f(OP_TEXT, b"frag-1 ", fin=False),
            f(OP_PING, b"are you there"),
            f(OP_CONT, b"frag-2 ", fin=False),
            f(OP_PONG, b""),
            f(OP_CONT, "fin \u00e9".encode(), fin=True),
            f(OP_PING, b"p" * 125),
            f(OP_TEXT, b"x" * 125),
            f(OP_TEXT, b"y" * 126),
        ]
    )


def feed_all(r: FrameRelay, pieces) -> bytes:
    return b"".join(r.feed(p) for p in pieces)


# ---------------------------------------------------------------------- forwarding


@pytest.mark.parametrize("masked", [True, False], ids=["client", "server"])
def test_whole_stream_is_forwarded_as_the_same_object(masked: bool) -> None:
    data = stream(masked)
    r = relay(masked)
    out = r.feed(data)
    assert out is data
    assert r.signal is None and not r.stopped
    assert r.messages == 6  # hello, empty, 512 B, the fragmented one, 125 B, 126 B
    assert r.at_frame_boundary and not r.mid_message
    assert r.bytes == len(data)


@pytest.mark.parametrize("masked", [True, False], ids=["client", "server"])
def test_split_at_every_byte_position_forwards_the_same_bytes(masked: bool) -> None:
    data = stream(masked)
    for i in range(len(data) + 1):
        r = relay(masked)
        out = feed_all(r, [data[:i], data[i:]])
        assert out == data, i
        assert r.signal is None and r.messages == 6


@pytest.mark.parametrize("masked", [True, False], ids=["client", "server"])
def test_bytewise_and_random_chunking_forward_the_same_bytes(masked: bool) -> None:
    data = stream(masked)
    r = relay(masked)
    assert feed_all(r, [data[i : i + 1] for i in range(len(data))]) == data
    rng = random.Random(6455)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        r = relay(masked)
        assert feed_all(r, pieces) == data
        assert r.messages == 6


def test_payload_chunks_pass_through_as_the_same_objects() -> None:
    payload = bytes(70_000)  # 64-bit length
    data = sframe(OP_BINARY, payload)
    r = relay(False)
    head = r.feed(data[:10])
    assert head == data[:10]
    assert not r.at_frame_boundary and r.mid_message
    body = [data[i : i + 4096] for i in range(10, len(data), 4096)]
    for chunk in body:
        assert r.feed(chunk) is chunk  # the cut-through fast path
    assert r.at_frame_boundary and r.messages == 1


def test_64bit_length_frame_split_inside_the_header() -> None:
    data = cframe(OP_BINARY, b"z" * 66_000) + cframe(OP_TEXT, b"after")
    for i in range(1, 20):
        r = relay(True)
        assert feed_all(r, [data[:i], data[i:]]) == data
        assert r.messages == 2


def test_only_an_incomplete_length_header_is_held() -> None:
    data = cframe(OP_BINARY, b"q" * 70_000)
    r = relay(True)
    for i in range(9):
        assert r.feed(data[i : i + 1]) == b""
    # 2 + 8 bytes: the size is known and checked; the mask key streams through with the payload
    assert r.feed(data[9:10]) == data[:10]
    assert r.feed(data[10:14]) == data[10:14]
    assert r.feed(data[14:]) == data[14:]
    assert r.at_frame_boundary and r.messages == 1


# ----------------------------------------------------------------------- violations


def violation(masked: bool, data: bytes, *, limit: int = LIMIT, deflate: bool = False,
              before: bytes = b"") -> Violation:
    """Feed ``before + data + trailing junk``: only ``before`` is forwarded; return the signal."""
    r = relay(masked, limit=limit, deflate=deflate)
    after = mk(masked)(OP_TEXT, b"never forwarded")
    out = r.feed(before + data + after)
    assert out == before
    assert isinstance(r.signal, Violation), r.signal
    assert r.stopped
    assert r.feed(after) == b""  # a stopped relay forwards nothing
    return r.signal


C = True  # client direction: masked
S = False  # server direction: unmasked


@pytest.mark.parametrize("masked", [C, S], ids=["client", "server"])
@pytest.mark.parametrize(
    ("frames", "code"),
    [
        (lambda f: f(OP_CONT, b"x"), 1002),
        (lambda f: f(OP_CONT, b"x", fin=False), 1002),
        (lambda f: (f(OP_TEXT, b"a", fin=False), f(OP_TEXT, b"b")), 1002),
        (lambda f: (f(OP_TEXT, b"a", fin=False), f(OP_BINARY, b"b")), 1002),
        (lambda f: f(OP_PING, b"p" * 126), 1002),
        (lambda f: f(OP_CLOSE, b"\x03\xe8" + b"r" * 124), 1002),
        (lambda f: f(OP_PING, b"p", fin=False), 1002),
        (lambda f: f(OP_PONG, b"", fin=False), 1002),
        (lambda f: f(OP_TEXT, b"a", rsv=0x40), 1002),
        (lambda f: f(OP_TEXT, b"a", rsv=0x20), 1002),
        (lambda f: f(OP_BINARY, b"a", rsv=0x10), 1002),
        (lambda f: f(OP_PING, b"", rsv=0x40), 1002),
    ],
    ids=["cont-alone", "cont-unfinished-alone", "text-in-text", "binary-in-text",
         "ping-126", "close-126", "fragmented-ping", "fragmented-pong", "rsv1", "rsv2", "rsv3",
         "rsv1-ping"],
)
def test_protocol_violations(masked: bool, frames, code: int) -> None:
    made = frames(mk(masked))
    before, bad = made if isinstance(made, tuple) else (b"", made)
    assert violation(masked, bad, before=before).code == code


@pytest.mark.parametrize("masked", [C, S], ids=["client", "server"])
@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
def test_reserved_opcodes_are_1002(masked: bool, opcode: int) -> None:
    v = violation(masked, mk(masked)(opcode, b"x"), before=mk(masked)(OP_TEXT, b"ok"))
    assert v.code == 1002 and str(opcode) in v.reason


def test_unmasked_client_frame_is_1002() -> None:
    v = violation(C, sframe(OP_TEXT, b"hi"), before=cframe(OP_TEXT, b"fine"))
    assert v == Violation(1002, "unmasked frame from a client")


@pytest.mark.parametrize("op", [OP_TEXT, OP_PING, OP_CLOSE])
def test_masked_server_frame_is_1002(op: int) -> None:
    v = violation(S, cframe(op, b""), before=sframe(OP_TEXT, b"fine"))
    assert v == Violation(1002, "masked frame from a server")


def test_message_size_limit_across_fragments_is_1009() -> None:
    first = cframe(OP_TEXT, b"a" * 60, fin=False)
    ping = cframe(OP_PING, b"p" * 100)  # control frames do not count
    v = violation(C, cframe(OP_CONT, b"b" * 41), limit=100, before=first + ping)
    assert v.code == 1009


def test_message_exactly_at_the_limit_passes() -> None:
    data = cframe(OP_TEXT, b"a" * 60, fin=False) + cframe(OP_CONT, b"b" * 40)
    r = relay(C, limit=100)
    assert r.feed(data) is data and r.signal is None
    data2 = cframe(OP_BINARY, b"c" * 100)
    assert r.feed(data2) is data2 and r.messages == 2


@pytest.mark.parametrize("masked", [C, S], ids=["client", "server"])
@pytest.mark.parametrize("length", [2**63, 2**64 - 1, LIMIT + 1])
def test_huge_declared_length_is_1009_before_any_payload(masked: bool, length: int) -> None:
    head = mk(masked)(OP_BINARY, b"", length=length)  # a header announcing `length` bytes
    r = relay(masked)
    assert r.feed(head) == b""  # nothing forwarded, nothing allocated
    assert r.signal == Violation(1009, f"message exceeds {LIMIT} bytes")
    assert r.feed(b"\x00" * 1000) == b""


def test_violation_split_from_its_header() -> None:
    good = cframe(OP_TEXT, b"good")
    bad = sframe(OP_TEXT, b"bad")
    r = relay(C)
    assert r.feed(good + bad[:1]) == good
    assert r.signal is None
    assert r.feed(bad[1:]) == b""
    assert r.signal is not None and r.signal.code == 1002


# ------------------------------------------------------------- permessage-deflate


@pytest.mark.parametrize("masked", [C, S], ids=["client", "server"])
def test_rsv1_allowed_on_first_frame_with_deflate(masked: bool) -> None:
    f = mk(masked)
    data = (f(OP_TEXT, b"compressed", rsv=0x40) + f(OP_BINARY, b"plain")
            + f(OP_BINARY, b"c1", rsv=0x40, fin=False) + f(OP_CONT, b"c2"))
    r = relay(masked, deflate=True)
    assert r.feed(data) is data and r.signal is None and r.messages == 3


@pytest.mark.parametrize(
    "frames",
    [
        lambda f: (f(OP_TEXT, b"c1", rsv=0x40, fin=False), f(OP_CONT, b"c2", rsv=0x40)),
        lambda f: f(OP_PING, b"", rsv=0x40),
        lambda f: f(OP_CLOSE, b"\x03\xe8", rsv=0x40),
        lambda f: f(OP_TEXT, b"x", rsv=0x20),
    ],
    ids=["rsv1-continuation", "rsv1-ping", "rsv1-close", "rsv2-with-deflate"],
)
def test_rsv_bits_refused_with_deflate(frames) -> None:
    made = frames(cframe)
    before, bad = made if isinstance(made, tuple) else (b"", made)
    assert violation(C, bad, deflate=True, before=before).code == 1002


def test_unknown_extension_owns_all_rsv_bits() -> None:
    r = FrameRelay(masked=True, max_message_size=LIMIT, rsv_first=0x70, rsv_cont=0x70)
    data = cframe(OP_TEXT, b"a", rsv=0x70, fin=False) + cframe(OP_CONT, b"b", rsv=0x30)
    assert r.feed(data) is data and r.signal is None


# ------------------------------------------------------------------- close frames


@pytest.mark.parametrize("masked", [C, S], ids=["client", "server"])
@pytest.mark.parametrize("code", [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000,
                                  65535])
def test_invalid_close_codes_are_1002(masked: bool, code: int) -> None:
    v = violation(masked, mk(masked)(OP_CLOSE, close_payload(code, "x")))
    assert v == Violation(1002, f"invalid close code {code}")


@pytest.mark.parametrize("masked", [C, S], ids=["client", "server"])
@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012,
                                  1013, 1014, 3000, 4001, 4999])
def test_valid_close_codes_pass(masked: bool, code: int) -> None:
    before = mk(masked)(OP_TEXT, b"last words")
    close = mk(masked)(OP_CLOSE, close_payload(code, "bye \u00e9"))
    r = relay(masked)
    assert r.feed(before + close + b"trailing junk") == before
    assert r.signal == CloseFrame(code, "bye \u00e9", close)
    assert r.stopped


def test_non_utf8_close_reason_is_1007() -> None:
    # Documented choice (RFC 6455 8.1 fails the connection; 1007 is what backends answer):
    # the relay reports it like they would, and stays transparent otherwise.
    v = violation(C, cclose(1000, b"\xff\xfe"))
    assert v == Violation(1007, "close reason is not valid UTF-8")


def test_one_byte_close_payload_is_1002() -> None:
    assert violation(S, sframe(OP_CLOSE, b"\x03")).code == 1002


def test_empty_close_is_a_close_without_code() -> None:
    r = relay(S)
    assert r.feed(sclose(None)) == b""
    assert r.signal == CloseFrame(None, "", sclose(None))


@pytest.mark.parametrize("masked", [C, S], ids=["client", "server"])
def test_close_frame_split_across_chunks_is_held_then_reported(masked: bool) -> None:
    f = mk(masked)
    before = f(OP_TEXT, b"before")
    close = f(OP_CLOSE, close_payload(4001, "bye"))
    for cut in range(1, len(close)):
        r = relay(masked)
        assert r.feed(before + close[:cut]) == before
        assert r.signal is None and not r.stopped
        assert r.feed(close[cut:]) == b""
        assert r.signal == CloseFrame(4001, "bye", close)


def test_close_inside_a_fragmented_message_is_allowed() -> None:
    first = cframe(OP_TEXT, b"half", fin=False)
    r = relay(C)
    assert r.feed(first + cclose(1000)) == first
    assert isinstance(r.signal, CloseFrame) and r.signal.code == 1000


# ----------------------------------------------------------------- inject / watch


def test_inject_at_a_boundary_goes_out_at_once_then_watches_for_the_close() -> None:
    r = relay(S)
    ours = build_close(1001, "going away")
    assert r.inject(ours) == ours
    assert r.inject(build_close(1000)) == b""  # only once
    assert r.feed(sframe(OP_TEXT, b"late")) == b""  # nothing after our close
    assert r.feed(sclose(1001)) == b""
    assert r.signal == CloseFrame(1001, "", sclose(1001))


@pytest.mark.parametrize("extra", [b"", sframe(OP_TEXT, b"next")], ids=["exact", "more"])
def test_inject_mid_frame_goes_out_when_the_frame_completes(extra: bytes) -> None:
    data = sframe(OP_BINARY, b"m" * 1000)
    ours = build_close(1001, "gateway shutting down")
    r = relay(S)
    assert r.feed(data[:100]) == data[:100]
    assert r.inject(ours) == b""
    assert r.feed(data[100:500]) == data[100:500]
    # the rest of the frame: forwarded, then our close right behind it
    assert r.feed(data[500:] + extra) == data[500:] + ours
    assert r.feed(sframe(OP_TEXT, b"later")) == b""


def test_inject_keeps_a_partial_header_for_the_watch() -> None:
    # A partial header held when our close goes out must not desynchronise the watch.
    r = relay(S)
    late = sframe(OP_TEXT, b"hello")
    assert r.feed(late[:1]) == b""
    ours = build_close(1001)
    assert r.inject(ours) == ours
    assert r.feed(late[1:]) == b""
    assert r.signal is None
    assert r.feed(sclose(1001)) == b""
    assert r.signal == CloseFrame(1001, "", sclose(1001))


# ----------------------------------------------------------------------- helpers


def test_build_close_roles_and_reason_cut() -> None:
    mask = b"\x01\x02\x03\x04"
    (f,) = parse_frames(build_close(4000, "\u00e9" * 100, mask=mask))
    assert f.masked and f.opcode == OP_CLOSE and len(f.payload) <= 125
    code, reason = f.close
    assert code == 4000 and reason == "\u00e9" * 61  # 122 bytes: cut on a character boundary
    (g,) = parse_frames(build_close(None))
    assert not g.masked and g.payload == b""


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", (None, "")),
        (b"\x03\xe8", (1000, "")),
        (b"\x0f\xa1ok", (4001, "ok")),
        (b"\x03", Violation(1002, "close frame with a 1-byte payload")),
        (b"\x03\xed", Violation(1002, "invalid close code 1005")),
        (b"\x03\xe8\xc3", Violation(1007, "close reason is not valid UTF-8")),
    ],
)
def test_parse_close_payload(payload: bytes, expected) -> None:
    assert parse_close_payload(payload) == expected
