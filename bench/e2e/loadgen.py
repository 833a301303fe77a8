"""Load generator for the end-to-end benchmark (picows client on uvloop).

Runs one scenario against a WebSocket URL and prints one JSON object on
stdout (progress goes to stderr). It reads the CPU time / RSS of the process
ids given with --pids itself, so that the measurement window lines up exactly
with the message counts.

Scenarios:
  probe       open 1 connection, echo a few messages, close   (warm-up/sanity)
  throughput  --conns N x --inflight K messages of --size bytes, closed loop
  latency     --conns N, each ping-pong (1 in flight), or with --rate R an
              open-loop schedule of R msgs/s per connection; percentiles in us
  interleaved one connection to each --target NAME=URL, one ping-pong round trip
              at a time, going through the targets in a fresh random order each
              round; percentiles in us per target
  connect     --concurrency C workers: fresh JWT, handshake, 1 echo, close
  idle        open --conns M idle connections, RSS before/after, hold them
              --hold H seconds sampling RSS every --sample S seconds, then
              one echo on every connection

Every connection carries a fresh HS256 JWT in ?token= (sub, aud, iat, exp).

`loadgen.py serve` reads one JSON argument list per line on stdin and answers
one JSON line each (the harness keeps one such process, saving start-up time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import random
import resource
import ssl
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

CLK_TCK = os.sysconf("SC_CLK_TCK")
BINARY = WSMsgType.BINARY
CLOSE = WSMsgType.CLOSE


# ---------------------------------------------------------------- /proc helpers


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime (+ reaped children's) of the given processes, in seconds."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        # after "(comm) ": state=0 ... utime=11 stime=12 cutime=13 cstime=14
        ticks += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def cpu_jiffies() -> dict[str, tuple[int, int, int]]:
    """Per-CPU (user+nice+system, total, steal) jiffies from /proc/stat.

    irq/softirq time is left out of the first figure: with IRQ time accounting
    it is not charged to any process, so it could not be told apart from
    other processes' work."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            v = [int(x) for x in vals]
            out[name] = (v[0] + v[1] + v[2], sum(v[:8]), v[7])
    return out


class Window:
    """CPU accounting over one measurement window."""

    def __init__(self, a: Args) -> None:
        self.a = a
        self.p0 = cpu_seconds(a.pids)
        self.b0 = cpu_seconds(a.backend_pids)
        self.g0 = time.process_time()
        self.j0 = cpu_jiffies()
        self.w0 = time.perf_counter()

    def end(self) -> dict[str, Any]:
        p1, b1, g1 = cpu_seconds(self.a.pids), cpu_seconds(self.a.backend_pids), time.process_time()
        j1 = cpu_jiffies()
        el = time.perf_counter() - self.w0
        busy, steal = {}, {}
        for cpu, (b, t, st) in j1.items():
            b0, t0, st0 = self.j0.get(cpu, (b, t, st))
            busy[cpu] = (b - b0) / (t - t0) if t > t0 else 0.0
            steal[cpu] = (st - st0) / (t - t0) if t > t0 else 0.0
        return {
            "elapsed_s": el,
            "proxy_cpu_s": p1 - self.p0,
            "backend_cpu_s": b1 - self.b0,
            "proxy_cpu_util": (p1 - self.p0) / el,
            "backend_cpu_util": (b1 - self.b0) / el,
            "loadgen_cpu_util": (g1 - self.g0) / el,
            "cpu_busy": busy,
            "cpu_steal": steal,
        }


