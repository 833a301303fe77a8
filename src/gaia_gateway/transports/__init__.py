"""Thin I/O drivers of the core: asyncio Protocols on asyncio's or uvloop's event loop."""

from .loops import new_event_loop, resolve_loop
from .server import GatewayServer

__all__ = ["GatewayServer", "new_event_loop", "resolve_loop"]
