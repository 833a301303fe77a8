"""The optional C walk (``_speedups.scan_small``) against its Python twin, ``_scan_small_py``.

FrameRelay's own tests run with each of the two (tests/core/test_core_frames.py and the
FrameRelay properties in tests/fuzz); here the two functions are held equal on their own,
on any bytes, from any position, for both directions' parameters.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire import OP_BINARY, OP_TEXT, cframe, sframe

from gaia_gateway.core import SPEEDUPS, _frames

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