def log(msg: str) -> None:
    print(f"    [loadgen] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- connections


class Args:
    url: str
    secret: str
    pids: list[int]
    backend_pids: list[int]
    tls: ssl.SSLContext | None  # for wss:// URLs: trusts --cafile


def make_token(secret: str) -> str:
    now = int(time.time())
    return jwt.encode(
        {"sub": f"bench-{uuid.uuid4().hex}", "aud": "authenticated", "iat": now, "exp": now + 3600},
        secret,
        algorithm="HS256",
    )


def token_url(a: Args) -> str:
    sep = "&" if "?" in a.url else "?"
    return f"{a.url}{sep}token={make_token(a.secret)}"


async def open_conn(a: Args, listener: WSListener) -> WSTransport:
    transport, _ = await ws_connect(
        lambda: listener,
        token_url(a),
        ssl_context=a.tls if a.url.startswith("wss:") else None,
        websocket_handshake_timeout=30,
        max_frame_size=64 * 1024 * 1024,
    )
    return transport


def close_conn(t: WSTransport) -> None:
    if not t.is_disconnected:
        with contextlib.suppress(OSError, RuntimeError):
            t.send_close()
            t.disconnect()


class BaseListener(WSListener):
    transport: WSTransport | None = None
    disconnected = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True


# ---------------------------------------------------------------- scenarios


class EchoOnce(BaseListener):
    """Resolves a future when one complete message comes back."""

    def __init__(self) -> None:
        self.fut: asyncio.Future[bytes] | None = None
        self.buf = bytearray()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is CLOSE:
            return
        self.buf += frame.get_payload_as_bytes()
        if frame.fin and self.fut is not None and not self.fut.done():
            self.fut.set_result(bytes(self.buf))
            self.buf.clear()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionError("disconnected"))

    async def echo(self, payload: bytes, timeout: float = 10.0) -> bool:
        assert self.transport is not None
        self.fut = asyncio.get_running_loop().create_future()
        self.transport.send(BINARY, payload)
        got = await asyncio.wait_for(self.fut, timeout)
        return got == payload


async def sc_probe(a: Args, o: argparse.Namespace) -> dict[str, Any]:
    lst = EchoOnce()
    t = await open_conn(a, lst)
    ok = 0
    for i in range(o.count):
        payload = os.urandom(o.size)
        ok += await lst.echo(payload)
    close_conn(t)
    return {"ok": ok, "count": o.count}


class Stats:
    __slots__ = ("bytes", "disconnects", "lat", "msgs", "recording")

    def __init__(self) -> None:
        self.msgs = 0
        self.bytes = 0
        self.lat: list[int] = []
        self.recording = False
        self.disconnects = 0


