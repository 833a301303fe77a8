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
  ``SSLWantReadError``, and raising it costs about 4 µs here, once for every batch of records
  received: at a game's tick rate, once per message. The override reads with
  :func:`read_records`, which the gateway's own TLS termination (``wss.py``) uses too.

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

__all__ = ["RECORD", "install_lean_ssl_protocol", "read_records"]

# The largest plaintext a TLS record holds (RFC 8446 5.1): one read returns one record at most,
# so asking more only makes each read allocate more (``SSLObject.read`` allocates the size
# asked, then shrinks it; in a fresh process glibc serves 256 KiB with mmap, 25 us a read).
RECORD = 16384


def read_records(obj: ssl.SSLObject, incoming: ssl.MemoryBIO) -> tuple[bytes, bool]:
    """The application data of every whole record in ``incoming``, and whether the peer's
    close_notify came (``SSLError`` other than ``SSLWantReadError`` goes to the caller).

    Reads record by record while bytes remain. Stopping when none do, rather than at
    ``SSLWantReadError``, saves raising it (3.8 us measured, against 0.15 for ``pending()``)
    once per read, as uvloop does; a partial record still ends in it. The common case, one
    record, takes one read and no list.
    """
    try:
        first = obj.read(RECORD)
    except ssl.SSLWantReadError:
        return b"", False
    if not first:  # close_notify
        return b"", True
    if not (incoming.pending or obj.pending()):
        return first, False
    chunks = [first]
    try:
        while incoming.pending or obj.pending():
            chunk = obj.read(RECORD)
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
    except ssl.SSLWantReadError:
        pass
    return b"".join(chunks), False

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
        # asyncio's own, but reading as read_records does (asyncio loops until SSLWantReadError)
        data, eof = read_records(self._sslobj, self._incoming)
        if data:
            self._app_protocol.data_received(data)
        if eof:
            self._call_eof_received()
            self._start_shutdown()


def install_lean_ssl_protocol() -> None:
    """Make asyncio's loops build ``_LeanSSLProtocol`` for TLS, process-wide."""
    sslproto.SSLProtocol = _LeanSSLProtocol  # type: ignore[misc]
