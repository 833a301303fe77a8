"""Event loop selection: the same Protocol driver runs on asyncio's loop or on uvloop's.

uvloop implements asyncio's transport and protocol API in libuv, so the transport layer is one
set of Protocol classes (``protocol.py``) and the choice is made here, by one option.
"""

from __future__ import annotations

import asyncio

from .tls import install_lean_ssl_protocol

__all__ = ["LOOPS", "new_event_loop", "resolve_loop"]

LOOPS = ("uvloop", "asyncio")


def resolve_loop(kind: str) -> str:
    """``auto`` means uvloop where it is installed, else asyncio."""
    if kind == "auto":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "asyncio"
        return "uvloop"
    if kind not in LOOPS:
        raise ValueError(f"unknown loop {kind!r}: use uvloop or asyncio")
    return kind


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    kind = resolve_loop(kind)
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ValueError("--loop uvloop needs the uvloop package (pip install uvloop)") from None
        return uvloop.new_event_loop()
    install_lean_ssl_protocol()  # asyncio's TLS: 256 KiB per connection otherwise (tls.py)
    return asyncio.new_event_loop()
