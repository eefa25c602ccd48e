"""Fault suite: clients we did not write, against the real daemon process (issue 11's table, the rows
about what the client sends: a message with no header block, non-UTF-8 envelope bytes, <postmaster> and
quoted local parts, a password typed as the AUTH LOGIN username, a header From with no valid mailbox,
and state files under umask 022).

Each test runs under uvloop (what production runs) and under asyncio's own loop, against one daemon per
loop for the whole module, started with umask 022. Every exchange is bounded (``SmtpTalk`` waits at most
10 s per reply, each test at most 90 s). Loopback is not a trusted network here: on the relay listener
the client is an outsider.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.errors
import email.policy
import os
import stat
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_PASSWORD, base_config, deep_merge, write_config
from tests.support.proc import LOOPS, DaemonProcess
from tests.support.sink import Received, Sink
from tests.support.smtptalk import SmtpTalk

pytestmark = pytest.mark.timeout(90)

PASSWORD_AS_USERNAME = "Hunter2-is-my-Passw0rd!"


class ThreadSink:
    """The test sink on its own event loop in a thread, so it outlives each test's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fault-sink", daemon=True)
        self.thread.start()
        self.sink: Sink = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> Sink:
        return await Sink().start()

    def find(self, rcpt: str, timeout: float = 30) -> Received:
        async def wait() -> Received:
            while True:
                for m in self.sink.messages:
                    if rcpt in m.rcpts:
                        return m
                await asyncio.sleep(0.05)
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(wait(), timeout), self.loop).result(timeout + 5)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sink.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def sink() -> Iterator[ThreadSink]:
    s = ThreadSink()
    yield s
    s.close()


@pytest.fixture(scope="module", params=LOOPS)
def daemon(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           tls_files: tuple[Path, Path], sink: ThreadSink) -> Iterator[DaemonProcess]:
    d = tmp_path_factory.mktemp(f"fault-{request.param}")
    cfg = write_config(d, deep_merge(base_config(tls_files), {
        "relay": {"trusted_networks": ["192.0.2.0/24"]},  # loopback clients are outsiders
        "routes": [{"domain": "*", "host": f"127.0.0.1:{sink.sink.port}"}],
    }))
    old = os.umask(0o022)  # what `make run` or a container shell usually has
    try:
        proc = DaemonProcess(cfg, loop=request.param)
    finally:
        os.umask(old)
    DaemonProcess.live.remove(proc)  # module-scoped: stopped below, not after each test
    try:
        proc.wait_ready()
        assert proc.uses_uvloop() == (request.param == "uvloop")
        yield proc
    finally:
        assert proc.stop() == 0


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


async def submission(d: DaemonProcess, tls: object, user: str = "alice") -> SmtpTalk:
    t = await SmtpTalk.connect(d.ports["submission"])
    assert (await t.ehlo())[0] == 250
    await t.starttls(tls)  # type: ignore[arg-type]
    assert (await t.ehlo())[0] == 250
    token = base64.b64encode(f"\0{user}\0{TEST_PASSWORD}".encode()).decode()
    code, text = await t.cmd(f"AUTH PLAIN {token}")
    assert code == 235, text
    return t


async def send(t: SmtpTalk, mail_from: str, rcpt: str, data: bytes) -> tuple[int, str]:
    code, text = await t.cmd(f"MAIL FROM:<{mail_from}>")
    assert code == 250, text
    code, text = await t.cmd(f"RCPT TO:<{rcpt}>")
    assert code == 250, text
    code, text = await t.cmd("DATA")
    assert code == 354, text
    return await t.cmd(data + b".")


