"""Property tests of the Sans-IO core's contract on hostile bytes (hypothesis).

The drivers and the checks live in ``fuzz/gaia_fuzzlib.py`` so the atheris harnesses assert
exactly the same invariants; its module docstring states them. In short, for byte streams
built from valid handshakes and frames, then mutated (bit flips, truncation, duplicated
slices, inserted tokens and runs, deletions, swaps) or drawn at random, and split at random
points:

* HTTP path (``Session.receive_client`` before the upgrade): nothing raises; only
  SendToClient / CloseClient / CloseUpstream / Rejected / ConnectUpstream come out; a
  Rejected carries a status in {400, 403, 404, 405, 408, 414, 426, 431, 503} and is followed
  by its response and CloseClient, leaving the session CLOSED with no deadline; otherwise the
  session waits in REQUEST with its handshake deadline set, or has emitted ConnectUpstream
  (CONNECTING, connect deadline set). The upstream's answer to the gateway's own handshake is
  fuzzed the same way (refusals are 4xx passed through, or 502).
* Frame path (an OPEN session, the upstream's 101 simulated): nothing raises; the bytes sent
  upstream are exactly the client's bytes up to what an independent RFC 6455 scanner
  (``ref_scan``) says may be forwarded. Precisely: while no close frame or violation has
  been seen, the forwarded bytes are the longest prefix of the input that ends either on a
  frame boundary or inside a frame whose header, up to and including its extended payload
  length, has arrived (cut-through: the rest of that frame's mask key and payload may follow
  in later chunks); an incomplete close frame is held back whole. A valid close frame is
  forwarded as it came, and nothing after it. A violation stops the stream right before the
  offending frame: the upstream gets the gateway's own 1001 close (masked with the session's
  ``random``), the client later gets the violation's code, one of {1002, 1007, 1009} and one
  the offending frame really earns. The mirror holds upstream->client (unmasked frames; the
  client gets 1011 and the upstream gets the violation's code). Nothing is sent to a side
  after its CloseClient / CloseUpstream. After client EOF, upstream EOF or a far timer the
  session reaches CLOSED, each socket closed exactly once.
* FrameRelay alone: feeding a stream whole or split at arbitrary points forwards the same
  bytes, counts the same messages and raises the same signal, and agrees with ``ref_scan``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))

import gaia_fuzzlib as fz

# 200 examples per test keeps the file well under a minute on a 2-core CI machine; a long
# local hunt: GAIA_FUZZ_EXAMPLES=20000 python -m pytest tests/fuzz/test_properties.py
SETTINGS = settings(
    max_examples=int(os.environ.get("GAIA_FUZZ_EXAMPLES", "200")),
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HANDSHAKES = fz.handshake_seeds()
ANSWERS = fz.upstream_answer_seeds()
CLIENT_FRAMES = fz.frame_seeds(masked=True)
SERVER_FRAMES = fz.frame_seeds(masked=False)

mutations = st.lists(
    st.tuples(st.integers(0, 7), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
    max_size=6,
)
cuts = st.lists(st.integers(0, 1 << 16), max_size=16)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    return fz.mutate(draw(st.sampled_from(seeds)), draw(mutations))


def byte_streams(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(seeds),
        mutated(seeds),
        st.binary(max_size=400),
        st.tuples(mutated(seeds), mutated(seeds)).map(b"".join),
    )


_PATTERN = bytes(range(256)) * 257
payloads = st.one_of(
    st.binary(max_size=40),
    # the lengths at the edges of the 7-, 16- and 64-bit forms and of the 64-byte limit
    st.sampled_from([0, 1, 63, 64, 65, 125, 126, 127, 200, 65535, 65536]).map(
        lambda n: _PATTERN[:n]
    ),
)


@st.composite
def messages(draw: st.DrawFn, compressed: bool = False) -> fz.Msg:
    return fz.Msg(
        opcode=draw(st.sampled_from([1, 2])),
        fragments=tuple(draw(st.lists(payloads, min_size=1, max_size=4))),
        pings=tuple(draw(st.sets(st.integers(0, 3), max_size=2))),
        mask=draw(st.binary(min_size=4, max_size=4)),
        compressed=compressed and draw(st.booleans()),
    )


close_codes = st.sampled_from([1000, 1001, 1003, 1008, 1011, 3000, 4999])


@st.composite
def valid_streams(draw: st.DrawFn, masked: bool, compressed: bool = False) -> bytes:
    msgs = draw(st.lists(messages(compressed), max_size=4))
    close = draw(st.one_of(
        st.none(), st.tuples(close_codes, st.text(max_size=20).map(
            lambda t: t.encode()[:123].decode("utf-8", "ignore").encode()))))
    return fz.build_stream(msgs, masked=masked, close=close,
                           close_mask=draw(st.binary(min_size=4, max_size=4)))


def frame_streams(masked: bool) -> st.SearchStrategy[bytes]:
    seeds = CLIENT_FRAMES if masked else SERVER_FRAMES
    valid = st.booleans().flatmap(lambda c: valid_streams(masked, c))
    return st.one_of(
        valid,
        valid.flatmap(lambda s: st.just(s) if not s else mutations.map(
            lambda ops: fz.mutate(s, ops))),
        byte_streams(seeds),
    )


# ------------------------------------------------------------------------- HTTP path


@SETTINGS
@given(data=byte_streams(HANDSHAKES), cut=cuts,
       variant=st.integers(0, fz.GATEWAY_VARIANTS - 1), end=st.integers(0, 1))
def test_handshake_bytes_only_documented_outcomes(data: bytes, cut: list[int], variant: int,
                                                  end: int) -> None:
    fz.run_http(fz.split(data, cut), variant=variant, end=end)


def test_http10_upgrade_without_host_is_a_400() -> None:
    """Found by fuzz_http.py: h11 accepts HTTP/1.0 without Host, then wsproto rebuilt the
    request as HTTP/1.1 and h11.LocalProtocolError escaped receive_client."""
    request = fz.handshake(version="HTTP/1.0").replace(b"Host: gateway.example\r\n", b"")
    d = fz.run_http([request])
    assert [r.status for r in d.rejections] == [400]


@SETTINGS
@given(data=st.one_of(st.sampled_from(ANSWERS), mutated(ANSWERS), st.binary(max_size=200)),
       cut=cuts, ext=st.integers(0, 2), end=st.integers(0, 2), variant=st.integers(0, 2))
def test_upstream_answer_only_documented_outcomes(data: bytes, cut: list[int], ext: int,
                                                  end: int, variant: int) -> None:
    fz.run_upstream_handshake(fz.split(data, cut), ext=ext, end=end, variant=variant)


def test_upstream_4xx_without_a_stdlib_phrase_is_passed_through() -> None:
    """Found by the fuzzer: 499 (no ``http.HTTPStatus`` member) made http_response raise."""
    answer = b"HTTP/1.1 499 Client Closed Request\r\nContent-Length: 0\r\n\r\n"
    d = fz.run_upstream_handshake([answer])
    assert [r.status for r in d.rejections] == [499]
    assert bytes(d.to_client).startswith(b"HTTP/1.1 499 ")


def test_upstream_non_ascii_extension_answer_is_a_502() -> None:
    """Found by fuzz_http.py: wsproto's split_comma_header decodes ASCII and raised."""
    ok, *_ = ANSWERS
    answer = ok[:-2] + b"Sec-WebSocket-Extensions: permessa\xd3ge-deflate\r\n\r\n"
    d = fz.run_upstream_handshake([answer], ext=1)
    assert [r.status for r in d.rejections] == [502]


