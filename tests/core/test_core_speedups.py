"""The optional C speedups against their Python twins.

- ``_speedups.scan_small`` against ``_scan_small_py``: on any bytes, from any position, for
  both directions' parameters.
- The C-headed relay (``_speedups.RelayHead``, whose ``feed`` takes the common cases in C)
  against the Python relay: fed the same chunks in lockstep, they forward the same bytes and
  stay in the same state after every chunk, on valid and broken streams, with closes
  injected and directions muted in between.

FrameRelay's own tests also run with each of the two (tests/core/test_core_frames.py and the
FrameRelay properties in tests/fuzz).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, cframe, close_payload, sframe

from gaia_gateway.core import SPEEDUPS, FrameRelay, _frames

_speedups = pytest.importorskip(
    "gaia_gateway.core._speedups",
    reason="gaia_gateway.core._speedups is not built (no C compiler at install time?): "
    "install gcc and run pip install -e . again",
)

# (lo, hi, step) as FrameRelay._scan passes them: client frames (masked), then server frames
DIRECTIONS = [(0x80, 0x80 + 125, 6 - 0x80), (0, 125, 2)]


def test_the_relay_uses_the_c_walk_when_it_is_built() -> None:
    assert SPEEDUPS == "C"
    assert _frames._scan_small is _speedups.scan_small
    relay = FrameRelay(masked=True, max_message_size=1 << 20)
    assert isinstance(relay, _speedups.RelayHead)
    assert type(relay).feed is _speedups.RelayHead.feed


@pytest.mark.parametrize("masked", [True, False])
def test_a_batch_of_small_frames_is_walked_to_its_end(masked: bool) -> None:
    make = cframe if masked else sframe
    frames = [make(OP_TEXT if i % 2 else OP_BINARY, bytes(i % 126)) for i in range(300)]
    data = b"".join(frames)
    lo, hi, step = DIRECTIONS[0 if masked else 1]
    assert _speedups.scan_small(data, 0, lo, hi, step) == (len(data), 300)
    # cut inside the last frame: the walk reports where that frame ends, past the data
    assert _speedups.scan_small(data[:-3], 0, lo, hi, step) == (len(data), 300)
    # a big frame stops it at its header
    big = make(OP_BINARY, bytes(200))
    assert _speedups.scan_small(frames[0] + big, 0, lo, hi, step) == (len(frames[0]), 1)


@settings(max_examples=2000, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=64),
        # mostly well-formed batches, with bytes flipped in
        st.lists(st.tuples(st.sampled_from([0x81, 0x82, 0x01, 0x88, 0xC1]),
                           st.integers(0, 255), st.binary(max_size=8)), max_size=12)
        .map(lambda fs: b"".join(bytes((a, b)) + c for a, b, c in fs)),
    ),
    pos=st.integers(0, 70),
    direction=st.sampled_from(DIRECTIONS),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_c_and_python_walks_agree(data: bytes, pos: int, direction: tuple[int, int, int],
                                  kind: type) -> None:
    lo, hi, step = direction
    expected = _frames._scan_small_py(data, pos, lo, hi, step)
    assert _speedups.scan_small(kind(data), pos, lo, hi, step) == expected


@pytest.mark.parametrize(
    "args, error",
    [
        ((b"\x82\x00", 0, 0, 125), TypeError),  # four arguments
        (("text", 0, 0, 125, 2), TypeError),  # not bytes-like
        ((b"\x82\x00", -1, 0, 125, 2), ValueError),
        ((b"\x82\x00", 0, 0, 125, 0), ValueError),  # would not move forward
        ((b"\x82\x00", 0, 0, 300, 2), ValueError),
        ((b"\x82\x00", 1 << 80, 0, 125, 2), OverflowError),
    ],
)
def test_bad_arguments_raise_and_never_hang(args: tuple[object, ...], error: type) -> None:
    with pytest.raises(error):
        _speedups.scan_small(*args)


# --------------------------------------------------------------- the C relay head, lockstep

STATE = ("_remaining", "_held", "_in_message", "_inject", "_max_message", "_message_size",
         "_watch", "stopped", "messages", "bytes")


def state(relay: FrameRelay) -> tuple[object, ...]:
    return (*(getattr(relay, name) for name in STATE), repr(relay.signal))


def frames_strategy(masked: bool) -> st.SearchStrategy[bytes]:
    """Streams the C head takes (small and 16-bit frames, batches) and hands back (the rest)."""
    make = cframe if masked else sframe
    payload = st.one_of(st.integers(0, 130), st.sampled_from([200, 4096, 65535, 65536])).map(bytes)
    frame = st.one_of(
        st.tuples(st.sampled_from([OP_BINARY, OP_TEXT]), payload).map(lambda a: make(*a)),
        st.tuples(st.sampled_from([OP_BINARY, OP_TEXT]), payload)
        .map(lambda a: make(a[0], a[1], fin=False) + make(OP_CONT, a[1])),
        st.just(make(OP_PING, b"hi")),
        st.sampled_from([make(OP_CLOSE, close_payload(1000, "bye")), make(OP_CLOSE, b"\x03")]),
        # wrong mask bit, reserved bits, reserved opcode, a lying length
        st.sampled_from([(sframe if masked else cframe)(OP_BINARY, b"x"),
                         make(OP_BINARY, b"x", rsv=0x40), make(0x3, b"x"),
                         make(OP_BINARY, b"", length=1 << 40)]),
    )
    # closes, reserved bits and reserved opcodes last, so that they tend to come after a batch
    return st.lists(frame, max_size=12).map(
        lambda fs: b"".join(sorted(fs, key=lambda f: f[0] in (0x88, 0xC2, 0x83))))


@settings(max_examples=1500, deadline=None)
@given(
    masked=st.booleans(),
    data=st.data(),
    limit=st.sampled_from([16, 125, 200, 1 << 20, 1 << 70]),
    rsv=st.sampled_from([(0, 0), (0x40, 0)]),
    kind=st.sampled_from([bytes, bytes, bytes, bytearray]),
)
def test_the_c_head_and_the_python_relay_agree_after_every_chunk(
    masked: bool, data: st.DataObject, limit: int, rsv: tuple[int, int], kind: type,
) -> None:
    # The reference is all Python: its batch walk too, not the C walk the head shares.
    assert _frames._scan_small is _speedups.scan_small
    _frames._scan_small = _frames._scan_small_py
    try:
        check_lockstep(masked, data, limit, rsv, kind)
    finally:
        _frames._scan_small = _speedups.scan_small


def check_lockstep(masked: bool, data: st.DataObject, limit: int, rsv: tuple[int, int],
                   kind: type) -> None:
    stream = data.draw(frames_strategy(masked))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    # between chunks: nothing, our close injected, or the other side gone (muted)
    between = data.draw(st.lists(st.sampled_from(["", "", "", "inject", "mute"]),
                                 min_size=len(chunks), max_size=len(chunks)))
    c = _frames._CFrameRelay(masked=masked, max_message_size=limit, rsv_first=rsv[0],
                             rsv_cont=rsv[1])
    py = _frames._PyFrameRelay(masked=masked, max_message_size=limit, rsv_first=rsv[0],
                               rsv_cont=rsv[1])
    ours = b"\x88\x02\x03\xe9"
    for chunk, step in zip(chunks, between, strict=True):
        assert c.feed(kind(chunk)) == py.feed(kind(chunk))
        assert state(c) == state(py)
        if step == "inject":
            assert c.inject(ours) == py.inject(ours)
        elif step == "mute":
            c.mute()
            py.mute()
        assert state(c) == state(py)


def test_the_c_head_returns_the_bytes_it_was_given() -> None:
    """The hot path forwards the very object it read: no copy, on every case C takes."""
    relay = _frames._CFrameRelay(masked=False, max_message_size=1 << 20)
    small = sframe(OP_BINARY, bytes(10))
    batch = small * 50
    assert relay.feed(batch) is batch
    big = sframe(OP_BINARY, bytes(70_000))
    head, body = big[:3000], big[3000:]
    assert relay.feed(head) is head
    assert relay.feed(body) is body
    assert (relay.messages, relay.bytes, relay._remaining) == (51, len(batch) + len(big), 0)
