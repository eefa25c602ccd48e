"""Clients we did not write, against the daemon as it runs in production (a subprocess), under
uvloop and under asyncio's own loop (issue 11's table). Each test is bounded in time.

Blocking sockets on purpose: each test sends exactly the bytes (and FINs and RSTs) it means."""

from __future__ import annotations

import collections
import json
import re
import smtplib
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import base_config, deep_merge, mailrelayd_cmd, write_config
from tests.support.proc import DaemonProcess

LOOPS = ["uvloop", "asyncio"]
SUPPRESSED = [f"gone{i}@example.net" for i in range(10)]


def _start(tmp: Path, tls_files: tuple[Path, Path], loop: str, over: dict, suppress: bool = False) -> DaemonProcess:
    cfg = write_config(tmp, deep_merge(base_config(tls_files), over))
    if suppress:
        csv = tmp / "suppress.csv"
        csv.write_text("address,reason\n" + "".join(f"{a},test\n" for a in SUPPRESSED))
        subprocess.run([*mailrelayd_cmd(), "suppress", "import", "-c", str(cfg), str(csv)], check=True,
                       capture_output=True, timeout=60)
    d = DaemonProcess(cfg, env={"MAILRELAYD_EVENT_LOOP": loop})
    # Shared by the module's tests (started once per loop): not killed after each test like the others.
    DaemonProcess.live.remove(d)
    try:
        return d.wait_ready()
    except BaseException:
        d.kill9()
        raise


@pytest.fixture(scope="module", params=LOOPS)
def daemon(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           tls_files: tuple[Path, Path]) -> Iterator[DaemonProcess]:
    d = _start(tmp_path_factory.mktemp(f"faults-{request.param}"), tls_files, request.param, {
        "limits": {"max_connections_per_ip": 5, "command_timeout": "3s", "tls_handshake_timeout": "1s",
                   "max_message_size": "64KB", "max_data_memory": "64KB",
                   # the client that never reads fills the buffers with NOOP replies
                   "max_junk_commands": 10**9},
    }, suppress=True)
    yield d
    assert d.stop() == 0


@pytest.fixture(scope="module", params=LOOPS)
def proxied(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            tls_files: tuple[Path, Path]) -> Iterator[DaemonProcess]:
    d = _start(tmp_path_factory.mktemp(f"proxy-{request.param}"), tls_files, request.param, {
        "listeners": [
            {"name": "relay", "address": "127.0.0.1:0", "mode": "relay", "tls": "starttls", "proxy_protocol": True},
            {"name": "fenced", "address": "127.0.0.1:0", "mode": "relay", "tls": "none", "proxy_protocol": True,
             "proxy_networks": ["10.0.0.0/8"]},
        ],
        "relay": {"trusted_networks": ["203.0.113.0/24"]},
        "limits": {"max_connections_per_ip": 3, "proxy_header_timeout": "1s"},
    })
    yield d
    assert d.stop() == 0


