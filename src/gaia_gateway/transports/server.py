"""The listening socket, shared state of one process, JWKS refreshes, graceful shutdown."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from ..core import Gateway, JwksCache, Rejected, Session
from .protocol import ClientProtocol
from .wss import TlsProtocol

if TYPE_CHECKING:
    from ..metrics import Metrics

__all__ = ["GatewayServer"]

log = logging.getLogger("gaia_gateway.access")
syslog = logging.getLogger("gaia_gateway")


class GatewayServer:
    def __init__(
        self,
        gateway: Gateway,
        loop: asyncio.AbstractEventLoop,
        *,
        server_ssl: ssl.SSLContext | None = None,
        upstream_ca_file: str | None = None,
        jwks_url: str | None = None,
        dns_ttl: float | None = 10.0,
    ) -> None:
        self.gateway = gateway
        self.loop = loop
        self.server_ssl = server_ssl
        self.tls = server_ssl is not None
        self.clients: set[ClientProtocol] = set()
        self.handshaking: set[TlsProtocol] = set()  # wss:// sockets still in the TLS handshake
        self.metrics: Metrics | None = None  # with --metrics-port
        self._upstream_ca_file = upstream_ca_file
        self._upstream_ssl: ssl.SSLContext | None = None
        self._jwks_url = jwks_url
        self._jwks_waiters: list[ClientProtocol] = []
        self._server: asyncio.base_events.Server | None = None
        self.dns_ttl = dns_ttl
        # host, port -> (expiry on the loop clock, addresses) or the lookup under way
        self._dns: dict[tuple[str, int], tuple[float, list[Any]] | asyncio.Task[list[Any]]] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ serving

    async def start(self, host: str, port: int, *, reuse_port: bool = False,
                    sock: socket.socket | None = None) -> int:
        # wss:// is terminated by the gateway itself (wss.py), on a plain TCP listener.
        factory: Any = ((lambda: TlsProtocol(self)) if self.server_ssl is not None
                        else (lambda: ClientProtocol(self)))
        if sock is not None:
            self._server = await self.loop.create_server(factory, sock=sock, backlog=2048)
        else:
            self._server = await self.loop.create_server(
                factory, host, port, reuse_port=reuse_port or None, backlog=2048)
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def shutdown(self, grace: float) -> None:
        """Drain: new handshakes get 503, open sessions get 1001, then stop listening."""
        gw = self.gateway
        gw.draining = True
        now = time.time()
        for client in list(self.clients):
            if client.session is not None:
                client.run(client.session.shutdown(now))
        if self.clients:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                syslog.warning("shutdown grace over: dropping connections",
                               extra={"fields": {"open": len(self.clients)}})
        if self._server is not None:
            self._server.close()
        for pending in list(self.handshaking):
            pending.abort()
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.abort()
            up = client.upstream
            if up is not None and up.transport is not None:
                up.transport.abort()
        await asyncio.sleep(0)

    def connection_done(self) -> None:
        if not self.clients:
            self._idle.set()

    # ---------------------------------------------------------- upstream addresses

    def cached_addresses(self, host: str, port: int) -> list[tuple[int, tuple[Any, ...]]] | None:
        """The addresses :meth:`resolve` would return, when it need not wait for them."""
        entry = self._dns.get((host, port))
        if type(entry) is tuple and entry[0] > self.loop.time():
            return entry[1]
        return None

    async def resolve(self, host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
        """(family, sockaddr) pairs for an upstream, from a cache kept ``dns_ttl`` seconds.

        Resolving ``localhost`` for every connection costs a trip through the resolver's
        thread pool (about 0.15 ms of a 1.1 ms handshake here); concurrent handshakes
        share one lookup. An IP literal is not looked up, and is remembered for good.
        """
        cached = self.cached_addresses(host, port)
        if cached is not None:
            return cached
        key = (host, port)
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            addrs: list[tuple[int, tuple[Any, ...]]] = [(family, (str(ip), port))]
            self._dns[key] = (float("inf"), addrs)
            return addrs
        lookup = self._dns.get(key)
        if not isinstance(lookup, asyncio.Task):  # none under way (an expired entry, or none)
            # its own task: a client that leaves must not cancel the others' lookup
            lookup = self.loop.create_task(self._lookup(key))
            self._dns[key] = lookup
        return await asyncio.shield(lookup)

    async def _lookup(self, key: tuple[str, int]) -> list[tuple[int, tuple[Any, ...]]]:
        try:
            infos = await self.loop.getaddrinfo(key[0], key[1], type=socket.SOCK_STREAM)
        except BaseException:
            self._dns.pop(key, None)
            raise
        addrs: list[tuple[int, tuple[Any, ...]]] = []
        for family, _type, _proto, _name, sockaddr in infos:
            if (family, sockaddr) not in addrs:
                addrs.append((family, sockaddr))
        if self.dns_ttl:
            self._dns[key] = (self.loop.time() + self.dns_ttl, addrs)
        else:
            self._dns.pop(key, None)
        return addrs

    def forget(self, host: str, port: int) -> None:
        """An address failed: look the name up again next time."""
        entry = self._dns.get((host, port))
        if isinstance(entry, tuple) and entry[0] != float("inf"):  # a literal stays
            del self._dns[(host, port)]

    # --------------------------------------------------------------- upstream TLS

    def upstream_ssl(self, tls: bool) -> ssl.SSLContext | None:
        if not tls:
            return None
        if self._upstream_ssl is None:
            self._upstream_ssl = ssl.create_default_context(cafile=self._upstream_ca_file)
        return self._upstream_ssl

    # ------------------------------------------------------------------- JWKS

    def fetch_keys(self, client: ClientProtocol) -> None:
        """Join or start the single JWKS refresh; the waiting sessions resume after it."""
        cache = self.gateway.auth.jwks
        assert cache is not None and self._jwks_url is not None
        self._jwks_waiters.append(client)
        if not cache.fetching:
            cache.fetch_started(time.time())
            self.loop.create_task(self._refresh_jwks(cache, self._jwks_url))

    async def _refresh_jwks(self, cache: JwksCache, url: str) -> None:
        try:
            body = await self.loop.run_in_executor(None, _fetch, url)
            cache.load(body)
            syslog.info("JWKS refreshed", extra={"fields": {"keys": len(cache.keys)}})
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old key set
            syslog.warning("JWKS refresh failed; keeping the cached keys",
                           extra={"fields": {"error": str(exc)[:200]}})
        finally:
            cache.fetch_finished()
            waiters, self._jwks_waiters = self._jwks_waiters, []
            now = time.time()
            for client in waiters:
                if client.session is not None and client.transport is not None:
                    client.run(client.session.keys_updated(now))

    # -------------------------------------------------------------------- logs

    def log_open(self, session: Session) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("open", extra={"fields": session.info()})

    def log_close(self, session: Session) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("close", extra={"fields": session.info()})

    def log_reject(self, session: Session, action: Rejected) -> None:
        level = logging.INFO if action.status in (200, 101) else logging.WARNING
        if action.status >= 500:
            level = logging.ERROR if action.status == 500 else logging.WARNING
        log.log(level, "reject", extra={"fields": session.info()})


def _fetch(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read(1024 * 1024)
