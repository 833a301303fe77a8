"""``python -m gaia_gateway.client URL``: a minimal interactive websocket client.

Each line typed is sent as a text message; each message received is printed. For trying the
demo without installing anything else (it runs on wsproto, a dependency already).
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    RejectConnection,
    Request,
    TextMessage,
)

__all__ = ["main"]


async def _run(url: str) -> int:
    parts = urlsplit(url)
    tls = parts.scheme == "wss"
    port = parts.port or (443 if tls else 80)
    reader, writer = await asyncio.open_connection(
        parts.hostname, port, ssl=ssl.create_default_context() if tls else None)
    ws = WSConnection(ConnectionType.CLIENT)
    target = parts.path + ("?" + parts.query if parts.query else "")
    writer.write(ws.send(Request(host=parts.netloc, target=target)))
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    loop.add_reader(sys.stdin.fileno(), lambda: lines.put_nowait(sys.stdin.readline() or None))

    async def pump_stdin() -> None:
        while (line := await lines.get()) is not None:
            writer.write(ws.send(TextMessage(line.rstrip("\n"))))
        writer.write(ws.send(CloseConnection(1000, "bye")))

    sender: asyncio.Task[None] | None = None
    status = 0
    while data := await reader.read(65536):
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                print("< connected (type JSON lines; Ctrl-D to close)", file=sys.stderr)
                sender = asyncio.create_task(pump_stdin())
            elif isinstance(event, RejectConnection):
                print(f"< refused: HTTP {event.status_code}", file=sys.stderr)
                status = 1
            elif isinstance(event, TextMessage):
                print(event.data, flush=True)
            elif isinstance(event, BytesMessage):
                print(f"< {len(event.data)} binary bytes", flush=True)
            elif isinstance(event, CloseConnection):
                print(f"< closed {event.code} {event.reason}", file=sys.stderr)
                if ws.state.name == "REMOTE_CLOSING":
                    writer.write(ws.send(event.response()))
        await writer.drain()
    loop.remove_reader(sys.stdin.fileno())
    if sender is not None:
        sender.cancel()
    writer.close()
    return status


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m gaia_gateway.client 'ws://HOST:PORT/ws/experience?token=...'",
              file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(sys.argv[1]))
    except (OSError, KeyboardInterrupt) as exc:
        print(f"< {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
