"""HTTP verdicts on the client's request: every refusal happens before any upstream contact."""

from __future__ import annotations

import json
import random
from urllib.parse import parse_qsl

import pytest
from wire import (
    CLIENT_ADDR,
    NOW,
    header,
    kinds,
    make_gateway,
    make_session,
    open_session,
    parse_response,
    request,
    token,
)

from gaia_gateway.core import (
    CloseClient,
    ConnectUpstream,
    Limits,
    Rejected,
    SendToClient,
    State,
)
from gaia_gateway.core._http import query_pairs


def refused(req: bytes | list[bytes], status: int, gateway=None, **session_kw):
    """Feed ``req`` (or its pieces); check the refusal and return (session, response)."""
    s = make_session(gateway, **session_kw)
    pieces = [req] if isinstance(req, bytes) else req
    actions = []
    for piece in pieces:
        actions = s.receive_client(piece, NOW)
        if actions:
            break
    assert kinds(actions) == [Rejected, SendToClient, CloseClient], (actions, s.reason)
    assert actions[0].status == status, s.reason
    assert actions[2] == CloseClient()
    got, headers, body = parse_response(actions[1].data)
    assert got == status
    assert header(headers, "connection") == [b"close"] or status == 426
    assert int(header(headers, "content-length")[0]) == len(body)
    assert s.state is State.CLOSED and s.status == status
    assert s.deadline is None
    return s, actions[1].data


def test_unknown_path_is_404() -> None:
    refused(request("/nope", tok=token()), 404)


@pytest.mark.parametrize("path", ["/ws/", "/WS", "//ws", "/ws/extra"])
def test_route_match_is_exact(path: str) -> None:
    refused(request(path, tok=token()), 404)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_non_get_is_405(method: str) -> None:
    _, resp = refused(request(method=method, tok=token()), 405)
    assert b"\r\nAllow: GET\r\n" in resp


def test_plain_get_is_426_with_upgrade_headers() -> None:
    _, resp = refused(request(upgrade=False, key=None, version=None, tok=token()), 426)
    _, headers, _ = parse_response(resp)
    assert header(headers, "upgrade") == [b"websocket"]
    assert header(headers, "sec-websocket-version") == [b"13"]


def test_missing_key_is_400() -> None:
    refused(request(key=None, tok=token()), 400)


def test_missing_version_is_400() -> None:
    _, resp = refused(request(version=None, tok=token()), 400)
    assert b"Sec-WebSocket-Version: 13" in resp


@pytest.mark.parametrize("version", ["12", "8", "14"])
def test_other_version_is_426(version: str) -> None:
    _, resp = refused(request(version=version, tok=token()), 426)
    _, headers, _ = parse_response(resp)
    assert header(headers, "sec-websocket-version") == [b"13"]
    assert len(header(headers, "content-length")) == 1


def test_upgrade_not_websocket_is_426() -> None:
    req = request(tok=token()).replace(b"Upgrade: websocket", b"Upgrade: h2c")
    refused(req, 426)


def test_missing_connection_upgrade_is_400() -> None:
    req = request(tok=token()).replace(b"Connection: Upgrade", b"Connection: keep-alive")
    refused(req, 400)


def test_missing_host_is_400() -> None:
    req = request(tok=token()).replace(b"Host: gateway.example\r\n", b"")
    refused(req, 400)


@pytest.mark.parametrize(
    "hdrs",
    [
        [("Sec-WebSocket-Protocol", "kb.v1, \xff")],
        [("Sec-WebSocket-Extensions", "permessage-deflate; x=\xe9")],
        [("Connection", "Upgrade, \xe9")],
    ],
    ids=["protocol", "extensions", "connection"],
)
def test_non_ascii_handshake_header_is_400_not_an_exception(hdrs) -> None:
    refused(request(tok=token(), headers=hdrs), 400)


@pytest.mark.parametrize("host", ["\xff", "xn--zz"])
def test_undecodable_host_is_400_not_an_exception(host: str) -> None:
    refused(request(tok=token(), host=host), 400)


# -------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("how", ["whole", "4k-chunks", "bytewise"])
def test_oversized_headers_are_431(how: str) -> None:
    req = request(tok=token(), headers=[(f"X-Pad-{i}", "p" * 1000) for i in range(20)])
    assert len(req) > Limits().max_header_bytes
    if how == "whole":
        pieces = [req]
    elif how == "4k-chunks":
        pieces = [req[i : i + 4096] for i in range(0, len(req), 4096)]
    else:
        pieces = [req[i : i + 1] for i in range(len(req))]
    refused(pieces, 431)


