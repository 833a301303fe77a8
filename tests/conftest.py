"""Fixtures of the end-to-end tests (tests/e2e): a gateway per test on uvloop or asyncio, real
upstreams, and leak checks after every e2e test: no open connection, client protocol or task
left in the gateway, nothing reported to its loop's exception handler, and the same open file
descriptors in the process as before the test."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gaia_gateway.transports import new_event_loop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import (
    DemoBackendThread,
    EchoServer,
    GatewayHandle,
    SilentListener,
    open_fds,
    wait_until,
)

LOOPS = ("uvloop", "asyncio")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end test over real sockets")


@pytest.fixture(params=LOOPS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def no_fd_leak(request: pytest.FixtureRequest) -> Iterator[None]:
    """The process has the same open file descriptors after the test (and its fixtures)."""
    before = open_fds()
    yield
    if wait_until(lambda: len(open_fds()) == len(before), timeout=2.0):
        return
    after = open_fds()
    added = {fd: path for fd, path in after.items() if before.get(fd) != path}
    removed = {fd: path for fd, path in before.items() if after.get(fd) != path}
    pytest.fail(f"file descriptors leaked: +{added} -{removed}", pytrace=False)


@pytest.fixture(scope="session")
def _warm_loops() -> None:
    """Create and close one loop of each kind before the first fd baseline.

    libuv opens a process-wide pipe pair (its signal lock) the first time a uv loop is
    initialised and keeps it for the life of the process: that is not a per-test leak.
    """
    for kind in LOOPS:
        new_event_loop(kind).close()


@pytest.fixture(autouse=True)
def _e2e_fd_check(request: pytest.FixtureRequest) -> Iterator[None]:
    # Requested first for every e2e test, so its teardown runs after all other fixtures'.
    if request.node.get_closest_marker("e2e") is None:
        yield
        return
    request.getfixturevalue("_warm_loops")
    request.getfixturevalue("no_fd_leak")
    yield


@pytest.fixture
def gateway_factory(loop_kind: str) -> Iterator[Callable[..., GatewayHandle]]:
    """``factory(upstream_url, **settings)`` starts a gateway on ``loop_kind``; each is checked
    for leaks (connections, client protocols, tasks, loop errors) and stopped at teardown."""
    handles: list[GatewayHandle] = []

    def factory(upstream: str, **overrides: Any) -> GatewayHandle:
        handle = GatewayHandle(loop_kind, upstream=upstream, **overrides)
        handles.append(handle)
        return handle.start()

    yield factory
    failures: list[str] = []
    for handle in handles:
        try:
            handle.assert_clean()
        except AssertionError as exc:
            failures.append(str(exc))
        try:
            handle.stop()
            handle.assert_no_loop_errors()
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        pytest.fail("; ".join(failures), pytrace=False)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer().start()
    yield server
    server.stop()


@pytest.fixture
def gateway(gateway_factory: Callable[..., GatewayHandle], echo: EchoServer) -> GatewayHandle:
    """A gateway in front of the echo upstream."""
    return gateway_factory(echo.url())


@pytest.fixture
def silent() -> Iterator[SilentListener]:
    listener = SilentListener().start()
    yield listener
    listener.stop()


@pytest.fixture
def demo_backend() -> Iterator[DemoBackendThread]:
    backend = DemoBackendThread()
    yield backend
    backend.stop()
