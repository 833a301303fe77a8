"""Drive the Node.js ``ws`` client in tests/e2e/node from Python tests.

``NodeClient(url, ...)`` spawns ``node client.js URL ...`` (installing its npm dependencies
once per checkout) and exchanges JSON lines with it: commands go to its stdin, events
(``{"event": "open"|"message"|"ping"|"pong"|"unexpected-response"|"error"|"close", ...}``)
come back from its stdout on a reader thread.

The methods block (threads, not asyncio).  When the server under test runs on the same
event loop as the test, use the ``*_async`` variants, which wait in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["NODE_DIR", "NodeClient", "ensure_node_deps", "open_echo_close"]

NODE_DIR = Path(__file__).resolve().parent / "e2e" / "node"
CLIENT_JS = NODE_DIR / "client.js"

_deps_lock = threading.Lock()
_deps_ready = False


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(
            f"{tool!r} not found on PATH: the Node.js e2e client needs Node.js >= 18 and npm "
            "(e.g. `apt-get install nodejs npm`, or see https://nodejs.org/)")
    return path


def _deps_fresh() -> bool:
    modules = NODE_DIR / "node_modules"
    hidden_lock = modules / ".package-lock.json"
    if not (modules / "ws" / "package.json").is_file() or not hidden_lock.is_file():
        return False
    newest_input = max((NODE_DIR / name).stat().st_mtime
                       for name in ("package.json", "package-lock.json")
                       if (NODE_DIR / name).is_file())
    return hidden_lock.stat().st_mtime >= newest_input


def ensure_node_deps() -> None:
    """Run ``npm ci`` (``npm install`` without a lockfile) in tests/e2e/node once."""
    global _deps_ready
    with _deps_lock:
        if _deps_ready:
            return
        npm = _require("npm")
        _require("node")
        digest = hashlib.sha1(str(NODE_DIR).encode()).hexdigest()[:12]
        lock_path = Path(tempfile.gettempdir()) / f"gaia-gateway-npm-{digest}.lock"
        with open(lock_path, "w") as lock_file:
            if sys.platform != "win32":  # serialise parallel test processes (pytest-xdist)
                import fcntl

                fcntl.flock(lock_file, fcntl.LOCK_EX)
            if not _deps_fresh():
                verb = "ci" if (NODE_DIR / "package-lock.json").is_file() else "install"
                proc = subprocess.run([npm, verb, "--no-audit", "--no-fund", "--loglevel=error"],
                                      cwd=NODE_DIR, capture_output=True, text=True, timeout=600,
                                      check=False)
                if proc.returncode != 0:
                    raise RuntimeError(f"`npm {verb}` in {NODE_DIR} failed ({proc.returncode}):\n"
                                       f"{proc.stdout}{proc.stderr}")
        _deps_ready = True


class NodeClient:
    """One ``node client.js`` process holding one websocket connection.

    Options map to client.js flags; ``WS_*`` variables of this process are not passed on, so
    only the arguments given here apply.  Use as a context manager (or call :meth:`terminate`).
    """

    def __init__(self, url: str, *, protocols: Iterable[str] = (),
                 headers: Mapping[str, str] | None = None, ca: str | os.PathLike[str] | None = None,
                 insecure: bool = False, permessage_deflate: bool = True,
                 handshake_timeout: float = 10.0, extra_args: Iterable[str] = ()) -> None:
        ensure_node_deps()
        args = [_require("node"), str(CLIENT_JS), url]
        for protocol in protocols:
            args += ["--protocol", protocol]
        for name, value in (headers or {}).items():
            args += ["--header", f"{name}: {value}"]
        if ca is not None:
            args += ["--ca", os.path.abspath(ca)]  # node runs with cwd=NODE_DIR
        if insecure:
            args.append("--insecure")
        args += ["--deflate" if permessage_deflate else "--no-deflate",
                 "--timeout", str(int(handshake_timeout * 1000)), *extra_args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("WS_")}
        self.url = url
        self.history: list[dict[str, Any]] = []  # every event handed out or skipped
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr: list[str] = []
        self._proc = subprocess.Popen(args, cwd=NODE_DIR, env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    # -- commands -------------------------------------------------------------------------
    def send_text(self, text: str) -> None:
        self._command({"op": "send", "text": text})

    def send_json(self, obj: Any) -> None:
        self.send_text(json.dumps(obj, separators=(",", ":")))

    def send_binary(self, data: bytes) -> None:
        self._command({"op": "send", "binary_b64": base64.b64encode(data).decode("ascii")})

    def ping(self, data: str = "") -> None:
        self._command({"op": "ping", "data": data})

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the close handshake; follow with :meth:`wait_closed`."""
        self._command({"op": "close", "code": code, "reason": reason})

    # -- events ---------------------------------------------------------------------------
    def next_event(self, timeout: float = 5.0) -> dict[str, Any]:
        """Next event dict; TimeoutError if none arrives, EOFError once the process is gone."""
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            msg = f"no event from node client within {timeout}s{self._diag()}"
            raise TimeoutError(msg) from None
        if event is None:
            self._events.put(None)  # keep reporting EOF
            raise EOFError(f"node client exited (rc={self._proc.poll()}){self._diag()}")
        self.history.append(event)
        return event

    def wait_for(self, event: str, timeout: float = 5.0) -> dict[str, Any]:
        """Skip events until one named ``event`` (e.g. "message", "open") arrives."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.next_event(max(0.0, deadline - time.monotonic()))
            if got["event"] == event:
                return got

    def next_message(self, timeout: float = 5.0) -> str | bytes:
        """Payload of the next message event (str for text, bytes for binary)."""
        got = self.wait_for("message", timeout)
        return got["text"] if "text" in got else base64.b64decode(got["binary_b64"])

    def next_json(self, timeout: float = 5.0) -> Any:
        message = self.next_message(timeout)
        if not isinstance(message, str):
            raise TypeError(f"expected a text message, got binary {message[:64]!r}")
        return json.loads(message)

    def wait_closed(self, timeout: float = 5.0) -> tuple[int, str]:
        """Wait for the close event (skipping others) and return (code, reason)."""
        got = self.wait_for("close", timeout)
        return int(got["code"]), str(got["reason"])

    async def next_event_async(self, timeout: float = 5.0) -> dict[str, Any]:
        return await asyncio.to_thread(self.next_event, timeout)

    async def wait_for_async(self, event: str, timeout: float = 5.0) -> dict[str, Any]:
        return await asyncio.to_thread(self.wait_for, event, timeout)

    async def next_json_async(self, timeout: float = 5.0) -> Any:
        return await asyncio.to_thread(self.next_json, timeout)

    async def wait_closed_async(self, timeout: float = 5.0) -> tuple[int, str]:
        return await asyncio.to_thread(self.wait_closed, timeout)

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def terminate(self, timeout: float = 5.0) -> None:
        """Kill the node process (no close handshake) and reap it; idempotent."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for thread in self._threads:
            thread.join(timeout)
        for pipe in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.terminate()

    # -- internals ------------------------------------------------------------------------
    def _command(self, cmd: dict[str, Any]) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(cmd).encode() + b"\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:  # ValueError: stdin already closed
            rc = self._proc.poll()
            raise RuntimeError(f"node client is gone (rc={rc}){self._diag()}") from exc

    def _read_stdout(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if line:
                try:
                    self._events.put(json.loads(line))
                except ValueError:
                    self._events.put({"event": "stdout", "line": line})
        self._events.put(None)

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        for raw in self._proc.stderr:
            self._stderr.append(raw.decode("utf-8", "replace"))

    def _diag(self) -> str:
        tail = "".join(self._stderr[-20:]).strip()
        return f"; node stderr:\n{tail}" if tail else ""


def open_echo_close(ws: NodeClient, text: str) -> None:
    """A session through an echo upstream, as a game client has one: open with the
    ``game.v1`` subprotocol, echo ``text`` and a 76,800 B binary message (several TLS records
    over wss://), a ping, then a 4001 close answered with the same code and reason."""
    assert ws.wait_for("open", 10)["protocol"] == "game.v1"
    ws.send_text(text)
    assert ws.next_message() == text
    payload = bytes(range(256)) * 300
    ws.send_binary(payload)
    assert ws.next_message() == payload
    ws.ping("pp")
    assert ws.wait_for("pong")["data"] == "pp"
    ws.close(4001, "bye")
    assert ws.wait_closed() == (4001, "bye")
