"""A mailrelayd daemon in a subprocess, for tests that need signals, systemd notify or kill -9.

Listeners bind port 0; the bound ports are read from the daemon's own JSON log
(``listener.started`` and ``daemon.ready`` events), so tests never clash on ports.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import mailrelayd_cmd

LOOPS = ("uvloop", "asyncio")
# The CLI with uvloop made unimportable: run_daemon() then uses asyncio.run().
_WITHOUT_UVLOOP = "import sys; sys.modules['uvloop'] = None; from mailrelayd.cli import main; sys.exit(main())"


class DaemonProcess:
    live: list[DaemonProcess] = []  # killed by conftest after each test, whatever the outcome

    @classmethod
    def kill_all(cls) -> None:
        while cls.live:
            d = cls.live.pop()
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(10)

    def __init__(self, config: Path, env: dict[str, str] | None = None, loop: str = "uvloop") -> None:
        """``loop="asyncio"`` runs the same daemon on asyncio's own event loop (``mailrelayd run`` falls back
        to it when uvloop cannot be imported), so socket tests can run under both loops."""
        self.config = config
        self.loop = loop
        e = dict(os.environ)
        e.pop("NOTIFY_SOCKET", None)
        e.update(env or {})
        cmd = mailrelayd_cmd() if loop == "uvloop" else [sys.executable, "-c", _WITHOUT_UVLOOP]
        self.proc = subprocess.Popen([*cmd, "run", "-c", str(config), "--log-format", "json"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=e)
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._q: queue.Queue[dict[str, Any]] = queue.Queue()
        self.ports: dict[str, int] = {}
        self.http_port = 0
        DaemonProcess.live.append(self)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(ev, dict):
                continue
            self.events.append(ev)
            self._q.put(ev)

    def wait_event(self, name: str, timeout: float = 30, **match: Any) -> dict[str, Any]:
        """The first event called ``name`` (seen already or arriving within ``timeout``)."""
        for ev in list(self.events):
            if ev.get("event") == name and all(ev.get(k) == v for k, v in match.items()):
                return ev
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self._q.empty()):
                raise AssertionError(f"no {name} event; log tail:\n" + "\n".join(self.lines[-30:]))
            try:
                ev = self._q.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if ev.get("event") == name and all(ev.get(k) == v for k, v in match.items()):
                return ev

    def wait_ready(self, timeout: float = 60) -> DaemonProcess:
        ev = self.wait_event("daemon.ready", timeout)
        for e in self.events:
            if e.get("event") == "listener.started" and e.get("bound"):
                self.ports[e["listener"]] = int(e["bound"].rsplit(":", 1)[1])
        if ev.get("http"):
            self.http_port = int(ev["http"].rsplit(":", 1)[1])
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def uses_uvloop(self) -> bool:
        """Whether uvloop's extension is loaded in the daemon process (Linux /proc)."""
        return "uvloop" in Path(f"/proc/{self.proc.pid}/maps").read_text()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)
