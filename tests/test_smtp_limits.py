"""Limits, timeouts, hostile input and SMTP smuggling: every case gets a precise reply code
(never a traceback, never a hang), and nothing refused reaches the spool."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from tests.support.smtptalk import SmtpTalk


async def _ready(port: int, rcpt: str = "x@other.example") -> SmtpTalk:
    t = await SmtpTalk.connect(port)
    assert (await t.ehlo())[0] == 250
    assert (await t.cmd("MAIL FROM:<app@example.com>"))[0] == 250
    assert (await t.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
    return t


async def _spooled(d) -> int:
    return (await d.spool.stats()).messages


async def test_size_declared_too_big(start_daemon) -> None:
    d = await start_daemon({"limits": {"max_message_size": "64KB"}})
    t = await SmtpTalk.connect(d.port("relay"))
    await t.ehlo()
    code, text = await t.cmd(f"MAIL FROM:<app@example.com> SIZE={64 * 1024 + 1}")
    assert code == 552 and text.startswith("5.3.4")
    await t.close()


async def test_size_lied_about_enforced_on_data(start_daemon) -> None:
    d = await start_daemon({"limits": {"max_message_size": "64KB"}})
    t = await SmtpTalk.connect(d.port("relay"))
    await t.ehlo()
    assert (await t.cmd("MAIL FROM:<app@example.com> SIZE=100"))[0] == 250
    assert (await t.cmd("RCPT TO:<x@other.example>"))[0] == 250
    assert (await t.cmd("DATA"))[0] == 354
    body = b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 2000  # ~144 KB
    code, text = await t.cmd(body + b".")
    assert code == 552 and text.startswith("5.3.4")
    assert (await t.cmd("NOOP"))[0] == 250  # still in step with the client
    assert await _spooled(d) == 0
    await t.close()


async def test_header_section_over_max_header_size(start_daemon) -> None:
    """A header block past limits.max_header_size is refused 552 5.3.4 without being read to its
    end (a few MB of short lines held the event loop for seconds); up to the limit is fine."""
    d = await start_daemon({"limits": {"max_header_size": "8KB"}})
    t = await _ready(d.port("relay"))
    assert (await t.cmd("DATA"))[0] == 354
    big = b"Subject: many\r\n" + b"X:\r\n" * 5000 + b"\r\nbody\r\n"  # 20 KB of header block
    code, text = await t.cmd(big + b".")
    assert (code, text) == (552, "5.3.4 Message header size exceeds limit")
    assert await _spooled(d) == 0
    assert (await t.cmd("MAIL FROM:<app@example.com>"))[0] == 250  # the session goes on
    assert (await t.cmd("RCPT TO:<x@other.example>"))[0] == 250
    assert (await t.cmd("DATA"))[0] == 354
    fits = b"Subject: some\r\n" + b"X-A: b\r\n" * 900 + b"\r\n" + b"body line\r\n" * 5000  # 7 KB of header
    assert (await t.cmd(fits + b"."))[0] == 250
    assert await _spooled(d) == 1
    await t.close()


async def test_too_many_recipients(start_daemon) -> None:
    d = await start_daemon({"limits": {"max_recipients": 3}})
    t = await SmtpTalk.connect(d.port("relay"))
    await t.ehlo()
    await t.cmd("MAIL FROM:<app@example.com>")
    for i in range(3):
        assert (await t.cmd(f"RCPT TO:<r{i}@other.example>"))[0] == 250
    assert await t.cmd("RCPT TO:<r3@other.example>") == (452, "4.5.3 Too many recipients")
    await t.close()


async def test_long_lines(start_daemon) -> None:
    d = await start_daemon()
    t = await _ready(d.port("relay"))
    assert (await t.cmd("DATA"))[0] == 354
    code, text = await t.cmd(b"Subject: x\r\n\r\n" + b"z" * 1200 + b"\r\n.")
    assert code == 500 and text.startswith("5.5.2 Line too long")
    code, text = await t.cmd("NOOP " + "n" * 5000)
    assert (code, text) == (500, "5.5.2 Line too long")
    assert (await t.cmd("NOOP"))[0] == 250
    assert await _spooled(d) == 0
    await t.close()


@pytest.mark.parametrize("payload", [
    b"Subject: a\r\n\r\nline\n.\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<v@other.example>\r\nDATA\r\nx\r\n.",
    b"Subject: a\r\n\r\nline\r.\r\nMAIL FROM:<evil@example.com>\r\n.",
    b"Subject: a\r\n\r\nline\r\n.\nRCPT TO:<v@other.example>\r\n.",
    b"Subject: a\r\n\r\nline\n.\r\nsmuggled\r\n.",
    b"Subject: a\r\n\r\nbare\rcarriage return\r\n.",
    b"Subject: a\r\n\r\nbare line feed\nhere\r\n.",
])
async def test_smtp_smuggling_rejected(start_daemon, payload: bytes) -> None:
    d = await start_daemon()
    t = await _ready(d.port("relay"))
    assert (await t.cmd("DATA"))[0] == 354
    code, text = await t.cmd(payload)
    assert code == 550 and text.startswith("5.6.0"), (code, text)
    # In step: the smuggled commands were part of the refused data, never run.
    assert (await t.cmd("NOOP"))[0] == 250
    assert await _spooled(d) == 0
    await t.close()


async def test_a_helo_name_with_spaces_is_taken(start_daemon) -> None:
    """Devices send their machine name ("EHLO Front Desk PC"): accepted, as Postfix does, and kept in
    Received: without its blanks; a missing name is still 501."""
    d = await start_daemon()
    t = await SmtpTalk.connect(d.port("relay"))
    assert await t.cmd("EHLO") == (501, "5.5.4 Syntax: EHLO hostname")
    assert (await t.ehlo("Front  Desk PC"))[0] == 250
    assert (await t.cmd("MAIL FROM:<app@example.com>"))[0] == 250
    assert (await t.cmd("RCPT TO:<x@other.example>"))[0] == 250
    assert (await t.cmd("DATA"))[0] == 354
    code, text = await t.cmd(b"From: app@example.com\r\nSubject: hi\r\n\r\nbody\r\n.")
    assert code == 250, text
    body = await d.spool.body(text.rsplit(" ", 1)[1])
    assert body is not None and body.startswith(b"Received: from FrontDeskPC ([127.0.0.1])"), body[:80]
    await t.close()


@pytest.mark.parametrize(("helo", "received"), [("été.example", b"xn--t-9fab.example"),
                                                ("bad\u00fchost..x", b"bad?host..x")])
async def test_a_non_ascii_helo_name_in_received(start_daemon, helo: str, received: bytes) -> None:
    """An internationalized name is written in its A-label form; another keeps its shape."""
    d = await start_daemon()
    t = await SmtpTalk.connect(d.port("relay"))
    assert (await t.ehlo(helo))[0] == 250
    assert (await t.cmd("MAIL FROM:<app@example.com>"))[0] == 250
    assert (await t.cmd("RCPT TO:<x@other.example>"))[0] == 250
    assert (await t.cmd("DATA"))[0] == 354
    code, text = await t.cmd(b"From: app@example.com\r\nSubject: hi\r\n\r\nbody\r\n.")
    assert code == 250, text
    body = await d.spool.body(text.rsplit(" ", 1)[1])
    assert body is not None and body.startswith(b"Received: from " + received + b" ([127.0.0.1])"), body[:80]
    await t.close()


async def test_dot_stuffing_and_empty_body(start_daemon) -> None:
    d = await start_daemon()
    t = await _ready(d.port("relay"))
    assert (await t.cmd("DATA"))[0] == 354
    code, text = await t.cmd(b"From: app@example.com\r\nSubject: dots\r\n\r\n..leading dot\r\n..\r\n...three\r\n.")
    assert code == 250
    body = await d.spool.body(text.rsplit(" ", 1)[1])
    assert body is not None and body.endswith(b"\r\n\r\n.leading dot\r\n.\r\n..three\r\n")
    assert (await t.cmd("MAIL FROM:<app@example.com>"))[0] == 250
    assert (await t.cmd("RCPT TO:<x@other.example>"))[0] == 250
    assert (await t.cmd("DATA"))[0] == 354
    code, text = await t.cmd(b".")  # an empty message: From/Date/Message-ID are added, like a submission server
    assert code == 250, text
    body = await d.spool.body(text.rsplit(" ", 1)[1])
    assert body is not None and b"\r\nFrom: <app@example.com>\r\n" in body
    await t.close()


async def test_command_sequence_errors(start_daemon) -> None:
    d = await start_daemon()
    t = await SmtpTalk.connect(d.port("relay"))
    assert (await t.cmd("MAIL FROM:<a@example.com>"))[0] == 503  # before EHLO
    assert (await t.cmd("EHLO"))[:1] == (501,)
    await t.ehlo()
    assert (await t.cmd("RCPT TO:<a@other.example>")) == (503, "5.5.1 Error: need MAIL command")
    assert (await t.cmd("DATA")) == (503, "5.5.1 Error: need MAIL command")
    assert (await t.cmd("MAIL FROM:<a@example.com>"))[0] == 250
    assert (await t.cmd("MAIL FROM:<a@example.com>")) == (503, "5.5.1 Error: nested MAIL command")
    assert (await t.cmd("DATA")) == (503, "5.5.1 Error: need RCPT command")
    assert (await t.cmd("MAIL TO:<a@example.com>"))[0] == 503
    await t.close()


async def test_garbage_commands_get_replies(start_daemon) -> None:
    d = await start_daemon({"limits": {"max_errors": 50}})
    t = await SmtpTalk.connect(d.port("relay"))
    for junk in (b"\x00\x01\x02\xff\xfe", b"XYZZY", b"\xc3\x28 bad utf8", b"MAIL FROM:", b"HELO",
                 b"MAIL FROM:<a@b.example> SIZE=abc", b"RCPT", b"STARTTLS now"):
        code, _ = await t.cmd(junk)
        assert 500 <= code < 600, junk
    await t.ehlo()
    assert (await t.cmd("MAIL FROM:<a@example.com> FOO=BAR")) == (555, "5.5.4 unsupported parameter FOO")
    assert (await t.cmd("NOOP"))[0] == 250
    await t.close()


async def test_too_many_errors_closes(start_daemon) -> None:
    d = await start_daemon({"limits": {"max_errors": 3}})
    t = await SmtpTalk.connect(d.port("relay"))
    for _ in range(2):
        assert (await t.cmd("BOGUS"))[0] == 500
    await t.send(b"BOGUS\r\n")
    assert (await t.reply())[0] == 500
    assert await t.reply() == (421, "4.7.0 Too many errors, closing connection")
    assert await t.closed()


async def test_pipelining_in_one_write(start_daemon) -> None:
    d = await start_daemon()
    t = await SmtpTalk.connect(d.port("relay"))
    await t.ehlo()
    await t.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@other.example>\r\nRCPT TO:<c@other.example>\r\nDATA\r\n")
    assert [(await t.reply())[0] for _ in range(4)] == [250, 250, 250, 354]
    code, _ = await t.cmd(b"From: a@example.com\r\n\r\nhi\r\n.")
    assert code == 250
    await t.close()


async def test_client_talking_before_greeting(start_daemon) -> None:
    d = await start_daemon()
    r, w = await asyncio.open_connection("127.0.0.1", d.port("relay"))
    w.write(b"EHLO eager.example\r\n")
    await w.drain()
    await asyncio.sleep(0)
    first = await asyncio.wait_for(r.readline(), 5)
    # Either we saw the early talker (554, then close) or the greeting won the race; never a hang.
    if first.startswith(b"554 5.5.0"):
        assert await asyncio.wait_for(r.read(), 5) == b""
    else:
        assert first.startswith(b"220 ")
        assert (await asyncio.wait_for(r.readline(), 5)).startswith(b"250")
    w.close()


async def test_command_timeout(start_daemon) -> None:
    d = await start_daemon({"limits": {"command_timeout": "0.5s"}})
    t = await SmtpTalk.connect(d.port("relay"))
    assert await t.reply(timeout=5) == (421, "4.4.2 Timeout exceeded, closing connection")
    assert await t.closed()


async def test_data_timeout(start_daemon) -> None:
    d = await start_daemon({"limits": {"data_timeout": "0.5s"}})
    t = await _ready(d.port("relay"))
    assert (await t.cmd("DATA"))[0] == 354
    await t.send(b"Subject: slow\r\n\r\npartial line without end")
    assert (await t.reply(timeout=5))[0] == 421
    assert await t.closed()
    assert await _spooled(d) == 0


async def test_connection_limits(start_daemon) -> None:
    d = await start_daemon({"limits": {"max_connections_per_ip": 2, "max_connections": 3}})
    port = d.port("relay")
    a = await SmtpTalk.connect(port)
    b = await SmtpTalk.connect(port)
    c = await SmtpTalk.connect(port, greeting=False)
    assert await c.reply() == (421, "4.7.0 Too many connections, try again later")
    other = await SmtpTalk.connect(port, source="127.0.0.3")  # a different IP still gets in
    e = await SmtpTalk.connect(port, source="127.0.0.4", greeting=False)  # but not past the total
    assert (await e.reply())[0] == 421
    await a.cmd("QUIT")
    await asyncio.sleep(0.1)
    f = await SmtpTalk.connect(port)  # a slot was freed
    for x in (b, other, f):
        await x.close()


async def test_spool_free_space_threshold(start_daemon) -> None:
    d = await start_daemon({"server": {"min_free_space": "1000000GB"}})
    t = await SmtpTalk.connect(d.port("relay"))
    await t.ehlo()
    assert await t.cmd("MAIL FROM:<a@example.com>") == (452, "4.3.1 Insufficient system storage, try again later")
    await t.close()


async def test_spool_write_failure_never_says_250(start_daemon, monkeypatch) -> None:
    """A write that fails inside the commit (disk full during the transaction) gets 452, not 250."""
    from mailrelayd.spool import store

    d = await start_daemon()
    t = await _ready(d.port("relay"))

    def full(c, msgs, kinds):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "_insert_many", full)
    assert (await t.cmd("DATA"))[0] == 354
    code, text = await t.cmd(b"From: a@example.com\r\n\r\nbody\r\n.")
    assert (code, text) == (452, "4.3.1 Insufficient system storage, try again later")
    monkeypatch.undo()
    assert await _spooled(d) == 0
    await t.close()


async def test_hop_count_stops_at_max_hops(start_daemon) -> None:
    """RFC 5321 §6.3: a message with as many Received fields as limits.max_hops allows (ours counts)
    is refused 554 5.4.6 at the end of DATA; one fewer is accepted. Received fields in the body do
    not count."""
    d = await start_daemon({"limits": {"max_hops": 5}})
    t = await _ready(d.port("relay"))
    assert (await t.cmd("DATA"))[0] == 354
    trace = b"".join(b"Received: from h%d.example by h%d.example; Mon, 30 Nov 2026 08:00:00 +0000\r\n" % (i, i + 1)
                     for i in range(5))
    code, text = await t.cmd(trace + b"Subject: loop\r\n\r\nbody\r\n.")
    assert (code, text) == (554, "5.4.6 Too many hops")
    assert await _spooled(d) == 0
    assert (await t.cmd("MAIL FROM:<app@example.com>"))[0] == 250  # the session goes on
    assert (await t.cmd("RCPT TO:<x@other.example>"))[0] == 250
    assert (await t.cmd("DATA"))[0] == 354
    body = b"Subject: four hops\r\n\r\n" + trace  # Received lines in the body are text
    assert (await t.cmd(trace.split(b"\r\n", 1)[1] + body + b"."))[0] == 250
    assert await _spooled(d) == 1
    await t.close()


async def _settled(*daemons) -> list:
    """Every row of the daemons' history once all their queues are empty."""
    from mailrelayd.spool.store import HistoryQuery

    async def wait() -> list:
        while True:
            rows = [r for d in daemons for r in await d.spool.history(HistoryQuery())]
            queued = [(await d.spool.stats()).messages for d in daemons]
            if rows and not any(queued):
                return rows
            await asyncio.sleep(0.1)
    return await asyncio.wait_for(wait(), 30)


