"""JWT verification, once per connection, before any upgrade.

The signature is checked as PyJWT's algorithm objects check it: HMAC with
``hmac.compare_digest``, from a context keyed once at start-up; RSA/EC by PyJWT's own objects
through ``cryptography``, with a PEM key prepared once at start-up. The compact-JWS parsing
around it is done here, with PyJWT 2.x's rules: the strict base64url alphabet, at most two
``=`` of padding and canonical encodings only; ``kid`` a string; ``crit`` a non-empty list of
understood extensions; ``b64: false`` (detached payloads) refused; then the signature, then the
payload as a JSON object; then the claims: the required ones present, ``iss`` and ``aud`` as
PyJWT checks them, ``sub`` and ``jti`` strings. ``PyJWT.decode`` did the same work with two to
four times the CPU (110 -> 55 us per fresh token, 85 -> 25 us warm: it checks the base64
alphabet one character at a time in Python, and prepares the key and checks its length on every
call), and ``tests/core/test_core_jwt_reference.py`` checks that both accept and refuse the
same tokens.

Time-based claims (``exp``, ``nbf``) are checked here against the ``now`` the
caller passes in, so the core reads no clock and tests are deterministic.

Keys come from a shared secret (HS*), a PEM public key, or a JWKS document. A JWKS *URL* is
fetched by the transport, never on the verification path: when a token names a ``kid`` the
cached set lacks, :meth:`Authenticator.verify` answers :class:`NeedKeys` if
:class:`JwksCache` allows a fetch (at most one per cooldown), and the transport retries once
the set is refreshed. A flood of random ``kid`` values therefore costs at most one fetch per
cooldown, and every other such token gets 403 from the cache.

Every failure is an :class:`AuthFailure` with a short reason that never contains the token.
"""

from __future__ import annotations

import binascii
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt
from jwt.algorithms import Algorithm, get_default_algorithms, has_crypto

__all__ = [
    "MAX_TOKEN_BYTES",
    "AuthConfig",
    "AuthFailure",
    "Authenticator",
    "Identity",
    "JwksCache",
    "NeedKeys",
]

# Supabase access tokens are about 1 KB; 16 KB leaves room for fat custom claims while a
# 100 KB token is refused before it is base64-decoded.
MAX_TOKEN_BYTES = 16 * 1024
_HMAC = frozenset(("HS256", "HS384", "HS512"))
# Three segments of the base64url alphabet, each with at most two '=' of padding (PyJWT
# accepts padded segments, as some issuers send them).
_COMPACT_JWS = re.compile(
    r"([A-Za-z0-9_-]*={0,2})\.([A-Za-z0-9_-]*={0,2})\.([A-Za-z0-9_-]*={0,2})")
_MALFORMED = "malformed token"
_INVALID = "invalid token"
# Parsed JOSE headers of tokens that verified, by their base64url segment. An issuer signs
# every token with the same header, so after the first token it is not decoded again; only a
# header that came with a valid signature gets a slot, so junk tokens cannot fill it.
_HEADER_SLOTS = 64


@dataclass(frozen=True, slots=True)
class AuthConfig:
    algorithms: tuple[str, ...] = ("HS256",)
    audience: tuple[str, ...] | None = ("authenticated",)  # Supabase's default
    issuer: str | None = None
    leeway: float = 0.0
    required_claims: tuple[str, ...] = ("exp", "sub")


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    claims: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AuthFailure:
    reason: str


@dataclass(frozen=True, slots=True)
class NeedKeys:
    """The token names a key id the cached JWKS lacks; a refresh is allowed now."""

    kid: str


class JwksCache:
    """The key set from a JWKS document, with the refresh policy for a JWKS URL."""

    def __init__(self, cooldown: float = 60.0) -> None:
        self.cooldown = cooldown
        self.keys: dict[str, jwt.PyJWK] = {}
        self.last_fetch: float | None = None
        self.fetching = False

    def load(self, document: str | bytes | Mapping[str, Any]) -> None:
        """Replace the key set; raises ``ValueError`` on a malformed document."""
        try:
            obj = json.loads(document) if isinstance(document, (str, bytes)) else document
            keyset = jwt.PyJWKSet.from_dict(dict(obj))
        except (ValueError, TypeError, KeyError, jwt.PyJWTError) as exc:
            raise ValueError(f"invalid JWKS document: {exc}") from None
        keys: dict[str, jwt.PyJWK] = {}
        for key in keyset.keys:
            if key.key_id:
                keys[key.key_id] = key
        self.keys = keys

    def may_fetch(self, now: float) -> bool:
        if self.fetching:
            return True  # join the fetch under way
        return self.last_fetch is None or now - self.last_fetch >= self.cooldown

    def fetch_started(self, now: float) -> None:
        self.fetching = True
        self.last_fetch = now

    def fetch_finished(self) -> None:
        self.fetching = False


