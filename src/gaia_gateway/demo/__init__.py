"""Demo backends used for local runs, examples and end-to-end tests.

:mod:`gaia_gateway.demo.backend` is a tiny stand-in for the "KB service"
experience websocket (``/ws/experience``) that the gateway proxies to.  Run it
with ``python -m gaia_gateway.demo.backend --host 127.0.0.1 --port 8001``.

The submodule is imported lazily so that ``python -m`` does not see it in
``sys.modules`` before executing it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DemoBackend", "main", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gaia_gateway.demo import backend

        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
