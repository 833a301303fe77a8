"""Fast WebSocket echo backend for the end-to-end benchmark (picows + uvloop).

Echoes every data frame back with the same opcode and FIN bit, on any path.
Close frames are answered and the connection dropped; pings are auto-ponged.
Replies to the frames of one read are coalesced into one write.

    python bench/e2e/echo_picows.py --host 127.0.0.1 --port 9001

Prints "READY <port>" on stdout once listening (port 0 picks a free one).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

_CLOSE = WSMsgType.CLOSE
_PING = WSMsgType.PING
_PONG = WSMsgType.PONG


def frame_header(opcode: int, fin: bool, size: int) -> bytes:
    """Header of an unmasked (server -> client) frame."""
    b0 = (0x80 if fin else 0) | opcode
    if size < 126:
        return bytes((b0, size))
    if size < 65536:
        return bytes((b0, 126)) + size.to_bytes(2, "big")
    return bytes((b0, 127)) + size.to_bytes(8, "big")


class EchoListener(WSListener):
    """Echo with write coalescing: the replies to all frames parsed from one
    read are written with one write() (picows' send() writes once per frame)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.write = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.write = transport.underlying_transport.write

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        t = frame.msg_type
        if t is _CLOSE or t is _PING or t is _PONG:
            if self.out:
                self.write(self.out)
                self.out = bytearray()
            if t is _CLOSE:
                transport.send_close(frame.get_close_code(), frame.get_close_message())
                transport.disconnect()
            return  # auto-pong handles pings
        out = self.out
        out += frame_header(t.value, frame.fin, frame.payload_size)
        out += frame.get_payload_as_memoryview()
        if frame.last_in_buffer:
            self.write(out)
            self.out = bytearray()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()

    server = await ws_create_server(
        lambda _req: EchoListener(),
        args.host,
        args.port,
        backlog=4096,
        max_frame_size=64 * 1024 * 1024,
        websocket_handshake_timeout=30,
    )
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover
        asyncio.run(main())
    sys.exit(0)
