"""The application features in the real daemon process, under uvloop and asyncio's loop: sendmail
piped through a symlink, the webhook receiver (a plain HTTP server here) checking signatures, the
HTTP API, and history through the admin socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mailrelayd.webhooks import SIGNATURE_HEADER, verify
from tests.conftest import base_config, deep_merge, mailrelayd_cmd, write_config
from tests.support.proc import DaemonProcess

SECRET = b"daemon-webhook-secret"


class _Sink:
    def __init__(self) -> None:
        self.rcpts: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.rcpts.extend(envelope.rcpt_tos)
        return "250 OK"


def _receiver(events: list[dict[str, Any]], bad: list[int]) -> ThreadingHTTPServer:
    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if not verify(SECRET, body, self.headers.get(SIGNATURE_HEADER, "")):
                bad.append(1)
                self.send_response(401)
            else:
                events.extend(json.loads(body)["events"])
                self.send_response(204)
            self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _wait(pred: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_sendmail_webhooks_api_history_in_the_daemon(tmp_path: Path, tls_files: Any, loop: str) -> None:
    exe = Path(sys.executable).parent / "mailrelayd"
    if not exe.exists():
        pytest.skip("no mailrelayd console script")
    sink = _Sink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        sink_port = s.getsockname()[1]
    ctl = Controller(sink, hostname="127.0.0.1", port=sink_port)
    ctl.start()
    events: list[dict[str, Any]] = []
    bad: list[int] = []
    rx = _receiver(events, bad)
    try:
        (tmp_path / "hook.secret").write_bytes(SECRET + b"\n")
        cfg = write_config(tmp_path, deep_merge(base_config(tls_files), {
            "routes": [{"domain": "*", "host": f"127.0.0.1:{sink_port}"}],
            "sendmail": {"user": "alice", "domain": "example.com"},
            "api": {"address": "127.0.0.1:0", "tls": False},
            "webhooks": [{"url": f"http://127.0.0.1:{rx.server_address[1]}/h", "secret_file": "hook.secret",
                          "events": ["accepted", "delivered"]}]}))
        env = {**os.environ, "MAILRELAYD_CONFIG": str(cfg)}
        env.pop("NOTIFY_SOCKET", None)
        key = subprocess.run([*mailrelayd_cmd(), "user", "apikey", "alice"], env=env, capture_output=True,
                             text=True, timeout=60, check=True).stdout.strip().splitlines()[-1]
        d = DaemonProcess(cfg, env={"MAILRELAYD_EVENT_LOOP": loop}).wait_ready()
        api = d.wait_event("api.started")["bound"]
        link = tmp_path / "sendmail"
        link.symlink_to(exe)
        r = subprocess.run([str(link), "-i", "-f", "cron@example.com", "s@dest.test"],
                           input=b"Subject: cron\n\nhello\n", env=env, capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        req = urllib.request.Request(f"http://{api}/v1/messages", method="POST",
                                     data=json.dumps({"from": "app@example.com", "to": ["h@dest.test"],
                                                      "text": "hi"}).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 202
            qid = json.loads(resp.read())["queue_id"]
        _wait(lambda: sorted(sink.rcpts) == ["h@dest.test", "s@dest.test"])
        _wait(lambda: {(e["event"], e["recipient"]) for e in events} >= {
            ("accepted", "s@dest.test"), ("delivered", "s@dest.test"),
            ("accepted", "h@dest.test"), ("delivered", "h@dest.test")})
        assert not bad
        out = subprocess.run([*mailrelayd_cmd(), "history", "--user", "alice", "--json"], env=env,
                             capture_output=True, text=True, timeout=60)
        rows = json.loads(out.stdout)
        assert {(r["recipient"], r["state"]) for r in rows} == {("s@dest.test", "delivered"),
                                                                 ("h@dest.test", "delivered")}
        assert qid in {r["queue_id"] for r in rows}
        assert d.stop() == 0
    finally:
        rx.shutdown()
        ctl.stop()
