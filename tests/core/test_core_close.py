"""The relay through a Session, and how each way of ending is carried across."""

from __future__ import annotations

import pytest
from wire import (
    NOW,
    OP_BINARY,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    RANDOM,
    cclose,
    cframe,
    make_gateway,
    open_session,
    parse_close,
    parse_frames,
    sclose,
    sframe,
    to_client,
    to_upstream,
)

from gaia_gateway.core import (
    CloseClient,
    CloseUpstream,
    Limits,
    SendToClient,
    SendToUpstream,
    State,
)

CLOSE_TIMEOUT = Limits().close_timeout


def opened(**limits):
    gw = make_gateway(limits=Limits(**limits)) if limits else None
    return open_session(gw).session


def upstream_ends(s, now: float = NOW) -> None:
    """The close frames are exchanged: the upstream's socket is closed once its end of stream
    comes (toward the upstream the gateway is the client; RFC 6455 7.1.1), not before."""
    assert s.state is State.CLOSING
    assert s.upstream_eof(now) == [CloseUpstream()]
    assert s.state is State.CLOSED


def client_traffic() -> bytes:
    return b"".join([
        cframe(OP_TEXT, b"move 1 2"),
        cframe(OP_BINARY, bytes(300)),
        cframe(OP_TEXT, b"part one ", fin=False),
        cframe(OP_PING, b"hb"),
        cframe(OP_CONT, b"part two", fin=False),
        cframe(OP_CONT, b" end"),
    ])


def server_traffic() -> bytes:
    return b"".join([
        sframe(OP_TEXT, b"state 1"),
        sframe(OP_BINARY, bytes(70_000)),
        sframe(OP_TEXT, b"a", fin=False),
        sframe(OP_CONT, b"b"),
    ])


# ------------------------------------------------------------------------- relaying


def test_frames_pass_through_the_session_as_the_same_objects() -> None:
    s = opened()
    up = client_traffic()
    actions = s.receive_client(up, NOW)
    assert actions == [SendToUpstream(up)] and actions[0].data is up
    down = server_traffic()
    actions = s.receive_upstream(down, NOW)
    assert actions == [SendToClient(down)] and actions[0].data is down
    assert s.state is State.OPEN
    s.client_eof(NOW)  # the accounting is in the info once the session is closing
    info = s.info()
    assert (info["msgs_in"], info["msgs_out"]) == (3, 3)
    assert (info["bytes_in"], info["bytes_out"]) == (len(up), len(down))


def test_split_at_every_byte_position_through_the_session() -> None:
    # (FrameRelay's own tests split longer streams; one handshake per position here)
    up = b"".join([
        cframe(OP_TEXT, b"mv", fin=False),
        cframe(OP_PING, b""),
        cframe(OP_CONT, b"!"),
        cframe(OP_BINARY, bytes(126)),  # 16-bit length
    ])
    for i in range(len(up) + 1):
        s = opened()
        out = to_upstream(s.receive_client(up[:i], NOW) + s.receive_client(up[i:], NOW))
        assert out == up, i
        assert s.state is State.OPEN
    down = sframe(OP_TEXT, b"hi") + sframe(OP_BINARY, bytes(200)) + sframe(OP_PING, b"")
    for i in range(len(down) + 1):
        s = opened()
        out = to_client(s.receive_upstream(down[:i], NOW) + s.receive_upstream(down[i:], NOW))
        assert out == down, i


# ------------------------------------------------------------------ clean closes


def test_client_close_is_carried_across_byte_identical() -> None:
    s = opened()
    close = cclose(4001, "bye")
    actions = s.receive_client(cframe(OP_TEXT, b"last") + close, NOW)
    assert actions == [SendToUpstream(cframe(OP_TEXT, b"last")), SendToUpstream(close)]
    assert s.state is State.CLOSING
    assert s.deadline == NOW + CLOSE_TIMEOUT
    # the upstream may still talk before its close reply; then the reply goes to the client
    reply = sclose(4001, "bye")
    actions = s.receive_upstream(sframe(OP_TEXT, b"final state") + reply, NOW + 0.1)
    assert actions == [SendToClient(sframe(OP_TEXT, b"final state")), SendToClient(reply),
                       CloseClient()]
    upstream_ends(s, NOW + 0.1)
    assert s.deadline is None
    info = s.info()
    assert info["initiator"] == "client"
    assert info["client_close"] == "4001 bye" and info["upstream_close"] == "4001 bye"
    assert info["gateway_close"] is None
    assert info["duration_ms"] == 100.0


