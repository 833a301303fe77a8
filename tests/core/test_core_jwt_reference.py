"""The gateway's JWT checks against PyJWT's ``decode`` as the reference (hypothesis).

``Authenticator`` parses the compact JWS itself and checks the signature as PyJWT's algorithm
objects do (HMAC from a context keyed once; see ``core/_auth.py``). Here, for tokens built from
valid ones and then bent (odd claims, odd headers, padding, non-canonical base64, flipped
characters, dropped or extra segments, other keys and algorithms), the gateway must accept
exactly the tokens that ``jwt.decode`` accepts with the same allow-list, key, audience, issuer
and required claims, and hand on the same claims. The time claims are the gateway's own
(checked against the ``now`` passed in, ``test_core_auth.py``), so the reference applies the
same check after ``jwt.decode``.

One deliberate difference: a ``b64: false`` header (RFC 7797 detached payload) is always
refused; PyJWT refuses it too unless the caller passes the detached payload, which a
gateway never does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import warnings
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire import NOW, SECRET, jwks, public_pem, rsa_key

from gaia_gateway.core import AuthConfig, Authenticator, AuthFailure, Identity, JwksCache

ISSUER = "https://auth.example/v1"
OTHER_SECRET = SECRET + "-other"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _bump_unused_bits(segment: str) -> str:
    """The same bytes, encoded with nonzero bits in the last character's unused low bits."""
    assert len(segment) % 4 in (2, 3)
    return segment[:-1] + _ALPHABET[_ALPHABET.index(segment[-1]) | 1]


def _sign_hs(alg: str, key: str, signing_input: str) -> str:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    return _b64(hmac.new(key.encode(), signing_input.encode(), digest).digest())


# ------------------------------------------------------------------ strategies

_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.text(max_size=6))
_claim_value = st.one_of(_json_scalar, st.lists(_json_scalar, max_size=3))
_MISSING = object()


def _maybe(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(_MISSING), values)


