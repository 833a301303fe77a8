"""From settings to a running process (or several, sharing the port with SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable

from . import __version__
from .config import ConfigError, Settings
from .core import (
    SPEEDUPS,
    AuthConfig,
    Authenticator,
    Gateway,
    JwksCache,
    Limits,
    parse_upstream_url,
)
from .transports import GatewayServer, new_event_loop, resolve_loop

__all__ = ["build_gateway", "run", "serve"]

log = logging.getLogger("gaia_gateway")

# With --workers, a worker that dies is replaced, unless more than RESPAWN_LIMIT die within
# RESPAWN_WINDOW seconds: then something is wrong that a new process will not mend.
RESPAWN_LIMIT = 5
RESPAWN_WINDOW = 60.0

# The signals the parent of --workers passes on to them.
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# prometheus_client's multiprocess directory; it reads the variable when it is imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def build_gateway(settings: Settings) -> Gateway:
    """Check every setting that can be checked before listening; ConfigError on a bad one."""
    try:
        routes = {path: parse_upstream_url(url) for path, url in settings.routes.items()}
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    jwks: JwksCache | None = None
    if settings.jwks_file or settings.jwks_url:
        jwks = JwksCache(cooldown=settings.jwks_cooldown)
        if settings.jwks_file:
            try:
                jwks.load(_read(settings.jwks_file, "JWKS file"))
            except ValueError as exc:
                raise ConfigError(f"{settings.jwks_file}: {exc}") from None
    public_key = _read(settings.jwt_public_key, "JWT public key") if settings.jwt_public_key else None
    try:
        auth = Authenticator(
            AuthConfig(
                algorithms=tuple(settings.jwt_algorithms),
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                leeway=settings.jwt_leeway,
            ),
            secret=settings.jwt_secret,
            public_key=public_key,
            jwks=jwks,
            jwks_refreshable=bool(settings.jwks_url),
        )
        limits = Limits(
            max_message_size=settings.max_message_size,
            max_header_bytes=settings.max_header_bytes,
            handshake_timeout=settings.handshake_timeout,
            connect_timeout=settings.connect_timeout,
            close_timeout=settings.close_timeout,
            idle_timeout=settings.idle_timeout,
            send_timeout=settings.send_timeout,
            write_buffer_high=settings.write_buffer,
            write_buffer_low=settings.write_buffer // 4,
        )
        return Gateway(
            routes, auth, limits,
            allowed_origins=frozenset(settings.allowed_origins)
            if settings.allowed_origins is not None else None,
            max_connections=settings.max_connections,
            max_connections_per_ip=settings.max_connections_per_ip,
            version=__version__,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _server_ssl(settings: Settings) -> ssl.SSLContext | None:
    if not settings.certfile:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(settings.certfile, settings.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate/key: {exc}") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def reload_tls(server: GatewayServer, settings: Settings) -> bool:
    """SIGHUP: read ``certfile`` and ``keyfile`` again. Connections accepted from now on get
    the new certificate; open ones keep the session they have, so a renewed certificate
    needs no restart (which would drop every game session). A file that does not load
    leaves the current certificate in place, with an error line. True if reloaded."""
    if server.server_ssl is None:
        log.info("SIGHUP: nothing to reload (no --certfile)")
        return False
    try:
        ctx = _server_ssl(settings)
    except ConfigError as exc:
        log.error("TLS certificate reload failed; keeping the current one",
                  extra={"fields": {"error": str(exc)}})
        return False
    server.server_ssl = ctx
    log.info("TLS certificate reloaded", extra={"fields": {
        "certfile": settings.certfile, "pid": os.getpid()}})
    return True


async def serve(
    settings: Settings,
    *,
    sock: socket.socket | None = None,
    ready: Callable[[GatewayServer], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT, then drain within the grace period."""
    loop = asyncio.get_running_loop()
    gateway = build_gateway(settings)
    server = GatewayServer(
        gateway, loop, server_ssl=_server_ssl(settings),
        upstream_ca_file=settings.upstream_ca_file, jwks_url=settings.jwks_url,
        dns_ttl=settings.upstream_dns_ttl,
    )
    if settings.upstream_ca_file:
        _read(settings.upstream_ca_file, "upstream CA file")
    if settings.metrics_port is not None:
        await _start_metrics(server, settings)
    try:
        port = await server.start(settings.host, settings.port,
                                  reuse_port=settings.workers > 1, sock=sock)
    except OSError as exc:
        if server.metrics is not None:
            server.metrics.stop()
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (tests): the caller sets ``stop``
    try:  # reload, as nginx does; and never die of a HUP, with or without TLS
        loop.add_signal_handler(signal.SIGHUP, reload_tls, server, settings)
    except (NotImplementedError, RuntimeError, ValueError):
        pass
    # A worker starts with these blocked (``_run_workers``): a stop or a HUP sent while it was
    # starting waited for the handlers above, and is taken now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    scheme = "https" if server.tls else "http"
    log.info("listening", extra={"fields": {
        "url": f"{scheme}://{settings.host}:{port}", "loop": type(loop).__module__.split(".")[0],
        "routes": ",".join(f"{p}->{u}" for p, u in settings.routes.items()),
        "pid": os.getpid(), "version": __version__,
        # the relay's hot path: "C" (the _speedups module) or "Python" (not built)
        "frame_walk": SPEEDUPS}})
    if ready is not None:
        ready(server)
    await stop.wait()
    log.info("draining", extra={"fields": {"open": len(server.clients),
                                           "grace_s": settings.shutdown_grace}})
    await server.shutdown(settings.shutdown_grace)
    if server.metrics is not None:
        server.metrics.stop()
    log.info("stopped", extra={"fields": {"pid": os.getpid()}})


