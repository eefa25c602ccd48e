"""systemd notify protocol (sd_notify(3)) over ``$NOTIFY_SOCKET``, without extra dependencies."""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends READY/RELOADING/STOPPING/WATCHDOG datagrams when run under systemd; no-op otherwise."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        if addr.startswith("@"):  # abstract namespace socket
            self._addr = b"\0" + addr[1:].encode()
        elif addr.startswith("/"):
            self._addr = addr
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # Ping at half the timeout, as sd_watchdog_enabled(3) recommends.
            self.watchdog_interval = int(usec) / 1_000_000 / 2

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def notify(self, state: str) -> bool:
        """Send one state string; returns False if not under systemd or the send failed."""
        if self._addr is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(state.encode(), self._addr)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def reloading(self) -> bool:
        # Type=notify-reload (systemd 253) wants MONOTONIC_USEC with RELOADING=1.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")