@st.composite
def claim_sets(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly valid claims with one or two bent; sometimes anything at all."""
    choices = {
        "sub": st.one_of(st.just("user-42"), _claim_value),
        "aud": st.one_of(st.just("authenticated"), st.just(["x", "authenticated"]),
                         st.just(["x"]), st.just(["authenticated", 1]), _claim_value),
        "iss": st.one_of(st.just(ISSUER), st.just([ISSUER]), _claim_value),
        "exp": st.one_of(st.just(int(NOW) + 60), st.just(int(NOW) - 1), st.floats(
            allow_nan=False, allow_infinity=False, width=32), _claim_value),
        "nbf": st.one_of(st.just(int(NOW) - 60), st.just(int(NOW) + 60), _claim_value),
        "jti": st.one_of(st.just("j-1"), _claim_value),
        "iat": _claim_value,
        "role": _claim_value,
    }
    claims: dict[str, Any] = {"sub": "user-42", "aud": "authenticated", "iss": ISSUER,
                              "exp": int(NOW) + 60, "role": "authenticated"}
    if draw(st.integers(0, 4)) == 0:
        claims = {}
        bent = list(choices)
    else:
        bent = draw(st.lists(st.sampled_from(sorted(choices)), max_size=2, unique=True))
    for name in bent:
        value = draw(_maybe(choices[name]))
        if value is _MISSING:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


@st.composite
def headers(draw: st.DrawFn) -> dict[str, Any]:
    alg = draw(st.sampled_from(["HS256"] * 8 + ["HS384", "HS512", "none", "RS256", "hs256", ""]))
    if draw(st.integers(0, 2)):  # mostly a plain header
        return {"alg": alg, "typ": "JWT"} if draw(st.booleans()) else {"alg": alg, "kid": "k1"}
    h: dict[str, Any] = {"alg": alg}
    if draw(st.booleans()):
        h["typ"] = draw(st.sampled_from(["JWT", "at+jwt", 7]))
    kid = draw(_maybe(st.one_of(st.just("k1"), st.just("nope"), _json_scalar)))
    if kid is not _MISSING:
        h["kid"] = kid
    crit = draw(_maybe(st.one_of(st.just(["b64"]), st.just(["exp"]), st.just([]),
                                 st.just("b64"), st.just([1]))))
    if crit is not _MISSING:
        h["crit"] = crit
    b64 = draw(_maybe(st.sampled_from([True, False, 0, "false"])))
    if b64 is not _MISSING:
        h["b64"] = b64
    return h


def _mutate(tok: str, how: int, pos: int, char: str) -> str:
    if how == 0:
        return tok
    if how == 1 and tok:  # replace one character
        i = pos % len(tok)
        return tok[:i] + char + tok[i + 1:]
    if how == 2:  # pad one segment with '='
        parts = tok.split(".")
        i = pos % len(parts)
        parts[i] += "=" * (1 + pos % 3)
        return ".".join(parts)
    if how == 3:  # drop the signature or add a segment
        return tok.rsplit(".", 1)[0] if pos % 2 else tok + ".e30"
    if how == 4 and "." in tok:  # non-canonical: bump the last character of the payload
        head, body, *rest = tok.split(".")
        if body:
            body = body[:-1] + _ALPHABET[(_ALPHABET.index(body[-1]) + 1 + pos % 3) % 64] \
                if body[-1] in _ALPHABET else body
        return ".".join([head, body, *rest])
    if how == 5:  # surrounding whitespace
        return f" {tok}" if pos % 2 else f"{tok}\n"
    return tok


@st.composite
def tokens(draw: st.DrawFn) -> str:
    header = draw(headers())
    claims = draw(claim_sets())
    encode = draw(st.sampled_from(["json"] * 8 + ["not-object", "not-json"]))
    if encode == "json":
        body = json.dumps(claims, separators=(",", ":")).encode()
    elif encode == "not-object":
        body = json.dumps([claims]).encode()
    else:
        body = b"{nope"
    segment = _b64(body)
    form = draw(st.sampled_from(["plain"] * 6 + ["padded", "overpadded", "noncanonical"]))
    if form == "padded":  # '=' to a multiple of 4: PyJWT accepts it
        segment += "=" * (-len(segment) % 4)
    elif form == "overpadded":
        segment += "=" * draw(st.integers(1, 3))
    elif form == "noncanonical" and len(segment) % 4 in (2, 3):  # nonzero unused low bits
        segment = _bump_unused_bits(segment)
    # signed over the segment as written: only the encoding rules can refuse it
    signing_input = _b64(json.dumps(header).encode()) + "." + segment
    alg = header["alg"]
    signer = draw(st.sampled_from(["secret"] * 6 + ["other", "rsa", "empty"]))
    if signer == "empty":
        sig = ""
    elif signer == "rsa" or alg == "RS256":
        sig = _b64(jwt.get_algorithm_by_name("RS256").sign(signing_input.encode(),
                                                           rsa_key("a")))
    else:
        hs = alg if alg in ("HS256", "HS384", "HS512") else "HS256"
        sig = _sign_hs(hs, SECRET if signer == "secret" else OTHER_SECRET, signing_input)
    tok = f"{signing_input}.{sig}"
    how = draw(st.integers(0, 5)) if draw(st.booleans()) else 0
    return _mutate(tok, how, draw(st.integers(0, 400)),
                   draw(st.sampled_from(list("A_-=.+/ é0"))))


# ------------------------------------------------------------------ the comparison


def _reference(tok: str, auth: Authenticator, key: Any, algorithms: list[str],
               audience: list[str] | None, issuer: str | None) -> Identity | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            claims = jwt.decode(
                tok, key, algorithms=algorithms, audience=audience, issuer=issuer,
                options={"require": ["exp", "sub"], "verify_exp": False, "verify_nbf": False,
                         "verify_iat": False, "verify_aud": audience is not None},
            )
        except Exception:  # noqa: BLE001 - any refusal is a refusal
            return None
    verdict = auth._check_times(claims, NOW)
    return verdict if isinstance(verdict, Identity) else None


def _compare(tok: str, auth: Authenticator, key: Any, algorithms: list[str],
             audience: list[str] | None, issuer: str | None) -> None:
    ours = auth.verify(tok, NOW)
    ref = _reference(tok, auth, key, algorithms, audience, issuer)
    if ref is None:
        assert isinstance(ours, AuthFailure), (tok, ours)
    else:
        assert ours == ref, (tok, ours)


SETTINGS = settings(max_examples=400, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


HS256 = Authenticator(AuthConfig(), secret=SECRET)
HS_ISS = Authenticator(AuthConfig(algorithms=("HS256", "HS384", "HS512"), audience=None,
                                  issuer=ISSUER), secret=SECRET)
RS256 = Authenticator(AuthConfig(algorithms=("RS256",)), public_key=public_pem("a"))
_CACHE = JwksCache()
_CACHE.load(jwks(("a", "k1")))
RS256_JWKS = Authenticator(AuthConfig(algorithms=("RS256",)), jwks=_CACHE)


@SETTINGS
@given(tokens())
def test_hs256_agrees_with_pyjwt(tok: str) -> None:
    _compare(tok, HS256, SECRET, ["HS256"], ["authenticated"], None)


@SETTINGS
@given(tokens())
def test_hs_family_with_issuer_and_no_audience_agrees_with_pyjwt(tok: str) -> None:
    _compare(tok, HS_ISS, SECRET, ["HS256", "HS384", "HS512"], None, ISSUER)


_CODECS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le",
           "utf-32-be"]
_BENDS = ["as is", "bad byte", "lone surrogate"]


def _encoded_token(claims: dict[str, Any], codec: str, bend: str) -> str:
    """An HS256 token whose payload is ``claims`` in ``codec``, bent as ``bend`` says."""
    text = json.dumps(claims, separators=(",", ":"), ensure_ascii=False)
    if bend == "lone surrogate":  # in a string, where json.loads keeps it
        text = '{"note":"\ud800"' + ("," + text[1:] if text != "{}" else "}")
    body = text.encode(codec, "surrogatepass")
    if bend == "bad byte":
        body = body[:-1] + b"\xff" + body[-1:]
    signing_input = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + _b64(body)
    return f"{signing_input}.{_sign_hs('HS256', SECRET, signing_input)}"


@SETTINGS
@given(claim_sets(), st.sampled_from(_CODECS), st.sampled_from(_BENDS))
def test_payload_encodings_agree_with_pyjwt(claims: dict[str, Any], codec: str, bend: str
                                            ) -> None:
    """A payload in any encoding ``json.loads(bytes)`` detects, with or without a broken
    byte or a lone surrogate: the gateway's shortcut for UTF-8 must decide as PyJWT does."""
    _compare(_encoded_token(claims, codec, bend), HS256, SECRET, ["HS256"], ["authenticated"],
             None)


@pytest.mark.parametrize("codec", _CODECS)
def test_valid_claims_pass_in_every_encoding(codec: str) -> None:
    claims = {"sub": "user-é", "aud": "authenticated", "exp": int(NOW) + 60}
    verdict = HS256.verify(_encoded_token(claims, codec, "as is"), NOW)
    assert isinstance(verdict, Identity) and verdict.user_id == "user-é"
    _compare(_encoded_token(claims, codec, "lone surrogate"), HS256, SECRET, ["HS256"],
             ["authenticated"], None)


@SETTINGS
@given(tokens())
def test_rs256_public_key_agrees_with_pyjwt(tok: str) -> None:
    _compare(tok, RS256, public_pem("a"), ["RS256"], ["authenticated"], None)


@SETTINGS
@given(tokens())
def test_jwks_agrees_with_pyjwt(tok: str) -> None:
    auth, cache = RS256_JWKS, _CACHE
    # the reference gets the key the token names, as a PyJWT user with a key set does
    try:
        kid = jwt.get_unverified_header(tok).get("kid")
    except Exception:  # noqa: BLE001
        kid = None
    key = cache.keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        assert isinstance(auth.verify(tok, NOW), AuthFailure)
        return
    _compare(tok, auth, key, ["RS256"], ["authenticated"], None)


def test_the_strategies_reach_acceptance_and_every_kind_of_refusal() -> None:
    """The comparison above is only worth something if both verdicts occur often."""
    seen: dict[str, int] = {}

    @SETTINGS
    @given(tokens())
    def collect(tok: str) -> None:
        v = HS256.verify(tok, NOW)
        key = "accepted" if isinstance(v, Identity) else v.reason  # type: ignore[union-attr]
        seen[key] = seen.get(key, 0) + 1

    collect()
    assert seen.get("accepted", 0) >= 20, seen
    for reason in ("malformed token", "bad signature", "token algorithm not allowed",
                   "wrong audience", "missing claim sub", "invalid token"):
        assert seen.get(reason, 0) >= 1, (reason, seen)


@pytest.mark.parametrize("secret", [public_pem("a"), public_pem("a").decode()])
def test_a_public_key_as_hmac_secret_fails_the_configuration(secret: Any) -> None:
    # PyJWT refuses such a key on every decode (the key-confusion attack); here it is a
    # configuration error at start-up.
    with pytest.raises(ValueError, match="unusable JWT secret"):
        Authenticator(AuthConfig(), secret=secret)


def test_a_short_secret_is_reported_once_at_start_up() -> None:
    auth = Authenticator(AuthConfig(), secret="short")
    assert auth.warnings and "below the minimum recommended length" in auth.warnings[0]
    assert Authenticator(AuthConfig(), secret=SECRET).warnings == []


def _signed(header_seg: str, payload_seg: str) -> str:
    signing_input = f"{header_seg}.{payload_seg}"
    return f"{signing_input}.{_sign_hs('HS256', SECRET, signing_input)}"


_HEADER_SEG = _b64(b'{"alg":"HS256","typ":"JWT"}')


def _payload_seg(tail: int) -> str:
    """A valid claims segment whose unpadded length is 4k + tail."""
    for pad in range(8):
        claims = {"sub": "user-42", "aud": "authenticated", "exp": int(NOW) + 60,
                  "x": "y" * pad}
        seg = _b64(json.dumps(claims, separators=(",", ":")).encode())
        if len(seg) % 4 == tail:
            return seg
    raise AssertionError(tail)


@pytest.mark.parametrize("case", [
    "plain-2", "plain-3", "plain-0", "padded-2", "padded-3", "overpadded-0", "wrong-pad-2",
    "noncanonical-2", "noncanonical-3", "noncanonical-signature", "padded-signature",
])
def test_base64url_encoding_rules_agree_with_pyjwt(case: str) -> None:
    kind, _, tail = case.rpartition("-")
    if kind in ("noncanonical", "padded") and tail == "signature":
        tok = _signed(_HEADER_SEG, _payload_seg(0))
        head, body, sig = tok.split(".")  # an HS256 signature is 43 characters: 4k + 3
        sig = _bump_unused_bits(sig) if kind == "noncanonical" else sig + "="
        tok = f"{head}.{body}.{sig}"
    else:
        seg = _payload_seg(int(tail))
        if kind == "padded":
            seg += "=" * (-len(seg) % 4)
        elif kind == "overpadded":
            seg += "=="
        elif kind == "wrong-pad":
            seg += "="  # 4k + 2 needs two
        elif kind == "noncanonical":
            seg = _bump_unused_bits(seg)
        tok = _signed(_HEADER_SEG, seg)
    _compare(tok, HS256, SECRET, ["HS256"], ["authenticated"], None)
    expected_ok = kind in ("plain", "padded")
    assert isinstance(HS256.verify(tok, NOW), Identity) is expected_ok, case
