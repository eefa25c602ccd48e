"""The HTTP sidecar: ``/health`` (liveness), ``/ready`` (readiness), ``/metrics`` (Prometheus) on
``[http] address``, and the admin API used by ``mailrelayd queue`` on a UNIX socket.

The admin API is never served on the TCP address: the socket's file permissions (0660, owner and
group of the daemon) decide who may flush, delete or bounce mail.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from mailrelayd import __version__
from mailrelayd.httpguard import HEADER_TIMEOUT, WRITE_TIMEOUT, HttpGuard


@dataclass
class SidecarHooks:
    """What the daemon provides to the sidecar."""

    readiness: Callable[[], dict[str, str]]
    """Check name -> "ok" or "fail: reason"."""
    before_scrape: Callable[[], Awaitable[None]] | None = None
    admin: Callable[[str, str, dict[str, Any]], Awaitable[tuple[int, Any]]] | None = None
    """(method, path, body) -> (HTTP status, JSON-able result) for the queue CLI."""


class Sidecar:
    def __init__(self, hooks: SidecarHooks, started: float | None = None, admin_max_body: int = 64 * 1024**2, *,
                 header_timeout: float = HEADER_TIMEOUT, write_timeout: float = WRITE_TIMEOUT) -> None:
        self.hooks = hooks
        self.admin_max_body = admin_max_body
        self.started = started if started is not None else time.time()
        self._runners: list[web.AppRunner] = []
        self.bound: tuple[str, int] | None = None
        # For the TCP address, which anyone who can reach it may hold open; the admin socket is local
        # and only the daemon's owner and group may connect to it.
        self.guard = HttpGuard("http", header_timeout=header_timeout, write_timeout=write_timeout)

    # --- handlers -----------------------------------------------------------------------
    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__,
                                  "uptime_s": round(time.time() - self.started, 3)})

    async def ready(self, _: web.Request) -> web.Response:
        checks = self.hooks.readiness()
        # "degraded: ..." (e.g. the shared suppression store) is reported but keeps the node ready.
        ok = all(not v.startswith("fail") for v in checks.values())
        body: dict[str, Any] = {"status": "ok" if ok else "degraded", "checks": checks}
        degraded = sorted(k for k, v in checks.items() if v.startswith("degraded"))
        if degraded:
            body["degraded"] = degraded
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(self, _: web.Request) -> web.Response:
        if self.hooks.before_scrape is not None:
            with contextlib.suppress(Exception):  # a stale gauge is better than a failed scrape
                await self.hooks.before_scrape()
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def admin(self, request: web.Request) -> web.Response:
        if self.hooks.admin is None:
            return web.json_response({"error": "admin API not available"}, status=404)
        body: dict[str, Any] = {}
        if request.can_read_body:
            try:
                body = await request.json()
            except (ValueError, RecursionError):  # RecursionError: arrays or objects nested too deep
                return web.json_response({"error": "body must be JSON"}, status=400)
        status, result = await self.hooks.admin(request.method, request.match_info["tail"], body)
        return web.json_response(result, status=status)

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self, host: str | None, port: int | None, admin_socket: Path | None) -> None:
        if host is not None and port is not None:
            app = web.Application(middlewares=[self.guard.middleware])
            app.router.add_get("/health", self.health)
            app.router.add_get("/ready", self.ready)
            app.router.add_get("/metrics", self.metrics)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            self._runners.append(runner)
            self.bound = await self.guard.start(runner, host, port)
        if admin_socket is not None:
            # Large enough for a sendmail submission (the message travels base64 in JSON).
            admin = web.Application(client_max_size=self.admin_max_body)
            admin.router.add_route("*", "/{tail:.*}", self.admin)
            runner = web.AppRunner(admin, access_log=None, handle_signals=False)
            await runner.setup()
            admin_socket.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                admin_socket.unlink()
            old = os.umask(0o117)  # socket mode 0660
            try:
                await web.UnixSite(runner, str(admin_socket)).start()
            finally:
                os.umask(old)
            self._runners.append(runner)

    async def stop(self) -> None:
        self.guard.close()
        for r in self._runners:
            await r.cleanup()
        self._runners.clear()
        await self.guard.wait_closed()
