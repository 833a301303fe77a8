"""Token attacks (case 6) and a JWKS key-id flood (case 7): every forged, stale or malformed
token is refused before the upstream is contacted, and unknown key ids cannot make the
gateway hammer the JWKS endpoint."""

from __future__ import annotations

import base64
import itertools
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest
from _support import (
    CountingEcho,
    Guard,
    JwksServer,
    claims,
    exchange,
    forge_jwt,
    jwks_document,
    one_response,
    rs256,
    rsa_keys,
    sockets_closed,
)
from helpers import HOST, SECRET, RawWS, token, upgrade_request

pytestmark = pytest.mark.timeout(60)

ISSUER = "https://issuer.example/auth/v1"


@pytest.fixture(scope="module")
def public_key_file() -> Iterator[str]:
    _, pem = rsa_keys()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "jwt-public.pem"
        path.write_bytes(pem)
        yield str(path)


def hs(**extra: object) -> str:
    """An HS256 token of the gateway's secret, valid unless ``extra`` says otherwise."""
    return jwt.encode(claims(**{"iss": ISSUER, **extra}), SECRET, algorithm="HS256")


def _no_sub() -> str:
    return jwt.encode(claims(None, iss=ISSUER), SECRET, algorithm="HS256")


def _hs_with_public_key() -> str:
    # The RS/HS confusion: an HS256 MAC keyed with the RSA public key (PEM bytes), which a
    # naive verifier would "verify" with the only key it holds.
    _, pem = rsa_keys()
    return forge_jwt({"alg": "HS256", "typ": "JWT"}, claims(iss=ISSUER), pem)


def _alg_none() -> str:
    return forge_jwt({"alg": "none", "typ": "JWT"}, claims(iss=ISSUER), None)


def _alg_none_variants() -> str:
    return forge_jwt({"alg": "nOnE", "typ": "JWT"}, claims(iss=ISSUER), None)


def _big() -> str:
    # 100 KB: a real, well-signed token whose size is the attack.
    return hs(pad="x" * 100_000)


def _truncated() -> str:
    return hs()[:-7]


def _truncated_to_header() -> str:
    return hs().split(".")[0]


def _garbage_b64() -> str:
    return "eyJ!!!.@@@@.####"


def _random_b64() -> str:
    parts = [base64.urlsafe_b64encode(os.urandom(n)).decode().rstrip("=") for n in (20, 40, 32)]
    return ".".join(parts)


# (name, gateway, how the token travels, forge, accepted statuses)
# gateway "hs": HS256 with jwt_issuer; "rs": RS256 only, with a PEM public key.
TOKEN_ATTACKS = [
    ("alg-none", "hs", "query", _alg_none, {403}),
    ("alg-none-mixed-case", "hs", "query", _alg_none_variants, {403}),
    ("alg-none-on-rs256", "rs", "query", _alg_none, {403}),
    ("hs256-signed-with-rs256-public-key", "rs", "query", _hs_with_public_key, {403}),
    ("hs256-on-rs256-gateway", "rs", "query", lambda: hs(), {403}),
    ("expired", "hs", "query", lambda: hs(exp=int(time.time()) - 30), {403}),
    ("nbf-in-the-future", "hs", "query", lambda: hs(nbf=int(time.time()) + 600), {403}),
    ("wrong-aud", "hs", "query", lambda: hs(aud="anon"), {403}),
    ("wrong-iss", "hs", "query", lambda: hs(iss="https://evil.example/auth/v1"), {403}),
    ("no-iss", "hs", "query", lambda: token(), {403}),
    ("missing-sub", "hs", "query", _no_sub, {403}),
    ("empty-sub", "hs", "query", lambda: hs(sub=""), {403}),
    ("wrong-secret", "hs", "query",
     lambda: jwt.encode(claims(iss=ISSUER), "x" * 40, algorithm="HS256"), {403}),
    # 100 KB: the request line is over max_header_bytes (16 KiB) in the query, the header
    # block in Authorization / Sec-WebSocket-Protocol; with a larger head limit the token
    # itself is refused (MAX_TOKEN_BYTES, 16 KiB) before it is base64-decoded.
    ("100kb-in-query", "hs", "query", _big, {414}),
    ("100kb-in-authorization", "hs", "authorization", _big, {431}),
    ("100kb-in-subprotocol", "hs", "subprotocol", _big, {431}),
    ("100kb-under-256k-head-limit", "hs-big-head", "query", _big, {403}),
    ("truncated-signature", "hs", "query", _truncated, {403}),
    ("truncated-to-header", "hs", "query", _truncated_to_header, {403}),
    ("garbage-base64", "hs", "query", _garbage_b64, {403}),
    ("random-base64", "hs", "query", _random_b64, {403}),
    ("garbage-in-authorization", "hs", "authorization", _garbage_b64, {403}),
    ("garbage-in-subprotocol", "hs", "subprotocol", _random_b64, {403}),
]