def test_upstream_close_is_carried_across_byte_identical() -> None:
    s = opened()
    close = sclose(1000, "match over")
    assert s.receive_upstream(close, NOW) == [SendToClient(close)]
    assert s.state is State.CLOSING
    reply = cclose(1000, "match over")
    assert s.receive_client(reply, NOW) == [SendToUpstream(reply), CloseClient()]
    upstream_ends(s)
    assert s.info()["initiator"] == "upstream"


def test_close_without_code_is_carried_too() -> None:
    s = opened()
    assert s.receive_client(cclose(None), NOW) == [SendToUpstream(cclose(None))]
    s.receive_upstream(sclose(None), NOW)
    upstream_ends(s)
    assert s.info()["client_close"] == "1005"


def test_close_split_across_chunks_through_the_session() -> None:
    s = opened()
    close = cclose(3000, "split")
    assert s.receive_client(close[:5], NOW) == []
    assert s.receive_client(close[5:], NOW) == [SendToUpstream(close)]


def test_simultaneous_closes() -> None:
    s = opened()
    c, u = cclose(1000), sclose(1001)
    assert s.receive_client(c, NOW) == [SendToUpstream(c)]
    # the upstream's own close crossed ours: it still goes to the client
    assert s.receive_upstream(u, NOW) == [SendToClient(u), CloseClient()]
    upstream_ends(s)


def test_close_timeout_when_the_upstream_never_replies() -> None:
    s = opened()
    s.receive_client(cclose(1000), NOW)
    assert s.handle_timer(NOW + CLOSE_TIMEOUT - 0.01) == []
    actions = s.handle_timer(NOW + CLOSE_TIMEOUT)
    # the client never got a close frame from us: its socket is aborted
    assert actions == [CloseClient(abort=True), CloseUpstream(abort=True)]
    assert s.state is State.CLOSED


def test_upstream_socket_waits_for_the_upstream_to_close_it_first() -> None:
    # RFC 6455 7.1.1: the server closes the TCP connection first, so that the TIME_WAIT is
    # its own; toward the upstream the gateway is the client.
    s = opened()
    s.receive_client(cclose(1000), NOW)
    assert s.receive_upstream(sclose(1000), NOW + 0.1) == [SendToClient(sclose(1000)),
                                                           CloseClient()]
    assert s.state is State.CLOSING and s.deadline == NOW + CLOSE_TIMEOUT
    # bytes after its close frame are nobody's
    assert s.receive_upstream(sframe(OP_TEXT, b"after close"), NOW + 0.2) == []
    assert s.handle_timer(NOW + 0.5) == []
    assert s.upstream_eof(NOW + 0.6) == [CloseUpstream()]
    assert s.state is State.CLOSED and s.deadline is None
    assert s.info()["upstream_close"] == "1000" and s.info()["duration_ms"] == 600.0


def test_upstream_that_keeps_its_socket_open_is_aborted_at_close_timeout() -> None:
    s = opened()
    close = sclose(1001, "restart")
    assert s.receive_upstream(close, NOW) == [SendToClient(close)]
    assert s.receive_client(cclose(1001), NOW) == [SendToUpstream(cclose(1001)), CloseClient()]
    assert s.handle_timer(NOW + CLOSE_TIMEOUT - 0.01) == []
    # aborted, not closed: an RST leaves no TIME_WAIT on the gateway either
    assert s.handle_timer(NOW + CLOSE_TIMEOUT) == [CloseUpstream(abort=True)]
    assert s.state is State.CLOSED
    assert s.info()["upstream_close"] == "1001 restart"


# ------------------------------------------------------------------ lost sockets


def test_client_eof_without_close_sends_1001_upstream() -> None:
    s = opened()
    actions = s.client_eof(NOW)
    assert [type(a) for a in actions] == [SendToUpstream, CloseClient]
    assert parse_close(actions[0].data, masked=True) == (1001, "client went away")
    assert parse_frames(actions[0].data)[0].masked
    assert actions[0].data[2:6] == RANDOM(4)  # masked with the injected random
    assert s.state is State.CLOSING
    # the upstream answers, then closes its socket: done
    assert s.receive_upstream(sclose(1001), NOW) == []
    upstream_ends(s)
    assert s.info()["client_close"] == "1006 connection lost"
    assert s.info()["gateway_close"] is None


