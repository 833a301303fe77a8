"""Fixtures of the adversarial suite: every gateway gets an extra route to a control echo
upstream (``/ws/control``) so that :class:`_support.Guard` can check it still serves normal
clients whatever the attack did to the main route; log records are captured for the token
check; the process's file descriptors are checked after each test (as for tests/e2e)."""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trustme
from _support import CONTROL_PATH, CountingEcho, Guard, LogCapture, Tls
from helpers import EchoServer, GatewayHandle, gateway_cert_files, trusting


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/hardening/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.hardening)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "hardening: adversarial end-to-end case (tests/hardening)")


@pytest.fixture(autouse=True)
def _hardening_fd_check(request: pytest.FixtureRequest) -> Iterator[None]:
    # Set up before the test's other fixtures, so its teardown checks after theirs.
    if request.node.get_closest_marker("hardening") is not None:
        request.getfixturevalue("_warm_loops")
        request.getfixturevalue("no_fd_leak")
    yield


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    capture = LogCapture().install()
    yield capture
    capture.remove()


@pytest.fixture
def control() -> Iterator[EchoServer]:
    server = EchoServer().start()
    yield server
    server.stop()


@pytest.fixture
def echo() -> Iterator[CountingEcho]:
    """The attacked route's upstream: the e2e echo server, also counting TCP accepts."""
    server = CountingEcho().start()
    yield server
    server.stop()


@pytest.fixture
def harden(gateway_factory: Callable[..., GatewayHandle], control: EchoServer,
           logs: LogCapture) -> Callable[..., Guard]:
    """``harden(upstream_url, *, good_token=..., warm=True, client_ssl=None, **settings)``: a
    gateway (on ``loop_kind``) with the main route to ``upstream_url`` and ``/ws/control`` to
    the control echo, and the :class:`Guard` holding its baseline (taken after one control echo
    unless ``warm`` is false; over wss:// trusting ``client_ssl``, for a gateway given
    ``certfile``)."""

    def make(upstream: str, *, good_token: Callable[[], str] | None = None,
             routes: dict[str, str] | None = None, warm: bool = True,
             client_ssl: ssl.SSLContext | None = None, **settings: Any) -> Guard:
        gw = gateway_factory(upstream, routes={CONTROL_PATH: control.url(), **(routes or {})},
                             **settings)
        kwargs = {"good_token": good_token} if good_token is not None else {}
        return Guard(gw, control, logs, warm=warm, client_ssl=client_ssl, **kwargs)

    return make


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A test CA's certificate for wss:// gateways (``_support.tls_gateway``)."""
    ca = trustme.CA()
    return Tls(*gateway_cert_files(ca, tmp_path_factory.mktemp("tls")), trusting(ca))
