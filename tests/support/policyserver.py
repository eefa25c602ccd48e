"""An MTA-STS policy host for the tests: HTTPS on 127.0.0.1:443 (a policy URL has no port, RFC 8461
§3.3), serving /.well-known/mta-sts.txt by Host, and a TLS-RPT POST endpoint (RFC 8460 §3)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import tempfile
from pathlib import Path

from aiohttp import web

from tests.support.testca import Issued

# The suite runs in several pytest-xdist workers, and there is one port 443: a policy server holds
# this lock (flock, released with its file when the process dies) from start() to stop(), so the
# tests that need one take turns instead of skipping for a port another worker holds.
_LOCK_PATH = Path(tempfile.gettempdir()) / "mailrelayd-tests-port443.lock"


def _lock_443() -> int:
    fd = os.open(_LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _unlock_443(fd: int) -> None:
    os.close(fd)  # releases the flock


def cannot_bind_443() -> str | None:
    """Why 127.0.0.1:443 cannot be had here (a reason to skip), or None. Checked in turn with the
    other workers' policy servers: only another program (or no right to bind it) is a reason."""
    fd = _lock_443()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", 443))
    except OSError as e:
        return f"cannot bind 127.0.0.1:443 for the MTA-STS policy server: {e}"
    finally:
        s.close()
        _unlock_443(fd)
    return None


class PolicyServer:
    """``policies[domain]`` (text, or bytes as they are: not UTF-8, oversized) for mta-sts.<domain>;
    a list of bytes is sent in those pieces, a moment apart (as a slow or chunking server would)."""

    def __init__(self, issued: Issued) -> None:
        self.ctx = issued.server_context()
        self.policies: dict[str, str | bytes | list[bytes]] = {}
        self.requests: list[str] = []
        self.posts: list[tuple[str, bytes]] = []
        self.redirect_to = ""
        """Where POST /moved sends the client (307, which keeps the method and body)."""
        self._runner: web.AppRunner | None = None
        self._lock: int | None = None

    async def _get(self, request: web.Request) -> web.Response:
        self.requests.append(request.host)
        host = request.host.split(":")[0]
        body = self.policies.get(host.removeprefix("mta-sts."))
        if body is None:
            return web.Response(status=404)
        if isinstance(body, list):
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await resp.prepare(request)
            for piece in body:
                await resp.write(piece)
                await asyncio.sleep(0.05)
            await resp.write_eof()
            return resp
        return web.Response(body=body.encode() if isinstance(body, str) else body, content_type="text/plain")

    async def _moved(self, request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": self.redirect_to})

    async def _post(self, request: web.Request) -> web.Response:
        self.posts.append((request.headers.get("Content-Type", ""), await request.read()))
        return web.Response(status=201)

    async def start(self) -> PolicyServer:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self._get)
        app.router.add_post("/tlsrpt", self._post)
        app.router.add_post("/moved", self._moved)
        self._lock = await asyncio.to_thread(_lock_443)
        try:
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", 443, ssl_context=self.ctx, reuse_address=True).start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        try:
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None
        finally:
            if self._lock is not None:
                _unlock_443(self._lock)
                self._lock = None
