"""The SMTP client against scriptable loopback servers, with MX lookups served by a loopback DNS responder."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import mailrelayd.delivery.transport as transport_mod
from mailrelayd.config import Config, parse_config
from mailrelayd.delivery.mx import MxResolver
from mailrelayd.delivery.transport import Transport
from tests.conftest import base_config, deep_merge, write_config
from tests.support.dnsserver import DnsServer
from tests.support.sink import Sink
from tests.test_smtpclient import EHLO_PIPELINING, Seen, _line, _serial_transaction, _serve

MSG = (b"From: a@example.com\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\n"
       b"line one\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n")


@pytest.fixture
def server_tls(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_files)
    return ctx


@pytest.fixture(params=[False, True], ids=["serial", "pipelined"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    """Every test against the sink runs with and without PIPELINING offered (RFC 2920)."""
    return bool(request.param)


@pytest.fixture
async def sink(pipelining: bool) -> AsyncIterator[Sink]:
    s = await Sink(pipelining=pipelining).start()
    yield s
    await s.stop()


@pytest.fixture
def dns_srv() -> Iterator[DnsServer]:
    with DnsServer() as srv:
        yield srv


def _config(tmp_path: Path, tls_files: tuple[Path, Path], over: dict[str, Any]) -> Config:
    write_config(tmp_path, {})  # the users file the base config names
    data = deep_merge(base_config(tls_files), over)
    return parse_config(data, tmp_path / "mailrelayd.toml")


def _transport(tmp_path: Path, tls_files: tuple[Path, Path], port: int, dns_port: int | None = None,
               **delivery: Any) -> Transport:
    over: dict[str, Any] = {"delivery": {"port": port, **delivery}}
    if dns_port is None:
        over["routes"] = [{"domain": "*", "host": f"127.0.0.1:{port}"}]
    else:
        over["routes"] = []
        over["dns"] = {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": "2s"}
    cfg = _config(tmp_path, tls_files, over)
    return Transport(cfg, MxResolver(cfg.dns))


async def test_per_recipient_replies_are_honoured(tmp_path: Path, tls_files: tuple[Path, Path], sink: Sink) -> None:
    sink.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    sink.rcpt_replies["full@dest.test"] = "452 4.2.2 Mailbox full"
    t = _transport(tmp_path, tls_files, sink.port)
    rcpts = ["ok1@dest.test", "gone@dest.test", "full@dest.test", "ok2@dest.test"]
    res = {r.address: r for r in await t.deliver("dest.test", "a@example.com", rcpts, MSG)}
    await t.close()
    assert res["ok1@dest.test"].ok and res["ok2@dest.test"].ok
    assert res["gone@dest.test"].permanent and res["gone@dest.test"].enhanced == "5.1.1"
    assert res["full@dest.test"].temporary and res["full@dest.test"].enhanced == "4.2.2"
    assert "No such user" in res["gone@dest.test"].text
    # One transaction with the accepted recipients only; body intact after dot-stuffing.
    assert len(sink.messages) == 1
    assert sink.messages[0].rcpts == ["ok1@dest.test", "ok2@dest.test"]
    assert sink.messages[0].data.replace(b"\r\n", b"\n") == MSG.replace(b"\r\n", b"\n")


async def test_many_recipients_go_in_several_transactions_on_one_connection(
        tmp_path: Path, tls_files: tuple[Path, Path], sink: Sink) -> None:
    # delivery.max_recipients_per_transaction (Postfix's default_destination_recipient_limit).
    t = _transport(tmp_path, tls_files, sink.port, max_recipients_per_transaction=4)
    rcpts = [f"r{i}@dest.test" for i in range(10)]
    res = await t.deliver("dest.test", "a@example.com", rcpts, MSG)
    await t.close()
    assert [r.address for r in res] == rcpts and all(r.ok for r in res)
    assert [m.rcpts for m in sink.messages] == [rcpts[:4], rcpts[4:8], rcpts[8:]]
    assert sink.connections == 1


@pytest.mark.parametrize("too_many", ["452 4.5.3 Too many recipients", "452 Too many recipients",
                                      "552 5.5.3 Too many recipients (RFC 821's code)",
                                      "552 too many recipients"])
async def test_a_receivers_recipient_limit_sends_the_rest_at_once(
        tmp_path: Path, tls_files: tuple[Path, Path], sink: Sink, too_many: str) -> None:
    # RFC 5321 §4.5.3.1.10: the rest go in the next transaction, not at the next retry; a 552 for
    # this reason is temporary.
    sink.max_rcpts, sink.too_many_reply = 3, too_many
    sink.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    t = _transport(tmp_path, tls_files, sink.port)
    rcpts = [f"r{i}@dest.test" for i in range(4)] + ["gone@dest.test"] + [f"r{i}@dest.test" for i in range(4, 8)]
    res = {r.address: r for r in await t.deliver("dest.test", "a@example.com", rcpts, MSG)}
    await t.close()
    assert res.pop("gone@dest.test").permanent
    assert all(r.ok for r in res.values()), [r.text for r in res.values() if not r.ok]
    assert [len(m.rcpts) for m in sink.messages] == [3, 3, 2]
    assert sorted(a for m in sink.messages for a in m.rcpts) == sorted(res)
    assert sink.connections == 1


@pytest.mark.parametrize("limit", [len(MSG) - 1, len(MSG) + 16])  # aiosmtpd counts dot-stuffed bytes
async def test_a_message_over_the_servers_announced_size_is_not_sent(
        tmp_path: Path, tls_files: tuple[Path, Path], sink: Sink, limit: int) -> None:
    # RFC 1870 §6.1: over the announced limit, refused at once (5.3.4, Postfix's wording) without a
    # MAIL; under it, sent with its SIZE. The connection stays usable for the next message.
    sink.size_limit = limit
    t = _transport(tmp_path, tls_files, sink.port)
    res = await t.deliver("dest.test", "a@example.com", ["r@dest.test"], MSG)
    small = await t.deliver("dest.test", "a@example.com", ["s@dest.test"], b"Subject: s\r\n\r\nx\r\n")
    await t.close()
    assert small[0].ok and sink.connections == 1
    if limit < len(MSG):
        assert (res[0].code, res[0].enhanced) == (552, "5.3.4") and res[0].permanent
        assert f"message size {len(MSG)} exceeds size limit {limit} of server" in res[0].text
        assert [m.rcpts for m in sink.messages] == [["s@dest.test"]] and len(sink.mail_seen) == 1
    else:
        assert res[0].ok and sink.messages[0].mail_options == [f"SIZE={len(MSG)}"]


async def test_a_full_mailbox_552_stays_permanent_and_no_progress_defers(
        tmp_path: Path, tls_files: tuple[Path, Path], sink: Sink) -> None:
    sink.rcpt_replies["full@dest.test"] = "552 5.2.2 Mailbox full"
    sink.max_rcpts = 1
    sink.data_reply = "451 4.3.0 Try later"  # nothing delivered: the rest are not sent again now
    t = _transport(tmp_path, tls_files, sink.port)
    res = {r.address: r for r in await t.deliver("dest.test", "a@example.com",
                                                  ["full@dest.test", "a@dest.test", "b@dest.test"], MSG)}
    await t.close()
    assert res["full@dest.test"].code == 552 and res["full@dest.test"].enhanced == "5.2.2"
    assert res["a@dest.test"].code == 451 and res["b@dest.test"].code == 452
    assert res["b@dest.test"].enhanced == "4.5.3" and len(sink.messages) == 1


async def test_a_reply_out_of_step_ends_the_connection(tmp_path: Path, tls_files: tuple[Path, Path],
                                                      sink: Sink) -> None:
    # A 354 to the final dot: the server may still be in DATA. The next message must not be sent on
    # that connection (its commands would become this one's data).
    sink.data_reply = "354 again?"
    t = _transport(tmp_path, tls_files, sink.port)
    (res,) = await t.deliver("dest.test", "a@example.com", ["x@dest.test"], MSG)
    assert res.temporary and "354 again?" in res.text
    sink.data_reply = "250 2.0.0 Ok"
    (res,) = await t.deliver("dest.test", "a@example.com", ["y@dest.test"], MSG)
    await t.close()
    assert res.ok and sink.connections == 2


async def test_a_greeting_that_never_comes_is_no_connect_timeout(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    held: list[asyncio.StreamWriter] = []  # referenced: Python 3.13 closes a collected writer's connection

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)  # accepts, says nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        t = _transport(tmp_path, tls_files, port, greeting_timeout="1s")
        (res,) = await t.deliver("dest.test", "a@example.com", ["x@dest.test"], MSG)
        await t.close()
    finally:
        for w in held:
            w.close()
        server.close()
    assert res.temporary and res.enhanced == "4.4.2", res
    assert "timed out while receiving the initial server greeting" in res.text


async def test_opportunistic_starttls(tmp_path: Path, tls_files: tuple[Path, Path],
                                      server_tls: ssl.SSLContext, pipelining: bool) -> None:
    s = await Sink(tls=server_tls, pipelining=pipelining).start()
    try:
        t = _transport(tmp_path, tls_files, s.port)
        res = await t.deliver("dest.test", "a@example.com", ["x@dest.test"], MSG)
        await t.close()
        assert res[0].ok
        assert s.messages[0].tls is True
    finally:
        await s.stop()


async def test_plaintext_when_starttls_not_offered(tmp_path: Path, tls_files: tuple[Path, Path],
                                                   sink: Sink) -> None:
    t = _transport(tmp_path, tls_files, sink.port)
    res = await t.deliver("dest.test", "a@example.com", ["x@dest.test"], MSG)
    await t.close()
    assert res[0].ok and sink.messages[0].tls is False


async def test_route_requiring_tls_defers_without_it(tmp_path: Path, tls_files: tuple[Path, Path],
                                                     sink: Sink) -> None:
    cfg = _config(tmp_path, tls_files, {"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}",
                                                     "tls": "require"}]})
    t = Transport(cfg, MxResolver(cfg.dns))
    res = await t.deliver("dest.test", "a@example.com", ["x@dest.test"], MSG)
    await t.close()
    assert res[0].temporary and res[0].enhanced == "4.7.5"
    assert sink.messages == []


async def test_route_verify_rejects_untrusted_certificate(tmp_path: Path, tls_files: tuple[Path, Path],
                                                          server_tls: ssl.SSLContext) -> None:
    s = await Sink(tls=server_tls).start()
    try:
        cfg = _config(tmp_path, tls_files, {"routes": [{"domain": "*", "host": f"127.0.0.1:{s.port}",
                                                         "tls": "verify"}]})
        t = Transport(cfg, MxResolver(cfg.dns))
        res = await t.deliver("dest.test", "a@example.com", ["x@dest.test"], MSG)
        await t.close()
        assert res[0].temporary  # self-signed: never falls back to plaintext
        assert s.messages == []
    finally:
        await s.stop()


async def test_drop_after_data_defers(tmp_path: Path, tls_files: tuple[Path, Path], sink: Sink) -> None:
    sink.data_action = "drop"
    t = _transport(tmp_path, tls_files, sink.port)
    res = await t.deliver("dest.test", "a@example.com", ["x@dest.test", "y@dest.test"], MSG)
    await t.close()
    assert sink.dropped == 1
    assert all(r.temporary for r in res)
    assert all(" while sending end of data -- message may be sent more than once: " in r.text for r in res), res


async def test_hang_after_data_times_out_and_defers(tmp_path: Path, tls_files: tuple[Path, Path],
                                                    sink: Sink) -> None:
    sink.data_action = "hang"
    t = _transport(tmp_path, tls_files, sink.port, data_done_timeout="1s")
    t0 = time.monotonic()
    res = await asyncio.wait_for(t.deliver("dest.test", "a@example.com", ["x@dest.test"], MSG), 10)
    await t.close()
    assert res[0].temporary and "timed out" in res[0].text
    # The dot was sent: the receiver may have the message (Postfix's words for it).
    assert res[0].text.endswith("timed out while sending end of data -- message may be sent more than once")
    assert time.monotonic() - t0 < 5


async def test_mail_from_refused_fails_every_recipient(tmp_path: Path, tls_files: tuple[Path, Path],
                                                       sink: Sink) -> None:
    sink.mail_reply = "553 5.7.1 Sender rejected"
    t = _transport(tmp_path, tls_files, sink.port)
    res = await t.deliver("dest.test", "a@example.com", ["x@dest.test", "y@dest.test"], MSG)
    await t.close()
    assert [r.enhanced for r in res] == ["5.7.1", "5.7.1"] and all(r.permanent for r in res)


async def test_connection_reused_at_once_without_rset(tmp_path: Path, tls_files: tuple[Path, Path],
                                                      sink: Sink) -> None:
    t = _transport(tmp_path, tls_files, sink.port)
    for i in range(3):
        res = await t.deliver("dest.test", "a@example.com", [f"r{i}@dest.test"], MSG)
        assert res[0].ok
    await t.close()
    assert len(sink.messages) == 3
    assert sink.connections == 1
    assert len({m.session_id for m in sink.messages}) == 1
    assert sink.rsets == 0  # idle for moments after a completed transaction: no RSET round trip


async def test_connection_idle_for_a_while_is_checked_with_rset(tmp_path: Path, tls_files: tuple[Path, Path],
                                                                sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_mod, "REUSE_WITHOUT_RSET", 0.0)
    t = _transport(tmp_path, tls_files, sink.port)
    for i in range(3):
        assert (await t.deliver("dest.test", "a@example.com", [f"r{i}@dest.test"], MSG))[0].ok
    await t.close()
    assert (sink.connections, sink.rsets, len(sink.messages)) == (1, 2, 3)


async def test_connection_left_mid_transaction_is_reset(tmp_path: Path, tls_files: tuple[Path, Path],
                                                         sink: Sink) -> None:
    """Every recipient refused: MAIL stays open on the server, so the next use must RSET first."""
    sink.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    t = _transport(tmp_path, tls_files, sink.port)
    assert (await t.deliver("dest.test", "a@example.com", ["gone@dest.test"], MSG))[0].permanent
    assert (await t.deliver("dest.test", "a@example.com", ["ok@dest.test"], MSG))[0].ok
    await t.close()
    assert (sink.connections, sink.rsets, len(sink.messages)) == (1, 1, 1)


async def test_reused_connection_closed_by_the_server_is_replaced(tmp_path: Path, tls_files: tuple[Path, Path],
                                                                  sink: Sink) -> None:
    """A server that drops the connection (or says 421) at the next MAIL on a connection: the
    message goes through on a new connection, nothing is deferred."""
    sink.mail_drop_after = 1
    t = _transport(tmp_path, tls_files, sink.port)
    for i in range(3):
        res = await t.deliver("dest.test", "a@example.com", [f"r{i}@dest.test"], MSG)
        assert res[0].ok, res[0].text
    sink.mail_drop_after = 0
    sink.mail_421_after = 1
    for i in range(3):
        res = await t.deliver("dest.test", "a@example.com", [f"s{i}@dest.test"], MSG)
        assert res[0].ok, res[0].text
    await t.close()
    assert len(sink.messages) == 6 and sink.connections == 6


async def test_max_messages_per_connection(tmp_path: Path, tls_files: tuple[Path, Path], sink: Sink) -> None:
    t = _transport(tmp_path, tls_files, sink.port, max_messages_per_connection=2)
    for i in range(4):
        assert (await t.deliver("dest.test", "a@example.com", [f"r{i}@dest.test"], MSG))[0].ok
    await t.close()
    assert sink.connections == 2


async def test_null_sender_and_8bit_options(tmp_path: Path, tls_files: tuple[Path, Path], sink: Sink) -> None:
    t = _transport(tmp_path, tls_files, sink.port)
    body = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()
    res = await t.deliver("dest.test", "", ["x@dest.test"], body)
    await t.close()
    assert res[0].ok
    assert sink.messages[0].mail_from in ("", "<>")  # aiosmtpd reports the null path as "<>"
    assert "BODY=8BITMIME" in sink.messages[0].mail_options


async def test_mx_lookup_tries_next_host(tmp_path: Path, tls_files: tuple[Path, Path], sink: Sink,
                                         dns_srv: DnsServer) -> None:
    dns_srv.add("dest.test.", "MX", "10 dead.dest.test.")
    dns_srv.add("dest.test.", "MX", "20 live.dest.test.")
    dns_srv.add("dead.dest.test.", "A", "127.0.0.3")  # nothing listens there: connection refused
    dns_srv.add("live.dest.test.", "A", "127.0.0.1")
    t = _transport(tmp_path, tls_files, sink.port, dns_port=dns_srv.port)
    res = await t.deliver("dest.test", "a@example.com", ["x@dest.test"], MSG)
    await t.close()
    assert res[0].ok and res[0].remote_mta == "live.dest.test"
    assert len(sink.messages) == 1


async def test_all_hosts_down_defers(tmp_path: Path, tls_files: tuple[Path, Path], dns_srv: DnsServer,
                                     sink: Sink) -> None:
    dns_srv.add("down.test.", "MX", "10 mx.down.test.")
    dns_srv.add("mx.down.test.", "A", "127.0.0.3")
    t = _transport(tmp_path, tls_files, sink.port, dns_port=dns_srv.port)
    res = await t.deliver("down.test", "a@example.com", ["x@down.test"], MSG)
    await t.close()
    assert res[0].temporary and res[0].enhanced == "4.4.1"


async def test_dns_outcomes_map_to_replies(tmp_path: Path, tls_files: tuple[Path, Path], dns_srv: DnsServer,
                                           sink: Sink) -> None:
    import dns.rcode
    dns_srv.add("nullmx.test.", "MX", "0 .")
    dns_srv.set_rcode("servfail.test.", dns.rcode.SERVFAIL)
    t = _transport(tmp_path, tls_files, sink.port, dns_port=dns_srv.port)
    null = await t.deliver("nullmx.test", "a@example.com", ["x@nullmx.test"], MSG)
    nx = await t.deliver("nx.test", "a@example.com", ["x@nx.test"], MSG)
    sf = await t.deliver("servfail.test", "a@example.com", ["x@servfail.test"], MSG)
    await t.close()
    assert null[0].permanent and null[0].enhanced == "5.1.10"
    assert nx[0].permanent and nx[0].enhanced == "5.1.2"
    assert sf[0].temporary and sf[0].enhanced == "4.4.3"
    assert sink.messages == []


async def test_large_message_in_blocks_arrives_intact(tmp_path: Path, tls_files: tuple[Path, Path],
                                                      sink: Sink) -> None:
    lines = [(b"." if i % 7 == 0 else b"") + b"%06d " % i + b"y" * 70 for i in range(40000)]  # ~3 MB
    body = b"Subject: big\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    t = _transport(tmp_path, tls_files, sink.port)
    res = await t.deliver("dest.test", "a@example.com", ["x@dest.test"], body)
    await t.close()
    assert res[0].ok
    assert sink.messages[0].data.replace(b"\r\n", b"\n") == body.replace(b"\r\n", b"\n")


async def test_silent_server_greeting_timeout_defers(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    """A remote that accepts the connection and never says anything must not hang a delivery."""
    conns: list[asyncio.StreamWriter] = []

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(w)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        t = _transport(tmp_path, tls_files, port, greeting_timeout="1s", connect_timeout="1s")
        t0 = time.monotonic()
        res = await asyncio.wait_for(t.deliver("dest.test", "a@example.com", ["x@dest.test"], MSG), 10)
        await t.close()
        assert res[0].temporary and time.monotonic() - t0 < 5
        assert conns, "the connection was made"
    finally:
        for w in conns:
            w.close()
        server.close()


# --- a refused MAIL in a pipelined group (RFC 2920 §3.1) -------------------------------------------
AFTER_REFUSED_MAIL = {
    "garbage": b"HTTP/1.1 400 Bad Request\r\n",       # not a reply: the session ends
    "close": b"",                                      # the server hangs up after its refusal
    "close_mid_reply": b"503-5.5.1 need MAIL\r\n",    # ... in the middle of the next reply
}


@pytest.mark.parametrize("after", sorted(AFTER_REFUSED_MAIL))
async def test_refused_mail_in_a_broken_group_bounces_with_its_reply(
        tmp_path: Path, tls_files: tuple[Path, Path], after: str) -> None:
    """MAIL's 550 came whole before the rest of the group broke: it decides every recipient
    (permanent, the server's own reply kept), instead of a deferral that retries a refused sender."""
    ended = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        try:
            await _line(reader, seen)
            writer.write(EHLO_PIPELINING)
            seen.reads.append(await reader.read(65536))  # MAIL, both RCPTs and DATA in one write
            writer.write(b"550 5.7.1 sender refused\r\n" + AFTER_REFUSED_MAIL[after])
            await writer.drain()
            if after == "garbage":
                await reader.read(65536)  # until the client gives up
        finally:
            ended.set()

    async def body(port: int, seen: Seen) -> None:
        t = _transport(tmp_path, tls_files, port)
        res = await t.deliver("dest.test", "a@example.com", ["x@dest.test", "y@dest.test"], MSG)
        await t.close()
        await asyncio.wait_for(ended.wait(), 2)
        assert [(r.address, r.code, r.enhanced, r.stage, r.remote_reply) for r in res] == [
            (a, 550, "5.7.1", "MAIL FROM", "550 5.7.1 sender refused") for a in ("x@dest.test", "y@dest.test")]
        assert seen.data == [] and seen.sessions == 1

    await _serve(handler, body)


# --- the end of a session (RFC 5321 §4.1.1.10) ------------------------------------------------------
@pytest.mark.parametrize("when", ["last message", "shutdown"])
async def test_quit_does_not_wait_for_a_silent_server(tmp_path: Path, tls_files: tuple[Path, Path],
                                                      when: str) -> None:
    """A server that reads QUIT and never answers (the results, the delivery and the connection slot
    used to wait 5 s for its 221): a session ended after its last message is closed at once, one
    idle at shutdown after QUIT_WAIT at most; QUIT is sent before the close either way."""
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await _serial_transaction(reader, writer, seen, b"250-mx.test\r\n250 8BITMIME\r\n")  # up to QUIT
        seen.reads.append(await reader.read(65536))  # no 221: only the client's close ends this
        closed.set()

    async def body(port: int, seen: Seen) -> None:
        t = _transport(tmp_path, tls_files, port, max_messages_per_connection=1 if when == "last message" else 100)
        t0 = time.monotonic()
        res = await t.deliver("dest.test", "a@example.com", ["x@dest.test"], MSG)
        delivered = time.monotonic() - t0
        await t.close()
        shut = time.monotonic() - t0 - delivered
        assert res[0].ok and seen.data
        assert delivered < 0.5, delivered
        assert shut < (0.5 if when == "last message" else transport_mod.QUIT_WAIT + 0.5), shut
        await asyncio.wait_for(closed.wait(), 2)
        assert seen.reads[-2:] == [b"QUIT\r\n", b""]

    await _serve(handler, body)


# --- MX hosts sharing an address ------------------------------------------------------------------
async def test_an_address_shared_by_two_mx_hosts_is_tried_once(tmp_path: Path, tls_files: tuple[Path, Path],
                                                               dns_srv: DnsServer) -> None:
    """Two MX names on one address are one server: one connection per attempt, under the first
    (most preferred) name, which is also the name TLS would check."""
    dns_srv.add("shared.test.", "MX", "10 a.shared.test.")
    dns_srv.add("shared.test.", "MX", "20 b.shared.test.")
    dns_srv.add("a.shared.test.", "A", "127.0.0.1")
    dns_srv.add("b.shared.test.", "A", "127.0.0.1")
    sessions: list[str] = []

    async def busy(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        sessions.append("x")
        w.write(b"421 4.3.2 busy\r\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(busy, "127.0.0.1", 0)
    try:
        t = _transport(tmp_path, tls_files, server.sockets[0].getsockname()[1], dns_port=dns_srv.port)
        res = await t.deliver("shared.test", "a@example.com", ["x@shared.test"], MSG)
        await t.close()
    finally:
        server.close()
    assert res[0].temporary and res[0].remote_mta == "a.shared.test", res[0]
    assert len(sessions) == 1


@pytest.mark.parametrize("refusal", [b"500 5.5.2 unrecognized command", b"502 5.5.1 EHLO not implemented",
                                     b"550 5.5.1 say HELO"])
async def test_a_server_that_refuses_ehlo_gets_helo(tmp_path: Path, tls_files: tuple[Path, Path],
                                                   refusal: bytes) -> None:
    """RFC 5321 §4.1.4: a server that does not take EHLO says so with a 5xx and stays where it was;
    the client falls back to HELO (as Postfix does) and sends without extensions: no pipelining,
    no MAIL parameters. Bouncing the mail there was wrong."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await _line(reader, seen)
        writer.write(refusal + b"\r\n")
        await _serial_transaction(reader, writer, seen, b"250 mx.test\r\n")

    async def body(port: int, seen: Seen) -> None:
        t = _transport(tmp_path, tls_files, port)
        res = await t.deliver("dest.test", "a@example.com", ["b@dest.test"], MSG.replace(b"hi", "hé".encode()))
        await t.close()
        assert res[0].ok, res[0]

    seen = await _serve(handler, body)
    assert [r.split(b" ")[0] for r in seen.reads[:4]] == [b"EHLO", b"HELO", b"MAIL", b"RCPT"]
    assert seen.reads[2] == b"MAIL FROM:<a@example.com>\r\n"  # no SIZE, no BODY: nothing was offered


async def test_a_server_that_refuses_ehlo_and_helo_bounces(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        for _ in range(2):
            await _line(reader, seen)
            writer.write(b"554 5.7.1 go away\r\n")
        await _line(reader, seen)

    async def body(port: int, seen: Seen) -> None:
        t = _transport(tmp_path, tls_files, port)
        res = await t.deliver("dest.test", "a@example.com", ["b@dest.test"], MSG)
        await t.close()
        assert res[0].permanent and res[0].enhanced == "5.7.1" and "HELO rejected" in res[0].text, res[0]

    seen = await _serve(handler, body)
    assert [r.split(b" ")[0] for r in seen.reads[:2]] == [b"EHLO", b"HELO"]
    assert seen.data == []


@pytest.mark.parametrize(("reply", "ours"), [
    ("relay.test.example ESMTP mailrelayd", True),
    ("RELAY.Test.Example.", True),  # case and a root dot do not make another host
    ("relay.test.example\nPIPELINING\nSIZE 100", True),  # an EHLO reply: its first line
    ("mx.test ESMTP relay.test.example", False),  # named later: not the server's own name
    ("relay.test.example.org ESMTP", False),
    ("", False),
])
def test_names_us(reply: str, ours: bool) -> None:
    assert transport_mod.names_us(reply, "relay.test.example") is ours


def test_a_name_without_a_dot_is_no_loop() -> None:
    """"localhost" (the development config's server.hostname) is what local sinks greet with too."""
    assert not transport_mod.names_us("localhost ESMTP smtp4dev", "localhost")
    assert not transport_mod.names_us("mailhost", "mailhost.")


async def test_a_server_that_answers_ehlo_with_our_name_is_a_loop(tmp_path: Path,
                                                                  tls_files: tuple[Path, Path]) -> None:
    """The host's EHLO reply names our own server.hostname: mail sent there comes back (Postfix:
    "mail for ... loops back to myself"). The recipient bounces 5.4.6; no MAIL is sent."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await _line(reader, seen)
        writer.write(b"250-Relay.Test.Example\r\n250 PIPELINING\r\n")
        await _line(reader, seen)

    async def body(port: int, seen: Seen) -> None:
        t = _transport(tmp_path, tls_files, port)
        res = await t.deliver("dest.test", "a@example.com", ["b@dest.test"], MSG)
        await t.close()
        assert res[0].permanent and res[0].enhanced == "5.4.6", res[0]
        assert "loops back to myself" in res[0].text and "replied to EHLO" in res[0].text, res[0]

    seen = await _serve(handler, body)
    assert [r.split(b" ")[0] for r in seen.reads] in ([b"EHLO"], [b"EHLO", b"QUIT\r\n"]), seen.reads


async def test_a_looping_mx_host_is_skipped_for_the_next(tmp_path: Path, tls_files: tuple[Path, Path],
                                                        dns_srv: DnsServer) -> None:
    """Only the host that greets with our name is refused: the next MX takes the mail."""
    def serve(greeting: bytes, seen: Seen) -> Any:
        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.sessions += 1
            writer.write(greeting)
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await _serial_transaction(reader, writer, seen, b"250 ok\r\n")
            writer.close()
        return on_client

    looped, other = Seen(), Seen()
    first = await asyncio.start_server(serve(b"220 relay.test.example ESMTP\r\n", looped), "127.0.0.2", 0)
    port = first.sockets[0].getsockname()[1]
    second = await asyncio.start_server(serve(b"220 mx2.dest.test ESMTP\r\n", other), "127.0.0.1", port)
    dns_srv.add("dest.test.", "MX", "10 mx1.dest.test.")
    dns_srv.add("dest.test.", "MX", "20 mx2.dest.test.")
    dns_srv.add("mx1.dest.test.", "A", "127.0.0.2")
    dns_srv.add("mx2.dest.test.", "A", "127.0.0.1")
    try:
        t = _transport(tmp_path, tls_files, port, dns_port=dns_srv.port)
        res = await t.deliver("dest.test", "a@example.com", ["x@dest.test"], MSG)
        await t.close()
    finally:
        first.close()
        second.close()
    assert res[0].ok and res[0].remote_mta == "mx2.dest.test", res[0]
    assert looped.sessions == 1 and not any(looped.reads), looped.reads  # not even an EHLO
    assert other.sessions == 1 and len(other.data) == 1
