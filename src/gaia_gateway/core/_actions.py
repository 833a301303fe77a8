"""What the core asks the transport to do. Each action is a small frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from ._http import Upstream

__all__ = [
    "Accepted",
    "Action",
    "CloseClient",
    "CloseUpstream",
    "ConnectUpstream",
    "FetchKeys",
    "Rejected",
    "SendToClient",
    "SendToUpstream",
]


@dataclass(frozen=True, slots=True)
class Action:
    pass


@dataclass(frozen=True, slots=True)
class SendToClient(Action):
    data: bytes


@dataclass(frozen=True, slots=True)
class SendToUpstream(Action):
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectUpstream(Action):
    upstream: Upstream


@dataclass(frozen=True, slots=True)
class FetchKeys(Action):
    """Refresh the JWKS, then call ``Session.keys_updated``."""


@dataclass(frozen=True, slots=True)
class CloseClient(Action):
    """Close the client's socket once what was sent is flushed (``abort``: at once, RST)."""

    abort: bool = False


@dataclass(frozen=True, slots=True)
class CloseUpstream(Action):
    abort: bool = False


@dataclass(frozen=True, slots=True)
class Rejected(Action):
    """The handshake was refused with ``status``; the response is in a SendToClient before."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class Accepted(Action):
    """The 101 went out: both legs are open and the relay runs."""