# --- helpers ------------------------------------------------------------------------------
class Raw:
    """A blocking SMTP client that sends exactly what it is told."""

    def __init__(self, port: int, *, greet: bool = True, preamble: bytes = b"") -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.buf = b""
        if preamble:
            self.s.sendall(preamble)
        if greet:
            code, text = self.reply()
            assert code == 220, text

    def reply(self) -> tuple[int, str]:
        while True:
            m = re.search(rb"(?m)^(\d{3}) ([^\r\n]*)\r\n", self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return int(m.group(1)), m.group(2).decode()
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; pending {self.buf!r}")
            self.buf += chunk

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.s.sendall((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def envelope(self, rcpt: str = "someone@example.net", mail: str = "MAIL FROM:<app@example.com>") -> None:
        assert self.cmd("EHLO client.test.example")[0] == 250
        assert self.cmd(mail)[0] == 250
        assert self.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
        assert self.cmd("DATA")[0] == 354

    def closed(self, timeout: float = 10) -> bool:
        """True once the server has closed (or reset) the connection, False if it is still open."""
        self.s.settimeout(timeout)
        try:
            while chunk := self.s.recv(65536):
                self.buf += chunk
        except ConnectionError:
            return True
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.s.close()


def _metric(d: DaemonProcess, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{d.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _until(pred, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _queue(d: DaemonProcess, *args: str) -> object:
    out = subprocess.run([*mailrelayd_cmd(), "queue", *args, "-c", str(d.config)], check=True,
                         capture_output=True, timeout=30).stdout
    return json.loads(out)


MSG = b"From: app@example.com\r\nSubject: t\r\n\r\nhello\r\n.\r\n"


# --- the table ----------------------------------------------------------------------------
def test_connect_and_leave_frees_the_slot_at_once(daemon: DaemonProcess) -> None:
    port = daemon.ports["relay"]
    for _ in range(4 * 5):  # four times max_connections_per_ip, each closed without a word
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.close()
    _until(lambda: _metric(daemon, "mailrelayd_connections_active", 'listener="relay"') == 0,
           what="the slots to be freed")
    c = Raw(port)  # not 421: the per-IP limit is free
    assert c.cmd("QUIT")[0] == 221
    c.close()
    daemon.wait_event("smtp.session", end="client_eof", timeout=5)


@pytest.mark.parametrize("how", ["half_close", "reset"])
def test_after_the_dot_the_commit_is_always_scheduled_and_logged(daemon: DaemonProcess, how: str) -> None:
    qids = []
    sessions = lambda: sum(e.get("event") == "smtp.session" for e in daemon.events)  # noqa: E731
    for i in range(6):
        n = sessions()
        c = Raw(daemon.ports["relay"])
        c.envelope(rcpt=f"{how}{i}@example.net")
        if how == "half_close":
            c.s.sendall(MSG)
            c.s.shutdown(socket.SHUT_WR)
            code, text = c.reply()  # RFC 5321: the half-closed client still gets its reply
            assert code == 250, text
            qids.append(text.rsplit(" ", 1)[1])
            assert c.closed()
        else:
            c.s.sendall(MSG)
            c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        _until(lambda n=n: sessions() > n, what="the session to end")  # (a slot is freed when the daemon sees the RST)
    # Whatever was committed is logged and handed to the scheduler (a delivery attempt follows).
    time.sleep(1.0)
    logged = {e["queue_id"] for e in daemon.events if e.get("event") == "message.accepted"}
    queued = {m["queue_id"] for m in _queue(daemon, "list", "--json")}  # type: ignore[union-attr]
    assert queued <= logged, f"committed but never logged: {queued - logged}"
    assert set(qids) <= logged
    # The session line counts the message even when the client left before the commit ended.
    per_session = collections.Counter(e["session"] for e in daemon.events if e.get("event") == "message.accepted")
    ends = {e["session"]: e for e in daemon.events if e.get("event") == "smtp.session" and e["session"] in per_session}
    assert ends and all(e["messages"] == per_session[sid] for sid, e in ends.items()), ends
    for q in queued | set(qids):
        daemon.wait_event("delivery.attempt", queue_id=q, timeout=15)


def test_reset_behind_a_pipelined_second_message_leaks_no_memory(daemon: DaemonProcess) -> None:
    """Two messages in one write (no waiting for 354), then a reset while the first commits: the
    first is committed and scheduled; what was behind it goes with the connection, and the bytes it
    held go back to the memory budget (before, they were never given back)."""
    sessions = lambda: sum(e.get("event") == "smtp.session" for e in daemon.events)  # noqa: E731
    accepted = lambda: [e["queue_id"] for e in daemon.events if e.get("event") == "message.accepted"]  # noqa: E731
    before = len(accepted())
    for i in range(4):
        n = sessions()
        c = Raw(daemon.ports["relay"])
        assert c.cmd("EHLO client.test.example")[0] == 250
        c.s.sendall(b"".join(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<piped%d-%d@example.net>\r\nDATA\r\n%s"
                             % (i, j, MSG) for j in range(2)))
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        _until(lambda n=n: sessions() > n, what="the session to end")
    _until(lambda: _metric(daemon, "mailrelayd_data_memory_bytes") == 0, timeout=10,
           what="the budget to be given back")
    # The first of each pair is committed whatever the client does; the second only if its commit
    # started before the reset was seen. Each one committed is scheduled.
    _until(lambda: len(accepted()) - before >= 4, what="the first messages to be committed")
    new = accepted()[before:]
    assert 4 <= len(new) <= 8
    for q in new:
        daemon.wait_event("delivery.attempt", queue_id=q, timeout=15)


def test_client_that_never_reads_is_aborted_by_the_timeout(daemon: DaemonProcess) -> None:
    s = socket.create_connection(("127.0.0.1", daemon.ports["relay"]), timeout=30)
    t0 = time.monotonic()
    with pytest.raises(OSError):  # reset or broken pipe once the server aborts
        while time.monotonic() - t0 < 30:
            s.sendall(b"NOOP\r\n" * 20000)
    assert time.monotonic() - t0 < 30
    s.close()
    daemon.wait_event("smtp.session", end="timeout", timeout=10)
    _until(lambda: _metric(daemon, "mailrelayd_connections_active", 'listener="relay"') == 0,
           what="the slot to be freed")


def test_a_browser_post_of_smtp_commands_relays_nothing(daemon: DaemonProcess) -> None:
    """Cross-protocol request forgery: a web page makes a browser on a trusted network POST a body of
    SMTP commands to the relay port. The request line ends the session; the body is never read."""
    s = socket.create_connection(("127.0.0.1", daemon.ports["relay"]), timeout=10)
    s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: 140\r\n\r\n"
              b"EHLO x\r\nMAIL FROM:<forged@example.com>\r\nRCPT TO:<someone@example.net>\r\nDATA\r\n"
              b"Subject: forged\r\n\r\nforged\r\n.\r\nQUIT\r\n")
    got = b""
    while chunk := s.recv(65536):  # the server closes: EOF ends the loop (the socket timeout bounds it)
        got += chunk
    s.close()
    assert got.split(b"\r\n")[1] == b"554 5.5.1 Protocol error: HTTP request to an SMTP server", got
    daemon.wait_event("smtp.session", end="non_smtp", timeout=5)
    assert not [e for e in daemon.events if e.get("event") == "message.accepted"
                and e.get("mail_from") == "forged@example.com"]


def test_recipient_overshoot_goes_to_the_accepted_ones(daemon: DaemonProcess) -> None:
    rcpts = [f"r{i}@example.net" for i in range(115)]
    with smtplib.SMTP("127.0.0.1", daemon.ports["relay"], timeout=30) as c:
        refused = c.sendmail("app@example.com", rcpts, "From: app@example.com\r\nSubject: many\r\n\r\nx\r\n")
    assert sorted(refused) == sorted(rcpts[100:])
    assert {v[0] for v in refused.values()} == {452}
    daemon.wait_event("message.accepted", rcpts=100, timeout=10)


def test_valid_and_suppressed_recipients(daemon: DaemonProcess) -> None:
    valid = [f"ok{i}@example.net" for i in range(10)]
    with smtplib.SMTP("127.0.0.1", daemon.ports["relay"], timeout=30) as c:
        refused = c.sendmail("app@example.com", [x for pair in zip(valid, SUPPRESSED, strict=True) for x in pair],
                             "From: app@example.com\r\nSubject: mixed\r\n\r\nx\r\n")
    assert sorted(refused) == sorted(SUPPRESSED)
    assert {v[0] for v in refused.values()} == {550}
    ev = daemon.wait_event("message.accepted", rcpts=10, mail_from="app@example.com", timeout=10)
    show = _queue(daemon, "show", ev["queue_id"])
    assert sorted(r["address"] for r in show["recipients"]) == sorted(valid)  # type: ignore[index]


def test_duplicate_recipient_is_delivered_once(daemon: DaemonProcess) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.ports["relay"], timeout=30) as c:
        refused = c.sendmail("dup@example.com", ["a@dup.example", "a@DUP.Example"],
                             "From: dup@example.com\r\nSubject: dup\r\n\r\nx\r\n")
    assert refused == {}
    ev = daemon.wait_event("message.accepted", mail_from="dup@example.com", timeout=10)
    assert ev["rcpts"] == 1
    show = _queue(daemon, "show", ev["queue_id"])
    assert [r["address"] for r in show["recipients"]] == ["a@dup.example"]  # type: ignore[index]


def test_a_non_ascii_digit_in_size_pipelined_behind_a_message(daemon: DaemonProcess) -> None:
    """"²".isdigit() is true and int("²") raises: the message before it must still get its 250,
    the bad parameter a 501, and the session must carry on (and end) normally."""
    c = Raw(daemon.ports["relay"])
    c.s.sendall(b"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster@bounces.test.example>\r\nDATA\r\n"
                b"Subject: leak\r\n\r\nx\r\n.\r\nMAIL FROM:<> SIZE=\xc2\xb2\r\nQUIT\r\n")
    assert c.closed(timeout=10)
    c.close()
    text = c.buf.decode()
    assert "250 2.0.0 Ok: queued as " in text, text
    assert text.endswith("501 5.5.4 SIZE takes a number\r\n221 2.0.0 Bye\r\n"), text


def test_huge_declared_size_is_552_not_a_disk_problem(daemon: DaemonProcess) -> None:
    c = Raw(daemon.ports["relay"])
    assert c.cmd("EHLO client.test.example")[0] == 250
    code, text = c.cmd("MAIL FROM:<app@example.com> SIZE=1099511627776")
    assert (code, text[:5]) == (552, "5.3.4"), text
    c.close()


def test_tls_handshake_that_never_starts_is_counted_as_a_timeout(daemon: DaemonProcess) -> None:
    before_impl = _metric(daemon, "mailrelayd_tls_handshake_failures_total", 'listener="submissions"')
    before_st = _metric(daemon, "mailrelayd_tls_handshake_failures_total", 'listener="submission"')
    silent = socket.create_connection(("127.0.0.1", daemon.ports["submissions"]), timeout=10)
    c = Raw(daemon.ports["submission"])
    assert c.cmd("EHLO client.test.example")[0] == 250
    assert c.cmd("STARTTLS")[0] == 220
    assert c.closed(timeout=10)  # then silence: closed after tls_handshake_timeout
    assert silent.recv(10) == b""
    silent.close()
    daemon.wait_event("smtp.tls_failed", listener="submission", end="tls_handshake_timeout", timeout=10)
    daemon.wait_event("smtp.tls_failed", listener="submissions", end="tls_handshake_timeout", timeout=10)
    _until(lambda: _metric(daemon, "mailrelayd_tls_handshake_failures_total",
                           'listener="submissions"') >= before_impl + 1, what="implicit TLS failure count")
    assert _metric(daemon, "mailrelayd_tls_handshake_failures_total", 'listener="submission"') >= before_st + 1


def test_memory_budget_refuses_new_data_with_451(daemon: DaemonProcess) -> None:
    hog = Raw(daemon.ports["relay"])
    hog.envelope(rcpt="big@example.net")
    hog.s.sendall(b"From: app@example.com\r\n\r\n" + b"x" * 998 + (b"\r\n" + b"x" * 998) * 58)  # ~58 KB, no dot
    _until(lambda: _metric(daemon, "mailrelayd_data_memory_bytes") > 55_000, what="the payload to be held")
    c = Raw(daemon.ports["relay"])
    assert c.cmd("EHLO client.test.example")[0] == 250
    assert c.cmd("MAIL FROM:<app@example.com> SIZE=20000")[0] == 250
    assert c.cmd("RCPT TO:<x@example.net>")[0] == 250
    code, text = c.cmd("DATA")
    assert (code, text[:5]) == (451, "4.3.2"), text
    assert c.cmd("RSET")[0] == 250
    # Without a declared size the payload is read and dropped once the budget runs out: 451 after the dot.
    c.envelope(rcpt="y@example.net", mail="MAIL FROM:<app@example.com>")
    c.s.sendall(b"Subject: t\r\n\r\n" + (b"y" * 998 + b"\r\n") * 20 + b".\r\n")
    code, text = c.reply()
    assert (code, text[:5]) == (451, "4.3.2"), text
    hog.close()
    c.close()
    _until(lambda: _metric(daemon, "mailrelayd_data_memory_bytes") == 0, what="the budget to be given back")


# --- PROXY protocol -------------------------------------------------------------------------
def _v2(src: str, sport: int = 40000) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", sport, 25)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def test_proxy_v1_address_is_what_policy_logs_and_received_see(proxied: DaemonProcess) -> None:
    c = Raw(proxied.ports["relay"], preamble=b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 25\r\n")
    c.envelope(rcpt="far@example.net")  # relaying: 203.0.113.9 is trusted (127.0.0.1 is not, here)
    c.s.sendall(b"From: app@example.com\r\nSubject: p\r\n\r\nx\r\n.\r\n")
    code, text = c.reply()
    assert code == 250, text
    qid = text.rsplit(" ", 1)[1]
    ev = proxied.wait_event("message.accepted", queue_id=qid, timeout=10)
    assert ev["peer"] == "203.0.113.9"
    show = _queue(proxied, "show", qid)
    assert "[203.0.113.9]" in json.dumps(show)
    c.close()


def test_proxy_v2_untrusted_address_cannot_relay(proxied: DaemonProcess) -> None:
    c = Raw(proxied.ports["relay"], preamble=_v2("198.51.100.7"))
    assert c.cmd("EHLO client.test.example")[0] == 250
    assert c.cmd("MAIL FROM:<app@example.com>")[0] == 250
    code, text = c.cmd("RCPT TO:<far@example.net>")
    assert (code, text[:5]) == (554, "5.7.1"), text
    c.close()


def test_proxy_limits_apply_to_the_proxied_address(proxied: DaemonProcess) -> None:
    held = [Raw(proxied.ports["relay"], preamble=_v2("192.0.2.50")) for _ in range(3)]
    over = Raw(proxied.ports["relay"], greet=False, preamble=_v2("192.0.2.50"))
    assert over.reply()[0] == 421
    other = Raw(proxied.ports["relay"], preamble=_v2("192.0.2.51"))
    for c in (*held, over, other):
        c.close()


@pytest.mark.parametrize("preamble", [b"EHLO client.test.example\r\n", b"PROXY TCP4 not-an-ip 1.2.3.4 1 2\r\n",
                                      b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04abcd"])
def test_proxy_listener_closes_a_connection_without_a_valid_header(proxied: DaemonProcess, preamble: bytes) -> None:
    c = Raw(proxied.ports["relay"], greet=False, preamble=preamble)
    assert c.closed(timeout=10)
    assert b"220" not in c.buf
    c.close()


def test_proxy_listener_closes_silence_and_foreign_sources(proxied: DaemonProcess) -> None:
    silent = Raw(proxied.ports["relay"], greet=False)
    assert silent.closed(timeout=10)  # proxy_header_timeout = 1s
    fenced = Raw(proxied.ports["fenced"], greet=False, preamble=_v2("203.0.113.9"))
    assert fenced.closed(timeout=10)  # 127.0.0.1 is not in proxy_networks
    for c in (silent, fenced):
        c.close()


def _flood(c: Raw, lines: bytes) -> list[tuple[int, str]]:
    """Pipeline ``lines`` and read every reply until the server closes."""
    c.s.sendall(lines)
    assert c.closed(timeout=10)
    return [(int(m[0]), m[1].decode()) for m in re.findall(rb"(?m)^(\d{3}) ([^\r\n]*)\r\n", c.buf)]


def test_a_session_of_noops_is_closed_past_the_junk_limit(proxied: DaemonProcess) -> None:
    """Each NOOP re-arms the idle timer, so without a limit a client keeps its slot for ever (Postfix:
    smtpd_junk_command_limit). Default limits here: 100 junk commands, then 10 errors."""
    c = Raw(proxied.ports["relay"], preamble=_v2("198.51.100.20"))
    replies = _flood(c, b"EHLO client.test.example\r\n" + b"NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\n" * 40)
    c.close()
    assert replies[-1] == (421, "4.7.0 Too many errors, closing connection")
    assert len(replies) == 1 + 100 + 10 + 1, replies[-15:]  # EHLO, the free ones, the errors, the 421
    ev = proxied.wait_event("smtp.session", peer="198.51.100.20", timeout=10)
    assert ev["end"] == "too_many_errors"


def test_recipients_past_the_overshoot_are_errors(proxied: DaemonProcess) -> None:
    c = Raw(proxied.ports["relay"], preamble=_v2("198.51.100.21"))
    assert c.cmd("EHLO client.test.example")[0] == 250
    assert c.cmd("MAIL FROM:<app@example.com>")[0] == 250
    replies = _flood(c, b"".join(b"RCPT TO:<r%d@bounces.test.example>\r\n" % i for i in range(1200)))
    c.close()
    codes = [r[0] for r in replies]
    # 100 accepted, 1000 free 452s, ten more that count, then the 421
    assert codes == [250] * 100 + [452] * 1010 + [421], (len(codes), replies[-3:])
    proxied.wait_event("smtp.session", peer="198.51.100.21", end="too_many_errors", timeout=10)


def test_sigterm_closes_idle_sessions_at_once(daemon: DaemonProcess) -> None:
    """Last in the module: it stops the module's daemon (shutdown_timeout is 5 s in the test config)."""
    import signal

    idle = Raw(daemon.ports["relay"])
    assert idle.cmd("EHLO client.test.example")[0] == 250
    leaver = socket.create_connection(("127.0.0.1", daemon.ports["relay"]), timeout=10)
    leaver.close()  # a health check that left: must not hold the drain either
    t0 = time.monotonic()
    daemon.signal(signal.SIGTERM)
    code, text = idle.reply()
    assert time.monotonic() - t0 < 4  # at once, not at the end of the drain
    assert (code, text[:5]) == (421, "4.3.2"), text
    assert idle.closed()
    assert daemon.proc.wait(30) == 0
    idle.close()
