"""SIGTERM under load (case 16), on the real CLI in a subprocess: new handshakes get 503
during the drain, open sessions get 1001, nothing a client sent before its close frame is
lost, and the process exits 0 within the grace period."""

from __future__ import annotations

import collections
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from _support import (
    ALLOWANCE,
    MiB,
    RawUpstream,
    assert_no_secrets,
    exchange,
    one_response,
)
from helpers import (
    HOST,
    SECRET,
    GatewayProcess,
    RawWS,
    free_port,
    gateway_args,
    http_request,
    token,
    upgrade_request,
    wait_until,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def upstream() -> Iterator[RawUpstream]:
    # A raw echo upstream that records each frame as it comes off its socket, so the count of
    # messages that "reached the upstream" depends on no server library's message queue.
    server = RawUpstream(echo=True)
    yield server
    server.stop()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_case_16_sigterm_under_load(upstream: RawUpstream, loop: str) -> None:
    port = free_port()
    grace = 5.0
    gw = GatewayProcess(gateway_args(
        port, upstream.url(), "--shutdown-grace", str(grace), "--loop", loop,
        "--close-timeout", "2", "--log-level", "debug", "--log-format", "json",
    ))
    n = 10
    tokens = [token(f"load-{i}") for i in range(n)]
    sent: dict[int, list[int]] = collections.defaultdict(list)
    closes: dict[int, tuple[int | None, str | None, float]] = {}
    errors: list[BaseException] = []
    going = threading.Barrier(n + 1)
    try:
        def healthy() -> bool:
            try:
                return http_request(port, f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n",
                                    timeout=1)[0] == 200
            except OSError:
                assert gw.proc.poll() is None, f"the gateway exited early:\n{gw.log}"
                return False

        assert wait_until(healthy, 15, 0.05), "the gateway never became healthy"
        rss0, fds0 = gw.rss(), gw.fds()

        def client(i: int) -> None:
            url = f"ws://{HOST}:{port}/ws/experience?token={tokens[i]}&experience=drain"
            try:
                with connect(url, open_timeout=5, close_timeout=3) as ws:
                    going.wait(10)
                    k = 0
                    try:
                        while True:  # 5 messages in flight, then their 5 echoes
                            for _ in range(5):
                                ws.send(f"{i}:{k}")
                                sent[i].append(k)  # send() returned: it is on the wire
                                k += 1
                            for j in range(k - 5, k):
                                assert ws.recv(timeout=10) == f"{i}:{j}"
                    except ConnectionClosed as exc:
                        rcvd = exc.rcvd
                        closes[i] = (rcvd.code if rcvd else None, rcvd.reason if rcvd else None,
                                     time.monotonic())
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        # One more client that never answers the gateway's close frame keeps the drain open
        # for close_timeout (2 s): the window in which new handshakes must get 503.
        mute_token = token("mute")
        tokens.append(mute_token)
        with RawWS(port, f"/ws/experience?token={mute_token}") as mute:
            assert mute.status == 101
            going.wait(10)
            assert wait_until(lambda: all(len(sent[i]) >= 20 for i in range(n)), 10)
            peak_rss = gw.rss() - rss0
            fds_under_load = gw.fds() - fds0
            assert fds_under_load <= 2 * (n + 1) + 8, fds_under_load  # 2 per session
            t_term = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            assert mute.recv_frame(ALLOWANCE).close == (1001, "gateway shutting down")
            # Draining now: new handshakes (and /health) get 503.
            statuses = []
            for _ in range(3):
                resp = one_response(exchange(port, upgrade_request(
                    f"/ws/experience?token={tokens[1]}")))
                statuses.append(resp.status)
                statuses.append(http_request(
                    port, f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n")[0])
            during = time.monotonic() - t_term
            assert statuses == [503] * 6, statuses
            assert gw.proc.poll() is None and during < grace
            for t in threads:
                t.join(ALLOWANCE + 3)
            peak_rss = max(peak_rss, gw.rss() - rss0)
            assert gw.proc.wait(grace + 2) == 0, gw.log
            exited = time.monotonic() - t_term
            assert mute.drain_to_eof(2) is not None
        assert not errors, errors[:3]
        assert sorted(closes) == list(range(n))
        for i, (code, reason, at) in closes.items():
            assert (code, reason) == (1001, "gateway shutting down"), (i, code, reason)
            assert at - t_term < ALLOWANCE, f"client {i} got its 1001 after {at - t_term:.2f}s"
        assert exited < grace, f"exited {exited:.2f}s after SIGTERM (grace {grace}s)"
        # Every message a client sent before its close frame reached the upstream, once, in order.
        assert wait_until(lambda: all(c.eof.is_set() for c in upstream.conns), 5)
        by_user = {c.header("X-User-Id")[0]: c for c in upstream.conns}
        assert len(by_user) == n + 1
        for i in range(n):
            conn = by_user[f"load-{i}"]
            got = [int(m.split(b":")[1]) for m in conn.data_frames]
            assert got == sent[i], (i, len(got), len(sent[i]), got[-3:], sent[i][-3:])
            assert conn.close_code == 1001, (i, conn.frames[-1:])  # the client's reply
        # Memory stayed bounded while it ran; the port is closed now.
        assert peak_rss < 40 * MiB, f"gateway RSS grew by {peak_rss / MiB:.1f} MiB"
        with pytest.raises(ConnectionRefusedError):
            http_request(port, f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
    finally:
        gw.close()
    log = gw.log
    assert "draining" in log and "stopped" in log, log[-2000:]
    assert_no_secrets(log, [*tokens, SECRET], where="gateway log (stderr)")