async def _start_metrics(server: GatewayServer, settings: Settings) -> None:
    """The ``/metrics`` listener (shared by the workers, each answering for all)."""
    from .metrics import Metrics

    metrics = Metrics(server, multiprocess=MULTIPROC_ENV in os.environ)
    try:
        port = await metrics.listen(settings.metrics_host, settings.metrics_port,
                                    reuse_port=settings.workers > 1)
    except OSError as exc:
        raise ConfigError(f"cannot listen for metrics on {settings.metrics_host}:"
                          f"{settings.metrics_port}: {exc.strerror}") from None
    server.metrics = metrics
    if settings.workers > 1:
        metrics.start_publishing(settings.metrics_interval)
    log.info("metrics", extra={"fields": {
        "url": f"http://{settings.metrics_host}:{port}/metrics", "pid": os.getpid()}})


def run(settings: Settings) -> int:
    """Run the gateway in this process, or fork ``workers`` processes; exit status."""
    kind = resolve_loop(settings.loop)
    gateway = build_gateway(settings)  # fail fast, once, before forking
    for warning in gateway.auth.warnings:  # e.g. a short HMAC secret
        log.warning("weak JWT key", extra={"fields": {"detail": warning}})
    own_dir = _multiprocess_dir(settings) if settings.metrics_port is not None else None
    try:
        if settings.workers == 1:
            return _run_one(settings, kind)
        return _run_workers(settings, kind)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def _multiprocess_dir(settings: Settings) -> str | None:
    """Where the metrics files go: ``PROMETHEUS_MULTIPROC_DIR`` if set, with its old files
    removed (as prometheus_client asks: a scrape sums every file in it), even for one
    process; else, for workers, a new directory, removed at exit (returned)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        for old in glob.glob(os.path.join(path, "*.db")):
            os.remove(old)
        return None
    if settings.workers == 1:
        return None
    path = tempfile.mkdtemp(prefix="gaia-metrics-")
    os.environ[MULTIPROC_ENV] = path  # before prometheus_client is imported: it reads it then
    return path


def _run_workers(settings: Settings, kind: str) -> int:
    """Fork the workers, forward signals to them, and replace one that dies."""
    children: set[int] = set()
    deaths: list[float] = []  # when workers died, for the respawn limit
    stopping = False
    status = 0
    def spawn() -> None:
        # The signals wait while the worker is forked: the child must not run the parent's
        # handler, and keeps them blocked until its event loop has its own (``serve``): a
        # SIGTERM that came while it started would otherwise kill it, not stop it.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child (os._exit: the finally below is not its)
                code = 1
                try:
                    for sig in _FORWARDED:
                        signal.signal(sig, signal.SIG_DFL)
                    code = _run_one(settings, kind)
                finally:
                    os._exit(code)
            children.add(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:  # every worker reloads its certificate on a HUP
            stopping = True
        for child in list(children):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    for _ in range(settings.workers):
        spawn()
    while children:
        pid, code = os.wait()
        children.discard(pid)
        if settings.metrics_port is not None:  # its live gauges leave the sums
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(pid)  # type: ignore[no-untyped-call]
        exit_code = os.waitstatus_to_exitcode(code)
        if stopping:
            status = status or exit_code
            continue
        if exit_code == 2:  # its settings cannot work (it said why): another would fail alike
            status = 2
            forward(signal.SIGTERM, None)
            continue
        # Not asked to stop: a crash, the OOM killer, a signal sent to the worker alone.
        # Replace it, as nginx's master does, unless workers keep dying.
        now = time.monotonic()
        deaths = [t for t in deaths if now - t < RESPAWN_WINDOW] + [now]
        fields = {"pid": pid, "exit": f"signal {-exit_code}" if exit_code < 0
                  else f"status {exit_code}"}
        if len(deaths) > RESPAWN_LIMIT:
            log.error("worker exited; workers keep dying: stopping the gateway", extra={
                "fields": {**fields, "deaths": len(deaths), "within_s": RESPAWN_WINDOW}})
            status = 1
            forward(signal.SIGTERM, None)
            continue
        log.error("worker exited; starting another", extra={"fields": fields})
        spawn()
    return status


def _run_one(settings: Settings, kind: str, *, reuse_loop: bool = False) -> int:
    """Serve in this process; ``reuse_loop``: on the loop already set (the demo's)."""
    loop = asyncio.get_event_loop() if reuse_loop else new_event_loop(kind)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(settings))
    except ConfigError as exc:
        print(f"gaia-gateway: error: {exc}", file=sys.stderr)
        return 2
    finally:
        loop.close()
    return 0
