"""Every authentication verdict, from the Authenticator and through a Session (403 first)."""

from __future__ import annotations

from collections.abc import Callable

import jwt
import pytest
from wire import (
    NOW,
    SECRET,
    b64url,
    claims,
    hs_authenticator,
    jwks,
    kinds,
    make_gateway,
    make_session,
    parse_request,
    parse_response,
    public_pem,
    raw_token,
    request,
    rs_token,
    token,
    upstream_101,
)

from gaia_gateway.core import (
    Accepted,
    AuthConfig,
    Authenticator,
    AuthFailure,
    CloseClient,
    ConnectUpstream,
    FetchKeys,
    Identity,
    JwksCache,
    NeedKeys,
    Rejected,
    SendToClient,
    State,
)

ISSUER = "https://auth.example/v1"


def _rs_authenticator(**config) -> Authenticator:
    return Authenticator(AuthConfig(algorithms=("RS256",), **config), public_key=public_pem("a"))


def _key_confusion_token() -> str:
    # The classic attack: an HS256 token whose HMAC key is the server's RSA public key PEM.
    return raw_token({"alg": "HS256", "typ": "JWT"}, claims(), public_pem("a"))


def _tampered() -> str:
    # a valid token whose payload is swapped for another user's: the signature no longer fits
    head, _, sig = token().split(".")
    payload = b64url(b'{"sub":"admin","aud":"authenticated","exp":9999999999}')
    return f"{head}.{payload}.{sig}"


def _alg_none_token() -> str:
    return raw_token({"alg": "none", "typ": "JWT"}, claims(), None)


# (id, authenticator factory, token factory, expected reason or None for success)
CASES: list[tuple[str, Callable[[], Authenticator], Callable[[], str | None], str | None]] = [
    ("valid", hs_authenticator, lambda: token(), None),
    ("missing", hs_authenticator, lambda: None, "missing token"),
    ("empty", hs_authenticator, lambda: "", "missing token"),
    ("malformed", hs_authenticator, lambda: "not-a-jwt", "malformed token"),
    ("garbage-base64", hs_authenticator, lambda: "!!!.@@@.###", "malformed token"),
    ("header-not-json", hs_authenticator, lambda: b64url(b"{nope") + ".e30.", "malformed token"),
    ("two-parts", hs_authenticator, lambda: token().rsplit(".", 1)[0], "malformed token"),
    ("expired", hs_authenticator, lambda: token(exp=int(NOW) - 1), "token expired"),
    ("expires-now", hs_authenticator, lambda: token(exp=int(NOW)), "token expired"),
    ("exp-not-number", hs_authenticator, lambda: token(exp="soon"), "exp is not a number"),
    ("nbf-future", hs_authenticator, lambda: token(nbf=int(NOW) + 60), "token not yet valid"),
    ("nbf-past", hs_authenticator, lambda: token(nbf=int(NOW) - 60), None),
    ("wrong-signature", hs_authenticator, lambda: token(key=SECRET + "-other"), "bad signature"),
    ("tampered-payload", hs_authenticator, lambda: _tampered(), "bad signature"),
    ("wrong-aud", hs_authenticator, lambda: token(aud="anon"), "wrong audience"),
    ("aud-list-ok", hs_authenticator, lambda: token(aud=["x", "authenticated"]), None),
    ("missing-aud", hs_authenticator, lambda: token(aud=None), "missing claim aud"),
    ("wrong-iss", lambda: hs_authenticator(issuer=ISSUER), lambda: token(iss="https://evil"),
     "wrong issuer"),
    ("missing-iss", lambda: hs_authenticator(issuer=ISSUER), lambda: token(), "missing claim iss"),
    ("right-iss", lambda: hs_authenticator(issuer=ISSUER), lambda: token(iss=ISSUER), None),
    ("iss-unchecked", hs_authenticator, lambda: token(iss="https://anything"), None),
    ("missing-sub", hs_authenticator, lambda: token(sub=None), "missing claim sub"),
    ("empty-sub", hs_authenticator, lambda: token(sub=""), "missing claim sub"),
    ("missing-exp", hs_authenticator, lambda: token(exp=None), "missing claim exp"),
    ("alg-none", hs_authenticator, _alg_none_token, "token algorithm not allowed"),
    ("alg-None-case", hs_authenticator,
     lambda: raw_token({"alg": "None"}, claims(), None), "token algorithm not allowed"),
    ("alg-hs512-not-allowed", hs_authenticator, lambda: token(key=SECRET * 2, alg="HS512"),
     "token algorithm not allowed"),
    ("rs256-when-hs256", hs_authenticator, lambda: rs_token(), "token algorithm not allowed"),
    ("key-confusion", _rs_authenticator, _key_confusion_token, "token algorithm not allowed"),
    ("key-confusion-hs-allowed-no-secret",
     lambda: Authenticator(AuthConfig(algorithms=("RS256", "HS256")), public_key=public_pem("a")),
     _key_confusion_token, "no key for this token"),
    ("rs256-valid", _rs_authenticator, lambda: rs_token(), None),
    ("rs256-other-key", _rs_authenticator, lambda: rs_token("b"), "bad signature"),
    ("rs256-expired", _rs_authenticator, lambda: rs_token(exp=int(NOW) - 5), "token expired"),
    ("too-large-100k", hs_authenticator, lambda: token(pad="x" * 100_000), "token too large"),
    ("too-large-garbage", hs_authenticator, lambda: "A" * 100_000, "token too large"),
]