def test_client_eof_after_its_close_does_not_send_another() -> None:
    s = opened()
    s.receive_client(cclose(1000), NOW)
    assert s.client_eof(NOW) == [CloseClient()]
    assert s.receive_upstream(sclose(1000), NOW) == []
    upstream_ends(s)


def test_client_eof_mid_frame_aborts_the_upstream_without_a_close_frame() -> None:
    s = opened()
    frame = cframe(OP_BINARY, bytes(1000))
    assert s.receive_client(frame[:300], NOW) == [SendToUpstream(frame[:300])]
    actions = s.client_eof(NOW)
    assert actions == [CloseUpstream(abort=True), CloseClient()]
    assert s.state is State.CLOSED


def test_client_eof_with_only_a_partial_header_held_closes_cleanly() -> None:
    s = opened()
    assert s.receive_client(cframe(OP_TEXT, b"x")[:1], NOW) == []
    actions = s.client_eof(NOW)
    assert parse_close(to_upstream(actions), masked=True) == (1001, "client went away")


def test_upstream_eof_sends_1011_to_the_client() -> None:
    s = opened()
    actions = s.upstream_eof(NOW)
    assert [type(a) for a in actions] == [SendToClient, CloseUpstream]
    assert parse_close(actions[0].data, masked=False) == (1011, "upstream connection lost")
    assert s.state is State.CLOSING
    assert s.receive_client(cclose(1011), NOW) == [CloseClient()]
    assert s.state is State.CLOSED
    assert s.info()["upstream_close"] == "1006 connection lost"
    assert s.info()["gateway_close"] == "1011 upstream connection lost"


def test_upstream_eof_mid_frame_aborts_the_client() -> None:
    s = opened()
    frame = sframe(OP_BINARY, bytes(1000))
    s.receive_upstream(frame[:10], NOW)
    assert s.upstream_eof(NOW) == [CloseClient(abort=True), CloseUpstream()]
    assert s.state is State.CLOSED


def test_both_eofs() -> None:
    s = opened()
    s.client_eof(NOW)
    assert s.upstream_eof(NOW) == [CloseUpstream()]
    assert s.state is State.CLOSED
    assert s.client_eof(NOW) == [] and s.upstream_eof(NOW) == []
    assert s.receive_client(b"more", NOW) == [] and s.receive_upstream(b"more", NOW) == []


# ------------------------------------------------------------ protocol violations


@pytest.mark.parametrize(
    ("bad", "code", "limits"),
    [
        (sframe(OP_TEXT, b"unmasked"), 1002, {}),
        (cframe(3, b"reserved"), 1002, {}),
        (cframe(OP_CONT, b"orphan"), 1002, {}),
        (cframe(OP_BINARY, bytes(101)), 1009, {"max_message_size": 100}),
        (cframe(OP_BINARY, b"", length=2**63), 1009, {}),
    ],
    ids=["unmasked", "reserved-opcode", "orphan-continuation", "too-big", "2**63"],
)
def test_client_violation_closes_upstream_first_then_the_client(bad, code, limits) -> None:
    s = opened(**limits)
    good = cframe(OP_TEXT, b"a request")
    actions = s.receive_client(good + bad + cframe(OP_TEXT, b"ignored"), NOW)
    assert actions[0] == SendToUpstream(good)
    assert [type(a) for a in actions] == [SendToUpstream, SendToUpstream]
    assert parse_close(actions[1].data, masked=True) == (1001, "client protocol error")
    assert to_client(actions) == b""
    assert s.state is State.CLOSING
    # the reply to the request sent before the error still reaches the client...
    reply = sframe(OP_TEXT, b"the answer")
    assert s.receive_upstream(reply, NOW) == [SendToClient(reply)]
    # ...and the client's close comes once the upstream has answered ours
    actions = s.receive_upstream(sclose(1001), NOW)
    assert [type(a) for a in actions] == [SendToClient, CloseClient]
    assert parse_close(actions[0].data, masked=False)[0] == code
    upstream_ends(s)
    assert s.info()["client_close"].startswith(f"{code} client error")


def test_client_violation_close_comes_at_close_timeout_without_an_upstream_reply() -> None:
    s = opened()
    s.receive_client(sframe(OP_TEXT, b"unmasked"), NOW)
    assert s.handle_timer(NOW + CLOSE_TIMEOUT / 2) == []
    actions = s.handle_timer(NOW + CLOSE_TIMEOUT)
    assert [type(a) for a in actions] == [SendToClient, CloseClient, CloseUpstream]
    assert parse_close(actions[0].data, masked=False) == (1002, "unmasked frame from a client")
    assert actions[1] == CloseClient(abort=False) and actions[2] == CloseUpstream(abort=True)
    assert s.state is State.CLOSED