# ------------------------------------------------------------------------- frame path


@SETTINGS
@given(data=frame_streams(masked=True), cut=cuts, variant=st.integers(0, 1),
       ext=st.integers(0, 2), early=st.integers(0, 1), end=st.integers(0, 2))
def test_client_frames_relay_a_valid_prefix(data: bytes, cut: list[int], variant: int, ext: int,
                                            early: int, end: int) -> None:
    fz.run_client_frames(fz.split(data, cut), variant=variant, ext=ext, early=early, end=end)


@SETTINGS
@given(data=frame_streams(masked=False), cut=cuts, variant=st.integers(0, 1),
       ext=st.integers(0, 2), trailing=st.integers(0, 1), end=st.integers(0, 2))
def test_upstream_frames_relay_a_valid_prefix(data: bytes, cut: list[int], variant: int,
                                              ext: int, trailing: int, end: int) -> None:
    fz.run_upstream_frames(fz.split(data, cut), variant=variant, ext=ext, trailing=trailing,
                           end=end)


@SETTINGS
@given(
    client=frame_streams(masked=True), upstream=frame_streams(masked=False),
    client_cut=cuts, upstream_cut=cuts,
    events=st.lists(st.tuples(st.integers(0, 9), st.binary(min_size=1, max_size=1)),
                    max_size=12),
    variant=st.integers(0, 1), ext=st.integers(0, 2), end=st.integers(0, 2),
)
def test_interleaved_traffic_and_events_never_dangle(
    client: bytes, upstream: bytes, client_cut: list[int], upstream_cut: list[int],
    events: list[tuple[int, bytes]], variant: int, ext: int, end: int,
) -> None:
    # Both streams' chunks in order, with ends, timers, write blocking and shutdown mixed in.
    ops: list[tuple[int, bytes]] = []
    c = [(0, x) for x in fz.split(client, client_cut)]
    u = [(4, x) for x in fz.split(upstream, upstream_cut)]
    ev = list(events)
    while c or u or ev:
        for queue in (c, u, ev):
            if queue:
                ops.append(queue.pop(0))
    fz.run_mixed(ops, variant=variant, ext=ext, end=end)


