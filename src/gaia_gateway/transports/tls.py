"""asyncio's TLS protocol, with two of its costs taken out: for wss:// upstreams.

The gateway terminates its clients' TLS itself (``wss.py``), on both loops. Its connections to
wss:// upstreams still run through the loop's TLS protocol, on asyncio's loop
``asyncio.sslproto.SSLProtocol`` (CPython 3.11-3.13 alike). Two of its habits cost a gateway
dearly; uvloop's version of the same protocol has neither, so the uvloop transport needs
nothing from this module:

- **256 KiB of memory per connection.** Every ``SSLProtocol`` allocates its own 256 KiB socket
  read buffer, zero-filled, when its TCP connection is made, before any byte
  (python/cpython#109534). 9,000 clients of a wss:// upstream mean 9,000 upstream
  connections: over 2 GiB.
  ``_LeanSSLProtocol`` reads every connection of one loop into one buffer. That is
  safe because the transport's read callback hands the bytes to ``buffer_updated``, which
  copies them into the connection's TLS input before returning.
- **An exception per read.** ``_do_read__copied`` calls ``SSLObject.read`` until it raises
  ``SSLWantReadError``, and raising it costs about 4 µs here (3.8 µs measured, against 0.15
  for ``pending()``), once for every batch of records received: at a game's tick rate, once
  per message. The override stops when neither the input buffer nor OpenSSL holds any more
  bytes, as uvloop does; a partial record still ends in ``SSLWantReadError``, as before.

``install_lean_ssl_protocol`` puts the subclass where asyncio's loops look for the class
(``asyncio.sslproto.SSLProtocol``), so it applies to every TLS connection an asyncio loop of
the process makes.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from asyncio import sslproto
from typing import TYPE_CHECKING, Any

__all__ = ["install_lean_ssl_protocol"]

_READ_SIZE = sslproto.SSLProtocol.max_size
_buffers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, memoryview] = (
    weakref.WeakKeyDictionary())


class _LeanSSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol: one read buffer per loop, no exception per read."""

    if TYPE_CHECKING:  # asyncio's own, which typeshed does not declare
        _incoming: ssl.MemoryBIO
        _sslobj: ssl.SSLObject
        _app_protocol: asyncio.Protocol

        def _call_eof_received(self) -> None: ...
        def _start_shutdown(self) -> None: ...

    def __init__(self, loop: asyncio.AbstractEventLoop, *args: Any, **kwargs: Any) -> None:
        self.max_size = 0  # type: ignore[misc]  # the size asyncio allocates here: nothing
        super().__init__(loop, *args, **kwargs)
        del self.max_size  # the class's read size again
        view = _buffers.get(loop)
        if view is None:
            view = _buffers[loop] = memoryview(bytearray(_READ_SIZE))
        self._ssl_buffer_view = view

    def get_buffer(self, n: int) -> memoryview:
        return self._ssl_buffer_view  # buffer_updated copies out of it at once

    def _do_read__copied(self) -> None:
        # asyncio's own, but for the loop's condition (it loops until SSLWantReadError)
        chunks: list[bytes] = []
        chunk = b"1"
        try:
            while self._incoming.pending or self._sslobj.pending():
                chunk = self._sslobj.read(self.max_size)
                if not chunk:
                    break
                chunks.append(chunk)
        except sslproto.SSLAgainErrors:
            pass  # a partial record: the rest comes with the next read
        if chunks:
            self._app_protocol.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if not chunk:  # close_notify
            self._call_eof_received()
            self._start_shutdown()


def install_lean_ssl_protocol() -> None:
    """Make asyncio's loops build ``_LeanSSLProtocol`` for TLS, process-wide."""
    sslproto.SSLProtocol = _LeanSSLProtocol  # type: ignore[misc]