def test_client_violation_when_the_upstream_is_already_gone() -> None:
    s = opened()
    s.upstream_eof(NOW)  # the client is told with 1011...
    actions = s.receive_client(cframe(3, b""), NOW)
    assert actions == [CloseClient()]  # ...and gets no second close frame
    assert s.state is State.CLOSED


def test_client_violation_answering_the_upstreams_close() -> None:
    s = opened()
    close = sclose(1000, "done")
    assert s.receive_upstream(close, NOW) == [SendToClient(close)]
    # the client answers with garbage: it already has a close frame, the upstream gets ours
    actions = s.receive_client(cframe(3, b""), NOW)
    assert [type(a) for a in actions] == [SendToUpstream, CloseClient]
    assert parse_close(actions[0].data, masked=True) == (1001, "client protocol error")
    upstream_ends(s)


def test_client_violation_answering_the_gateways_close() -> None:
    s = opened()
    s.shutdown(NOW)
    actions = s.receive_client(cframe(3, b""), NOW)
    assert [type(a) for a in actions] == [SendToUpstream, CloseClient]
    assert parse_close(actions[0].data, masked=True) == (1001, "client protocol error")
    assert s.receive_upstream(sclose(1001), NOW) == []
    upstream_ends(s)


def test_upstream_violation_closes_both_sides() -> None:
    s = opened()
    actions = s.receive_upstream(cframe(OP_TEXT, b"masked from a server"), NOW)
    assert [type(a) for a in actions] == [SendToUpstream, SendToClient, CloseUpstream]
    assert parse_close(actions[0].data, masked=True) == (1002, "masked frame from a server")
    assert parse_close(actions[1].data, masked=False) == (1011, "upstream protocol error")
    assert s.receive_client(cclose(1011), NOW) == [CloseClient()]
    assert s.state is State.CLOSED


# -------------------------------------------------------------- gateway closes


def test_shutdown_at_a_frame_boundary() -> None:
    s = opened()
    actions = s.shutdown(NOW)
    assert [type(a) for a in actions] == [SendToClient]
    assert parse_close(actions[0].data, masked=False) == (1001, "gateway shutting down")
    assert s.state is State.CLOSING and s.info()["initiator"] == "gateway"
    # the upstream keeps talking: nothing more reaches the client
    assert s.receive_upstream(sframe(OP_TEXT, b"late"), NOW) == []
    # the client's close reply is what the upstream gets
    reply = cclose(1001)
    assert s.receive_client(reply, NOW) == [SendToUpstream(reply), CloseClient()]
    assert s.receive_upstream(sclose(1001), NOW) == []
    upstream_ends(s)


@pytest.mark.parametrize("extra", [b"", sframe(OP_TEXT, b"next")], ids=["exact", "more"])
def test_shutdown_mid_frame_appends_the_close_after_the_frame(extra: bytes) -> None:
    s = opened()
    frame = sframe(OP_BINARY, bytes(5000))
    assert s.receive_upstream(frame[:1000], NOW) == [SendToClient(frame[:1000])]
    assert s.shutdown(NOW) == []
    assert s.receive_upstream(frame[1000:3000], NOW) == [SendToClient(frame[1000:3000])]
    actions = s.receive_upstream(frame[3000:] + extra, NOW)
    out = to_client(actions)
    assert out[: len(frame) - 3000] == frame[3000:]
    assert parse_close(out[len(frame) - 3000 :], masked=False) == (1001, "gateway shutting down")


def test_shutdown_with_a_partial_upstream_header_held() -> None:
    s = opened()
    late = sframe(OP_TEXT, b"hello")
    assert s.receive_upstream(late[:1], NOW) == []
    assert parse_close(to_client(s.shutdown(NOW)), masked=False)[0] == 1001
    # the rest of that frame is not mistaken for a broken frame header
    assert s.receive_upstream(late[1:], NOW) == []
    assert to_upstream(s.receive_client(cclose(1001), NOW)) == cclose(1001)
    assert s.receive_upstream(sclose(1001), NOW) == []
    upstream_ends(s)
    assert s.info()["upstream_close"] == "1001"


def test_shutdown_is_idempotent() -> None:
    s = opened()
    s.shutdown(NOW)
    assert s.shutdown(NOW) == []