def test_nothing_is_relayed_to_a_side_after_it_was_closed() -> None:
    """Found by the interleaving property (and seen in the soak as uvloop's "Cannot call
    write() after write_eof()"): after CloseClient the upstream's frames were still relayed to
    the client, after CloseUpstream the client's (even a close queued behind a frame)."""
    # the client leaves (FIN): CloseClient; the upstream's data must not follow it
    d = fz.open_session()
    d.call("client_eof", d.tick())
    assert d.client_closes == 1
    assert d.call("receive_upstream", fz.sframe(1, b"late"), d.tick()) == []
    d.call("receive_upstream", fz.sframe(8, fz.close_payload(1001)), d.tick())
    assert d.s.upstream_close == (1001, "")  # the upstream's close reply is still seen
    d.call("upstream_eof", d.tick())  # and its socket closed after it, by the upstream
    assert d.s.state is fz.State.CLOSED and d.upstream_closes == 1
    # the upstream breaks the protocol while a client frame is in flight
    fz.run_mixed([(0, b"\x81\x80"), (4, b"\x80\x00"), (0, b"\x00\x00\x00\x00")])


# ------------------------------------------------------------------------- FrameRelay
# Both tests run with the relay's hot path in C, and all in Python (the relay_impl fixture).
# The fixture holds for the whole test, which is what is wanted here: hence the health check
# is off.
RELAY_SETTINGS = settings(
    SETTINGS,
    suppress_health_check=[*SETTINGS.suppress_health_check, HealthCheck.function_scoped_fixture],
)


@RELAY_SETTINGS
@given(masked=st.booleans(), compressed=st.booleans(), data=st.data(), cut=cuts,
       limit=st.sampled_from([64, 1 << 20]))
def test_relay_split_feeding_equals_whole_feeding_on_valid_streams(
    relay_impl: str, masked: bool, compressed: bool, data: st.DataObject, cut: list[int],
    limit: int,
) -> None:
    stream = data.draw(valid_streams(masked, compressed))
    rsv_first = 0x40 if compressed else 0
    chunks = fz.split(stream, cut)
    whole = fz.relay_run([stream], masked=masked, max_message=limit, rsv_first=rsv_first)
    parts = fz.relay_run(chunks, masked=masked, max_message=limit, rsv_first=rsv_first)
    assert whole[0] == parts[0]
    assert whole[2] == parts[2]
    assert repr(whole[1]) == repr(parts[1])
    ref = fz.ref_scan(stream, masked=masked, max_message=limit, rsv_first=rsv_first)
    if limit == 1 << 20:  # every message fits: the whole stream is valid
        assert ref.kind in ("open", "close")
        assert whole[0] + (whole[1].raw if whole[1] is not None else b"") == stream
    fz.check_relay(stream, chunks, masked=masked, max_message=limit, rsv_first=rsv_first)


@RELAY_SETTINGS
@given(masked=st.booleans(), data=st.data(), cut=cuts,
       rsv=st.sampled_from([(0, 0), (0x40, 0), (0x70, 0x70)]),
       limit=st.sampled_from([16, 64, 125, 1 << 20]))
def test_relay_split_feeding_equals_whole_feeding_on_any_stream(
    relay_impl: str, masked: bool, data: st.DataObject, cut: list[int], rsv: tuple[int, int],
    limit: int,
) -> None:
    stream = data.draw(frame_streams(masked))
    fz.check_relay(stream, fz.split(stream, cut), masked=masked, max_message=limit,
                   rsv_first=rsv[0], rsv_cont=rsv[1])
