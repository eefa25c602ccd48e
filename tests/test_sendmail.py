"""`mailrelayd sendmail` as cron, PHP mail() and scripts use it: piped on stdin, through a symlink
named sendmail, with the daemon up (admin socket) and down (maildrop, picked up on start)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from mailrelayd import sendmail as sm
from mailrelayd.spool.store import HistoryQuery
from tests.conftest import base_config, deep_merge, mailrelayd_cmd, write_config
from tests.support.sink import Sink

CRON_MAIL = (b"From: root (Cron Daemon)\nTo: ops@dest.test\nBcc: secret@dest.test\n"
             b"Subject: Cron <root@host> /usr/local/bin/backup\n\nbackup done\n.\nnot part of it? with -i it is\n")


# --- argument parsing and preparation (pure) -----------------------------------------------
def test_parse_args_like_postfix() -> None:
    a = sm.parse_args(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-odi", "-t", "-f", "root", "--", "-x@y.test"])
    assert (a.full_name, a.dot_ends, a.extract, a.sender, a.recipients) == ("CronDaemon", False, True, "root",
                                                                              ["-x@y.test"])
    a = sm.parse_args(["-oi", "-fapp@example.com", "a@x.test,b@x.test", "c@x.test", "-bm"])
    assert a.recipients == ["a@x.test", "b@x.test", "c@x.test"] and a.sender == "app@example.com"
    assert not a.dot_ends
    assert sm.parse_args(["-ti"]).extract and not sm.parse_args(["-ti"]).dot_ends
    with pytest.raises(sm.UsageError):
        sm.parse_args(["-bp"])  # list the queue: not this command's job
    with pytest.raises(sm.UsageError):
        sm.parse_args(["-f"])


def test_dot_line_ends_input_unless_i() -> None:
    assert sm.read_message(b"a\n.\nb\n", dot_ends=True) == b"a\r\n"
    assert sm.read_message(b"a\n.\nb\n", dot_ends=False) == b"a\r\n.\r\nb\r\n"


def test_prepare_extracts_recipients_removes_bcc_and_qualifies_from() -> None:
    data = sm.read_message(CRON_MAIL, dot_ends=False)
    p = sm.prepare(data, recipients=["extra@dest.test"], extract=True, sender=None, full_name=None,
                   domain="host.example.com", default_sender=None, fallback_sender="root@host.example.com")
    assert p.recipients == ("extra@dest.test", "ops@dest.test", "secret@dest.test")
    assert b"Bcc" not in p.data and b"secret@" not in p.data
    assert b"From: Cron Daemon <root@host.example.com>\r\n" in p.data
    assert p.mail_from == "root@host.example.com"
    assert p.data.endswith(b"backup done\r\n.\r\nnot part of it? with -i it is\r\n")
    p = sm.prepare(b"Subject: x\r\n\r\nhi\r\n", recipients=["a@dest.test"], extract=False, sender="app",
                   full_name="The App", domain="example.com", default_sender=None)
    assert p.mail_from == "app@example.com"
    assert p.data.startswith(b"From: The App <app@example.com>\r\nSubject: x\r\n")
    with pytest.raises(sm.PrepareError) as e:
        sm.prepare(b"Subject: x\r\n\r\n", recipients=[], extract=True, sender="a@b.test", full_name=None,
                   domain="b.test", default_sender=None)
    assert e.value.exit_code == sm.EX_NOUSER


def test_f_empty_or_angle_brackets_is_the_null_sender() -> None:
    """sendmail -f '<>' (or -f '', or -r): the null reverse-path of bounces and autoreplies, as in
    sendmail and Postfix. It fell back to default_from / the From header / login@domain instead."""
    for argv in (["-f", "<>"], ["-f<>"], ["-f", ""], ["-f", " <> "], ["-r", "<>"], ["-r", ""], ["-r<>"]):
        assert sm.parse_args([*argv, "a@dest.test"]).sender == "", argv
    assert sm.parse_args(["-f", "<app@example.com>"]).sender == "app@example.com"
    assert sm.parse_args(["a@dest.test"]).sender is None
    assert sm.parse_args(["-f", "<", "a@dest.test"]).sender == "<"  # a typo, refused later: not the null sender
    autoreply = b"From: Ops <ops@example.com>\r\nSubject: Out of office\r\n\r\naway\r\n"
    for sender in ("", "<>", " <> "):  # "<>": the HTTP API's ?from=<>
        p = sm.prepare(autoreply, recipients=["a@dest.test"], extract=False, sender=sender, full_name=None,
                       domain="example.com", default_sender="noreply@example.com", fallback_sender="root@example.com")
        assert (p.mail_from, p.recipients, p.data) == ("", ("a@dest.test",), autoreply), sender
    # No From header: one is required (RFC 5322 §3.6); Postfix writes MAILER-DAEMON, without -F's name.
    p = sm.prepare(b"Subject: x\r\n\r\nhi\r\n", recipients=["a@dest.test"], extract=False, sender="",
                   full_name="Cron", domain="example.com", default_sender=None)
    assert (p.mail_from, p.data) == ("", b"From: MAILER-DAEMON@example.com\r\nSubject: x\r\n\r\nhi\r\n")
    # Not given at all: still no sender is an error.
    with pytest.raises(sm.PrepareError, match="no sender"):
        sm.prepare(b"Subject: x\r\n\r\n", recipients=["a@dest.test"], extract=False, sender=None, full_name=None,
                   domain="example.com", default_sender=None)


def test_domain_literals_read_alike_on_every_python() -> None:
    """-t recipients and the From header through the lenient address reader: Python 3.13's strict
    default of email.utils.getaddresses dropped user@[192.0.2.1] (3.11 keeps it)."""
    data = (b"From: Ops <ops@[192.0.2.1]>\r\nTo: user@[192.0.2.1], b@dest.test\r\n"
            b"Cc: C <c@[IPv6:2001:db8::1]>\r\nSubject: x\r\n\r\nhi\r\n")
    p = sm.prepare(data, recipients=[], extract=True, sender=None, full_name=None, domain="example.com",
                   default_sender=None)
    assert p.recipients == ("user@[192.0.2.1]", "b@dest.test", "c@[IPv6:2001:db8::1]")
    assert p.mail_from == "ops@[192.0.2.1]"  # from the From header


# --- end to end -------------------------------------------------------------------------------
def _overrides(sink: Sink, **sendmail: Any) -> dict[str, Any]:
    return {"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
            "delivery": {"retry_initial": "1s", "retry_max": "1s", "retry_jitter": 0.0},
            "server": {"hostname": "relay.test.example", "spool_dir": "spool", "state_dir": "state",
                       "shutdown_timeout": "5s", "min_free_space": "1MB"},
            "sendmail": {"user": "cron", "domain": "example.com", **sendmail}}


USERS = {"alice": ("@example.com",), "cron": ("@example.com",), "bob": ("bob@example.org",)}


async def _run(cmd: list[str], stdin: bytes, config: Path, extra_env: dict[str, str] | None = None
               ) -> tuple[int, str]:
    env = {**os.environ, "MAILRELAYD_CONFIG": str(config), **(extra_env or {})}
    env.pop("NOTIFY_SOCKET", None)
    p = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.STDOUT, env=env)
    out, _ = await asyncio.wait_for(p.communicate(stdin), 60)
    return p.returncode or 0, out.decode()


def _parsed(raw: bytes) -> Any:
    return email.message_from_bytes(raw, policy=email.policy.default)


async def test_cron_style_pipe_through_the_daemon(start_daemon, tmp_path) -> None:
    sink = await Sink().start()
    try:
        d = await start_daemon(_overrides(sink), users=USERS)
        # cronie's invocation.
        code, out = await _run([*mailrelayd_cmd(), "sendmail", "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-t"],
                               CRON_MAIL, d.config)
        assert code == 0, out
        msgs = await sink.wait_for(1)
        assert sorted(r for m in msgs for r in m.rcpts) == ["ops@dest.test", "secret@dest.test"]
        m = _parsed(msgs[0].data)
        assert m["From"] == "Cron Daemon <root@example.com>"
        assert m["Bcc"] is None
        assert m["Message-ID"] and m["Date"]  # completed like a submission
        assert "with LOCAL" in str(m["Received"])
        assert msgs[0].mail_from == "root@example.com"
        hist = await d.spool.history(HistoryQuery(user="cron"))
        assert {h.recipient for h in hist} == {"ops@dest.test", "secret@dest.test"}
    finally:
        await sink.stop()


async def test_symlink_named_sendmail_and_refusals(start_daemon, tmp_path) -> None:
    sink = await Sink().start()
    try:
        d = await start_daemon(_overrides(sink), users=USERS)
        exe = Path(sys.executable).parent / "mailrelayd"
        if not exe.exists():
            pytest.skip("no mailrelayd console script in this environment")
        link = tmp_path / "bin" / "sendmail"
        link.parent.mkdir()
        link.symlink_to(exe)
        code, out = await _run([str(link), "-oi", "-f", "app@example.com", "dev@dest.test"],
                               b"Subject: via symlink\n\nhello\n", d.config)
        assert code == 0, out
        (msg,) = await sink.wait_for(1)
        assert msg.mail_from == "app@example.com" and msg.rcpts == ["dev@dest.test"]
        assert _parsed(msg.data)["Subject"] == "via symlink"
        # Not one of the user's senders: refused for good (EX_NOPERM), with the SMTP reply.
        code, out = await _run([str(link), "-f", "ceo@other.test", "dev@dest.test"], b"Subject: x\n\nx\n", d.config)
        assert code == sm.EX_NOPERM and "5.7.1" in out, out
        # Header From of somebody else: refused too.
        code, out = await _run([str(link), "-f", "app@example.com", "dev@dest.test"],
                               b"From: ceo@other.test\nSubject: x\n\nx\n", d.config)
        assert code == sm.EX_NOPERM and "5.7.1" in out, out
        code, out = await _run([str(link), "-t"], b"Subject: nobody\n\nx\n", d.config)
        assert code == sm.EX_NOUSER, out
        # The null sender needs allowed_from "*": refused for good, and the reply says so.
        code, out = await _run([str(link), "-f", "<>", "dev@dest.test"], b"From: app@example.com\n\nx\n", d.config)
        assert code == sm.EX_NOPERM and "550 5.7.1 Null sender <> not allowed for this user" in out, out
        await asyncio.sleep(0.5)
        assert len(sink.messages) == 1
    finally:
        await sink.stop()


async def test_daemon_down_maildrop_then_picked_up_on_start(start_daemon, tmp_path, tls_files) -> None:
    sink = await Sink().start()
    try:
        directory = tmp_path / "relay"
        cfg = write_config(directory, deep_merge(base_config(tls_files), _overrides(sink)), USERS)
        (directory / "state").mkdir()
        code, out = await _run([*mailrelayd_cmd(), "sendmail", "-oi", "-f", "app@example.com", "late@dest.test"],
                               b"Subject: while down\n\nqueued locally\n", cfg)
        assert code == 0, out
        assert "maildrop" in out
        # What the daemon would refuse whoever sent it is refused now, not left to fail at pickup.
        for argv, stdin, exit_code, words in (
                (["-f", "app@example.com\rX", "a@dest.test"], b"Subject: x\n\nx\n", sm.EX_DATAERR, "bad sender"),
                (["-f", "app@example.com", "a@@dest.test", "b c@dest.test"], b"Subject: x\n\nx\n", sm.EX_NOUSER,
                 "no valid recipient"),
                (["-f", "app@example.com", "a@dest.test"], b"Subject: x\n\nnul \0 here\n", sm.EX_DATAERR,
                 "5.6.0")):  # (long lines are folded or encoded: test_long_lines_mbox_from_and_ignored_options)
            code, out = await _run([*mailrelayd_cmd(), "sendmail", "-oi", *argv], stdin, cfg)
            assert (code, words in out, "message not sent" in out) == (exit_code, True, True), out
        # One bad recipient among good ones: said, and the message goes to the others.
        code, out = await _run([*mailrelayd_cmd(), "sendmail", "-oi", "-f", "app@example.com", "late@dest.test",
                                "x y@dest.test"], b"Subject: while down\n\nqueued locally\n", cfg)
        assert code == 0 and "bad recipient address 'x y@dest.test'" in out, out
        drops = list((directory / "state" / "maildrop").glob("*.json"))
        assert len(drops) == 2
        await start_daemon(_overrides(sink), users=USERS, directory=directory)
        msgs = await sink.wait_for(2, timeout=20)
        assert [m.rcpts for m in msgs] == [["late@dest.test"]] * 2
        assert _parsed(msgs[0].data)["Subject"] == "while down"
        for _ in range(100):
            if not list((directory / "state" / "maildrop").glob("*.json")):
                break
            await asyncio.sleep(0.05)
        assert not list((directory / "state" / "maildrop").glob("*.json"))
    finally:
        await sink.stop()


async def test_null_sender_through_the_daemon_and_the_maildrop(start_daemon, tmp_path, tls_files) -> None:
    """-f '<>' reaches the next hop as MAIL FROM:<>, whether the daemon takes the message over its
    admin socket or picks it up from the maildrop (it was sent as the From header's address)."""
    sink = await Sink().start()
    try:
        directory = tmp_path / "relay"
        users = {**USERS, "cron": ("*",)}  # "*" allows the null sender too
        cfg = write_config(directory, deep_merge(base_config(tls_files), _overrides(sink)), users)
        (directory / "state").mkdir()
        autoreply = b"From: Ops <ops@example.com>\nSubject: Out of office\n\naway\n"
        for argv in (["-f", "<>"], ["-r", ""]):
            code, out = await _run([*mailrelayd_cmd(), "sendmail", "-oi", *argv, "down@dest.test"], autoreply, cfg)
            assert code == 0 and "maildrop" in out, out
        await start_daemon(_overrides(sink), users=users, directory=directory)
        code, out = await _run([*mailrelayd_cmd(), "sendmail", "-oi", "-f<>", "up@dest.test"], autoreply, cfg)
        assert code == 0, out
        msgs = await sink.wait_for(3, timeout=20)
        assert sorted((m.mail_from, *m.rcpts) for m in msgs) == [  # the sink's spelling of MAIL FROM:<>
            ("<>", "down@dest.test"), ("<>", "down@dest.test"), ("<>", "up@dest.test")]
        assert all(_parsed(m.data)["From"] == "Ops <ops@example.com>" for m in msgs)
    finally:
        await sink.stop()


async def test_no_daemon_and_no_maildrop_exits_75(tmp_path, tls_files) -> None:
    if os.geteuid() == 0:
        # root writes anywhere: make the maildrop a file instead of a directory.
        blocker = tmp_path / "blocked"
        blocker.write_text("x")
        maildrop = str(blocker / "maildrop")
    else:
        maildrop = "/proc/maildrop"
    cfg = write_config(tmp_path / "relay", deep_merge(base_config(tls_files), {
        "sendmail": {"user": "alice", "maildrop_dir": maildrop}}), USERS)
    code, out = await _run([*mailrelayd_cmd(), "sendmail", "-oi", "a@dest.test"], b"Subject: x\n\nx\n", cfg)
    assert code == sm.EX_TEMPFAIL, out
    assert "message not sent" in out
    code, out = await _run([*mailrelayd_cmd(), "sendmail", "-oi", "a@dest.test"], b"Subject: x\n\nx\n",
                           tmp_path / "missing.toml")
    assert code == sm.EX_TEMPFAIL and "config" in out, out


# --- Postfix compatibility: mbox From line, long lines, ignored options, bad -t addresses, 8-bit names ---
def test_postfix_compatible_arguments_and_input() -> None:
    for argv in (["-Am"], ["-Ac"], ["-G"], ["-m"], ["-q1h"], ["-q15m"], ["-q1h30m"]):  # Postfix: "(ignored)"
        assert sm.parse_args([*argv, "a@dest.test"]).recipients == ["a@dest.test"], argv
    with pytest.raises(sm.UsageError, match="mailrelayd queue flush"):
        sm.parse_args(["-q"])
    # The mbox separator some programs leave on is dropped, as Postfix's sendmail drops it.
    data = sm.read_message(b"From someone@example.com Mon Nov 30 12:00:00 2026\nTo: a@dest.test\n\nhi\n", True)
    assert data == b"To: a@dest.test\r\n\r\nhi\r\n"
    # -t: an entry that holds no readable address is kept, to be refused and reported (it was dropped).
    p = sm.prepare(b"To: x@, t4@example.net, team: Foo <y@>;\r\n\r\nhi\r\n", recipients=[], extract=True,
                   sender="a@example.com", full_name=None, domain="example.com", default_sender=None)
    assert p.recipients == ("x@", "t4@example.net", "Foo <y@>")
    # A Latin-1 display name keeps its bytes when the bare address is qualified: an ISO-8859-1 encoded word.
    p = sm.prepare(b"From: R\xe9my <root>\r\nSubject: x\r\n\r\nhi\r\n", recipients=["a@dest.test"], extract=False,
                   sender=None, full_name=None, domain="example.com", default_sender=None)
    assert p.data.startswith(b"From: =?iso-8859-1?q?R=E9my?= <root@example.com>\r\n")
    assert _parsed(p.data)["From"] == "R\xe9my <root@example.com>"


def test_long_lines_fit_rfc5322() -> None:
    from mailrelayd.longlines import fit_long_lines

    body = b"x" * 3000 + b" end =\r\ntrailing blank \r\n"
    msg = b"Subject: " + b"word " * 400 + b"\r\nFrom: a@example.com\r\n\r\n" + body
    out = fit_long_lines(msg)
    assert max(map(len, out.split(b"\r\n"))) <= 998
    m = _parsed(out)  # single part: quoted-printable, decoded it is the original
    assert (m["Content-Transfer-Encoding"], m["MIME-Version"]) == ("quoted-printable", "1.0")
    assert m.get_payload(decode=True) == body and str(m["Subject"]).strip() == ("word " * 400).strip()
    multipart = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n"
                 + b"y" * 2500 + b"\r\n--b--\r\n")
    out = fit_long_lines(multipart)  # a part is not re-encoded: its lines are broken, as Postfix does
    assert max(map(len, out.split(b"\r\n"))) <= 998 and out.replace(b"\r\n", b"") == multipart.replace(b"\r\n", b"")
    assert fit_long_lines(CRON_MAIL) is CRON_MAIL