def _relay_to(port: int, to_port: int, hostname: str | None = None, max_hops: int = 25) -> dict:
    """A relay listener on ``port`` (loopback is trusted) whose every domain is routed to ``to_port``."""
    cfg = {"listeners": [{"name": "relay", "address": f"127.0.0.1:{port}", "mode": "relay", "tls": "none"}],
           "limits": {"max_hops": max_hops}, "routes": [{"domain": "*", "host": f"127.0.0.1:{to_port}"}]}
    if hostname:
        cfg["server"] = {"hostname": hostname}
    return cfg


async def _send_loop_message(port: int) -> None:
    t = await _ready(port, rcpt="someone@looped.example")
    assert (await t.cmd("DATA"))[0] == 354
    assert (await t.cmd(b"From: <app@example.com>\r\nSubject: loop\r\n\r\nbody\r\n."))[0] == 250
    await t.close()


async def test_route_back_to_itself_is_a_loop(start_daemon) -> None:
    """A route that points at the relay's own listener (a typo, or an MX that names this host): the
    server greets with our own host name, so the first attempt bounces the recipient with 5.4.6
    (as Postfix's "loops back to myself"), and the bounce, routed the same way, ends there too."""
    from tests.support.pg import free_port

    port = free_port()
    d = await start_daemon(_relay_to(port, port))
    await _send_loop_message(port)
    rows = await _settled(d)
    looped = [r for r in rows if r.recipient == "someone@looped.example"]
    assert [r.state for r in looped] == ["bounced"], rows
    assert "5.4.6" in looped[0].last_reply and "loops back to myself" in looped[0].last_reply
    assert "with my own hostname relay.test.example" in looped[0].last_reply
    bounces = [r for r in rows if r.recipient == "app@example.com"]
    # The bounce (null sender) loops the same way; a bounce of a bounce is never made.
    assert [r.state for r in bounces] == ["bounced"] and len(rows) == 2, rows