def spool_write_errors(d: DaemonProcess) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{d.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("mailrelayd_spool_write_errors_total "):
            return float(line.split()[1])
    return 0.0


# --- a message with no header block --------------------------------------------------------------
def test_message_without_headers_gets_headers_then_blank_line_then_body(daemon: DaemonProcess, sink: ThreadSink,
                                                                        client_tls: object) -> None:
    rcpt = f"bodyonly-{daemon.loop}@dest.test.example"

    async def go() -> None:
        t = await submission(daemon, client_tls)
        code, text = await send(t, "alice@example.com", rcpt, b"just a body line\r\n")
        assert code == 250, text
        await t.cmd("QUIT")
        await t.close()
    run(go())
    got = sink.find(rcpt)
    msg = email.message_from_bytes(got.data, policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec == "alice@example.com"
    assert msg["Message-ID"] and msg["Date"]
    assert msg.get_content().replace("\r\n", "\n") == "just a body line\n"
    assert not [x for x in msg.defects if isinstance(x, email.errors.MissingHeaderBodySeparatorDefect)]
    assert got.data.replace(b"\r\n", b"\n").endswith(b"\n\njust a body line\n")


# --- bytes that are not UTF-8 in the envelope ----------------------------------------------------
def test_non_utf8_envelope_is_553_5_6_7_never_a_spool_error(daemon: DaemonProcess) -> None:
    before = spool_write_errors(daemon)

    async def go() -> None:
        t = await SmtpTalk.connect(daemon.ports["relay"])
        assert (await t.ehlo())[0] == 250
        code, text = await t.cmd(b"MAIL FROM:<\xff\xfe@evil.example> SMTPUTF8")
        assert (code, text[:5]) == (553, "5.6.7"), text
        # The session goes on, and the same bytes in RCPT get the same answer.
        assert (await t.cmd("MAIL FROM:<> SMTPUTF8"))[0] == 250
        code, text = await t.cmd(b"RCPT TO:<\xff\xfe@bounces.test.example>")
        assert (code, text[:5]) == (553, "5.6.7"), text
        code, text = await t.cmd(b"RCPT TO:<x@\xc3\x28.bounces.test.example>")  # invalid UTF-8 in the domain
        assert (code, text[:5]) == (553, "5.6.7"), text
        assert (await t.cmd("RSET"))[0] == 250
        assert (await t.cmd("QUIT"))[0] == 221
        await t.close()
    run(go())
    assert spool_write_errors(daemon) == before
    assert not [e for e in daemon.events if e.get("event") == "message.accepted" and "evil" in e.get("mail_from", "")]


# --- <postmaster> and quoted local parts ----------------------------------------------------------
@pytest.mark.parametrize("postmaster", ["postmaster", "Postmaster"])
def test_postmaster_from_an_outsider_with_a_quoted_sender(daemon: DaemonProcess, postmaster: str) -> None:
    async def go() -> str:
        t = await SmtpTalk.connect(daemon.ports["relay"])
        assert (await t.ehlo("outsider.test.example"))[0] == 250
        code, text = await send(t, '"a b"@example.com', postmaster,
                                f"From: <\"a b\"@example.com>\r\nSubject: hello {postmaster}\r\n\r\nhi\r\n".encode())
        assert code == 250, text
        await t.cmd("QUIT")
        await t.close()
        return text.rsplit(" ", 1)[1]
    qid = run(go())
    ev = daemon.wait_event("message.accepted", queue_id=qid)
    assert ev["queue"] == "feedback" and ev["mail_from"] == '"a b"@example.com'
    daemon.wait_event("feedback.received", queue_id=qid)  # handled locally, not relayed
    kept = Path(daemon.wait_event("postmaster.received", queue_id=qid)["kept"])  # a person's mail: kept
    assert kept.read_bytes().endswith(b"\r\n\r\nhi\r\n")
    recipients = [e for e in daemon.events if e.get("event") == "delivery.attempt" and e.get("queue_id") == qid]
    assert recipients == []


def test_quoted_sender_is_relayed_for_its_owner(daemon: DaemonProcess, sink: ThreadSink, client_tls: object) -> None:
    rcpt = f"quoted-{daemon.loop}@dest.test.example"

    async def go() -> None:
        t = await submission(daemon, client_tls)
        code, text = await send(t, '"a b"@example.com', rcpt,
                                b'From: "a b"@example.com\r\nSubject: quoted\r\n\r\nbody\r\n')
        assert code == 250, text
        await t.cmd("QUIT")
        await t.close()
    run(go())
    assert sink.find(rcpt).mail_from == '"a b"@example.com'


# --- a password typed as the AUTH LOGIN username --------------------------------------------------
def test_password_typed_as_login_username_is_never_logged(daemon: DaemonProcess, client_tls: object) -> None:
    secret_b64 = base64.b64encode(PASSWORD_AS_USERNAME.encode()).decode()

    async def go() -> None:
        t = await SmtpTalk.connect(daemon.ports["submission"])
        await t.ehlo()
        await t.starttls(client_tls)  # type: ignore[arg-type]
        await t.ehlo()
        assert (await t.cmd("AUTH LOGIN"))[0] == 334
        assert (await t.cmd(secret_b64))[0] == 334
        code, text = await t.cmd(base64.b64encode(b"alice").decode())
        assert (code, text[:5]) == (535, "5.7.8"), text
        assert (await t.cmd("QUIT"))[0] == 221
        await t.close()
    run(go())
    ev = daemon.wait_event("smtp.auth_failed")
    assert ev["user"].startswith("unknown:")
    daemon.wait_event("smtp.session", session=ev["session"], end="quit")  # every line of it is logged
    for needle in (PASSWORD_AS_USERNAME, PASSWORD_AS_USERNAME[:8], secret_b64):
        assert needle not in daemon.output


# --- a header From with no single valid mailbox ---------------------------------------------------
@pytest.mark.parametrize("from_value", ["undisclosed-recipients:;", "ceo@victim.com@example.com"])
def test_header_from_without_valid_mailbox_is_550_5_7_1(daemon: DaemonProcess, from_value: str,
                                                        client_tls: object) -> None:
    async def go() -> None:
        t = await submission(daemon, client_tls)
        data = f"From: {from_value}\r\nSubject: spoof\r\n\r\nbody\r\n".encode()
        code, text = await send(t, "alice@example.com", "victim@dest.test.example", data)
        assert (code, text[:5]) == (550, "5.7.1"), text
        assert (await t.cmd("QUIT"))[0] == 221
        await t.close()
    run(go())


# --- spool and state files under umask 022 ---------------------------------------------------------
def test_spool_and_state_files_are_private_under_umask_022(daemon: DaemonProcess) -> None:
    async def go() -> str:  # something for every kind of file: a queued message, a kept report
        t = await SmtpTalk.connect(daemon.ports["relay"])
        await t.ehlo()
        code, text = await send(t, "", "postmaster", b"Subject: not a report\r\n\r\nkept for the operator\r\n")
        assert code == 250, text
        await t.cmd("QUIT")
        await t.close()
        return text.rsplit(" ", 1)[1]
    qid = run(go())
    daemon.wait_event("postmaster.received", queue_id=qid)
    root = daemon.config.parent
    files = [p for sub in ("spool", "state") for p in (root / sub).rglob("*") if p.is_file()]
    names = {p.relative_to(root).as_posix() for p in files}
    assert {"spool/spool.db", "spool/spool.db-wal", "spool/spool.db-shm", "spool/lock", "state/suppressions.db",
            f"state/postmaster/{qid}.eml"} <= names, names
    modes = {p.relative_to(root).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert all(m in ("0o600", "0o640") for m in modes.values()), modes