async def test_postfix_compatibility_through_the_daemon(start_daemon, tmp_path) -> None:
    """cron output with a 3000-octet line and a leading mbox From line, options Postfix ignores; the same
    exit code for a bad address as with the daemon down (67), and a bad -t address reported."""
    sink = await Sink().start()
    try:
        d = await start_daemon(_overrides(sink), users=USERS)
        long_line = b"0123456789" * 300
        code, out = await _run([*mailrelayd_cmd(), "sendmail", "-Am", "-G", "-m", "-q1h", "-t", "-i"],
                               b"From root@host Mon Nov 30 12:00:00 2026\nFrom: root\nTo: x@, t4@dest.test\n"
                               b"Subject: report\n\n" + long_line + b"\n", d.config)
        assert code == 0 and "x@: 553 5.1.3" in out, out
        (msg,) = await sink.wait_for(1)
        assert msg.rcpts == ["t4@dest.test"]
        m = _parsed(msg.data)
        assert m["Subject"] == "report" and m.get_payload(decode=True) == long_line + b"\r\n"
        code, out = await _run([*mailrelayd_cmd(), "sendmail", "x@"], b"Subject: x\n\nx\n", d.config)
        assert code == sm.EX_NOUSER and "5.1.3" in out, out
    finally:
        await sink.stop()