def test_too_many_headers_is_431() -> None:
    refused(request(tok=token(), headers=[(f"X-H{i}", "v") for i in range(101)]), 431)


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_over_long_request_line_is_414(how: str) -> None:
    req = request(query="q=" + "x" * 20_000, tok=token())
    pieces = [req] if how == "whole" else [req[i : i + 1] for i in range(len(req))]
    refused(pieces, 414)


def test_headers_just_under_the_limit_pass() -> None:
    limits = Limits(max_header_bytes=4096)
    req = request(tok=token())
    pad = 4096 - len(req) - len("X-Pad: \r\n") - 64
    req = request(tok=token(), headers=[("X-Pad", "p" * pad)])
    s = make_session(make_gateway(limits=limits))
    assert kinds(s.receive_client(req, NOW)) == [ConnectUpstream]


@pytest.mark.parametrize(
    "hdrs",
    [
        [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "chunked")],
        [("Content-Length", "5"), ("Content-Length", "6")],
        [("Content-Length", "5"), ("Content-Length", "5")],
        [("Content-Length", "5")],
        [("Content-Length", "9" * 30)],
        [("Content-Length", "18446744073709551616")],
    ],
    ids=["cl+te", "te", "dup-cl-conflict", "dup-cl-same", "cl", "huge-cl", "2**64-cl"],
)
def test_body_on_upgrade_is_400(hdrs) -> None:
    refused(request(tok=token(), headers=hdrs) + b"hello", 400)


def test_zero_content_length_is_tolerated() -> None:
    s = make_session()
    req = request(tok=token(), headers=[("Content-Length", "0")])
    assert kinds(s.receive_client(req, NOW)) == [ConnectUpstream]


@pytest.mark.parametrize(
    "req",
    [
        b"GET /ws HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # TLS hello
        b"GET /ws HTTP/1.1\r\n\r\n",  # no Host: h11 refuses HTTP/1.1 without it
    ],
    ids=["bad-header-line", "tls-on-plain-port", "no-host"],
)
def test_malformed_requests_are_400(req: bytes) -> None:
    refused(req, 400)


# ------------------------------------------------------------------ origin, drain


ORIGINS = frozenset({"https://play.example", "https://beta.play.example"})


def test_origin_outside_allow_list_is_403() -> None:
    gw = make_gateway(allowed_origins=ORIGINS)
    refused(request(tok=token(), headers=[("Origin", "https://evil.example")]), 403, gw)


@pytest.mark.parametrize("origin", ["https://play.example", None])
def test_allowed_or_absent_origin_passes(origin: str | None) -> None:
    gw = make_gateway(allowed_origins=ORIGINS)
    hdrs = [("Origin", origin)] if origin else []
    s = make_session(gw)
    assert kinds(s.receive_client(request(tok=token(), headers=hdrs), NOW)) == [ConnectUpstream]


def test_origin_is_checked_before_the_token() -> None:
    gw = make_gateway(allowed_origins=ORIGINS)
    s, _ = refused(request(headers=[("Origin", "https://evil.example")]), 403, gw)
    assert s.reason == "origin not allowed"


def test_draining_gateway_is_503() -> None:
    gw = make_gateway()
    gw.draining = True
    _, resp = refused(request(tok=token()), 503, gw)
    assert b"\r\nRetry-After: 1\r\n" in resp


def test_connection_cap_is_503() -> None:
    gw = make_gateway(max_connections=2)
    gw.open_connections = 3
    refused(request(tok=token()), 503, gw)
    gw.open_connections = 2
    s = make_session(gw)
    assert kinds(s.receive_client(request(tok=token()), NOW)) == [ConnectUpstream]


def test_address_cap_is_429_for_that_address_only() -> None:
    gw = make_gateway(max_connections_per_ip=2)
    for _ in range(3):  # this session's socket is the third from its address
        gw.connection_opened(CLIENT_ADDR)
    gw.connection_opened("198.51.100.9")
    assert gw.open_connections == 4
    assert gw.by_address == {CLIENT_ADDR: 3, "198.51.100.9": 1}
    s, resp = refused(request(tok=token()), 429, gw)
    assert s.reason == "too many connections from this address"
    assert b"429 Too Many Requests" in resp
    # /health answers whatever the address holds (load balancers poll it)
    health = make_session(gw).receive_client(request("/health"), NOW)
    assert parse_response(health[0].data)[0] == 200
    gw.connection_closed(CLIENT_ADDR)  # down to 2: this one may go on
    s = make_session(gw)
    assert kinds(s.receive_client(request(tok=token()), NOW)) == [ConnectUpstream]
    gw.connection_closed(CLIENT_ADDR)
    gw.connection_closed(CLIENT_ADDR)
    gw.connection_closed("198.51.100.9")
    assert (gw.open_connections, gw.by_address) == (0, {})  # nothing kept for gone addresses


