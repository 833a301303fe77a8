"""Micro-benchmarks of the Sans-IO core alone, fed from memory (no sockets, no event loop).

    python -m pytest bench/test_core_bench.py --benchmark-only -q   # timed, with a per-frame table
    python -m pytest bench                                          # each body once, as a test

* ``test_relay_feed``: ``FrameRelay.feed`` as the transport's hot path calls it, per direction
  (client->upstream frames are masked, upstream->client are not), for 64 B, 4 KiB and 64 KiB
  frames: one frame per chunk, 16 frames per chunk (what the e2e 64 B load reads at a time), or
  a 256 KiB chunk holding many frames (a busy socket read).
* ``test_relay_feed_walk``: 64 B frames, 16 per chunk or 256 KiB chunks, with the batch walk
  in C (``_speedups``, what the gateway runs where it was built) and in Python (its fallback).
* ``test_session_relay``: the same through ``Session.receive_client`` / ``receive_upstream``
  (one frame per chunk), i.e. with the action list the transport gets otherwise.
* ``test_relay_fragmented``: a 16-fragment message with a ping in the middle, in one chunk or
  one chunk per frame; ``test_relay_large_frame_in_reads``: a 64 KiB frame in 4 KiB reads.
* ``test_handshake_hs256``: a whole handshake per call: request bytes in -> ConnectUpstream
  (h11, wsproto checks, HS256 verification), upstream_connected -> the upstream request,
  the upstream's 101 in -> the client's 101 and Accepted.

Every benchmark also checks that the output is right, so it passes as a test.
"""

from __future__ import annotations

import pytest
from wire import (
    MASK,
    NOW,
    OP_BINARY,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    UPSTREAM,
    frame,
    kinds,
    make_gateway,
    make_session,
    open_session,
    parse_response,
    request,
    token,
    upstream_101,
)

from gaia_gateway.core import (
    Accepted,
    ConnectUpstream,
    FrameRelay,
    Limits,
    SendToClient,
    SendToUpstream,
    State,
)

SIZES = {"64B": 64, "4KiB": 4096, "64KiB": 65536}
BATCH_BYTES = 256 * 1024  # uvloop and asyncio read up to 256 KiB at a time
LIMIT = Limits().max_message_size
DIRECTIONS = ("c2u", "u2c")


