"""The outbound SMTP client (mailrelayd.delivery.smtpclient): its reply parser and message framing
in memory, then the transport against scripted raw servers on loopback, under asyncio and uvloop:
a pipelined group goes out in one write (RFC 2920), refusals inside a group, hostile replies,
STARTTLS response injection and AUTH."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from mailrelayd.config import parse_config
from mailrelayd.delivery.mx import MxResolver
from mailrelayd.delivery.smtpclient import BadReply, Reply, ReplyParser, SmtpClient, message_bytes, parse_ehlo
from mailrelayd.delivery.transport import RcptResult, Transport
from tests.conftest import base_config, deep_merge, write_config

LOOPS = ["asyncio", "uvloop"]
MSG = b"From: a@example.com\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\nbody\r\n"
EHLO_PIPELINING = b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Seen"], Awaitable[None]]


# --- the parser and the framing, in memory ---------------------------------------------------
def test_parser_joins_multiline_replies_split_anywhere() -> None:
    raw = b"250-mx.test says hi\r\n250-PIPELINING\r\n250 SIZE 10\r\n354 go ahead\r\n"
    for cut in range(1, len(raw)):
        p = ReplyParser()
        got = p.feed(raw[:cut]) + p.feed(raw[cut:])
        assert got == [Reply(250, "mx.test says hi\nPIPELINING\nSIZE 10"), Reply(354, "go ahead")], cut


def test_a_huge_reply_is_quoted_in_part() -> None:
    """A reply can be megabytes (512 lines of 16 KB); results, DSNs and logs quote 2000 characters."""
    p = ReplyParser()
    (r,) = p.feed(b"".join(b"550-" + b"x" * 16000 + b"\r\n" for _ in range(100)) + b"550 5.1.1 no\r\n")
    assert len(r.text) > 1_000_000
    assert len(r.line()) == 2000 and r.line().startswith("550 xxx") and r.line().endswith(" [...]")
    assert Reply(550, "5.1.1 no such user").line() == "550 5.1.1 no such user"


def test_parser_takes_bare_lf_and_code_only_lines() -> None:
    assert ReplyParser().feed(b"250\n221-bye\n221 now\n") == [Reply(250, ""), Reply(221, "bye\nnow")]


@pytest.mark.parametrize("raw", [
    b"hello there\r\n",                 # not a reply at all
    b"25 short\r\n",
    b"250x junk\r\n",
    b"250-first\r\n251 changed code\r\n",  # RFC 5321 §4.2.1: one code per reply
    b"250 " + b"x" * 20000 + b"\r\n",   # an endless line
    b"250 " + b"x" * 20000,             # the same, never terminated
])
def test_parser_refuses_what_is_not_a_reply(raw: bytes) -> None:
    with pytest.raises(BadReply):
        ReplyParser().feed(raw)


def test_ehlo_keywords_and_old_auth_form() -> None:
    ext = parse_ehlo(Reply(250, "mx.test\nPIPELINING\nSIZE 2000\nAUTH LOGIN\nAUTH=PLAIN\nstarttls"))
    assert ext == {"pipelining": "", "size": "2000", "auth": "LOGIN PLAIN", "starttls": ""}


def test_message_sent_as_it_is_when_it_needs_no_change() -> None:
    pieces = message_bytes(MSG)
    assert pieces[0] is MSG and pieces[1] == b".\r\n"


@pytest.mark.parametrize(("data", "wire"), [
    (b".lead\r\nmid\r\n.\r\n..x\r\n", b"..lead\r\nmid\r\n..\r\n...x\r\n.\r\n"),  # RFC 5321 §4.5.2
    (b"a\nb\rc\r\n", b"a\r\nb\r\nc\r\n.\r\n"),  # bare LF and CR become CRLF
    (b"no end", b"no end\r\n.\r\n"),
    (b"x\n.y", b"x\r\n..y\r\n.\r\n"),
    (b"", b".\r\n"),
])
def test_message_framing(data: bytes, wire: bytes) -> None:
    assert b"".join(message_bytes(data)) == wire


# --- scripted servers ----------------------------------------------------------------------------
class Seen:
    """What a scripted server received: raw reads and whole sessions."""

    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.sessions = 0
        self.data: list[bytes] = []
        self.auth: list[bytes] = []


async def _line(reader: asyncio.StreamReader, seen: Seen) -> bytes:
    line = await reader.readline()
    seen.reads.append(line)
    return line


async def _body(reader: asyncio.StreamReader, seen: Seen) -> bytes:
    data = await reader.readuntil(b"\r\n.\r\n")
    seen.data.append(data)
    return data


async def _serial_transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen,
                              *first: bytes) -> None:
    """Answer ``first`` replies, then MAIL, RCPT, DATA, the message and QUIT, one command at a time."""
    for reply in (*first, b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
        await _line(reader, seen)
        writer.write(reply)
    await _body(reader, seen)
    writer.write(b"250 queued\r\n")
    await _line(reader, seen)


async def _serve(handler: Handler, body: Callable[[int, Seen], Awaitable[None]], rcvbuf: int = 0) -> Seen:
    seen = Seen()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.sessions += 1
        try:
            writer.write(b"220 mx.test ESMTP\r\n")
            await handler(reader, writer, seen)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    sock = socket.socket()
    if rcvbuf:  # before listen(): accepted sockets inherit it, and it caps the kernel's autotuning
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(on_client, sock=sock)
    try:
        await body(server.sockets[0].getsockname()[1], seen)
    finally:
        server.close()
    return seen


def _transport(tmp_path: Path, tls_files: tuple[Path, Path], port: int, **route: Any) -> Transport:
    write_config(tmp_path, {})
    data = deep_merge(base_config(tls_files), {
        "routes": [{"domain": "*", "host": f"127.0.0.1:{port}", "tls": "none", **route}],
        "delivery": {"mail_timeout": "3s", "rcpt_timeout": "3s", "data_init_timeout": "3s",
                     "data_done_timeout": "3s", "greeting_timeout": "3s"}})
    cfg = parse_config(data, tmp_path / "mailrelayd.toml")
    return Transport(cfg, MxResolver(cfg.dns))


def _run(loop: str, coro: Awaitable[None]) -> None:
    (uvloop.run if loop == "uvloop" else asyncio.run)(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


async def _deliver(t: Transport, rcpts: list[str], data: bytes = MSG) -> list[RcptResult]:
    return await t.deliver("dest.test", "a@example.com", rcpts, data)


async def _deferred_unsent(t: Transport, seen: Seen, enhanced: str) -> None:
    """One delivery attempt ends deferred with ``enhanced`` and the server never got a message."""
    res = await _deliver(t, ["a@dest.test"])
    await t.close()
    assert res[0].temporary and res[0].enhanced == enhanced, res[0]
    assert seen.data == []


# --- pipelining --------------------------------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
def test_pipelined_group_is_one_write_and_replies_are_matched_in_order(
        loop: str, tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await _line(reader, seen)  # EHLO
        writer.write(EHLO_PIPELINING)
        for _ in range(2):  # two messages on one session
            group = await reader.read(65536)
            seen.reads.append(group)
            writer.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 <b@dest.test>: no such user\r\n"
                         b"250 2.1.5 ok\r\n354 go\r\n")
            await _body(reader, seen)
            writer.write(b"250 2.0.0 queued\r\n")
        await _line(reader, seen)
        writer.write(b"221 bye\r\n")

    async def body(port: int, seen: Seen) -> None:
        t = _transport(tmp_path, tls_files, port)
        for _ in range(2):
            res = await _deliver(t, ["a@dest.test", "b@dest.test", "c@dest.test"])
            assert [(r.code, r.stage) for r in res] == [(250, "end of DATA"), (550, "RCPT TO"),
                                                         (250, "end of DATA")]
            assert res[1].remote_reply == "550 5.1.1 <b@dest.test>: no such user"
        await t.close()
        groups = [r for r in seen.reads if r.startswith(b"MAIL")]
        assert len(groups) == 2
        for g in groups:  # MAIL, three RCPTs and DATA arrived in one read: one write, no waiting
            lines = g.split(b"\r\n")
            assert lines[0] == b"MAIL FROM:<a@example.com> SIZE=%d" % len(MSG)
            assert lines[1:5] == [b"RCPT TO:<a@dest.test>", b"RCPT TO:<b@dest.test>", b"RCPT TO:<c@dest.test>",
                                  b"DATA"]
        assert seen.sessions == 1 and seen.data == [MSG + b".\r\n"] * 2

    _run(loop, _serve(handler, body))


@pytest.mark.parametrize("loop", LOOPS)
def test_refused_mail_in_a_group_ends_a_stray_354_with_a_lone_dot(
        loop: str, tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    """MAIL refused, the RCPT refused in turn, but DATA answered 354 (RFC 2920 §3.1 allows it): the
    client sends only the terminator, the recipient fails with MAIL's reply, the session lives on."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await _line(reader, seen)
        writer.write(EHLO_PIPELINING)
        seen.reads.append(await reader.read(65536))
        writer.write(b"553 5.7.1 sender refused\r\n503 5.5.1 need MAIL\r\n354 go anyway\r\n")
        await _line(reader, seen)  # the lone dot
        writer.write(b"554 5.5.1 no valid recipients\r\n")
        seen.reads.append(await reader.read(65536))  # the next message
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await _body(reader, seen)
        writer.write(b"250 2.0.0 queued\r\n")
        await _line(reader, seen)

    async def body(port: int, seen: Seen) -> None:
        t = _transport(tmp_path, tls_files, port)
        res = await _deliver(t, ["a@dest.test"])
        assert (res[0].code, res[0].stage, res[0].remote_reply) == (553, "MAIL FROM", "553 5.7.1 sender refused")
        assert seen.reads[-1] == b".\r\n"
        res = await _deliver(t, ["a@dest.test"])
        assert res[0].ok
        await t.close()
        assert seen.sessions == 1 and seen.data == [MSG + b".\r\n"]

    _run(loop, _serve(handler, body))


