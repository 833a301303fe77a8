#!/usr/bin/env python3
"""WebSocket echo server used as the upstream for Autobahn|Testsuite runs.

Echoes every message exactly as received (text as text, binary as binary) on any
path and query string. permessage-deflate is offered/accepted (the websockets
default) unless --no-compression is given. Message size is unlimited and the
per-message fragment cap of the websockets library is lifted, so fragmentation
cases (9.3/9.4) are not failed by the backend.

    python scripts/echo_backend.py --host 127.0.0.1 --port 9001 [--no-compression]

Prints a line ``ready <host> <port>`` on stdout once listening; exits cleanly on
SIGTERM / SIGINT.
"""

from __future__ import annotations

import os

# Must be set before websockets is imported: the fragment cap is read at import
# time (websockets/asyncio/messages.py, default 4096).
os.environ.setdefault("WEBSOCKETS_MAX_FRAGMENTS", "1000000")

import argparse
import asyncio
import logging
import signal
import sys

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


async def echo(ws: ServerConnection) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


def _log_request(ws: ServerConnection, request) -> None:  # type: ignore[no-untyped-def]
    headers = "; ".join(f"{k}: {v}" for k, v in request.headers.raw_items())
    print(f"handshake {request.path} | {headers}", file=sys.stderr, flush=True)


async def main(args: argparse.Namespace) -> int:
    stop = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: None if stop.done() else stop.set_result(None))

    async with serve(
        echo,
        args.host,
        args.port,
        compression=None if args.no_compression else "deflate",
        max_size=None,
        max_queue=None,
        ping_interval=None,
        ping_timeout=None,
        open_timeout=args.open_timeout,
        close_timeout=10,
        process_request=_log_request if args.log_handshake else None,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"ready {args.host} {port}", flush=True)
        await stop
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--port", type=int, default=9001, help="0 picks a free port (printed in the ready line)"
    )
    p.add_argument(
        "--no-compression", action="store_true", help="do not negotiate permessage-deflate"
    )
    p.add_argument(
        "--log-handshake",
        action="store_true",
        help="print each handshake request's headers on stderr",
    )
    p.add_argument("--open-timeout", type=float, default=60.0)
    p.add_argument("--log-level", default="critical")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr)
    try:
        sys.exit(asyncio.run(main(a)))
    except KeyboardInterrupt:
        sys.exit(0)
