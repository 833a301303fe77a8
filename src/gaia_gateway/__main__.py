"""``python -m gaia_gateway``: serve (default), ``demo``, ``token``."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from collections.abc import Sequence

from . import __version__
from .config import ConfigError, add_arguments, load_settings

__all__ = ["main", "make_token"]

_COMMANDS = ("serve", "demo", "token")


def make_token(secret: str, sub: str = "demo-user", ttl: float = 3600.0,
               audience: str = "authenticated", **claims: object) -> str:
    """A development HS256 token shaped like a Supabase access token."""
    import jwt

    now = int(time.time())
    payload = {"sub": sub, "aud": audience, "role": "authenticated", "iat": now,
               "exp": now + int(ttl), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gaia_gateway",
        description="WebSocket gateway: checks the JWT once, then relays frames to the upstream.",
        epilog="Commands: serve (default), demo (gateway + demo backend), token (dev JWT). "
        "Every option is also a GAIA_* environment variable and a key of --config FILE.toml.",
    )
    parser.add_argument("--version", action="version", version=f"gaia-gateway {__version__}")
    add_arguments(parser)
    return parser


def _demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gaia_gateway demo",
        description="Run the gateway and the built-in demo KB backend together, on loopback.",
    )
    parser.add_argument("--backend-port", type=int, default=8001, help="demo backend port (8001)")
    add_arguments(parser)
    return parser


def _token_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gaia_gateway token",
                                     description="Print a development HS256 JWT.")
    parser.add_argument("--secret", required=True, help="the gateway's --jwt-secret")
    parser.add_argument("--sub", default="demo-user", help="user id (sub claim)")
    parser.add_argument("--ttl", type=float, default=3600.0, help="seconds until exp")
    parser.add_argument("--audience", default="authenticated")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = args_list.pop(0) if args_list and args_list[0] in _COMMANDS else "serve"
    if command == "token":
        targs = _token_parser().parse_args(args_list)
        print(make_token(targs.secret, targs.sub, targs.ttl, targs.audience))
        return 0
    parser = _demo_parser() if command == "demo" else _parser()
    args = parser.parse_args(args_list)
    # Imported here, after parsing, so that --help and bad flags answer fast.
    from .app import run
    from .logs import setup_logging

    try:
        if command == "demo":
            return _demo(args)
        settings = load_settings(args)
        setup_logging(settings.log_format, settings.log_level)
        return run(settings)
    except ConfigError as exc:
        print(f"gaia-gateway: error: {exc}", file=sys.stderr)
        return 2


def _demo(args: argparse.Namespace) -> int:
    from .app import _run_one
    from .demo.backend import DemoBackend
    from .logs import setup_logging
    from .transports import resolve_loop

    secret = args.jwt_secret or secrets.token_urlsafe(24)
    overrides = {"jwt_secret": secret, "upstream": f"ws://127.0.0.1:{args.backend_port}/ws/experience"}
    if args.host is None:
        overrides["host"] = "127.0.0.1"
    settings = load_settings(args, overrides=overrides)
    setup_logging(settings.log_format, settings.log_level)
    backend = DemoBackend("127.0.0.1", args.backend_port)

    async def start_backend() -> None:
        await backend.start()

    loop_kind = resolve_loop(settings.loop)
    from .transports import new_event_loop

    loop = new_event_loop(loop_kind)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(start_backend())
    except OSError as exc:
        raise ConfigError(f"cannot start the demo backend on port {args.backend_port}: "
                          f"{exc.strerror}") from None
    token = make_token(secret, "demo-user")
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"ws://{host}:{settings.port}/ws/experience?token={token}&experience=wylding-woods"
    print(
        "\n".join([
            f"demo backend on ws://127.0.0.1:{args.backend_port}/ws/experience",
            f"gateway on http://{host}:{settings.port} (health: curl http://{host}:{settings.port}/health)",
            "connect a client (dev token valid 1 h; type {\"type\":\"ping\",\"timestamp\":1}):",
            f"  python -m gaia_gateway.client '{url}'",
            "",
        ]),
        flush=True,
    )
    del loop
    return _run_one(settings, loop_kind, reuse_loop=True)


if __name__ == "__main__":
    sys.exit(main())