@pytest.mark.parametrize(("make_auth", "make_token", "reason"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_authenticator_verdicts(make_auth, make_token, reason) -> None:
    verdict = make_auth().verify(make_token(), NOW)
    if reason is None:
        assert isinstance(verdict, Identity), verdict
        assert verdict.user_id == "user-42"
    else:
        assert verdict == AuthFailure(reason)


@pytest.mark.parametrize(("make_auth", "make_token", "reason"),
                         [c[1:] for c in CASES if c[0] != "valid"],
                         ids=[c[0] for c in CASES if c[0] != "valid"])
def test_session_refuses_with_403_before_any_upstream_contact(make_auth, make_token,
                                                              reason) -> None:
    from gaia_gateway.core import Limits

    tok = make_token()
    # Big headers allowed so the 100 KB token reaches the authenticator instead of the 431.
    gw = make_gateway(make_auth(), Limits(max_header_bytes=512 * 1024))
    s = make_session(gw)
    hdrs = [("Authorization", f"Bearer {tok}")] if tok else []
    actions = s.receive_client(request(headers=hdrs), NOW)
    if reason is None:
        assert actions == [ConnectUpstream(gw.routes["/ws"])]
        return
    assert kinds(actions) == [Rejected, SendToClient, CloseClient]
    assert actions[0] == Rejected(403, reason)
    status, _, body = parse_response(actions[1].data)
    assert status == 403
    assert body == f"403 {reason}\n".encode()
    assert s.state is State.CLOSED
    if tok:
        assert tok.encode() not in actions[1].data


@pytest.mark.parametrize(
    ("leeway", "overrides", "ok"),
    [
        (30, {"exp": int(NOW) - 10}, True),
        (30, {"exp": int(NOW) - 30}, False),
        (30, {"nbf": int(NOW) + 10}, True),
        (30, {"nbf": int(NOW) + 31}, False),
        (0, {"exp": int(NOW) - 1}, False),
        (0, {"nbf": int(NOW) + 1}, False),
    ],
)
def test_leeway(leeway: float, overrides: dict, ok: bool) -> None:
    verdict = hs_authenticator(leeway=leeway).verify(token(**overrides), NOW)
    assert isinstance(verdict, Identity) is ok, verdict


def test_audience_check_can_be_disabled() -> None:
    assert isinstance(hs_authenticator(audience=None).verify(token(aud="anon"), NOW), Identity)


# --------------------------------------------------------------- where the token is


def _open_with(req: bytes) -> bytes:
    s = make_session()
    actions = s.receive_client(req, NOW)
    assert kinds(actions) == [ConnectUpstream], (s.status, s.reason)
    (send,) = s.upstream_connected(NOW)
    assert kinds(s.receive_upstream(upstream_101(send.data), NOW)) == [SendToClient, Accepted]
    assert s.user_id == "user-42"
    return send.data


def test_token_in_query() -> None:
    tok = token()
    sent = _open_with(request(tok=tok))
    # the query reaches the backend unchanged: it is what the backend sees without us
    assert parse_request(sent).target == f"/kb/ws?token={tok}".encode()


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_token_in_authorization_header(scheme: str) -> None:
    _open_with(request(headers=[("Authorization", f"{scheme} {token()}")]))


def test_token_in_subprotocol() -> None:
    tok = token()
    sent = _open_with(request(headers=[("Sec-WebSocket-Protocol", f"bearer.{tok}, kb.v1")]))
    assert parse_request(sent).one("sec-websocket-protocol") == "kb.v1"
    assert tok.encode() not in sent


def test_query_token_wins_over_header() -> None:
    bad = token(sub=None)
    _open_with(request(tok=token(), headers=[("Authorization", f"Bearer {bad}")]))


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    "])
def test_non_bearer_authorization_is_missing_token(value: str) -> None:
    s = make_session()
    actions = s.receive_client(request(headers=[("Authorization", value)]), NOW)
    assert actions[0] == Rejected(403, "missing token")


# ------------------------------------------------------------------------------ JWKS


def _jwks_gateway(cache: JwksCache, *, refreshable: bool = True):
    auth = Authenticator(AuthConfig(algorithms=("RS256",)), jwks=cache,
                         jwks_refreshable=refreshable)
    return make_gateway(auth)


def _loaded_cache(*pairs: tuple[str, str], cooldown: float = 60.0) -> JwksCache:
    cache = JwksCache(cooldown=cooldown)
    cache.load(jwks(*pairs))
    return cache


def test_jwks_known_kid_is_accepted() -> None:
    cache = _loaded_cache(("a", "k1"), ("b", "k2"))
    auth = Authenticator(AuthConfig(algorithms=("RS256",)), jwks=cache)
    assert isinstance(auth.verify(rs_token("a", kid="k1"), NOW), Identity)
    assert isinstance(auth.verify(rs_token("b", kid="k2"), NOW), Identity)
    # a token signed by key a but naming key b's id
    assert auth.verify(rs_token("a", kid="k2"), NOW) == AuthFailure("bad signature")
    assert auth.verify(rs_token("a"), NOW) == AuthFailure("token has no key id")
    # not refreshable: an unknown kid is a plain 403
    assert auth.verify(rs_token("c", kid="k3"), NOW) == AuthFailure("unknown key id")


def test_jwks_document_as_json_text_and_errors() -> None:
    import json

    cache = JwksCache()
    cache.load(json.dumps(jwks(("a", "k1"))))
    assert set(cache.keys) == {"k1"}
    for bad in ("not json", "[]", {"keys": "nope"}, b"{}"):
        with pytest.raises(ValueError):
            cache.load(bad)
    assert set(cache.keys) == {"k1"}  # a bad document keeps the old set


def test_jwks_unknown_kid_fetches_then_proceeds() -> None:
    cache = _loaded_cache(("a", "k1"))
    gw = _jwks_gateway(cache)
    s = make_session(gw)
    tok = rs_token("b", kid="k2")
    assert s.receive_client(request(tok=tok), NOW) == [FetchKeys()]
    assert s.state is State.AUTH_WAIT
    assert s.receive_client(b"\x81\x80early", NOW + 0.1) == []  # kept while waiting
    # the transport fetches the set and resumes the session
    cache.fetch_started(NOW)
    cache.load(jwks(("a", "k1"), ("b", "k2")))
    cache.fetch_finished()
    actions = s.keys_updated(NOW + 0.2)
    assert actions == [ConnectUpstream(gw.routes["/ws"])]
    assert s.user_id == "user-42"
    assert s.keys_updated(NOW + 0.3) == []  # not waiting any more


def test_jwks_kid_still_unknown_after_refresh_is_403() -> None:
    cache = _loaded_cache(("a", "k1"))
    s = make_session(_jwks_gateway(cache))
    assert s.receive_client(request(tok=rs_token("b", kid="k2")), NOW) == [FetchKeys()]
    cache.fetch_started(NOW)
    cache.load(jwks(("a", "k1")))
    cache.fetch_finished()
    actions = s.keys_updated(NOW + 0.5)
    assert actions[0] == Rejected(403, "unknown key id")


def test_jwks_unknown_kid_flood_costs_one_fetch_per_cooldown() -> None:
    cache = _loaded_cache(("a", "k1"), cooldown=60.0)
    gw = _jwks_gateway(cache)
    fetches = 0
    first = make_session(gw)
    assert first.receive_client(request(tok=rs_token("b", kid="rnd-0")), NOW) == [FetchKeys()]
    fetches += 1
    cache.fetch_started(NOW)
    # while the fetch is under way, other sessions join it (one fetch, many waiters)
    joiner = make_session(gw)
    assert joiner.receive_client(request(tok=rs_token("b", kid="rnd-x")), NOW) == [FetchKeys()]
    cache.fetch_finished()
    assert first.keys_updated(NOW + 1)[0] == Rejected(403, "unknown key id")
    assert joiner.keys_updated(NOW + 1)[0] == Rejected(403, "unknown key id")
    # the flood within the cooldown: 403 straight from the cache, no fetch
    for i in range(1, 200):
        s = make_session(gw)
        actions = s.receive_client(request(tok=rs_token("b", kid=f"rnd-{i}")), NOW + i * 0.25)
        assert FetchKeys() not in actions
        assert actions[0] == Rejected(403, "unknown key id")
    # the known key still works during the flood
    ok = make_session(gw)
    assert kinds(ok.receive_client(request(tok=rs_token("a", kid="k1")), NOW + 59)) == [
        ConnectUpstream
    ]
    # after the cooldown one more fetch is allowed
    later = make_session(gw, now=NOW + 60)
    assert later.receive_client(request(tok=rs_token("b", kid="rnd-late")), NOW + 60) == [
        FetchKeys()
    ]
    assert fetches == 1


def test_jwks_auth_wait_times_out_with_408() -> None:
    cache = _loaded_cache(("a", "k1"))
    s = make_session(_jwks_gateway(cache))
    assert s.receive_client(request(tok=rs_token("b", kid="k9")), NOW) == [FetchKeys()]
    actions = s.handle_timer(NOW + 10)
    assert actions[0] == Rejected(408, "handshake timeout")
    assert s.keys_updated(NOW + 11) == []


def test_need_keys_from_the_authenticator() -> None:
    cache = _loaded_cache(("a", "k1"))
    auth = Authenticator(AuthConfig(algorithms=("RS256",)), jwks=cache, jwks_refreshable=True)
    assert auth.verify(rs_token("b", kid="k2"), NOW) == NeedKeys("k2")


@pytest.mark.parametrize(
    ("config", "kwargs"),
    [
        (AuthConfig(algorithms=()), {"secret": SECRET}),
        (AuthConfig(algorithms=("none",)), {"secret": SECRET}),
        (AuthConfig(algorithms=("HS256", "NONE")), {"secret": SECRET}),
        (AuthConfig(algorithms=("HS256",)), {}),
        (AuthConfig(algorithms=("RS256",)), {}),
        (AuthConfig(algorithms=("RS256",)), {"public_key": b"not a pem"}),
    ],
)
def test_bad_configurations_fail_at_start_up(config: AuthConfig, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Authenticator(config, **kwargs)


def test_pyjwt_would_refuse_the_confusion_key_anyway() -> None:
    # Documents why the test above builds the token by hand.
    with pytest.raises(jwt.InvalidKeyError):
        jwt.encode(claims(), public_pem("a"), algorithm="HS256")


def test_a_warm_header_cache_changes_no_verdict() -> None:
    # Every case again on one authenticator that has already verified a token with the same
    # header: the header is then taken from its cache, and each verdict must stay the same.
    auth = hs_authenticator()
    assert isinstance(auth.verify(token(), NOW), Identity)
    for name, make_auth, make_token, reason in CASES:
        if make_auth is not hs_authenticator:
            continue
        verdict = auth.verify(make_token(), NOW)
        if reason is None:
            assert isinstance(verdict, Identity), name
        else:
            assert verdict == AuthFailure(reason), name


def test_only_headers_of_verified_tokens_are_remembered_and_at_most_64() -> None:
    auth = hs_authenticator()
    for i in range(200):  # distinct headers, wrong key: none may take a slot
        forged = raw_token({"alg": "HS256", "typ": "JWT", "n": i}, claims(), b"not-the-secret")
        assert auth.verify(forged, NOW) == AuthFailure("bad signature")
    assert auth._headers == {}
    for i in range(100):
        good = raw_token({"alg": "HS256", "typ": "JWT", "n": i}, claims(), SECRET.encode())
        assert isinstance(auth.verify(good, NOW), Identity)
        assert isinstance(auth.verify(good, NOW), Identity)  # again, from the cache or not
    assert len(auth._headers) == 64