def _frame(direction: str, size: int, opcode: int = OP_BINARY, *, fin: bool = True) -> bytes:
    payload = (bytes(range(256)) * (size // 256 + 1))[:size]
    return frame(opcode, payload, fin=fin, mask=MASK if direction == "c2u" else None)


def _chunk(direction: str, size: int, layout: str) -> tuple[bytes, int]:
    one = _frame(direction, size)
    if layout == "single":
        return one, 1
    if layout == "read16":
        return one * 16, 16
    count = max(2, BATCH_BYTES // len(one))
    return one * count, count


def _relay(direction: str) -> FrameRelay:
    return FrameRelay(masked=direction == "c2u", max_message_size=LIMIT)


LAYOUTS = {
    "single": "one frame per chunk",
    "read16": "16 frames per chunk (the e2e 64 B load's reads)",
    "batch": "256 KiB chunks",
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_relay_feed(benchmark, direction: str, size: str, layout: str) -> None:
    chunk, frames = _chunk(direction, SIZES[size], layout)
    relay = _relay(direction)
    benchmark.group = f"relay, {LAYOUTS[layout]}"
    benchmark.extra_info.update(frames=frames, bytes=len(chunk))
    out = benchmark(relay.feed, chunk)
    assert out is chunk  # forwarded as is: no copy, no re-encoding
    assert relay.signal is None and not relay.stopped
    assert relay.at_frame_boundary and not relay.mid_message
    assert relay.messages > 0 and relay.messages % frames == 0


@pytest.mark.parametrize("layout", ["read16", "batch"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_relay_feed_walk(benchmark, relay_impl: str, direction: str, layout: str) -> None:
    chunk, frames = _chunk(direction, SIZES["64B"], layout)
    relay = _relay(direction)
    benchmark.group = f"relay, 64 B frames, {LAYOUTS[layout]}: the hot path in C and in Python"
    benchmark.extra_info.update(frames=frames, bytes=len(chunk), walk=relay_impl)
    out = benchmark(relay.feed, chunk)
    assert out is chunk
    assert relay.signal is None and relay.at_frame_boundary
    assert relay.messages > 0 and relay.messages % frames == 0


@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_session_relay(benchmark, direction: str, size: str) -> None:
    session = open_session().session
    chunk, frames = _chunk(direction, SIZES[size], "single")
    feed = session.receive_client if direction == "c2u" else session.receive_upstream
    expected = SendToUpstream(chunk) if direction == "c2u" else SendToClient(chunk)
    benchmark.group = "session, one frame per chunk"
    benchmark.extra_info.update(frames=frames, bytes=len(chunk))
    actions = benchmark(feed, chunk, NOW)
    assert actions == [expected] and actions[0].data is chunk
    assert session.state is State.OPEN


def _fragmented(direction: str, fragments: int = 16, size: int = 256) -> list[bytes]:
    frames = [_frame(direction, size, OP_TEXT, fin=False)]
    for i in range(1, fragments):
        if i == fragments // 2:
            frames.append(_frame(direction, 8, OP_PING))  # interleaved control frame
        frames.append(_frame(direction, size, OP_CONT, fin=i == fragments - 1))
    return frames


@pytest.mark.parametrize("layout", ["one-chunk", "chunk-per-frame"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_relay_fragmented(benchmark, direction: str, layout: str) -> None:
    frames = _fragmented(direction)
    whole = b"".join(frames)
    # correctness once, on a fresh relay: the same bytes, one message
    check = _relay(direction)
    assert b"".join(check.feed(f) for f in frames) == whole and check.messages == 1

    relay = _relay(direction)
    if layout == "one-chunk":
        def run() -> bytes:
            return relay.feed(whole)
    else:
        def run() -> bytes:
            feed = relay.feed
            out = b""
            for f in frames:
                out = feed(f)
            return out

    benchmark.group = "relay, fragmented message (16 x 256 B + ping)"
    benchmark.extra_info.update(frames=len(frames), bytes=len(whole), messages=1)
    out = benchmark(run)
    assert out is (whole if layout == "one-chunk" else frames[-1])
    assert relay.signal is None and not relay.mid_message and relay.messages > 0


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_relay_large_frame_in_reads(benchmark, direction: str) -> None:
    big = _frame(direction, 65536)
    reads = [big[i : i + 4096] for i in range(0, len(big), 4096)]
    relay = _relay(direction)

    def run() -> bytes:
        feed = relay.feed
        out = b""
        for r in reads:
            out = feed(r)
        return out

    benchmark.group = "relay, 64 KiB frame in 4 KiB reads"
    benchmark.extra_info.update(frames=1, bytes=len(big), reads=len(reads))
    assert benchmark(run) is reads[-1]
    assert relay.signal is None and relay.at_frame_boundary and relay.messages > 0


def test_handshake_hs256(benchmark) -> None:
    gateway = make_gateway()  # HS256, audience "authenticated", exp and sub required
    req = request(query="experience=lobby", tok=token())
    # The injected random makes the gateway's nonce fixed, so the upstream's 101 is too.
    probe = make_session(gateway)
    probe.receive_client(req, NOW)
    (sent,) = probe.upstream_connected(NOW)
    answer = upstream_101(sent.data)

    def handshake():
        s = make_session(gateway)
        first = s.receive_client(req, NOW)
        second = s.upstream_connected(NOW)
        third = s.receive_upstream(answer, NOW)
        return s, first, second, third

    benchmark.group = "handshake"
    s, first, second, third = benchmark(handshake)
    assert first == [ConnectUpstream(UPSTREAM)]
    assert second == [SendToUpstream(sent.data)]
    assert kinds(third) == [SendToClient, Accepted]
    assert parse_response(third[0].data)[0] == 101
    assert s.state is State.OPEN and s.user_id == "user-42"