def masked_frame(payload: bytes, mask: bytes) -> bytes:
    """A complete client->server binary frame, masked with `mask`."""
    n = len(payload)
    if n < 126:
        head = bytes((0x82, 0x80 | n))
    elif n < 65536:
        head = bytes((0x82, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x82, 0x80 | 127)) + n.to_bytes(8, "big")
    m = int.from_bytes(mask * (n // 4 + 1), "big") >> (8 * (4 - n % 4))
    body = (int.from_bytes(payload, "big") ^ m).to_bytes(n, "big") if n else b""
    return head + mask + body


class ThroughputListener(BaseListener):
    """Closed loop: one new message per echoed one. The frame is masked once
    (random key per connection). With ``coalesce`` the replies to all frames parsed
    from one read go out in one write(), so the loadgen spends little CPU per message
    and the proxy reads many frames per syscall; without it every message is its own
    write(), as a game client's send() is."""

    def __init__(self, st: Stats, payload: bytes, coalesce: bool = True) -> None:
        self.st = st
        self.frame = masked_frame(payload, os.urandom(4))
        self.pending = 0
        self.write: Any = None
        self.coalesce = coalesce

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.write = transport.underlying_transport.write

    def send_many(self, n: int) -> None:
        if self.coalesce:
            self.write(self.frame * n)
        else:
            for _ in range(n):
                self.write(self.frame)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is CLOSE:
            return
        st = self.st
        st.bytes += frame.payload_size
        if frame.fin:
            st.msgs += 1
            if not self.coalesce:
                self.write(self.frame)
                return
            self.pending += 1
        if frame.last_in_buffer and self.pending:
            self.write(self.frame * self.pending)
            self.pending = 0

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.st.disconnects += 1


class LatencyListener(BaseListener):
    """Closed loop: one message in flight, the next one sent on each reply."""

    def __init__(self, st: Stats, payload: bytes) -> None:
        self.st = st
        self.payload = payload
        self.sent_at = 0

    def send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter_ns()
        self.transport.send(BINARY, self.payload)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is CLOSE or not frame.fin:
            return
        now = time.perf_counter_ns()
        st = self.st
        st.msgs += 1
        if st.recording:
            st.lat.append(now - self.sent_at)
        self.sent_at = time.perf_counter_ns()
        transport.send(BINARY, self.payload)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.st.disconnects += 1


class PacedListener(BaseListener):
    """Open loop: the sender stamps perf_counter_ns into the first 8 bytes."""

    def __init__(self, st: Stats) -> None:
        self.st = st

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is CLOSE or not frame.fin:
            return
        now = time.perf_counter_ns()
        st = self.st
        st.msgs += 1
        sent = int.from_bytes(frame.get_payload_as_memoryview()[:8], "little")
        if st.recording and sent:
            st.lat.append(now - sent)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.st.disconnects += 1


async def open_many(
    a: Args, n: int, factory: Any, concurrency: int = 64, progress: bool = False
) -> tuple[list[WSTransport], list[Any]]:
    sem = asyncio.Semaphore(concurrency)
    transports: list[WSTransport | None] = [None] * n
    listeners: list[Any] = [None] * n
    done = 0
    errors: list[str] = []

    async def one(i: int) -> None:
        nonlocal done
        async with sem:
            lst = factory()
            try:
                t = await open_conn(a, lst)
                if lst.transport is None or t.is_disconnected:
                    # picows returns a disconnected transport when the peer closes the
                    # socket before answering the upgrade (nginx does when it drains
                    # connections waiting for a request)
                    close_conn(t)
                    raise ConnectionError("closed by the peer during the handshake")
                transports[i] = t
                listeners[i] = lst
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
            done += 1
            if progress and done % 1000 == 0:
                log(f"opened {done}/{n}")

    await asyncio.gather(*(one(i) for i in range(n)))
    if errors:
        log(f"{len(errors)} connection(s) failed, first: {errors[0]}")
    ts = [t for t in transports if t is not None]
    ls = [l for l in listeners if l is not None]
    return ts, ls


async def sc_throughput(a: Args, o: argparse.Namespace) -> dict[str, Any]:
    st = Stats()
    payload = os.urandom(o.size)
    coalesce = not o.write_per_msg
    ts, ls = await open_many(a, o.conns, lambda: ThroughputListener(st, payload, coalesce))
    if len(ts) < o.conns:
        raise RuntimeError(f"only {len(ts)}/{o.conns} connections opened")
    for lst in ls:
        lst.send_many(o.inflight)
    await asyncio.sleep(o.warmup)
    m0, b0, win = st.msgs, st.bytes, Window(a)
    await asyncio.sleep(o.duration)
    m1, b1, res = st.msgs, st.bytes, win.end()
    disconnects = st.disconnects
    for t in ts:
        close_conn(t)
    await asyncio.sleep(0.2)
    el = res["elapsed_s"]
    msgs = m1 - m0
    res.update(
        {
            "msgs": msgs,
            "msgs_per_s": msgs / el,
            "mb_per_s": (b1 - b0) / el / 1e6,
            "cpu_us_per_msg": res["proxy_cpu_s"] / msgs * 1e6 if msgs else None,
            "backend_cpu_us_per_msg": res["backend_cpu_s"] / msgs * 1e6 if msgs else None,
            "disconnects": disconnects,
        }
    )
    return res


def percentiles(lat_ns: list[int]) -> dict[str, float]:
    if not lat_ns:
        return {}
    s = sorted(lat_ns)
    n = len(s)

    def p(q: float) -> float:
        return s[min(n - 1, max(0, int(q * n + 0.5) - 1))] / 1000.0

    return {
        "p50": p(0.50),
        "p90": p(0.90),
        "p99": p(0.99),
        "p99.9": p(0.999),
        "max": s[-1] / 1000.0,
        "mean": sum(s) / n / 1000.0,
        "samples": n,
    }


class Recorder(Protocol):
    recording: bool  # the scenario counts what happens while this is True


async def recorded_window(rec: Recorder, a: Args, o: argparse.Namespace) -> dict[str, Any]:
    """Wait ``o.warmup``, then record for ``o.duration`` (``rec.recording`` is True meanwhile);
    the window's CPU accounting (``Window``)."""
    await asyncio.sleep(o.warmup)
    rec.recording = True
    win = Window(a)
    await asyncio.sleep(o.duration)
    rec.recording = False
    return win.end()


async def sc_latency(a: Args, o: argparse.Namespace) -> dict[str, Any]:
    st = Stats()
    payload = os.urandom(o.size)
    paced = o.rate > 0
    factory = (lambda: PacedListener(st)) if paced else (lambda: LatencyListener(st, payload))
    ts, ls = await open_many(a, o.conns, factory)
    if len(ts) < o.conns:
        raise RuntimeError(f"only {len(ts)}/{o.conns} connections opened")
    stop = False
    sent = 0

    async def pacer(t: WSTransport, phase: float) -> None:
        # fixed schedule (no coordinated omission): message i at start + i/rate
        nonlocal sent
        period = 1.0 / o.rate
        buf = bytearray(payload)
        nxt = time.perf_counter() + phase * period
        while not stop and not t.is_disconnected:
            delay = nxt - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            buf[:8] = time.perf_counter_ns().to_bytes(8, "little")
            t.send(BINARY, buf)
            sent += 1
            nxt += period

    tasks: list[asyncio.Task[None]] = []
    if paced:
        tasks = [asyncio.create_task(pacer(t, i / len(ts))) for i, t in enumerate(ts)]
    else:
        for lst in ls:
            lst.send()
    cpu = await recorded_window(st, a, o)
    el = cpu["elapsed_s"]
    disconnects = st.disconnects
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in ts:
        close_conn(t)
    await asyncio.sleep(0.2)
    res: dict[str, Any] = percentiles(st.lat)
    res["rtt_per_s"] = len(st.lat) / el
    res["mode"] = f"open loop {o.rate:g} msg/s per conn" if paced else "closed loop ping-pong"
    res["disconnects"] = disconnects
    res.update(cpu)
    return res


class RoundRobin:
    """One round trip in flight over all the targets: each reply sends the next target's
    message, and every round visits the targets in a fresh random order."""

    def __init__(self, n: int, payload: bytes) -> None:
        self.n = n
        self.payload = payload
        self.lat: list[list[int]] = [[] for _ in range(n)]
        self.transports: list[WSTransport] = []
        self.order: list[int] = []
        self.pos = 0
        self.sent_at = 0
        self.recording = False
        self.stopping = False
        self.done: asyncio.Future[None] | None = None

    def start(self, transports: list[WSTransport]) -> None:
        self.transports = transports
        self.done = asyncio.get_running_loop().create_future()
        self._new_round()
        self._send()

    def _new_round(self) -> None:
        self.order = list(range(self.n))
        random.shuffle(self.order)
        self.pos = 0

    def _send(self) -> None:
        self.sent_at = time.perf_counter_ns()
        self.transports[self.order[self.pos]].send(BINARY, self.payload)

    def got(self, i: int) -> None:
        now = time.perf_counter_ns()
        if i != self.order[self.pos]:
            return  # not the reply in flight (cannot happen with an echo backend)
        if self.recording:
            self.lat[i].append(now - self.sent_at)
        self.pos += 1
        if self.pos == self.n:
            if self.stopping:
                if self.done is not None and not self.done.done():
                    self.done.set_result(None)
                return
            self._new_round()
        self._send()


class RoundRobinListener(BaseListener):
    def __init__(self, rr: RoundRobin, i: int) -> None:
        self.rr = rr
        self.i = i

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is CLOSE or not frame.fin:
            return
        self.rr.got(self.i)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        super().on_ws_disconnected(transport)
        rr = self.rr
        if rr.done is not None and not rr.done.done():
            rr.done.set_exception(ConnectionError(f"target {self.i} closed the connection"))


async def sc_interleaved(a: Args, o: argparse.Namespace) -> dict[str, Any]:
    """Side by side at the finest grain: the targets take turns round trip by round trip, so
    they all meet the same host state. Passes of one target each (``latency``) move by ±15 µs
    at p50 from pass to pass, more than gaia and nginx differ (bench/RESULTS.md)."""
    targets = [t.split("=", 1) for t in o.target]
    if len(targets) < 2 or any(len(t) != 2 for t in targets):
        raise ValueError("interleaved wants two or more --target NAME=URL")
    rr = RoundRobin(len(targets), os.urandom(o.size))
    transports: list[WSTransport] = []
    try:
        for i, (_, url) in enumerate(targets):
            b = copy.copy(a)  # the same secret and pids, this target's URL
            b.url = url
            transports.append(await open_conn(b, RoundRobinListener(rr, i)))
        rr.start(transports)
        cpu = await recorded_window(rr, a, o)
        rr.stopping = True
        assert rr.done is not None
        await asyncio.wait_for(rr.done, 10)
    finally:
        for t in transports:
            close_conn(t)
        await asyncio.sleep(0.2)
    return {
        "mode": "interleaved closed-loop ping-pong, 1 conn per target, random order per round",
        "rounds": min(len(x) for x in rr.lat),
        "targets": {name: percentiles(rr.lat[i]) for i, (name, _) in enumerate(targets)},
        "cpu_busy": cpu["cpu_busy"],
        "cpu_steal": cpu["cpu_steal"],
        "elapsed_s": cpu["elapsed_s"],
    }


@dataclass
class ConnectState:
    """What the connect scenario's workers share: a handshake counts if it started and
    ended while ``recording``."""

    recording: bool = False
    stop: bool = False
    ok: int = 0
    err: int = 0
    first_err: str | None = None


async def sc_connect(a: Args, o: argparse.Namespace) -> dict[str, Any]:
    payload = os.urandom(64)
    state = ConnectState()

    async def worker() -> None:
        while not state.stop:
            lst = EchoOnce()
            rec = state.recording
            try:
                t = await open_conn(a, lst)
                good = await lst.echo(payload)
                close_conn(t)
                if not good:
                    raise RuntimeError("bad echo")
                if rec and state.recording:
                    state.ok += 1
            except Exception as e:  # noqa: BLE001
                state.err += 1
                if state.first_err is None:
                    state.first_err = repr(e)
                await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(worker()) for _ in range(o.concurrency)]
    res = await recorded_window(state, a, o)
    state.stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.2)
    el = res["elapsed_s"]
    n = state.ok
    res.update(
        {
            "handshakes": n,
            "handshakes_per_s": n / el,
            "cpu_ms_per_handshake": res["proxy_cpu_s"] / n * 1e3 if n else None,
            "backend_cpu_ms_per_handshake": res["backend_cpu_s"] / n * 1e3 if n else None,
            "errors": state.err,
            "first_error": state.first_err,
        }
    )
    return res