async def test_two_relays_routed_at_each_other_end_at_max_hops(start_daemon) -> None:
    """Two relays with their own names, each routed at the other (MX records that name each other):
    no greeting names the sender, but each pass adds a Received field, so the loop ends at
    limits.max_hops with a 554 5.4.6 bounce, and the bounce's own loop ends the same way."""
    from tests.support.pg import free_port

    pa, pb = free_port(), free_port()
    a = await start_daemon(_relay_to(pa, pb, "a.relay.test", max_hops=4))
    b = await start_daemon(_relay_to(pb, pa, "b.relay.test", max_hops=4))
    await _send_loop_message(pa)
    rows = await _settled(a, b)
    looped = [r for r in rows if r.recipient == "someone@looped.example"]
    # Accepted with 1, 2, 3 and 4 Received fields (ours included); the fifth pass was refused.
    assert len(looped) == 4, rows
    assert sorted(r.state for r in looped) == ["bounced", "delivered", "delivered", "delivered"], rows
    assert any("5.4.6 Too many hops" in r.last_reply for r in looped if r.state == "bounced")
    bounces = [r for r in rows if r.recipient == "app@example.com"]
    # The bounce (null sender) loops too: the one made, then a pass per hop; its own 554 ends it
    # without another bounce.
    assert len(bounces) == 5 and len(rows) == 9, rows
    assert [r.state for r in bounces].count("bounced") == 1, rows