def test_without_an_address_cap_no_address_is_kept() -> None:
    gw = make_gateway()
    gw.connection_opened(CLIENT_ADDR)
    assert (gw.open_connections, gw.by_address) == (1, {})
    s = make_session(gw)
    assert kinds(s.receive_client(request(tok=token()), NOW)) == [ConnectUpstream]
    gw.connection_closed(CLIENT_ADDR)
    assert gw.open_connections == 0


@pytest.mark.parametrize("state", ["request", "connecting", "upstream-handshake"])
def test_shutdown_before_open_is_503(state: str) -> None:
    from gaia_gateway.core import CloseUpstream

    s = make_session()
    if state != "request":
        s.receive_client(request(tok=token()), NOW)
    if state == "upstream-handshake":
        s.upstream_connected(NOW)
    actions = s.shutdown(NOW)
    expected = [Rejected, SendToClient, CloseClient]
    if state != "request":
        expected = [CloseUpstream, *expected]
    assert kinds(actions) == expected
    assert actions[-3].status == 503


# --------------------------------------------------------------------------- health


def test_health_is_200_json() -> None:
    gw = make_gateway(version="1.2.3")
    gw.open_connections = 7
    s = make_session(gw)
    actions = s.receive_client(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", NOW)
    assert kinds(actions) == [SendToClient, CloseClient]
    status, headers, body = parse_response(actions[0].data)
    assert status == 200
    assert header(headers, "content-type") == [b"application/json"]
    assert json.loads(body) == {"status": "ok", "connections": 7, "version": "1.2.3"}
    assert s.status == 200 and s.state is State.CLOSED


def test_health_while_draining_is_503() -> None:
    gw = make_gateway()
    gw.draining = True
    s = make_session(gw)
    actions = s.receive_client(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", NOW)
    status, _, body = parse_response(actions[0].data)
    assert status == 503 and json.loads(body)["status"] == "draining"
    assert s.status == 503


def test_health_head_has_no_body() -> None:
    s = make_session()
    actions = s.receive_client(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n", NOW)
    status, headers, body = parse_response(actions[0].data)
    assert status == 200 and body == b""
    assert int(header(headers, "content-length")[0]) > 0  # the size a GET would have


def test_health_post_is_405() -> None:
    refused(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405)


def test_health_needs_no_token_and_ignores_upgrade() -> None:
    s = make_session()
    actions = s.receive_client(request("/health"), NOW)
    assert parse_response(actions[0].data)[0] == 200


# -------------------------------------------------------------- the token in logs


def _no_token_in(info: dict, tok: str) -> None:
    text = json.dumps(info)
    assert tok not in text
    for part in tok.split("."):
        assert part not in text


def test_info_never_contains_the_token() -> None:
    tok = token()
    o = open_session(req=request(query="experience=lobby", tok=tok))
    _no_token_in(o.session.info(), tok)
    assert o.session.info()["experience"] == "lobby"
    o.session.client_eof(NOW + 1)
    _no_token_in(o.session.info(), tok)

    bad = token(exp=int(NOW) - 1)
    s, _ = refused(request(tok=bad), 403)
    _no_token_in(s.info(), bad)

    s, _ = refused(request(headers=[("Sec-WebSocket-Protocol", f"bearer.{bad}")]), 403)
    _no_token_in(s.info(), bad)


@pytest.mark.parametrize(
    "template",
    [
        b"GET /ws?token=%s  HTTP/1.1\r\nHost: x\r\n\r\n",  # two spaces: illegal request line
        b"GET /ws?token=%s&x=\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer %s\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\x00x\r\n\r\n",
    ],
    ids=["request-line", "target-char", "header-line", "header-value"],
)
def test_malformed_request_reason_does_not_echo_the_token(template: bytes) -> None:
    tok = token()
    s, resp = refused(template % tok.encode(), 400)
    _no_token_in(s.info(), tok)
    assert tok.encode() not in resp


QUERIES = [
    "", "&", "&&", "=", "a", "a=", "=b", "a=b", "a=b=c", "a&b", "a=1&&b=2&", "token=x&token=y",
    "a+b=c+d", "a%20b=c%2Bd", "%zz=%4", "e=%C3%A9", "e=%ff%fe", "x=%", "x=%2", "+=+", "%3D=%26",
    "a;b=c", "experience=lobby&token=eyJh.eyJz.sig", "k=v#frag", "\ufffd=\ufffd",
]


def test_query_pairs_is_parse_qsl_with_blank_values() -> None:
    rng = random.Random(6455)
    alphabet = "ab=&+%2Fx0;\ufffd"
    generated = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
                 for _ in range(3000)]
    for query in QUERIES + generated:
        assert query_pairs(query) == parse_qsl(query, keep_blank_values=True), query
