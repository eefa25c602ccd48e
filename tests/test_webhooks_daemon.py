"""Webhooks whose receiver is hostile or broken, against the daemon in a subprocess: what reaches
the log and /metrics, and how long SIGTERM takes while a webhook is stuck."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import base_config, deep_merge, write_config
from tests.support.proc import LOOPS, DaemonProcess
from tests.support.sink import Sink
from tests.support.smtptalk import SmtpTalk

SIGNING_SECRET = b"signing-secret-0123456789abcdef"
PASSWORD = "pw-in-the-url-9f3c1a"
TOKEN = "token-in-the-query-7d2e4b"


async def _relay_one(port: int) -> None:
    """One message through the relay listener (trusted network): an "accepted" event."""
    t = await SmtpTalk.connect(port)
    await t.ehlo()
    assert (await t.cmd("MAIL FROM:<app@example.com>"))[0] == 250
    assert (await t.cmd("RCPT TO:<someone@dest.test>"))[0] == 250
    assert (await t.cmd("DATA"))[0] == 354
    code, text = await t.cmd(b"From: app@example.com\r\nSubject: hook\r\n\r\nx\r\n.")
    assert code == 250, text
    await t.close()


def _config(tmp_path: Path, tls_files: tuple[Path, Path], sink: Sink, hook: dict[str, Any]) -> Path:
    secret = tmp_path / "hook.secret"
    secret.write_bytes(SIGNING_SECRET)
    cfg = deep_merge(base_config(tls_files), {
        "server": {"shutdown_timeout": "1s"},
        "routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
        "events": {"retry_initial": "100ms", "retry_max": "300ms"},
        "webhooks": [{"secret_file": str(secret), "events": ["accepted"], "timeout": "1s", **hook}],
    })
    return write_config(tmp_path / "d", cfg)


async def test_credentials_in_the_url_reach_neither_log_nor_metrics(tmp_path, tls_files) -> None:
    """User info and a query token in the webhook URL are credentials: the default name (the
    ``webhook`` label of logs and /metrics) is host:port without the user info, and a receiver's
    malformed answer (aiohttp quotes the request URL in that error) is logged without the URL's
    query. The user info is still sent, as HTTP basic auth."""
    heads: list[bytes] = []

    async def bad_status_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 2x0 OK\r\n\r\n")  # not a status code: ClientResponseError
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(bad_status_line, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = await Sink().start()
    try:
        url = f"http://hookuser:{PASSWORD}@127.0.0.1:{port}/hook?token={TOKEN}"
        d = DaemonProcess(_config(tmp_path, tls_files, sink, {"url": url}))
        await asyncio.to_thread(d.wait_ready)
        await _relay_one(d.ports["relay"])
        failed = await asyncio.to_thread(d.wait_event, "webhook.post_failed", 15)
        assert failed["webhook"] == f"127.0.0.1:{port}"
        assert "2x0" in failed["error"]  # what went wrong is still said
        with urllib.request.urlopen(f"http://127.0.0.1:{d.http_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert f'mailrelayd_webhook_events_failed_total{{webhook="127.0.0.1:{port}"}}' in metrics
        assert d.stop() == 0
        for text in (d.output, metrics):
            assert PASSWORD not in text and TOKEN not in text and SIGNING_SECRET.decode() not in text
        assert heads and b"authorization: basic " in heads[0].lower()
    finally:
        server.close()
        await sink.stop()


# A name lookup that hangs, as getaddrinfo(3) does with an unreachable nameserver (glibc retries
# for up to 30 s): patched into the daemon's interpreter through sitecustomize.
_HANGING_LOOKUP = '''
import socket, time
_real = socket.getaddrinfo
def _getaddrinfo(host, *args, **kwargs):
    if isinstance(host, str) and host.endswith(".hang.test"):
        time.sleep(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    return _real(host, *args, **kwargs)
socket.getaddrinfo = _getaddrinfo
'''


@pytest.mark.parametrize("loop", LOOPS)
async def test_sigterm_is_not_held_by_a_hanging_name_lookup(loop: str, tmp_path, tls_files) -> None:
    """A webhook whose host name never resolves: SIGTERM still exits within shutdown_timeout (the
    lookup was left in a thread that process exit waited for: 30 s here)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_HANGING_LOOKUP)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}
    sink = await Sink().start()
    try:
        cfg = _config(tmp_path, tls_files, sink, {"url": "http://hook.hang.test/hook"})
        d = DaemonProcess(cfg, env=env, loop=loop)
        await asyncio.to_thread(d.wait_ready)
        await _relay_one(d.ports["relay"])
        failed = await asyncio.to_thread(d.wait_event, "webhook.post_failed", 15)
        assert failed["error"].startswith("TimeoutError")  # the lookup is stuck, the POST timed out
        started = time.monotonic()
        d.signal(signal.SIGTERM)
        try:
            rc = await asyncio.to_thread(d.proc.wait, 10)
        except subprocess.TimeoutExpired:
            raise AssertionError("SIGTERM held up by the hanging lookup") from None
        assert rc == 0
        assert time.monotonic() - started < 6  # shutdown_timeout is 1 s
    finally:
        await sink.stop()