async def sc_idle(a: Args, o: argparse.Namespace) -> dict[str, Any]:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if o.conns + 64 > soft:
        # one socket per connection here; the proxy holds two (client + upstream)
        raise RuntimeError(f"{o.conns} connections need more than this process' {soft} fds")
    rss0 = rss_kib(a.pids)
    brss0 = rss_kib(a.backend_pids)
    t0 = time.perf_counter()
    ts, ls = await open_many(a, o.conns, EchoOnce, concurrency=o.concurrency, progress=True)
    open_s = time.perf_counter() - t0
    await asyncio.sleep(o.settle)
    rss1 = rss_kib(a.pids)
    brss1 = rss_kib(a.backend_pids)
    opened = len(ts)
    log(f"opened {opened}/{o.conns} in {open_s:.1f}s; RSS {rss0} -> {rss1} KiB")

    # hold: nothing is sent; sample the proxy's RSS (and CPU) meanwhile
    samples: list[tuple[float, int]] = [(0.0, rss1)]
    hold_cpu: dict[str, Any] = {}
    if o.hold > 0:
        win = Window(a)
        h0 = time.perf_counter()
        while (el := time.perf_counter() - h0) < o.hold:
            await asyncio.sleep(min(o.sample, o.hold - el))
            samples.append((round(time.perf_counter() - h0, 1), rss_kib(a.pids)))
        hold_cpu = win.end()
        log(f"held {opened} for {o.hold:g}s; RSS samples (s, KiB): {samples}")
    rss2 = samples[-1][1]
    brss2 = rss_kib(a.backend_pids)
    dropped = sum(1 for l in ls if l.disconnected)

    payload = b"i" * 64
    sem = asyncio.Semaphore(256)

    failures: dict[str, int] = {}

    async def check(lst: EchoOnce) -> bool:
        async with sem:
            try:
                if await lst.echo(payload, timeout=30):
                    return True
                why = "wrong payload"
            except Exception as e:  # noqa: BLE001
                tb = traceback.extract_tb(e.__traceback__)
                where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
                why = f"{type(e).__name__}: {e}"[:120] + where
            failures[why] = failures.get(why, 0) + 1
            return False

    c0 = time.perf_counter()
    oks = await asyncio.gather(*(check(l) for l in ls))
    check_s = time.perf_counter() - c0
    answered = sum(1 for x in oks if x)
    log(
        f"echo check: {answered}/{o.conns} answered in {check_s:.1f}s"
        + (f"; failures: {failures}" if failures else "")
    )
    for i, t in enumerate(ts):
        close_conn(t)
        if i % 500 == 499:
            await asyncio.sleep(0)
    await asyncio.sleep(0.5)
    per = (lambda r: (r - rss0) / opened) if opened else (lambda r: None)
    return {
        "conns": o.conns,
        "opened": opened,
        "answered": answered,
        "dropped_during_hold": dropped,
        "echo_failures": failures,
        "open_s": open_s,
        "opens_per_s": opened / open_s if open_s else None,
        "hold_s": o.hold,
        "check_s": check_s,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "rss_end_hold_kib": rss2,
        "rss_max_hold_kib": max(r for _, r in samples),
        "rss_samples": samples,
        # ΔRSS per connection: at the end of the hold (= after opening if no hold)
        "kib_per_conn": per(rss2),
        "kib_per_conn_open": per(rss1),
        "kib_per_conn_max": per(max(r for _, r in samples)),
        "total_kib_per_conn": rss2 / opened if opened else None,
        "backend_kib_per_conn": (brss2 - brss0) / opened if opened else None,
        "backend_kib_per_conn_open": (brss1 - brss0) / opened if opened else None,
        "hold_proxy_cpu_util": hold_cpu.get("proxy_cpu_util"),
    }


