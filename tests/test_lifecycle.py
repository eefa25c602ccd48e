"""The daemon as systemd runs it: notify protocol, SIGHUP reload (all or nothing), SIGTERM drain,
the sidecar endpoints, and secrets kept out of the logs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import TEST_PASSWORD, base_config, deep_merge, write_config
from tests.support.proc import DaemonProcess
from tests.support.smtptalk import SmtpTalk


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def notify_socket(tmp_path: Path):
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(0.2)
    yield path, s
    s.close()


def _datagrams(s: socket.socket, want: str, timeout: float = 20) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(s.recv(4096).decode())
        except TimeoutError:
            continue
        if any(want in g for g in got):
            return got
    raise AssertionError(f"no {want!r} notification; got {got}")


def test_notify_reload_and_graceful_stop(tmp_path: Path, tls_files, notify_socket) -> None:
    path, sock = notify_socket
    cfg = write_config(tmp_path, base_config(tls_files))
    d = DaemonProcess(cfg, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
    try:
        d.wait_ready()
        assert any("READY=1" in g for g in _datagrams(sock, "READY=1"))
        assert any(g == "WATCHDOG=1" for g in _datagrams(sock, "WATCHDOG=1", timeout=5))
        # /health and /ready answer while we are at it.
        status, body = _get(d.http_port, "/health")
        health = json.loads(body)
        assert status == 200 and health["status"] == "ok" and health["uptime_s"] >= 0 and health["version"]
        status, body = _get(d.http_port, "/ready")
        ready = json.loads(body)
        assert status == 200, ready
        assert ready["checks"]["listeners"] == "ok" and ready["checks"]["spool"] == "ok"
        assert ready["checks"]["tls"] == "ok"
        status, body = _get(d.http_port, "/metrics")
        text = body.decode()
        assert status == 200
        for name in ("mailrelayd_build_info", "process_cpu_seconds_total", "mailrelayd_connections_total",
                     "mailrelayd_tls_certificate_expiry_timestamp_seconds", "mailrelayd_queue_messages"):
            assert name in text, name
        # SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
        d.signal(signal.SIGHUP)
        got = _datagrams(sock, "RELOADING=1")
        rel = next(g for g in got if "RELOADING=1" in g)
        assert "MONOTONIC_USEC=" in rel
        _datagrams(sock, "READY=1")
        d.wait_event("config.reloaded")
        # SIGTERM: STOPPING=1, exit 0.
        d.signal(signal.SIGTERM)
        _datagrams(sock, "STOPPING=1")
        assert d.proc.wait(30) == 0
    finally:
        d.stop()


def test_sighup_with_broken_config_keeps_serving(tmp_path: Path, tls_files) -> None:
    data = deep_merge(base_config(tls_files), {"limits": {"max_recipients": 5}})
    cfg = write_config(tmp_path, data)
    d = DaemonProcess(cfg).wait_ready()
    try:
        cfg.write_text(cfg.read_text() + '\n[limits2]\nx = 1\n')
        d.signal(signal.SIGHUP)
        ev = d.wait_event("config.reload_failed")
        assert "limits2: unknown key" in ev["error"]
        _status, body = _get(d.http_port, "/metrics")
        assert "mailrelayd_config_reload_failures_total 1.0" in body.decode()
        assert "mailrelayd_config_last_reload_successful 0.0" in body.decode()

        async def still_serving() -> None:
            t = await SmtpTalk.connect(d.ports["relay"])
            await t.ehlo()
            await t.cmd("MAIL FROM:<a@example.com>")
            codes = [(await t.cmd(f"RCPT TO:<r{i}@other.example>"))[0] for i in range(6)]
            assert codes == [250] * 5 + [452]  # the old limit still applies
            await t.close()

        asyncio.run(still_serving())
        # A good config is then applied by the next SIGHUP.
        write_config(tmp_path, deep_merge(base_config(tls_files), {"limits": {"max_recipients": 2}}))
        d.signal(signal.SIGHUP)
        d.wait_event("config.reloaded")

        async def new_limit() -> None:
            t = await SmtpTalk.connect(d.ports["relay"])
            await t.ehlo()
            await t.cmd("MAIL FROM:<a@example.com>")
            codes = [(await t.cmd(f"RCPT TO:<r{i}@other.example>"))[0] for i in range(3)]
            assert codes == [250, 250, 452]
            await t.close()

        asyncio.run(new_limit())
    finally:
        assert d.stop() == 0


def test_sigterm_lets_a_transaction_finish(tmp_path: Path, tls_files) -> None:
    cfg = write_config(tmp_path, deep_merge(base_config(tls_files), {"server": {"shutdown_timeout": "20s"}}))
    d = DaemonProcess(cfg).wait_ready()

    async def scenario() -> str:
        t = await SmtpTalk.connect(d.ports["relay"])
        await t.ehlo()
        await t.cmd("MAIL FROM:<a@example.com>")
        await t.cmd("RCPT TO:<b@other.example>")
        assert (await t.cmd("DATA"))[0] == 354
        await t.send(b"From: a@example.com\r\nSubject: in flight\r\n\r\nfirst half\r\n")
        d.signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert d.proc.poll() is None  # still draining: our session is open
        # A new connection is refused (the listener is closed).
        with pytest.raises(OSError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", d.ports["relay"]), 2)
        code, text = await t.cmd(b"second half\r\n.")
        assert code == 250, text
        # The next transaction is refused: we are shutting down.
        assert (await t.cmd("MAIL FROM:<a@example.com>"))[0] == 421
        return text.rsplit(" ", 1)[1]

    qid = asyncio.run(scenario())
    assert d.proc.wait(20) == 0
    assert qid in d.output


def test_ready_reports_degraded_with_detail(tmp_path: Path, tls_files) -> None:
    cfg = write_config(tmp_path, deep_merge(base_config(tls_files), {"server": {"min_free_space": "100000GB"}}))
    d = DaemonProcess(cfg).wait_ready()
    try:
        status, body = _get(d.http_port, "/ready")
        ready = json.loads(body)
        assert status == 503 and ready["status"] == "degraded"
        assert ready["checks"]["spool"].startswith("fail: ")
        assert ready["checks"]["listeners"] == "ok"
        assert _get(d.http_port, "/health")[0] == 200  # alive, just not ready
    finally:
        d.stop()


def test_secrets_never_logged(tmp_path: Path, tls_files, client_tls) -> None:
    cfg = write_config(tmp_path, base_config(tls_files))
    d = DaemonProcess(cfg).wait_ready()
    wrong = "Wr0ng-Pa55word-zzz"
    plain_ok = base64.b64encode(b"\0alice\0" + TEST_PASSWORD.encode()).decode()
    plain_bad = base64.b64encode(b"\0alice\0" + wrong.encode()).decode()

    async def talk() -> None:
        t = await SmtpTalk.connect(d.ports["submissions"], tls=client_tls)
        await t.ehlo()
        assert (await t.cmd(f"AUTH PLAIN {plain_bad}"))[0] == 535
        assert (await t.cmd("AUTH LOGIN"))[0] == 334
        assert (await t.cmd(base64.b64encode(b"alice").decode()))[0] == 334
        assert (await t.cmd(base64.b64encode(wrong.encode()).decode()))[0] == 535
        assert (await t.cmd(f"AUTH PLAIN {plain_ok}"))[0] == 235
        await t.cmd("QUIT")

    try:
        asyncio.run(talk())
        d.wait_event("smtp.session", end="quit")
    finally:
        d.stop()
    out = d.output
    for secret in (TEST_PASSWORD, wrong, plain_ok, plain_bad, base64.b64encode(wrong.encode()).decode(),
                   "PRIVATE KEY"):
        assert secret not in out, secret
    assert "smtp.auth_failed" in out  # the failures themselves are logged, without the secret


def _rcpt_limit(port: int) -> int:
    """How many RCPTs the relay listener takes in one transaction now (up to 6)."""
    async def talk() -> int:
        t = await SmtpTalk.connect(port)
        await t.ehlo()
        await t.cmd("MAIL FROM:<a@example.com>")
        codes = [(await t.cmd(f"RCPT TO:<r{i}@other.example>"))[0] for i in range(6)]
        await t.close()
        return codes.count(250)
    return asyncio.run(talk())


def test_sighup_during_a_reload_is_not_lost(tmp_path: Path, tls_files, notify_socket) -> None:
    """A SIGHUP while a reload ran was dropped without a word: an edit made after that reload had read
    the config was never applied, though `config.reloaded` had been logged."""
    path, sock = notify_socket
    users = tmp_path / "users.toml"

    def config(max_recipients: int) -> None:
        write_config(tmp_path, deep_merge(base_config(tls_files), {"limits": {"max_recipients": max_recipients}}))
        # Thousands of users: reading them keeps each reload busy for about a second.
        one = users.read_text().partition("[users.alice]")[2].partition("[users.")[0]
        users.write_text(users.read_text() + "".join(f"[users.u{i}]" + one for i in range(8000)))

    config(6)
    d = DaemonProcess(tmp_path / "mailrelayd.toml", env={"NOTIFY_SOCKET": str(path)}).wait_ready()
    try:
        _datagrams(sock, "READY=1")
        config(5)
        d.signal(signal.SIGHUP)
        _datagrams(sock, "RELOADING=1")
        time.sleep(0.2)  # the reload has read the config with 5 and is reading the users
        config(2)
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while sum(e.get("event") == "config.reloaded" for e in d.events) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _rcpt_limit(d.ports["relay"]) == 2  # the config on disk, not the one the first reload read
    finally:
        assert d.stop() == 0


def test_sighup_after_sigterm_is_ignored(tmp_path: Path, tls_files, notify_socket) -> None:
    """A SIGHUP during the drain reloaded the config: READY=1 ("accepting mail") went to systemd
    after STOPPING=1, and a new DKIM helper was started after the old one had been shut down."""
    path, sock = notify_socket
    cfg = write_config(tmp_path, deep_merge(base_config(tls_files), {"server": {"shutdown_timeout": "20s"}}))
    d = DaemonProcess(cfg, env={"NOTIFY_SOCKET": str(path)}).wait_ready()
    _datagrams(sock, "READY=1")

    async def scenario() -> None:
        t = await SmtpTalk.connect(d.ports["relay"])  # an open session keeps the drain going
        await t.ehlo()
        d.signal(signal.SIGTERM)
        _datagrams(sock, "STOPPING=1")
        d.signal(signal.SIGHUP)
        d.wait_event("config.reload_ignored", reason="shutting down")
        await t.cmd("QUIT")
        await t.close()

    asyncio.run(scenario())
    assert d.proc.wait(20) == 0
    later: list[str] = []
    with contextlib.suppress(AssertionError):
        later = _datagrams(sock, "READY=1", timeout=1)
    assert not any("READY=1" in g or "RELOADING=1" in g for g in later), later
    assert not any(e.get("event") == "config.reloaded" for e in d.events)


def test_reload_keeps_what_a_listening_socket_was_set_up_for(tmp_path: Path, tls_files) -> None:
    """A reload that turned a STARTTLS submission listener into `tls = "implicit"` marked its plaintext
    sessions as TLS: AUTH was offered and taken in the clear. That and `proxy_protocol` need a restart,
    and the reload reports them."""
    def config(tls: str, proxy: bool) -> None:
        write_config(tmp_path, deep_merge(base_config(tls_files), {"listeners": [
            {"name": "submission", "address": "127.0.0.1:0", "mode": "submission", "tls": tls,
             "proxy_protocol": proxy}]}))

    config("starttls", False)
    d = DaemonProcess(tmp_path / "mailrelayd.toml").wait_ready()
    try:
        config("implicit", True)
        d.signal(signal.SIGHUP)
        ev = d.wait_event("config.reloaded")
        assert ev["restart_needed_for"] == ["listeners (submission: proxy_protocol or implicit tls)"]

        async def plaintext() -> None:
            t = await SmtpTalk.connect(d.ports["submission"])  # no PROXY header: none is expected yet
            t.w.write(b"EHLO client.test.example\r\n")
            lines = []
            while not lines or lines[-1][3:4] == b"-":
                lines.append(await asyncio.wait_for(t.r.readuntil(b"\r\n"), 10))
            assert b"250 STARTTLS\r\n" in lines and not any(b"AUTH" in x for x in lines), lines
            plain = base64.b64encode(f"\0alice\0{TEST_PASSWORD}".encode()).decode()
            assert (await t.cmd(f"AUTH PLAIN {plain}"))[0] == 530
            await t.close()

        asyncio.run(plaintext())
    finally:
        assert d.stop() == 0


def test_a_moved_listener_is_reported_once_under_its_own_name(tmp_path: Path, tls_files) -> None:
    """A new address for a listener is a restart matter of its own: it is not reported a second time
    as a PROXY or implicit-TLS change, which it is not."""
    def config(address: str) -> None:
        write_config(tmp_path, deep_merge(base_config(tls_files), {"listeners": [
            {"name": "submission", "address": address, "mode": "submission", "tls": "starttls"}]}))

    config("127.0.0.1:0")
    d = DaemonProcess(tmp_path / "mailrelayd.toml").wait_ready()
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            other = s.getsockname()[1]
        config(f"127.0.0.1:{other}")
        d.signal(signal.SIGHUP)
        assert d.wait_event("config.reloaded")["restart_needed_for"] == ["listeners (names/addresses)"]
    finally:
        assert d.stop() == 0
