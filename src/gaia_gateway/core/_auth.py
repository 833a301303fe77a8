"""JWT verification, once per connection, before any upgrade.

PyJWT checks the signature, the algorithm allow-list, ``aud``, ``iss`` and the presence of the
required claims. Time-based claims (``exp``, ``nbf``) are checked here against the ``now`` the
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

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt
from jwt.algorithms import has_crypto

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
        if any(a in _HMAC for a in config.algorithms) and not secret:
            if not asymmetric:
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
        self._decoder = jwt.PyJWT(
            options={
                "require": list(config.required_claims),
                "verify_exp": False,  # checked below against the caller's clock
                "verify_nbf": False,
                "verify_iat": False,
            }
        )

    def verify(self, token: str | None, now: float) -> Identity | AuthFailure | NeedKeys:
        if not token:
            return AuthFailure("missing token")
        if len(token) > MAX_TOKEN_BYTES:
            return AuthFailure("token too large")
        header = _peek_header(token)
        if header is None:
            return AuthFailure("malformed token")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.config.algorithms:
            return AuthFailure("token algorithm not allowed")
        key = self._key_for(alg, header, now)
        if isinstance(key, (AuthFailure, NeedKeys)):
            return key
        if key is None:
            return AuthFailure("no key for this token")
        audience = self.config.audience
        try:
            claims = self._decoder.decode(
                token,
                key,
                algorithms=[alg],
                audience=list(audience) if audience else None,
                issuer=self.config.issuer,
                options={"verify_aud": audience is not None},
            )
        except jwt.ExpiredSignatureError:  # pragma: no cover - exp is checked below
            return AuthFailure("token expired")
        except jwt.InvalidAudienceError:
            return AuthFailure("wrong audience")
        except jwt.InvalidIssuerError:
            return AuthFailure("wrong issuer")
        except jwt.MissingRequiredClaimError as exc:
            return AuthFailure(f"missing claim {exc.claim}")
        except jwt.InvalidSignatureError:
            return AuthFailure("bad signature")
        except jwt.DecodeError:
            return AuthFailure("malformed token")
        except jwt.PyJWTError:
            return AuthFailure("invalid token")
        except Exception:  # noqa: BLE001 - e.g. key/algorithm mismatch inside the crypto layer
            return AuthFailure("invalid token")
        return self._check_times(claims, now)

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


def _peek_header(token: str) -> dict[str, Any] | None:
    """The token's header, only to pick the key; PyJWT then checks the whole token.

    (PyJWT's own ``get_unverified_header`` would decode and strictly re-validate the token a
    second time; on a handshake that doubled the JWT cost.)
    """
    segment = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, TypeError):
        return None
    return header if isinstance(header, dict) else None


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