@pytest.mark.parametrize("loop", LOOPS)
def test_every_recipient_refused_in_a_group_sends_no_message(
        loop: str, tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await _line(reader, seen)
        writer.write(EHLO_PIPELINING)
        seen.reads.append(await reader.read(65536))
        writer.write(b"250 ok\r\n550 5.1.1 no\r\n450 4.2.1 later\r\n554 5.5.1 no valid recipients\r\n")
        seen.reads.append(await reader.read(65536))  # the session is checked before it is used again

    async def body(port: int, seen: Seen) -> None:
        t = _transport(tmp_path, tls_files, port)
        res = await _deliver(t, ["a@dest.test", "b@dest.test"])
        assert [(r.code, r.enhanced) for r in res] == [(550, "5.1.1"), (450, "4.2.1")]
        await t.close()
        assert seen.data == []
        assert seen.reads[-1] in (b"RSET\r\n", b"QUIT\r\n", b"")  # never a message

    _run(loop, _serve(handler, body))


# --- hostile and broken servers ------------------------------------------------------------------
HOSTILE = {
    "garbage_after_ehlo": b"HTTP/1.1 400 Bad Request\r\n",
    "code_changes_mid_reply": b"250-ok\r\n550 no\r\n",
    "endless_line": b"250 " + b"A" * 100000,
    "closes_after_mail": b"250 ok\r\n",
}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_broken_server_defers_and_never_hangs(loop: str, case: str, tmp_path: Path,
                                                tls_files: tuple[Path, Path]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await _line(reader, seen)
        writer.write(EHLO_PIPELINING)
        seen.reads.append(await reader.read(65536))
        writer.write(HOSTILE[case])
        await writer.drain()
        if case == "closes_after_mail":
            return  # the handler's end closes the connection mid-group
        await reader.read(65536)  # until the client gives up

    async def body(port: int, seen: Seen) -> None:
        await _deferred_unsent(_transport(tmp_path, tls_files, port), seen, "4.4.2")

    _run(loop, _serve(handler, body))


@pytest.mark.parametrize("loop", LOOPS)
def test_silence_after_data_command_times_out(loop: str, tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await _line(reader, seen)
        writer.write(EHLO_PIPELINING)
        seen.reads.append(await reader.read(65536))
        writer.write(b"250 ok\r\n250 ok\r\n")  # and nothing for DATA
        await reader.read(65536)

    async def body(port: int, seen: Seen) -> None:
        t = _transport(tmp_path, tls_files, port)
        t.cfg = parse_config(deep_merge(base_config(tls_files), {
            "routes": [{"domain": "*", "host": f"127.0.0.1:{port}", "tls": "none"}],
            "delivery": {"data_init_timeout": "0.5s"}}), tmp_path / "mailrelayd.toml")
        res = await _deliver(t, ["a@dest.test"])
        await t.close()
        assert res[0].temporary and res[0].text.endswith("timed out while sending DATA command")

    _run(loop, _serve(handler, body))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_cancelled_wait_ends_the_session(loop: str) -> None:
    """A delivery cancelled while a reply is owed (shutdown) must not leave the session for reuse:
    that reply would answer the next command."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await _line(reader, seen)
        await reader.read(65536)  # never answers EHLO

    async def body(port: int, seen: Seen) -> None:
        client, greeting = await SmtpClient.connect("127.0.0.1", port, connect_timeout=5, greeting_timeout=5)
        assert greeting.code == 220
        task = asyncio.ensure_future(client.ehlo("client.test", 30))
        await asyncio.sleep(0.1)
        assert client.is_connected
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not client.is_connected

    _run(loop, _serve(handler, body))


# --- STARTTLS and AUTH -----------------------------------------------------------------------------
@pytest.fixture
def server_ctx(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_files)
    return ctx


@pytest.mark.parametrize("loop", LOOPS)
def test_starttls_response_injection_is_refused(loop: str, tmp_path: Path, tls_files: tuple[Path, Path],
                                                server_ctx: ssl.SSLContext) -> None:
    """A reply sent in the clear behind the 220 (the CVE-2011-0411 family) would be read as the answer
    to the first command inside TLS: the session is dropped instead (RFC 3207 §4)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await _line(reader, seen)
        writer.write(b"250-mx.test\r\n250 STARTTLS\r\n")
        await _line(reader, seen)
        writer.write(b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n")
        await writer.start_tls(server_ctx)  # a server that then behaves: only the injection is wrong
        await _serial_transaction(reader, writer, seen, b"250 mx.test\r\n")

    async def body(port: int, seen: Seen) -> None:
        await _deferred_unsent(_transport(tmp_path, tls_files, port, tls="may"), seen, "4.7.5")

    _run(loop, _serve(handler, body))


@pytest.mark.parametrize("loop", LOOPS)
def test_starttls_offered_then_refused_defers(loop: str, tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    """STARTTLS in EHLO, then 454 to the command (RFC 3207 §4): a TLS failure, never a silent
    plaintext delivery (delivery.tls_fallback_plaintext, when set, applies to MX delivery, not routes)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await _line(reader, seen)
        writer.write(b"250-mx.test\r\n250 STARTTLS\r\n")
        await _line(reader, seen)
        writer.write(b"454 4.7.0 TLS not available due to local problem\r\n")
        await reader.read(65536)

    async def body(port: int, seen: Seen) -> None:
        t = _transport(tmp_path, tls_files, port, tls="may")
        res = await _deliver(t, ["a@dest.test"])
        await t.close()
        assert res[0].temporary and res[0].enhanced == "4.7.5", res[0]
        assert "STARTTLS refused" in res[0].text and "454 4.7.0" in res[0].text
        assert seen.data == []

    _run(loop, _serve(handler, body))


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("mechs", ["PLAIN LOGIN", "LOGIN"])
def test_route_auth_inside_starttls(loop: str, mechs: str, tmp_path: Path, tls_files: tuple[Path, Path],
                                    server_ctx: ssl.SSLContext) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await _line(reader, seen)
        writer.write(b"250-mx.test\r\n250-AUTH " + mechs.encode() + b"\r\n250 STARTTLS\r\n")
        assert await _line(reader, seen) == b"STARTTLS\r\n"  # never AUTH in the clear
        writer.write(b"220 go ahead\r\n")
        await writer.start_tls(server_ctx)
        await _line(reader, seen)
        writer.write(b"250-mx.test\r\n250 AUTH " + mechs.encode() + b"\r\n")
        line = await _line(reader, seen)
        if line.startswith(b"AUTH PLAIN "):
            seen.auth.append(base64.b64decode(line.split()[2]))
        else:
            assert line == b"AUTH LOGIN\r\n"
            for prompt in (b"VXNlcm5hbWU6", b"UGFzc3dvcmQ6"):
                writer.write(b"334 " + prompt + b"\r\n")
                seen.auth.append(base64.b64decode((await _line(reader, seen)).strip()))
        writer.write(b"235 2.7.0 ok\r\n")
        await _serial_transaction(reader, writer, seen)

    async def body(port: int, seen: Seen) -> None:
        t = _transport(tmp_path, tls_files, port, tls="encrypt", username="relay-user", password="s3cret pass")
        res = await _deliver(t, ["a@dest.test"])
        await t.close()
        assert res[0].ok, res[0]
        want = [b"\0relay-user\0s3cret pass"] if mechs.startswith("PLAIN") else [b"relay-user", b"s3cret pass"]
        assert seen.auth == want
        assert seen.data == [MSG + b".\r\n"]

    _run(loop, _serve(handler, body))


# --- a receiver that reads slowly, and one that stops reading -------------------------------------
BIG = b"From: a@example.com\r\nSubject: big\r\n\r\n" + b"x\r\n" * 4_000_000  # 12 MB


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("reader", ["slow", "stopped"])
def test_data_block_timeout_is_about_progress(loop: str, reader: str, tmp_path: Path,
                                              tls_files: tuple[Path, Path]) -> None:
    """The receiver's buffer is 32 KB, so most of the message waits in ours. One that keeps taking it
    2 MB at a time with 0.3 s pauses (over a second in all; data_block_timeout is 0.5 s) gets all of
    it; one that takes nothing more after the first 256 KB is dropped after data_block_timeout, not
    data_done_timeout."""
    async def handler(r: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await _line(r, seen)
        writer.write(EHLO_PIPELINING.replace(b"SIZE 1000000", b"SIZE 100000000"))
        seen.reads.append(await r.read(4096))
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        got = bytearray()
        while not got.endswith(b"\r\n.\r\n"):
            burst = len(got) + (2 << 20)
            while len(got) < burst and not got.endswith(b"\r\n.\r\n"):
                if reader == "stopped" and len(got) > 256 * 1024:
                    await asyncio.sleep(30)
                chunk = await r.read(64 * 1024)
                if not chunk:
                    return
                got += chunk
            await asyncio.sleep(0.3)
        seen.data.append(bytes(got))
        writer.write(b"250 queued\r\n")
        await _line(r, seen)

    async def body(port: int, seen: Seen) -> None:
        t = _transport(tmp_path, tls_files, port)
        t.cfg = parse_config(deep_merge(base_config(tls_files), {
            "routes": [{"domain": "*", "host": f"127.0.0.1:{port}", "tls": "none"}],
            "delivery": {"data_block_timeout": "0.5s", "data_done_timeout": "10s"}}), tmp_path / "mailrelayd.toml")
        t0 = time.monotonic()
        res = await _deliver(t, ["a@dest.test"], BIG)
        took = time.monotonic() - t0
        await t.close()
        if reader == "slow":
            assert res[0].ok, res[0]
            assert seen.data == [BIG + b".\r\n"]
        else:
            assert res[0].temporary and res[0].text.endswith("timed out while sending message body"), res[0]
            assert took < 5, took  # data_block_timeout decided, not data_done_timeout

    _run(loop, _serve(handler, body, rcvbuf=32 * 1024))


# --- Postfix's smtp-sink: a real server that offers PIPELINING --------------------------------------
SMTP_SINK = next((p for p in ("/usr/sbin/smtp-sink", "/usr/lib/postfix/smtp-sink") if Path(p).exists()), None)


@pytest.mark.skipif(SMTP_SINK is None or os.geteuid() != 0,
                    reason="Postfix's smtp-sink is not installed (only the benchmarks need postfix), or not root")
@pytest.mark.parametrize("loop", LOOPS)
def test_against_postfix_smtp_sink(loop: str, tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    """Messages of several recipients, one after another on reused sessions and in parallel, all
    arrive intact at Postfix's smtp-sink (which announces PIPELINING)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    where = Path(tempfile.mkdtemp(prefix="smtp-sink-"))  # smtp-sink drops to nobody before it writes
    where.chmod(0o777)
    dump = where / "sink.dump"
    assert SMTP_SINK is not None
    sink = subprocess.Popen([SMTP_SINK, "-u", "nobody", "-D", str(dump), f"127.0.0.1:{port}", "64"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    msgs = [MSG.replace(b"Subject: hi", b"Subject: n%d" % i).replace(b"body", b".dot line %d\r\n." % i)
            for i in range(30)]

    async def body() -> None:
        for _ in range(100):
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            await asyncio.sleep(0.05)
        t = _transport(tmp_path, tls_files, port)
        first = await _deliver(t, ["a@dest.test", "b@dest.test"], msgs[0])
        rest = await asyncio.gather(*(_deliver(t, ["a@dest.test", "b@dest.test", "c@dest.test"], m)
                                      for m in msgs[1:]))
        await t.close()
        bad = [r for res in [first, *rest] for r in res if not r.ok]
        assert not bad, bad[:3]

    try:
        _run(loop, body())
        text = dump.read_bytes()
    finally:
        sink.terminate()
        sink.wait(5)
        shutil.rmtree(where, ignore_errors=True)
    for i in range(30):  # smtp-sink keeps the message as it arrived, dot-stuffing undone
        assert b"Subject: n%d\r\n" % i in text or b"Subject: n%d\n" % i in text
        assert b".dot line %d" % i in text