@pytest.mark.parametrize(("attack", "kind", "where", "forge", "statuses"), TOKEN_ATTACKS,
                         ids=[a[0] for a in TOKEN_ATTACKS])
def test_case_06_token_attacks(harden: Callable[..., Guard], echo: CountingEcho,
                               public_key_file: str, attack: str, kind: str, where: str,
                               forge: Callable[[], str], statuses: set[int]) -> None:
    if kind == "rs":
        g = harden(echo.url(), jwt_algorithms=("RS256",), jwt_public_key=public_key_file,
                   good_token=lambda: rs256("control-user"))
    else:
        extra = {"max_header_bytes": 256 * 1024} if kind == "hs-big-head" else {}
        g = harden(echo.url(), jwt_issuer=ISSUER,
                   good_token=lambda: token("control-user", iss=ISSUER), **extra)
    bad = g.secret(forge())
    headers: list[tuple[str, str]] = []
    target = "/ws/experience?experience=hardening"
    if where == "query":
        target += f"&token={bad}"
    elif where == "authorization":
        headers.append(("Authorization", f"Bearer {bad}"))
    else:
        headers.append(("Sec-WebSocket-Protocol", f"game.v1, bearer.{bad}"))
    resp = one_response(exchange(g.port, upgrade_request(target, headers=headers)))
    assert resp.status in statuses, (resp.status, resp.body)
    assert bad.encode() not in resp.body
    time.sleep(0.05)  # a connection attempt, had there been one, would be accepted by now
    assert echo.contacted == 0, "the upstream was contacted for a refused token"
    g.check(main_route=True)


# ----------------------------------------------------------------------------- case 7


@pytest.mark.parametrize("pace", ["burst", "sustained"])
def test_case_07_jwks_kid_flood(harden: Callable[..., Guard], echo: CountingEcho,
                                pace: str) -> None:
    """burst: 4 waves of 100 concurrent handshakes with random kids against a cold cache and
    a slow JWKS endpoint (cooldown 5 s): one fetch, which the first wave joins; all 403; then
    the real kid succeeds from the cache. sustained: handshakes with random kids one after
    the other for 1.6 s with a 0.5 s cooldown: the fetches are >= one cooldown apart."""
    real_kid = "real-" + secrets.token_hex(4)
    cooldown = 5.0 if pace == "burst" else 0.5
    jwks = JwksServer(jwks_document(real_kid), delay=0.2 if pace == "burst" else 0.0)
    try:
        g = harden(echo.url(), jwt_algorithms=("RS256",), jwks_url=jwks.url(),
                   jwks_cooldown=cooldown, good_token=lambda: rs256("control-user", kid=real_kid),
                   warm=pace == "sustained")
        jwks.fetch_times.clear()
        t0 = time.monotonic()
        statuses: list[int] = []
        if pace == "burst":
            waves, per_wave = 4, 100
            for wave in range(waves):
                socks: list[socket.socket] = []
                with sockets_closed(socks):
                    for _ in range(per_wave):  # all in flight at once
                        bad = rs256("flood", kid=secrets.token_hex(8))
                        s = socket.create_connection((HOST, g.port), timeout=5)
                        s.sendall(upgrade_request(f"/ws/experience?token={bad}"))
                        socks.append(s)
                    for s in socks:
                        raw = b""
                        while data := s.recv(65536):
                            raw += data
                        statuses.append(one_response(raw).status)
                g.sample()
                if wave == 0:
                    time.sleep(0.3)
        else:
            while time.monotonic() - t0 < 1.6:
                bad = rs256("flood", kid=secrets.token_hex(8))
                raw = exchange(g.port, upgrade_request(f"/ws/experience?token={bad}"))
                statuses.append(one_response(raw).status)
        elapsed = time.monotonic() - t0
        assert set(statuses) == {403}, sorted(set(statuses))
        assert len(statuses) > 20
        # At most one fetch per cooldown.
        times = list(jwks.fetch_times)
        assert len(times) >= 1, "the unknown kids never caused a fetch"
        assert len(times) <= 1 + int(elapsed / cooldown), (len(times), elapsed)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(gap >= cooldown * 0.9 for gap in gaps), gaps
        fetches = jwks.fetches
        # The real kid gets through, from the cache.
        good = g.secret(rs256("real", kid=real_kid))
        with RawWS(g.port, f"/ws/experience?token={good}") as ws:
            assert ws.status == 101
            ws.send_frame(0x1, b"real kid")
            assert ws.recv_frame().payload == b"real kid"
            ws.send_close(1000)
            assert ws.recv_frame().close == (1000, "")
        assert jwks.fetches == fetches
        assert echo.contacted == 1  # only the good token reached the upstream
        g.check(main_route=True)
    finally:
        jwks.stop()