class Authenticator:
    def __init__(
        self,
        config: AuthConfig,
        *,
        secret: str | bytes | None = None,
        public_key: str | bytes | None = None,
        jwks: JwksCache | None = None,
        jwks_refreshable: bool = False,
    ) -> None:
        if not config.algorithms:
            raise ValueError("at least one JWT algorithm must be allowed")
        if "none" in (a.lower() for a in config.algorithms):
            raise ValueError("the 'none' JWT algorithm cannot be allowed")
        asymmetric = [a for a in config.algorithms if a not in _HMAC]
        if asymmetric and not has_crypto:
            raise ValueError("asymmetric JWT algorithms need the 'cryptography' package")
        if any(a in _HMAC for a in config.algorithms) and not secret and not asymmetric:
            raise ValueError("HS* JWT algorithms need a secret (GAIA_JWT_SECRET)")
        if asymmetric and public_key is None and jwks is None:
            raise ValueError(
                f"{', '.join(asymmetric)} need a public key (--jwt-public-key) or a JWKS"
            )
        self.config = config
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self._public_key: Any = None
        if public_key is not None:
            # Parse once at start-up: a bad PEM fails the configuration, not a handshake.
            from jwt.algorithms import RSAAlgorithm

            try:
                self._public_key = RSAAlgorithm(RSAAlgorithm.SHA256).prepare_key(public_key)
            except Exception:  # noqa: BLE001 - try the other key families
                try:
                    from jwt.algorithms import ECAlgorithm

                    self._public_key = ECAlgorithm(ECAlgorithm.SHA256).prepare_key(public_key)
                except Exception as exc:  # noqa: BLE001
                    raise ValueError(f"cannot load the JWT public key: {exc}") from None
        self.jwks = jwks
        self._jwks_refreshable = jwks_refreshable
        algorithms = get_default_algorithms()
        self._algorithms: dict[str, Algorithm] = {
            a: algorithms[a] for a in config.algorithms if a in algorithms}
        unknown = [a for a in config.algorithms if a not in algorithms]
        if unknown:
            raise ValueError(f"unknown JWT algorithm(s): {', '.join(unknown)}")
        # The HMAC key, prepared and keyed once: each token's MAC starts from a copy of the
        # keyed context, where ``hmac.new`` (PyJWT's way) would fetch the digest from OpenSSL
        # and key it again for every token. PyJWT refuses a secret that is a PEM or SSH
        # public key (the key-confusion attack); that fails the configuration, not a handshake.
        self._hmac_ctx: dict[str, hmac.HMAC] = {}
        self.warnings: list[str] = []  # for the start-up log
        if self._secret:
            for alg in self._algorithms:
                if alg in _HMAC:
                    obj = self._algorithms[alg]
                    try:
                        prepared = obj.prepare_key(self._secret)
                    except jwt.InvalidKeyError as exc:
                        raise ValueError(f"unusable JWT secret: {exc}") from None
                    self._hmac_ctx[alg] = hmac.new(
                        prepared, digestmod=obj.hash_alg)  # type: ignore[attr-defined]
                    short = obj.check_key_length(prepared)
                    if short:
                        self.warnings.append(short)
        self._audience = list(config.audience) if config.audience else None
        self._required = tuple(config.required_claims)
        self._headers: dict[str, dict[str, Any]] = {}

    def verify(self, token: str | None, now: float) -> Identity | AuthFailure | NeedKeys:
        if not token:
            return AuthFailure("missing token")
        if len(token) > MAX_TOKEN_BYTES:
            return AuthFailure("token too large")
        segments = _COMPACT_JWS.fullmatch(token)
        if segments is None:
            return AuthFailure(_MALFORMED)
        head, body, sig = segments.groups()
        header = self._headers.get(head)
        known = header is not None
        if header is None:
            header = _json_object(_b64url(head))
            if header is None:
                return AuthFailure(_MALFORMED)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.config.algorithms:
            return AuthFailure("token algorithm not allowed")
        key = self._key_for(alg, header, now)
        if isinstance(key, (AuthFailure, NeedKeys)):
            return key
        if key is None:
            return AuthFailure("no key for this token")
        claims = self._decode(head, body, sig, alg, header, key)
        if isinstance(claims, AuthFailure):
            return claims
        if not known and len(self._headers) < _HEADER_SLOTS:
            self._headers[head] = header
        return self._check_times(claims, now)

    def _decode(self, head: str, body: str, sig: str, alg: str, header: dict[str, Any],
                key: Any) -> dict[str, Any] | AuthFailure:
        """Signature and claims, as ``PyJWT.decode`` checks them (see the module docstring)."""
        payload_raw = _b64url(body)
        signature = _b64url(sig)
        if payload_raw is None or signature is None:
            return AuthFailure(_MALFORMED)
        if "kid" in header and not isinstance(header["kid"], str):
            return AuthFailure(_INVALID)
        if "crit" in header:
            crit = header["crit"]
            if not isinstance(crit, list) or not crit or any(
                    c != "b64" or c not in header for c in crit):
                return AuthFailure(_INVALID)
        if header.get("b64", True) is False:  # detached payload: never what a client sends
            return AuthFailure(_MALFORMED)
        signed = f"{head}.{body}".encode("ascii")
        try:
            if isinstance(key, jwt.PyJWK):
                if alg != key.algorithm_name:  # the key's own algorithm, not the token's
                    return AuthFailure(_INVALID)
                obj = key.Algorithm
                valid = obj.verify(signed, obj.prepare_key(key.key), signature)
            elif alg in _HMAC:  # as PyJWT's HMACAlgorithm.verify, from the keyed context
                mac = self._hmac_ctx[alg].copy()
                mac.update(signed)
                valid = hmac.compare_digest(signature, mac.digest())
            else:
                obj = self._algorithms[alg]
                valid = obj.verify(signed, obj.prepare_key(key), signature)
        except Exception:  # noqa: BLE001 - e.g. key/algorithm mismatch inside the crypto layer
            return AuthFailure(_INVALID)
        if not valid:
            return AuthFailure("bad signature")
        claims = _json_object(payload_raw)
        if claims is None:
            return AuthFailure(_MALFORMED)
        for claim in self._required:
            if claims.get(claim) is None:
                return AuthFailure(f"missing claim {claim}")
        issuer = self.config.issuer
        if issuer is not None:
            if "iss" not in claims:
                return AuthFailure("missing claim iss")
            if claims["iss"] != issuer:  # a non-string never equals the configured string
                return AuthFailure("wrong issuer")
        audience = self._audience
        if audience is not None:
            aud = claims.get("aud")
            if not aud:
                return AuthFailure("missing claim aud")
            if isinstance(aud, str):
                aud = [aud]
            if not isinstance(aud, list) or any(not isinstance(a, str) for a in aud):
                return AuthFailure("wrong audience")
            if all(a not in aud for a in audience):
                return AuthFailure("wrong audience")
        if "sub" in claims and not isinstance(claims["sub"], str):
            return AuthFailure(_INVALID)
        if "jti" in claims and not isinstance(claims["jti"], str):
            return AuthFailure(_INVALID)
        return claims

    def _check_times(self, claims: dict[str, Any], now: float) -> Identity | AuthFailure:
        leeway = self.config.leeway
        exp = claims.get("exp")
        if "exp" in claims or "exp" in self.config.required_claims:
            if not _is_number(exp):
                return AuthFailure("exp is not a number")
            if now >= exp + leeway:
                return AuthFailure("token expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _is_number(nbf):
                return AuthFailure("nbf is not a number")
            if now < nbf - leeway:
                return AuthFailure("token not yet valid")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            return AuthFailure("missing claim sub")
        return Identity(sub, claims)

    def _key_for(self, alg: str, header: dict[str, Any], now: float) -> Any:
        if alg in _HMAC:
            return self._secret if self._secret else AuthFailure("no key for this token")
        if self.jwks is not None:
            kid = header.get("kid")
            if isinstance(kid, str):
                found = self.jwks.keys.get(kid)
                if found is not None:
                    return found
                if self._jwks_refreshable and self.jwks.may_fetch(now):
                    return NeedKeys(kid)
                return AuthFailure("unknown key id")
            if self._public_key is None:
                return AuthFailure("token has no key id")
        return self._public_key


def _json_object(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        if raw[:1] == b"{" and raw[1:2] != b"\0":
            # What json.loads(bytes) detects for this start (UTF-8), without its detour
            obj = json.loads(raw.decode("utf-8", "surrogatepass"))
        else:
            obj = json.loads(raw)  # bytes: UTF-8/16/32 detected, as PyJWT does
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


_B64URL_VALUE = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}


def _b64url(segment: str) -> bytes | None:
    """One base64url segment, decoded as strictly as PyJWT does; None if it is not one.

    The caller has matched the segment against the base64url alphabet (``_COMPACT_JWS``).
    """
    stripped = segment.rstrip("=")
    padding = len(segment) - len(stripped)
    tail = len(stripped) % 4
    if padding > 2 or (padding and len(segment) % 4) or tail == 1:
        return None
    # Canonical only (PyJWT re-encodes and compares): the bits of the last character that
    # encode no byte must be zero, 4 of them after 2 characters of a group, 2 after 3.
    if tail and _B64URL_VALUE[stripped[-1]] & (0x0F if tail == 2 else 0x03):
        return None
    try:  # the alphabet is checked: map it to the standard one, as urlsafe_b64decode does
        return binascii.a2b_base64(
            stripped.replace("-", "+").replace("_", "/") + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        return None


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def token_from_request(
    query: Sequence[tuple[str, str]], authorization: str | None, subprotocols: Sequence[str]
) -> tuple[str | None, str | None]:
    """Find the token: ``?token=``, then ``Authorization: Bearer``, then a subprotocol entry.

    Returns ``(token, subprotocol_entry)``; the entry (``bearer.<JWT>``) must be removed from
    the offer forwarded upstream and is never echoed back. The query string wins because it is
    what the backend itself sees.
    """
    for name, value in query:
        if name == "token":
            return value, None
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip(), None
    for entry in subprotocols:
        if entry.startswith("bearer."):
            return entry[len("bearer."):], entry
    return None, None


__all__ += ["token_from_request"]
