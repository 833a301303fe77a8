"""The Sans-IO core: bytes and the current time in, actions out. No I/O, no clock."""

from ._actions import (
    Accepted,
    Action,
    CloseClient,
    CloseUpstream,
    ConnectUpstream,
    FetchKeys,
    Rejected,
    SendToClient,
    SendToUpstream,
)
from ._auth import AuthConfig, Authenticator, AuthFailure, Identity, JwksCache, NeedKeys
from ._frames import (
    SPEEDUPS,
    CloseFrame,
    FrameRelay,
    Violation,
    build_close,
    parse_close_payload,
)
from ._http import Upstream, parse_upstream_url
from ._limits import Limits
from ._session import Gateway, Session, State

__all__ = [
    "SPEEDUPS",
    "Accepted",
    "Action",
    "AuthConfig",
    "AuthFailure",
    "Authenticator",
    "CloseClient",
    "CloseFrame",
    "CloseUpstream",
    "ConnectUpstream",
    "FetchKeys",
    "FrameRelay",
    "Gateway",
    "Identity",
    "JwksCache",
    "Limits",
    "NeedKeys",
    "Rejected",
    "SendToClient",
    "SendToUpstream",
    "Session",
    "State",
    "Upstream",
    "Violation",
    "build_close",
    "parse_close_payload",
    "parse_upstream_url",
]
