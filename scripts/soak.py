#!/usr/bin/env python3
"""Soak test: N connections exchanging messages through the gateway for a while.

    python scripts/soak.py                        # 9,000 connections, 300 s, 1,000 msg/s
    python scripts/soak.py --conns 500 --duration 20

What it does, all on 127.0.0.1:

1. starts the demo backend (``python -m gaia_gateway.demo.backend``, permessage-deflate off
   so nobody keeps a zlib context per connection) and the gateway as subprocesses
   (``python -m gaia_gateway ... --max-connections`` above ``--conns``), ready when
   ``GET /health`` answers 200;
2. records the gateway's idle RSS (``VmRSS`` in /proc/PID/status) and open fds
   (/proc/PID/fd) as the baseline;
3. starts client processes (``--procs``, default one per 4,000 connections, so none nears
   the 20,000 fd limit), each opening its share of the connections at ``--ramp``
   connections per second with its own HS256 JWT (claims sub, aud "authenticated", exp) and
   checking the backend's welcome names that user (the gateway's X-User-Id);
4. once every connection is open, each sends a JSON ``echo`` message every
   ``conns / rate`` seconds (``--rate`` messages per second overall) for ``--duration``
   seconds and checks the reply is the same message, then closes with a close handshake;
5. samples the gateway's RSS and fds every few seconds, printing progress on stderr.

It fails (exit 1) unless: every connection opened and none was lost; every message sent was
echoed, unchanged; the gateway's RSS did not grow after the warm-up (median of the last third
of the steady samples <= median of the first third * 1.05 + 5 MB); after all clients closed,
the gateway's fd count returned to its baseline and /health reports no connection but its
own; the
gateway and the backend are still running. A summary (RSS per connection, fds, messages,
rates) is printed on stdout at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECRET = "soak-secret-0123456789abcdef-0123456789"
PER_PROCESS = 4000
ROUTE = "/ws/experience"


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ----------------------------------------------------------------------- client worker


def make_token(sub: str, ttl: float) -> str:
    import jwt

    claims = {"sub": sub, "aud": "authenticated", "exp": int(time.time() + ttl)}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@dataclass
class WorkerStats:
    opened: int = 0
    failed: int = 0  # connections that did not open
    lost: int = 0  # connections that ended before the test closed them
    sent: int = 0
    echoed: int = 0
    bad: int = 0  # replies that were not the message sent
    timeouts: int = 0
    closed: int = 0
    close_errors: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, exc: BaseException) -> None:
        key = f"{type(exc).__name__}: {str(exc)[:80]}"
        cause = exc.__cause__ or exc.__context__
        if cause is not None:
            key += f" <- {type(cause).__name__}: {str(cause)[:80]}"
        self.errors[key] = self.errors.get(key, 0) + 1


async def _worker(args: argparse.Namespace) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    stats = WorkerStats()
    conns: list[Any] = [None] * args.conns
    out_lock = asyncio.Lock()

    async def emit(kind: str, **extra: Any) -> None:
        async with out_lock:
            line = {"kind": kind, "worker": args.worker_id, **stats.__dict__, **extra}
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()

    async def open_one(i: int) -> None:
        sub = f"soak-{args.worker_id}-{i}"
        url = f"{args.url}?token={make_token(sub, args.token_ttl)}"
        try:
            ws = await connect(url, compression=None, ping_interval=None, open_timeout=30,
                               close_timeout=10, max_size=1 << 20)
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if welcome.get("type") != "connected" or welcome.get("user_id") != sub:
                stats.bad += 1
            conns[i] = ws
            stats.opened += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported
            stats.failed += 1
            stats.error(exc)

    # 1. open the connections at the ramp rate, with a bounded number of handshakes in
    # flight (an overloaded machine then opens more slowly instead of timing out)
    tasks = []
    inflight = asyncio.Semaphore(max(1, args.inflight))

    async def open_bounded(i: int) -> None:
        try:
            await open_one(i)
        finally:
            inflight.release()

    t0 = time.monotonic()
    for i in range(args.conns):
        delay = t0 + i / args.ramp - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await inflight.acquire()
        tasks.append(asyncio.create_task(open_bounded(i)))
        if i % 250 == 249:
            await emit("progress", phase="opening")
    await asyncio.gather(*tasks)
    await emit("ready")

    # 2. wait for the parent's "go <epoch end>"
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    parts = line.split()
    if len(parts) != 2 or parts[0] != "go":
        await emit("final", aborted=True)
        return
    end = float(parts[1])
    interval = args.interval
    pad = "x" * args.size

    async def talk(i: int, ws: Any) -> None:
        seq = 0
        rng = random.Random(i)
        next_at = time.time() + rng.uniform(0, interval)
        try:
            while True:
                delay = next_at - time.time()
                if next_at >= end:
                    return
                if delay > 0:
                    await asyncio.sleep(delay)
                seq += 1
                msg = {"type": "echo", "conn": i, "seq": seq, "pad": pad}
                await ws.send(json.dumps(msg, separators=(",", ":")))
                stats.sent += 1
                try:
                    reply = await asyncio.wait_for(ws.recv(), args.echo_timeout)
                except TimeoutError:
                    stats.timeouts += 1
                    return
                if json.loads(reply) == msg:
                    stats.echoed += 1
                else:
                    stats.bad += 1
                next_at += interval
        except ConnectionClosed as exc:
            stats.lost += 1
            stats.error(exc)
        except Exception as exc:  # noqa: BLE001
            stats.lost += 1
            stats.error(exc)

    async def reporter() -> None:
        while True:
            await asyncio.sleep(2.0)
            await emit("progress", phase="messaging")

    rep = asyncio.create_task(reporter())
    await asyncio.gather(*(talk(i, ws) for i, ws in enumerate(conns) if ws is not None))

    # 3. close every connection with a close handshake, a few hundred at a time
    sem = asyncio.Semaphore(500)

    async def close_one(ws: Any) -> None:
        async with sem:
            try:
                await ws.close()
                stats.closed += 1
            except Exception as exc:  # noqa: BLE001
                stats.close_errors += 1
                stats.error(exc)

    await asyncio.gather(*(close_one(ws) for ws in conns if ws is not None))
    rep.cancel()
    await emit("final")


def worker_main(args: argparse.Namespace) -> int:
    raise_fd_limit()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_worker(args))
    return 0


# ----------------------------------------------------------------------- orchestration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def health(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            if r.status == 200:
                return json.loads(r.read())
    except Exception:  # noqa: BLE001
        return None
    return None


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on {port} within {timeout} s")


@dataclass
class Sample:
    t: float  # seconds since messaging began (negative: before)
    rss_kb: int
    fds: int
    phase: str


class Worker:
    """One client process and the latest stats line it printed."""

    def __init__(self, cmd: list[str], worker_id: int) -> None:
        self.id = worker_id
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.last: dict[str, Any] = {}
        self.ready = threading.Event()
        self.final = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            self.last = obj
            if obj.get("kind") == "ready":
                self.ready.set()
            elif obj.get("kind") == "final":
                self.final.set()
        self.ready.set()
        self.final.set()

    def go(self, end: float) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"go {end}\n")
        self.proc.stdin.flush()


def total(workers: list[Worker], key: str) -> int:
    return sum(int(w.last.get(key, 0)) for w in workers)


def median_mb(samples: list[Sample]) -> float:
    return statistics.median(s.rss_kb for s in samples) / 1024


def run(args: argparse.Namespace) -> int:
    limit = raise_fd_limit()
    if args.conns * 2 + 100 > limit:
        log(f"warning: the gateway needs ~{args.conns * 2} fds, the limit is {limit}")
    procs = args.procs or max(1, math.ceil(args.conns / PER_PROCESS))
    interval = args.conns / args.rate
    sample_every = args.sample_interval or max(1.0, min(5.0, args.duration / 15))
    warmup = args.warmup if args.warmup is not None else min(30.0, args.duration * 0.2)
    workdir = Path(tempfile.mkdtemp(prefix="gaia-soak-"))
    backend_port, gw_port = free_port(), free_port()
    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log(f"{args.conns} connections over {procs} client processes, {args.duration:g} s, "
        f"{args.rate:g} msg/s overall (one per connection every {interval:.2f} s); "
        f"logs in {workdir}")

    backend_log = open(workdir / "backend.log", "wb")  # noqa: SIM115
    gateway_log = open(workdir / "gateway.log", "wb")  # noqa: SIM115
    backend = subprocess.Popen(
        [py, "-m", "gaia_gateway.demo.backend", "--host", "127.0.0.1", "--port",
         str(backend_port), "--no-deflate", "--log-level", "WARNING"],
        stdout=backend_log, stderr=subprocess.STDOUT, env=env)
    gateway = subprocess.Popen(
        [py, "-m", "gaia_gateway", "--host", "127.0.0.1", "--port", str(gw_port),
         "--upstream", f"ws://127.0.0.1:{backend_port}{ROUTE}", "--jwt-secret", SECRET,
         "--max-connections", str(max(10000, args.conns + 100)), "--log-level", "warning"],
        stdout=gateway_log, stderr=subprocess.STDOUT, env=env)
    workers: list[Worker] = []
    failures: list[str] = []
    samples: list[Sample] = []
    try:
        wait_listening(backend_port, backend, "the backend", 30)
        deadline = time.monotonic() + 30
        while health(gw_port) is None:
            if gateway.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the gateway did not answer GET /health with 200")
            time.sleep(0.2)
        time.sleep(1.0)  # let the health probes' sockets close
        base_rss, base_fds = rss_kb(gateway.pid), fd_count(gateway.pid)
        log(f"gateway pid {gateway.pid} ready: RSS {base_rss / 1024:.1f} MB, {base_fds} fds "
            f"(baseline)")

        # open the connections
        t_open = time.monotonic()
        shares = [args.conns // procs + (1 if i < args.conns % procs else 0)
                  for i in range(procs)]
        for i, n in enumerate(shares):
            cmd = [py, __file__, "--worker", "--worker-id", str(i), "--conns", str(n),
                   "--url", f"ws://127.0.0.1:{gw_port}{ROUTE}", "--interval", str(interval),
                   "--ramp", str(args.ramp / procs), "--size", str(args.size),
                   "--inflight", str(max(1, args.inflight // procs)),
                   "--echo-timeout", str(args.echo_timeout),
                   "--token-ttl", str(args.duration + 3600)]
            workers.append(Worker(cmd, i))
        while not all(w.ready.is_set() for w in workers):
            time.sleep(sample_every)
            samples.append(Sample(-1.0, rss_kb(gateway.pid), fd_count(gateway.pid), "opening"))
            log(f"opening: {total(workers, 'opened')}/{args.conns} open, "
                f"{total(workers, 'failed')} failed; gateway RSS {samples[-1].rss_kb / 1024:.1f}"
                f" MB, {samples[-1].fds} fds")
        open_secs = time.monotonic() - t_open
        opened, failed = total(workers, "opened"), total(workers, "failed")
        full_rss, full_fds = rss_kb(gateway.pid), fd_count(gateway.pid)
        hc = health(gw_port) or {}
        log(f"{opened} open in {open_secs:.1f} s ({failed} failed); gateway reports "
            f"{hc.get('connections')} connections, RSS {full_rss / 1024:.1f} MB, {full_fds} fds")
        if opened != args.conns:
            failures.append(f"{args.conns - opened} connections did not open")
            for w in workers:
                for k, v in w.last.get("errors", {}).items():
                    log(f"  worker {w.id}: {v} x {k}")

        # exchange messages
        start = time.time()
        end = start + args.duration
        cpu_start = cpu_seconds(gateway.pid)
        for w in workers:
            w.go(end)
        while time.time() < end:
            time.sleep(min(sample_every, max(0.0, end - time.time())))
            now = time.time() - start
            if gateway.poll() is not None:
                failures.append(f"the gateway exited with {gateway.returncode}")
                break
            s = Sample(now, rss_kb(gateway.pid), fd_count(gateway.pid),
                       "warmup" if now < warmup else "steady")
            samples.append(s)
            log(f"t={now:5.0f}s [{s.phase}] sent {total(workers, 'sent')} echoed "
                f"{total(workers, 'echoed')} lost {total(workers, 'lost')} timeouts "
                f"{total(workers, 'timeouts')}; gateway RSS {s.rss_kb / 1024:.1f} MB, "
                f"{s.fds} fds")

        cpu_msg = cpu_seconds(gateway.pid) - cpu_start if gateway.poll() is None else 0.0
        # close and wait for the workers
        for w in workers:
            w.final.wait(timeout=args.echo_timeout + 120)
            try:
                w.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                failures.append(f"client process {w.id} did not exit")
                w.proc.kill()
        # /health counts its own connection: 1 means no client is left
        t_closed = time.monotonic()
        hc_after = health(gw_port) or {}
        while (hc_after.get("connections") != 1 and gateway.poll() is None
               and time.monotonic() - t_closed < args.settle):
            time.sleep(0.5)
            hc_after = health(gw_port) or {}
        fds_after = -1
        while gateway.poll() is None and time.monotonic() - t_closed < args.settle:
            fds_after = fd_count(gateway.pid)  # the probe's socket lingers up to close_timeout
            if fds_after <= base_fds:
                break
            time.sleep(0.5)
        rss_after = rss_kb(gateway.pid) if gateway.poll() is None else 0

        # verdicts
        sent, echoed = total(workers, "sent"), total(workers, "echoed")
        bad, lost = total(workers, "bad"), total(workers, "lost")
        timeouts, closed = total(workers, "timeouts"), total(workers, "closed")
        close_errors = total(workers, "close_errors")
        if sent == 0:
            failures.append("no message was sent")
        if echoed != sent:
            failures.append(f"{sent - echoed} of {sent} messages were not echoed")
        if bad:
            failures.append(f"{bad} replies or welcomes were wrong")
        if lost:
            failures.append(f"{lost} connections were lost while messaging")
        if timeouts:
            failures.append(f"{timeouts} echoes timed out ({args.echo_timeout} s)")
        if closed != opened or close_errors:
            failures.append(f"{closed} of {opened} connections closed cleanly "
                            f"({close_errors} close errors)")
        steady = [s for s in samples if s.phase == "steady"]
        rss_first = rss_last = float("nan")
        if len(steady) >= 3:
            third = max(1, len(steady) // 3)
            rss_first, rss_last = median_mb(steady[:third]), median_mb(steady[-third:])
            if rss_last > rss_first * 1.05 + 5:
                failures.append(f"gateway RSS grew after warm-up: {rss_first:.1f} MB -> "
                                f"{rss_last:.1f} MB (medians of first/last third)")
        else:
            failures.append(f"only {len(steady)} steady samples: run longer or sample faster")
        if fds_after != base_fds:
            failures.append(f"gateway fds {fds_after} after all clients closed, baseline "
                            f"{base_fds}")
        if hc_after.get("connections") != 1:
            failures.append(f"/health reports {hc_after.get('connections')} connections (its "
                            f"own included) after all clients closed")
        if gateway.poll() is not None:
            failures.append(f"the gateway exited with {gateway.returncode}")
        if backend.poll() is not None:
            failures.append(f"the backend exited with {backend.returncode}")

        peak_rss = max((s.rss_kb for s in samples), default=full_rss)
        peak_fds = max((s.fds for s in samples), default=full_fds)
        steady_rss = median_mb(steady) if steady else full_rss / 1024
        per_conn_kb = (steady_rss * 1024 - base_rss) / max(1, opened)
        summary = {
            "connections": args.conns, "opened": opened, "failed_to_open": failed,
            "client_processes": procs, "open_seconds": round(open_secs, 1),
            "duration_s": args.duration, "rate_target_msg_s": args.rate,
            "messages_sent": sent, "messages_echoed": echoed, "bad": bad, "lost": lost,
            "timeouts": timeouts, "closed_cleanly": closed,
            "rate_achieved_msg_s": round(sent / args.duration, 1),
            "gateway_rss_mb": {
                "baseline": round(base_rss / 1024, 1), "all_open": round(full_rss / 1024, 1),
                "steady_median": round(steady_rss, 1), "steady_first_third": round(rss_first, 1),
                "steady_last_third": round(rss_last, 1), "peak": round(peak_rss / 1024, 1),
                "after_close": round(rss_after / 1024, 1),
            },
            "gateway_rss_per_connection_kb": round(per_conn_kb, 1),
            "gateway_cpu_while_messaging_pct": round(100 * cpu_msg / args.duration, 1),
            "gateway_fds": {"baseline": base_fds, "all_open": full_fds, "peak": peak_fds,
                            "after_close": fds_after},
            "health_after": hc_after,
            "result": "FAIL" if failures else "PASS",
            "failures": failures,
        }
        print(json.dumps(summary, indent=2))
        for f in failures:
            log(f"FAIL: {f}")
        if not failures:
            log("PASS")
        return 1 if failures else 0
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
        for proc in (gateway, backend):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (gateway, backend):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        backend_log.close()
        gateway_log.close()
        tail = (workdir / "gateway.log").read_bytes()[-2000:]
        if failures and tail:
            log("gateway log tail:\n" + tail.decode("utf-8", "replace"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=9000, help="connections (default 9000)")
    ap.add_argument("--duration", type=float, default=300.0,
                    help="seconds of messaging once all are open (default 300)")
    ap.add_argument("--rate", type=float, default=1000.0,
                    help="messages per second, all connections together (default 1000)")
    ap.add_argument("--size", type=int, default=64, help="padding bytes per message")
    ap.add_argument("--procs", type=int, default=0,
                    help=f"client processes (default: one per {PER_PROCESS} connections)")
    ap.add_argument("--ramp", type=float, default=300.0,
                    help="new connections per second, all processes together (default 300)")
    ap.add_argument("--inflight", type=int, default=96,
                    help="opening handshakes in flight, all processes together (default 96)")
    ap.add_argument("--sample-interval", type=float, default=0.0,
                    help="seconds between RSS/fd samples (default: duration/15, 1-5 s)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds of messaging not judged for RSS growth (default: 20%%, "
                         "at most 30 s)")
    ap.add_argument("--echo-timeout", type=float, default=15.0,
                    help="seconds to wait for each echo (default 15)")
    ap.add_argument("--settle", type=float, default=30.0,
                    help="seconds to wait for the gateway's fds to return to the baseline")
    # the client-process side (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--token-ttl", type=float, default=3600.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.conns <= 0 or args.duration <= 0 or args.rate <= 0 or args.ramp <= 0:
        ap.error("--conns, --duration, --rate and --ramp must be positive")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
