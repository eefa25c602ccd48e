"""Implicit TLS through our own accept loop, PROXY protocol before TLS, and the pregreet test
(``greet_delay``), against the daemon as it runs in production (a subprocess), under uvloop and under
asyncio's own loop. Blocking sockets on purpose: each test sends exactly the bytes it means."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import base_config, deep_merge, write_config
from tests.support.proc import DaemonProcess
from tests.test_inbound_faults import Raw, _metric, _queue, _until

LOOPS = ["uvloop", "asyncio"]
HANDSHAKE = 4.0  # limits.tls_handshake_timeout of the module's daemon
GREET = 1.0  # greet_delay of its "greet" listener


def _cfg(tmp: Path, tls_files: tuple[Path, Path], over: dict) -> Path:
    return write_config(tmp, deep_merge(base_config(tls_files), over))


LISTENERS = [
    {"name": "relay", "address": "127.0.0.1:0", "mode": "relay", "tls": "starttls"},
    {"name": "submissions", "address": "127.0.0.1:0", "mode": "submission", "tls": "implicit"},
    {"name": "smtps-proxied", "address": "127.0.0.1:0", "mode": "relay", "tls": "implicit", "proxy_protocol": True},
    {"name": "smtps-fenced", "address": "127.0.0.1:0", "mode": "relay", "tls": "implicit", "proxy_protocol": True,
     "proxy_networks": ["10.0.0.0/8"]},
    {"name": "greet", "address": "127.0.0.1:0", "mode": "relay", "tls": "none", "greet_delay": f"{GREET}s"},
]


@pytest.fixture(scope="module", params=LOOPS)
def daemon(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           tls_files: tuple[Path, Path]) -> Iterator[DaemonProcess]:
    cfg = _cfg(tmp_path_factory.mktemp(f"tlsaccept-{request.param}"), tls_files, {
        "listeners": LISTENERS,
        "relay": {"trusted_networks": ["127.0.0.1/32", "203.0.113.0/24"]},
        "limits": {"max_connections_per_ip": 3, "tls_handshake_timeout": f"{HANDSHAKE}s",
                   "proxy_header_timeout": "1s", "command_timeout": "10s"},
    })
    d = DaemonProcess(cfg, env={"MAILRELAYD_EVENT_LOOP": request.param})
    DaemonProcess.live.remove(d)  # shared by the module's tests; stopped below
    try:
        d.wait_ready()
        assert d.uses_uvloop() == (request.param == "uvloop")
    except BaseException:
        d.kill9()
        raise
    yield d
    if d.proc.poll() is None:
        assert d.stop() == 0


# --- helpers ------------------------------------------------------------------------------
class TlsClient:
    """A blocking TLS client over memory BIOs, so that ``first`` (a PROXY header) goes out in the
    same segment as the ClientHello: the server must not read a byte past the header."""

    def __init__(self, port: int, ctx: ssl.SSLContext, first: bytes = b"", source: str | None = None) -> None:
        self.s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.s.settimeout(15)
        if source:
            self.s.bind((source, 0))
        self.s.connect(("127.0.0.1", port))
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out, server_hostname="relay.test.example")
        self.buf = b""
        self._step(first)

    def _step(self, first: bytes = b"") -> None:
        while True:
            try:
                self.tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self.s.sendall(first + self.out.read())
                first = b""
                self._fill()

    def _flush(self) -> None:
        if self.out.pending:
            self.s.sendall(self.out.read())

    def _fill(self) -> None:
        data = self.s.recv(65536)
        if not data:
            raise ConnectionError("closed by the server")
        self.inc.write(data)

    def reply(self) -> tuple[int, str]:
        while True:
            m = re.search(rb"(?m)^(\d{3}) ([^\r\n]*)\r\n", self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return int(m.group(1)), m.group(2).decode()
            try:
                self.buf += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._fill()

    def cmd(self, line: str) -> tuple[int, str]:
        self.tls.write(line.encode() + b"\r\n")
        self._flush()
        return self.reply()

    def close(self) -> None:
        self.s.close()


def _v2(src: str, sport: int = 40000) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", sport, 465)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def _closed(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except ConnectionError:
        return True
    except TimeoutError:
        return False
    return True


def _fds(d: DaemonProcess) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def _tls_failed(d: DaemonProcess, listener: str) -> float:
    return _metric(d, "mailrelayd_connections_total", f'listener="{listener}",result="tls_failed"')


def _session(d: DaemonProcess, client_tls: ssl.SSLContext, listener: str = "submissions",
             first: bytes = b"", source: str | None = None) -> TlsClient:
    c = TlsClient(d.ports[listener], client_tls, first, source)
    code, text = c.reply()
    assert code == 220, text
    return c


def _session_soon(d: DaemonProcess, client_tls: ssl.SSLContext) -> TlsClient:
    deadline = time.monotonic() + 15
    while True:
        try:
            return _session(d, client_tls)
        except (ConnectionError, ssl.SSLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# --- 1. handshake failures: at once, with the peer, by type ---------------------------------
@pytest.mark.parametrize("junk", [b"EHLO plaintext.example\r\n", b"\x16\x03\x01\x00\x05hello",
                                  b"GET / HTTP/1.0\r\n\r\n"])
def test_a_failed_handshake_is_counted_at_once_with_the_peer(daemon: DaemonProcess, junk: bytes) -> None:
    before = _metric(daemon, "mailrelayd_tls_handshake_failures_total", 'listener="submissions"')
    before_conn = _tls_failed(daemon, "submissions")
    n = len([e for e in daemon.events if e.get("event") == "smtp.tls_failed"])
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", daemon.ports["submissions"]), timeout=10)
    s.sendall(junk)
    assert _closed(s, 10)
    took = time.monotonic() - t0
    s.close()
    assert took < HANDSHAKE / 2, f"closed after {took:.1f}s: it waited for the timeout"
    _until(lambda: len([e for e in daemon.events if e.get("event") == "smtp.tls_failed"]) > n, what="the log line")
    ev = [e for e in daemon.events if e.get("event") == "smtp.tls_failed"][n]
    assert (ev["listener"], ev["peer"], ev["implicit"], ev["end"]) == ("submissions", "127.0.0.1", True, "tls_failed")
    assert "Error" in ev["error"]  # the exception type, for the operator
    assert _metric(daemon, "mailrelayd_tls_handshake_failures_total", 'listener="submissions"') == before + 1
    assert _tls_failed(daemon, "submissions") == before_conn + 1


def test_a_silent_client_is_a_handshake_timeout(daemon: DaemonProcess) -> None:
    before = _tls_failed(daemon, "submissions")
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", daemon.ports["submissions"]), timeout=10)
    assert _closed(s, HANDSHAKE + 10)
    took = time.monotonic() - t0
    s.close()
    assert HANDSHAKE - 0.5 <= took < HANDSHAKE + 4.5, took
    ev = daemon.wait_event("smtp.tls_failed", listener="submissions", end="tls_handshake_timeout", timeout=10)
    assert ev["peer"] == "127.0.0.1" and ev["implicit"] is True
    _until(lambda: _tls_failed(daemon, "submissions") == before + 1, what="the timeout to be counted")


def test_connection_limits_hold_through_the_handshake_and_every_path_frees_the_slot(
        daemon: DaemonProcess, client_tls: ssl.SSLContext) -> None:
    port = daemon.ports["submissions"]
    fds = _fds(daemon)
    # Every way a handshake can end, many times: no slot and no descriptor is kept.
    for i in range(12):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 3 == 0:
            s.sendall(b"EHLO x\r\n")  # plaintext client
        elif i % 3 == 1:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        s.close()  # (i % 3 == 2: FIN before any ClientHello)
    # (Those still being torn down may hold the three slots for a moment: retry.)
    for _ in range(2):
        _session_soon(daemon, client_tls).close()
    # max_connections_per_ip = 3: three silent handshakes hold the three slots ...
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    before = _metric(daemon, "mailrelayd_connections_total", 'listener="submissions",result="rejected_per_ip"')
    # ... so a fourth connection is closed before its handshake, and counted.
    over = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert _closed(over, 10)
    over.close()
    _until(lambda: _metric(daemon, "mailrelayd_connections_total",
                           'listener="submissions",result="rejected_per_ip"') == before + 1, what="the refusal")
    ev = daemon.wait_event("smtp.connection_refused", listener="submissions", timeout=5)
    assert (ev["peer"], ev["reason"]) == ("127.0.0.1", "rejected_per_ip")
    for s in silent:
        s.close()
    # The slots come back (the handshakes end with the clients' FIN), and are handed over to sessions.
    held = [_session_soon(daemon, client_tls) for _ in range(3)]
    # Held by the sessions now: a fourth is refused before the handshake.
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        _session(daemon, client_tls)
    for c in held:
        assert c.cmd("EHLO client.test.example")[0] == 250
        c.close()
    _until(lambda: _fds(daemon) <= fds + 2, what=f"descriptors back to {fds} (now {_fds(daemon)})")


def test_starttls_failure_is_classified_by_type(daemon: DaemonProcess) -> None:
    c = Raw(daemon.ports["relay"])
    assert c.cmd("EHLO client.test.example")[0] == 250
    assert c.cmd("STARTTLS")[0] == 220
    t0 = time.monotonic()
    c.s.sendall(b"EHLO still-plaintext.example\r\n")
    assert c.closed(timeout=10)
    assert time.monotonic() - t0 < HANDSHAKE / 2
    c.close()
    ev = daemon.wait_event("smtp.tls_failed", listener="relay", timeout=10)
    assert (ev["end"], ev["implicit"], ev["peer"]) == ("tls_failed", False, "127.0.0.1")


# --- 2. PROXY protocol in front of implicit TLS --------------------------------------------
@pytest.mark.parametrize("header", [_v2("203.0.113.9"), b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 465\r\n"],
                         ids=["v2", "v1"])
def test_proxy_header_then_tls_in_one_segment(daemon: DaemonProcess, client_tls: ssl.SSLContext,
                                              header: bytes) -> None:
    c = _session(daemon, client_tls, "smtps-proxied", first=header)
    assert c.cmd("EHLO client.test.example")[0] == 250
    assert c.cmd("MAIL FROM:<app@example.com>")[0] == 250
    assert c.cmd("RCPT TO:<far@example.net>")[0] == 250  # relaying: 203.0.113.9 is trusted
    assert c.cmd("DATA")[0] == 354
    code, text = c.cmd("From: app@example.com\r\nSubject: p\r\n\r\nx\r\n.")
    assert code == 250, text
    qid = text.rsplit(" ", 1)[1]
    ev = daemon.wait_event("message.accepted", queue_id=qid, timeout=10)
    assert ev["peer"] == "203.0.113.9"
    show = json.dumps(_queue(daemon, "show", qid))
    assert "[203.0.113.9]" in show and "TLS" in show
    c.close()


def test_proxy_address_is_what_policy_and_limits_see(daemon: DaemonProcess, client_tls: ssl.SSLContext) -> None:
    c = _session(daemon, client_tls, "smtps-proxied", first=_v2("198.51.100.7"))
    assert c.cmd("EHLO client.test.example")[0] == 250
    assert c.cmd("MAIL FROM:<app@example.com>")[0] == 250
    code, text = c.cmd("RCPT TO:<far@example.net>")
    assert (code, text[:5]) == (554, "5.7.1"), text  # not trusted: the proxy's own 127.0.0.1 would be
    c.close()
    # Per-IP limits count the proxied address: three from one client, and others still get in.
    held = [_session(daemon, client_tls, "smtps-proxied", first=_v2("192.0.2.50")) for _ in range(3)]
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        _session(daemon, client_tls, "smtps-proxied", first=_v2("192.0.2.50"))
    other = _session(daemon, client_tls, "smtps-proxied", first=_v2("192.0.2.51"))
    for x in (*held, other):
        x.close()
    # LOCAL (v2) and UNKNOWN (v1), the proxy's health checks: the connection's own address.
    local = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    for header in (local, b"PROXY UNKNOWN\r\n"):
        c = _session(daemon, client_tls, "smtps-proxied", first=header)
        assert c.cmd("EHLO client.test.example")[0] == 250
        c.close()


@pytest.mark.parametrize(("preamble", "result"), [
    (b"", "proxy_timeout"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "proxy_invalid"),  # a ClientHello, no header
    (b"PROXY TCP4 not-an-ip 127.0.0.1 1 2\r\n", "proxy_invalid"),
    (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff", "proxy_invalid"),  # v2 with an absurd length
])
def test_proxied_tls_listener_refuses_without_a_valid_header(daemon: DaemonProcess, preamble: bytes,
                                                            result: str) -> None:
    label = f'listener="smtps-proxied",result="{result}"'
    before = _metric(daemon, "mailrelayd_connections_total", label)
    s = socket.create_connection(("127.0.0.1", daemon.ports["smtps-proxied"]), timeout=10)
    s.sendall(preamble)
    assert _closed(s, 10)  # proxy_header_timeout is 1s
    s.close()
    _until(lambda: _metric(daemon, "mailrelayd_connections_total", label) == before + 1, what=result)
    ev = daemon.wait_event("smtp.proxy_refused", listener="smtps-proxied", reason=result, timeout=5)
    assert ev["peer"] == "127.0.0.1"


def test_proxied_tls_listener_refuses_foreign_sources(daemon: DaemonProcess, client_tls: ssl.SSLContext) -> None:
    label = 'listener="smtps-fenced",result="proxy_not_allowed"'
    before = _metric(daemon, "mailrelayd_connections_total", label)
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        _session(daemon, client_tls, "smtps-fenced", first=_v2("203.0.113.9"))
    _until(lambda: _metric(daemon, "mailrelayd_connections_total", label) == before + 1, what="the refusal")


# --- 3. pregreet ----------------------------------------------------------------------------
def test_a_client_that_talks_first_is_refused(daemon: DaemonProcess) -> None:
    label = 'listener="greet",result="pregreet"'
    before = _metric(daemon, "mailrelayd_connections_total", label)
    c = Raw(daemon.ports["greet"], greet=False, preamble=b"EHLO spambot.example\r\n")
    code, text = c.reply()
    assert (code, text) == (554, "5.5.1 Protocol error: talked before greeting")
    assert c.closed(timeout=10)
    assert b"220" not in c.buf
    c.close()
    _until(lambda: _metric(daemon, "mailrelayd_connections_total", label) == before + 1, what="the count")
    ev = daemon.wait_event("smtp.pregreet", listener="greet", timeout=5)
    assert ev["peer"] == "127.0.0.1"
    daemon.wait_event("smtp.session", listener="greet", end="pregreet", timeout=5)


def test_a_client_that_waits_is_greeted_after_the_delay(daemon: DaemonProcess) -> None:
    before = _metric(daemon, "mailrelayd_connections_total", 'listener="greet",result="accepted"')
    t0 = time.monotonic()
    c = Raw(daemon.ports["greet"])
    assert time.monotonic() - t0 >= GREET - 0.2
    c.envelope(rcpt="far@example.net")
    c.s.sendall(b"From: app@example.com\r\nSubject: g\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    assert c.cmd("QUIT")[0] == 221
    c.close()
    _until(lambda: _metric(daemon, "mailrelayd_connections_total", 'listener="greet",result="accepted"')
           == before + 1, what="the count")
    # Leaving during the delay frees the slot at once (max_connections_per_ip = 3).
    for _ in range(6):
        socket.create_connection(("127.0.0.1", daemon.ports["greet"]), timeout=10).close()
    _until(lambda: _metric(daemon, "mailrelayd_connections_active", 'listener="greet"') == 0, what="slots")
    held = [Raw(daemon.ports["greet"]) for _ in range(3)]
    for x in held:
        x.close()


def test_other_listeners_greet_at_once(daemon: DaemonProcess) -> None:
    t0 = time.monotonic()
    Raw(daemon.ports["relay"]).close()
    assert time.monotonic() - t0 < GREET - 0.3


# --- shutdown (last: it stops the module's daemon) -----------------------------------------
def test_sigterm_stops_accepting_and_drops_pending_handshakes(daemon: DaemonProcess) -> None:
    port = daemon.ports["submissions"]
    pending = socket.create_connection(("127.0.0.1", port), timeout=10)  # in its handshake
    waiting = Raw(daemon.ports["greet"], greet=False)  # its greeting held back
    time.sleep(0.3)
    t0 = time.monotonic()
    daemon.signal(signal.SIGTERM)
    code, text = waiting.reply()
    assert (code, text[:5]) == (421, "4.3.2"), text
    assert _closed(pending, 10)
    assert daemon.proc.wait(30) == 0
    assert time.monotonic() - t0 < 4.5  # nothing held the drain (shutdown_timeout is 5s)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    pending.close()
    waiting.close()


# --- reload ---------------------------------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
def test_reload_applies_to_the_accept_loop(tmp_path: Path, tls_files: tuple[Path, Path],
                                           client_tls: ssl.SSLContext, loop: str) -> None:
    over = {"listeners": LISTENERS, "limits": {"tls_handshake_timeout": "30s"}}
    cfg = _cfg(tmp_path, tls_files, over)
    d = DaemonProcess(cfg, env={"MAILRELAYD_EVENT_LOOP": loop}).wait_ready()
    _session(d, client_tls).close()
    changed = deep_merge(over, {"limits": {"tls_handshake_timeout": "1s"}})
    changed["listeners"] = [dict(x, greet_delay="0s") if x["name"] == "greet" else x for x in LISTENERS]
    _cfg(tmp_path, tls_files, changed)
    d.signal(signal.SIGHUP)
    d.wait_event("config.reloaded", timeout=20)
    # The new handshake timeout applies to the next connection, and the listener still serves.
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", d.ports["submissions"]), timeout=10)
    assert _closed(s, 15)
    assert time.monotonic() - t0 < 10
    s.close()
    d.wait_event("smtp.tls_failed", listener="submissions", end="tls_handshake_timeout", timeout=10)
    c = _session(d, client_tls)
    assert c.cmd("EHLO client.test.example")[0] == 250
    c.close()
    t0 = time.monotonic()
    Raw(d.ports["greet"]).close()  # greet_delay 0 now: at once
    assert time.monotonic() - t0 < GREET - 0.3
    assert d.stop() == 0


# --- a real HAProxy in front of 465 -------------------------------------------------------
def _haproxy() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loop", LOOPS)
def test_haproxy_send_proxy_v2_to_implicit_tls(tmp_path: Path, tls_files: tuple[Path, Path],
                                               client_tls: ssl.SSLContext, loop: str) -> None:
    """docs/scale-out.md's set-up for 465: HAProxy in TCP mode sends the PROXY v2 header, then the
    client's TLS bytes; the relay sees the client (127.0.0.2), not HAProxy (127.0.0.1)."""
    haproxy = _haproxy()
    if haproxy is None:
        pytest.skip("haproxy not installed (tests/system-deps.sh installs it)")
    cfg = _cfg(tmp_path, tls_files, {
        "listeners": [{"name": "smtps", "address": "127.0.0.1:0", "mode": "relay", "tls": "implicit",
                       "proxy_protocol": True, "proxy_networks": ["127.0.0.1/32"]}],
        "relay": {"trusted_networks": ["127.0.0.2/32"]},  # the client may relay; HAProxy's address may not
    })
    d = DaemonProcess(cfg, env={"MAILRELAYD_EVENT_LOOP": loop}).wait_ready()
    front = _free_port()
    (tmp_path / "haproxy.cfg").write_text(f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtps
    bind 127.0.0.1:{front}
    default_backend relays
backend relays
    server relay1 127.0.0.1:{d.ports["smtps"]} send-proxy-v2
""")
    hp = subprocess.Popen([haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", front), timeout=2).close()
                break
            except OSError:
                if hp.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"haproxy did not start: {hp.stdout.read() if hp.stdout else ''}") from None
                time.sleep(0.1)
        c = TlsClient(front, client_tls, source="127.0.0.2")
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test.example")[0] == 250
        assert c.cmd("MAIL FROM:<app@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<far@example.net>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        code, text = c.cmd("From: app@example.com\r\nSubject: h\r\n\r\nx\r\n.")
        assert code == 250, text
        ev = d.wait_event("message.accepted", queue_id=text.rsplit(" ", 1)[1], timeout=10)
        assert ev["peer"] == "127.0.0.2"
        c.close()
    finally:
        hp.terminate()
        hp.wait(10)
        assert d.stop() == 0