def test_slow_client_is_dropped_after_send_timeout() -> None:
    s = opened()
    s.client_write_blocked(NOW + 1)
    s.client_write_blocked(NOW + 5)  # the first time counts
    assert s.deadline == NOW + 31
    assert s.handle_timer(NOW + 30.9) == []
    actions = s.handle_timer(NOW + 31)
    assert [type(a) for a in actions] == [CloseClient, SendToUpstream]
    assert actions[0] == CloseClient(abort=True)
    assert parse_close(actions[1].data, masked=True) == (1001, "client not reading")
    # the next deadline is the close timeout, not the spent send timeout
    assert s.deadline == NOW + 31 + CLOSE_TIMEOUT
    assert s.handle_timer(NOW + 31) == []
    assert s.receive_upstream(sclose(1001), NOW + 31.2) == []
    upstream_ends(s, NOW + 31.2)
    assert s.info()["gateway_close"] == "1001 client not reading"


def test_slow_client_mid_frame_gets_the_upstream_close_after_the_frame() -> None:
    s = opened()
    frame = cframe(OP_BINARY, bytes(500))
    s.receive_client(frame[:100], NOW)
    s.client_write_blocked(NOW)
    assert s.handle_timer(NOW + 30) == [CloseClient(abort=True)]
    # the client's frame still completes upstream, then our close follows
    out = to_upstream(s.receive_client(frame[100:], NOW + 30.1))
    rest = len(frame) - 100
    assert out[:rest] == frame[100:]
    assert parse_close(out[rest:], masked=True) == (1001, "client not reading")


def test_upstream_not_reading_is_dropped_after_send_timeout() -> None:
    # The client is not read while the upstream's buffer is full, so a client that leaves
    # meanwhile is invisible; the same send timeout ends the session.
    s = opened()
    s.upstream_write_blocked(NOW + 2)
    assert s.deadline == NOW + 32
    actions = s.handle_timer(NOW + 32)
    assert [type(a) for a in actions] == [CloseUpstream, SendToClient]
    assert actions[0] == CloseUpstream(abort=True)
    assert parse_close(actions[1].data, masked=False) == (1011, "upstream not reading")
    assert s.receive_client(cclose(1011), NOW + 32.1) == [
        CloseClient()
    ]
    assert s.state is State.CLOSED


def test_unblocked_upstream_is_not_dropped() -> None:
    s = opened()
    s.upstream_write_blocked(NOW)
    s.upstream_write_unblocked()
    assert s.deadline is None
    assert s.handle_timer(NOW + 100) == []
    assert s.state is State.OPEN


def test_unblocked_client_is_not_dropped() -> None:
    s = opened()
    s.client_write_blocked(NOW)
    s.client_write_unblocked()
    assert s.deadline is None
    assert s.handle_timer(NOW + 100) == []
    assert s.state is State.OPEN


def test_idle_timeout() -> None:
    s = opened(idle_timeout=30.0)
    assert s.deadline == NOW + 30
    # the first expiry notes the traffic mark; traffic since then keeps the session
    assert s.handle_timer(NOW + 30) == []
    assert s.deadline == NOW + 60
    s.receive_client(cframe(OP_TEXT, b"still here"), NOW + 45)
    assert s.handle_timer(NOW + 60) == []
    assert s.deadline == NOW + 90
    # a whole period without a byte either way closes both sides with 1001
    actions = s.handle_timer(NOW + 90)
    assert [type(a) for a in actions] == [SendToClient, SendToUpstream]
    assert parse_close(actions[0].data, masked=False) == (1001, "idle timeout")
    assert parse_close(actions[1].data, masked=True) == (1001, "idle timeout")
    assert s.deadline == NOW + 90 + CLOSE_TIMEOUT  # not the spent idle deadline
    assert s.handle_timer(NOW + 90) == []
    # not forwarded: we closed the upstream ourselves
    assert s.receive_client(cclose(1001), NOW + 90.1) == [CloseClient()]
    assert s.receive_upstream(sclose(1001), NOW + 90.2) == []
    upstream_ends(s, NOW + 90.2)


def test_no_idle_timeout_by_default() -> None:
    s = opened()
    assert s.deadline is None
    assert s.handle_timer(NOW + 86_400) == []


def test_client_close_during_idle_wait_keeps_the_close_timeout() -> None:
    s = opened(idle_timeout=0.5)
    s.receive_client(cclose(1000), NOW + 0.1)
    assert s.deadline == NOW + 0.1 + CLOSE_TIMEOUT
    assert s.handle_timer(NOW + 0.6) == []
