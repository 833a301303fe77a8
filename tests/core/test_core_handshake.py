"""The two handshakes, byte in / byte out: client request -> upstream request -> 101 both ways."""

from __future__ import annotations

import base64

import pytest
from wire import (
    CLIENT_ADDR,
    CLIENT_KEY,
    NOW,
    OP_BINARY,
    OP_TEXT,
    REQUEST_ID,
    UPSTREAM,
    cframe,
    header,
    kinds,
    make_gateway,
    make_session,
    open_session,
    parse_frames,
    parse_request,
    parse_response,
    request,
    sframe,
    to_client,
    token,
    upstream_101,
)
from wsproto.utilities import generate_accept_token

from gaia_gateway.core import (
    Accepted,
    CloseClient,
    CloseUpstream,
    ConnectUpstream,
    Limits,
    Rejected,
    SendToClient,
    SendToUpstream,
    State,
)

GATEWAY_NONCE = base64.b64encode(b"\x01" * 16)  # what RANDOM(16) becomes


def chunks(data: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [data]
    if how == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    if how == "halves":
        return [data[: len(data) // 2], data[len(data) // 2 :]]
    if how == "at-crlf":  # cut right inside the final CRLF CRLF
        return [data[:-3], data[-3:]]
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["whole", "bytewise", "halves", "at-crlf"])
def test_request_fed_in_pieces_reaches_connect(how: str) -> None:
    s = make_session()
    pieces = chunks(request(tok=token()), how)
    for piece in pieces[:-1]:
        assert s.receive_client(piece, NOW) == []
        assert s.state is State.REQUEST
    actions = s.receive_client(pieces[-1], NOW)
    assert actions == [ConnectUpstream(UPSTREAM)]
    assert s.state is State.CONNECTING
    assert s.user_id == "user-42"
    assert s.deadline == NOW + Limits().connect_timeout

    (send,) = s.upstream_connected(NOW)
    assert isinstance(send, SendToUpstream)
    assert s.state is State.UPSTREAM_HANDSHAKE

    # the upstream's 101 fed the same ways
    answer = upstream_101(send.data)
    pieces = chunks(answer, how)
    for piece in pieces[:-1]:
        assert s.receive_upstream(piece, NOW) == []
    actions = s.receive_upstream(pieces[-1], NOW)
    assert kinds(actions) == [SendToClient, Accepted]
    status, headers, body = parse_response(actions[0].data)
    assert status == 101 and body == b""
    assert header(headers, "sec-websocket-accept") == [generate_accept_token(CLIENT_KEY.encode())]
    assert s.state is State.OPEN and s.status == 101
    assert s.deadline is None  # no idle timeout configured


def test_early_client_frames_are_forwarded_after_the_101_in_order() -> None:
    early1 = cframe(OP_TEXT, b"sent with the request")
    early2 = cframe(OP_BINARY, bytes(range(200)))  # 16-bit length
    early3 = cframe(OP_TEXT, b"sent while the upstream handshake ran")
    s = make_session()
    # the request and the first frame plus half of the second in one chunk
    assert s.receive_client(request(tok=token()) + early1 + early2[:7], NOW) == [
        ConnectUpstream(UPSTREAM)
    ]
    assert s.receive_client(early2[7:], NOW) == []  # CONNECTING: kept
    (send,) = s.upstream_connected(NOW)
    assert early1 not in send.data  # the request alone goes first
    assert s.receive_client(early3, NOW) == []  # UPSTREAM_HANDSHAKE: kept
    actions = s.receive_upstream(upstream_101(send.data), NOW)
    assert kinds(actions) == [SendToClient, Accepted, SendToUpstream]
    assert actions[2].data == early1 + early2 + early3
    assert [f.payload for f in parse_frames(actions[2].data)] == [
        b"sent with the request", bytes(range(200)), b"sent while the upstream handshake ran"
    ]
    assert s.c2u is not None and s.c2u.messages == 3


def test_upstream_frames_right_behind_its_101_reach_the_client_after_ours() -> None:
    s = make_session()
    s.receive_client(request(tok=token()), NOW)
    (send,) = s.upstream_connected(NOW)
    hello = sframe(OP_TEXT, b"welcome")
    actions = s.receive_upstream(upstream_101(send.data, extra=hello), NOW)
    assert kinds(actions) == [SendToClient, Accepted, SendToClient]
    assert parse_response(actions[0].data)[0] == 101
    assert actions[2].data == hello


def test_too_many_early_bytes_in_the_requests_own_chunk_is_refused() -> None:
    gw = make_gateway(limits=Limits(max_early_bytes=100))
    s = make_session(gw)
    actions = s.receive_client(request(tok=token()) + cframe(OP_BINARY, b"x" * 101), NOW)
    assert kinds(actions) == [Rejected, SendToClient, CloseClient]
    assert actions[0].status == 400
    s = make_session(gw)
    early = cframe(OP_BINARY, b"x" * 94)  # 100 bytes with its header and mask: allowed
    assert kinds(s.receive_client(request(tok=token()) + early, NOW)) == [ConnectUpstream]


def test_too_many_early_bytes_is_refused() -> None:
    gw = make_gateway(limits=Limits(max_early_bytes=100))
    s = make_session(gw)
    s.receive_client(request(tok=token()), NOW)
    assert s.receive_client(cframe(OP_BINARY, b"x" * 50), NOW) == []
    actions = s.receive_client(cframe(OP_BINARY, b"x" * 50), NOW)
    assert kinds(actions) == [CloseUpstream, Rejected, SendToClient, CloseClient]
    assert actions[0] == CloseUpstream(abort=True)
    assert actions[1].status == 400


# ------------------------------------------------------------- the upstream request


def _subprotocol_token_request() -> tuple[bytes, str]:
    tok = token()
    req = request(
        query="experience=a%26token%3Dx&lang=en",
        headers=[
            ("Sec-WebSocket-Protocol", f"kb.v1, bearer.{tok}, kb.v2"),
            ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "gopher"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Real-IP", "6.6.6.6"),
            ("Forwarded", "for=6.6.6.6"),
            ("X-Request-ID", "spoofed-id"),
            ("X-User-Id", "admin"),
            ("Keep-Alive", "timeout=5"),
            ("Cookie", "session=abc"),
            ("User-Agent", "gaia-test/1"),
            ("Origin", "https://play.example"),
        ],
    )
    return req, tok


@pytest.mark.parametrize("tls", [True, False])
def test_upstream_request_rewrites_identity_and_keeps_the_query(tls: bool) -> None:
    req, tok = _subprotocol_token_request()
    s = make_session(tls=tls)
    assert s.receive_client(req, NOW) == [ConnectUpstream(UPSTREAM)]
    (send,) = s.upstream_connected(NOW)
    up = parse_request(send.data)

    assert up.method == b"GET"
    # the configured upstream path plus the client's raw query, byte for byte
    assert up.target == b"/kb/ws?experience=a%26token%3Dx&lang=en"
    assert s.experience == "a&token=x"  # decoded for the log, never re-encoded
    assert up.one("host") == "backend.internal:8000"
    assert up.one("upgrade") == "websocket"
    assert up.one("connection") == "Upgrade"
    assert up.one("sec-websocket-version") == "13"
    assert up.one("sec-websocket-key") == GATEWAY_NONCE.decode()  # ours, not the client's
    # identity headers: ours, exactly once each; the client's copies are gone
    assert up.one("x-forwarded-for") == CLIENT_ADDR
    assert up.one("x-forwarded-proto") == ("https" if tls else "http")
    assert up.one("x-request-id") == REQUEST_ID
    assert up.one("x-user-id") == "user-42"
    for name in ("x-forwarded-host", "x-real-ip", "forwarded", "keep-alive"):
        assert up.get(name) == []
    # the offer minus the token entry; extensions verbatim
    assert up.one("sec-websocket-protocol") == "kb.v1, kb.v2"
    assert up.one("sec-websocket-extensions") == "permessage-deflate; client_max_window_bits"
    # end-to-end headers pass
    assert up.one("cookie") == "session=abc"
    assert up.one("user-agent") == "gaia-test/1"
    assert up.one("origin") == "https://play.example"
    assert tok.encode() not in send.data
    assert tok.split(".")[2].encode() not in send.data


def test_upstream_101_choice_is_handed_to_the_client_never_the_token() -> None:
    req, tok = _subprotocol_token_request()
    o = open_session(req=req, protocol="kb.v2",
                     extensions="permessage-deflate; server_no_context_takeover")
    assert kinds(o.actions) == [SendToClient, Accepted]
    status, headers, _ = parse_response(o.actions[0].data)
    assert status == 101
    assert header(headers, "sec-websocket-accept") == [generate_accept_token(CLIENT_KEY.encode())]
    assert header(headers, "sec-websocket-protocol") == [b"kb.v2"]
    assert header(headers, "sec-websocket-extensions") == [
        b"permessage-deflate; server_no_context_takeover"
    ]
    assert header(headers, "x-request-id") == [REQUEST_ID.encode()]
    assert tok.encode() not in o.actions[0].data
    assert o.session.subprotocol == "kb.v2"
    assert o.session.extensions == "permessage-deflate; server_no_context_takeover"


def test_token_only_subprotocol_offer_is_not_forwarded_nor_answered() -> None:
    tok = token()
    o = open_session(req=request(headers=[("Sec-WebSocket-Protocol", f"bearer.{tok}")]))
    assert parse_request(o.upstream_request).get("sec-websocket-protocol") == []
    _, headers, _ = parse_response(o.actions[0].data)
    assert header(headers, "sec-websocket-protocol") == []
    assert o.session.user_id == "user-42"


def test_no_query_means_no_question_mark() -> None:
    tok = token()
    o = open_session(req=request(headers=[("Authorization", f"Bearer {tok}")]))
    assert parse_request(o.upstream_request).target == b"/kb/ws"


def test_upstream_host_header_omits_default_port() -> None:
    from gaia_gateway.core import Upstream

    up = Upstream("kb.example", 443, "/ws", True)
    o = open_session(make_gateway(routes={"/ws": up}))
    assert parse_request(o.upstream_request).one("host") == "kb.example"


def test_interim_1xx_before_the_101_is_skipped() -> None:
    s = make_session()
    s.receive_client(request(tok=token()), NOW)
    (send,) = s.upstream_connected(NOW)
    actions = s.receive_upstream(b"HTTP/1.1 100 Continue\r\n\r\n" + upstream_101(send.data), NOW)
    assert kinds(actions) == [SendToClient, Accepted]


# ------------------------------------------------------------- the upstream says no


def _to_upstream_handshake(protocols: str | None = None, extensions: str | None = None):
    hdrs = []
    if protocols:
        hdrs.append(("Sec-WebSocket-Protocol", protocols))
    if extensions:
        hdrs.append(("Sec-WebSocket-Extensions", extensions))
    s = make_session()
    s.receive_client(request(tok=token(), headers=hdrs), NOW)
    (send,) = s.upstream_connected(NOW)
    return s, send.data


def _refused(actions, status: int) -> None:
    assert kinds(actions) == [CloseUpstream, Rejected, SendToClient, CloseClient]
    assert actions[0] == CloseUpstream(abort=True)
    assert actions[1].status == status
    assert parse_response(actions[2].data)[0] == status
    assert actions[3] == CloseClient()


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", 403),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 404),
        (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n", 502),
        (b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n", 502),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", 502),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", 502),
        (b"\x00\x01\x02 garbage \xff\r\n\r\n", 502),
        (b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\n\r\n", 502),
    ],
    ids=["403", "404", "500", "302", "200", "ssh", "binary", "101-no-upgrade"],
)
def test_upstream_refusal_maps_to_client_status(answer: bytes, status: int) -> None:
    s, _ = _to_upstream_handshake()
    _refused(s.receive_upstream(answer, NOW), status)
    assert s.state is State.CLOSED
    assert s.status == status


def test_wrong_accept_key_is_502() -> None:
    s, sent = _to_upstream_handshake()
    wrong = generate_accept_token(CLIENT_KEY.encode())  # the client's key, not ours
    _refused(s.receive_upstream(upstream_101(sent, accept=wrong), NOW), 502)
    assert "Accept" in s.reason


def test_subprotocol_nobody_offered_is_502() -> None:
    s, sent = _to_upstream_handshake(protocols="kb.v1")
    _refused(s.receive_upstream(upstream_101(sent, protocol="kb.v9"), NOW), 502)


def test_bearer_entry_is_never_forwarded_nor_echoed_even_when_unused() -> None:
    # The token authenticates from ?token= here; a bearer.<JWT> offer is still a token and
    # must neither go upstream nor come back to the client as the chosen subprotocol.
    tok = token()
    other = token(sub="someone-else")
    s, sent = _to_upstream_handshake(protocols=f"kb.v1, bearer.{other}")
    assert parse_request(sent).one("sec-websocket-protocol") == "kb.v1"
    assert other.encode() not in sent
    actions = s.receive_upstream(upstream_101(sent, protocol=f"bearer.{other}"), NOW)
    _refused(actions, 502)
    assert other.encode() not in to_client(actions)
    assert tok.encode() not in to_client(actions)


def test_extension_nobody_offered_is_502() -> None:
    s, sent = _to_upstream_handshake()
    _refused(s.receive_upstream(upstream_101(sent, extensions="permessage-deflate"), NOW), 502)


def test_upstream_eof_during_handshake_is_502() -> None:
    s, _ = _to_upstream_handshake()
    actions = s.upstream_eof(NOW)
    assert kinds(actions) == [Rejected, SendToClient, CloseClient]
    assert actions[0].status == 502


@pytest.mark.parametrize(("timeout", "status"), [(True, 504), (False, 502)])
@pytest.mark.parametrize("connected", [False, True])
def test_upstream_failed(timeout: bool, status: int, connected: bool) -> None:
    s = make_session()
    s.receive_client(request(tok=token()), NOW)
    if connected:
        s.upstream_connected(NOW)
    _refused(s.upstream_failed("refused" if not timeout else "timed out", timeout=timeout,
                               now=NOW), status)


@pytest.mark.parametrize("connected", [False, True])
def test_connect_deadline_is_504(connected: bool) -> None:
    s = make_session()
    s.receive_client(request(tok=token()), NOW + 1)
    if connected:
        s.upstream_connected(NOW + 2)
    deadline = NOW + 1 + Limits().connect_timeout
    assert s.deadline == deadline
    assert s.handle_timer(deadline - 0.001) == []
    _refused(s.handle_timer(deadline), 504)
    assert s.deadline is None
    assert s.handle_timer(deadline + 10) == []


def test_upstream_connected_after_the_session_ended_drops_the_socket() -> None:
    s = make_session()
    s.receive_client(request(tok=token()), NOW)
    s.client_eof(NOW)
    assert s.upstream_connected(NOW) == [CloseUpstream(abort=True)]


@pytest.mark.parametrize("partial", [b"", b"GET /ws HTTP/1.1\r\nHost: x\r\n"])
def test_handshake_timeout_is_408(partial: bytes) -> None:
    s = make_session()
    if partial:
        assert s.receive_client(partial, NOW) == []
    assert s.deadline == NOW + Limits().handshake_timeout
    assert s.handle_timer(NOW + 9.999) == []
    actions = s.handle_timer(NOW + 10)
    assert kinds(actions) == [Rejected, SendToClient, CloseClient]
    assert actions[0].status == 408
    assert s.state is State.CLOSED


def test_client_leaving_during_connect_aborts_the_upstream() -> None:
    s = make_session()
    s.receive_client(request(tok=token()), NOW)
    assert s.client_eof(NOW) == [CloseUpstream(abort=True), CloseClient(abort=True)]
    assert s.state is State.CLOSED