SCENARIOS = {
    "probe": sc_probe,
    "throughput": sc_throughput,
    "latency": sc_latency,
    "interleaved": sc_interleaved,
    "connect": sc_connect,
    "idle": sc_idle,
}


def parse_pids(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="picows load generator for bench/e2e")
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--url", default="", help="the target (every scenario but interleaved)")
    ap.add_argument("--target", action="append", default=[], metavar="NAME=URL",
                    help="interleaved: a target, named (give two or more)")
    ap.add_argument("--jwt-secret", default="bench-secret")
    ap.add_argument("--cafile", help="wss:// targets: the CA (PEM) their certificates chain to")
    ap.add_argument("--pids", default="", help="comma list: proxy process tree (CPU/RSS)")
    ap.add_argument("--backend-pids", default="", help="comma list: echo backend")
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--inflight", type=int, default=1)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument(
        "--write-per-msg",
        action="store_true",
        help="throughput: one write() per message (default: replies to one read coalesced)",
    )
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--hold", type=float, default=0.0, help="idle: seconds to hold the connections")
    ap.add_argument(
        "--sample", type=float, default=5.0, help="idle: RSS sampling period during --hold"
    )
    ap.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="latency: msgs/s per connection, open loop (0 = closed-loop ping-pong)",
    )
    return ap


def run_one(argv: list[str]) -> dict[str, Any]:
    parser = build_parser()
    o = parser.parse_args(argv)
    if not o.url and o.scenario != "interleaved":
        parser.error(f"{o.scenario} needs --url")
    a = Args()
    a.url, a.secret = o.url, o.jwt_secret
    a.pids, a.backend_pids = parse_pids(o.pids), parse_pids(o.backend_pids)
    a.tls = ssl.create_default_context(cafile=o.cafile) if o.cafile else None

    async def run() -> dict[str, Any]:
        return await SCENARIOS[o.scenario](a, o)

    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(run())
    return uvloop.run(run())


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    if sys.argv[1:] == ["serve"]:
        # Persistent mode for the harness: one JSON argv list per stdin line,
        # one JSON result per stdout line; each scenario gets a fresh loop.
        import gc

        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                res = run_one(json.loads(line))
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                traceback.print_exc()
                res = {"error": f"{type(e).__name__}: {e}"}
            gc.collect()
            print(json.dumps(res), flush=True)
        return

    print(json.dumps(run_one(sys.argv[1:])), flush=True)


if __name__ == "__main__":
    main()
