"""gaia-gateway: a WebSocket and HTTP gateway for realtime game backends."""

__version__ = "0.1.0"
__all__ = ["__version__"]
