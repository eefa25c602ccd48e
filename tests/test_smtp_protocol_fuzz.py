"""The sans-I/O SMTP server protocol against sessions nobody wrote by hand: seeded random mixes of
valid, malformed and hostile commands, message bodies and edge events (EOF, timeout, shutdown, TLS,
AUTH and commit outcomes), cut into random pieces. Whatever arrives, the protocol must not raise,
must answer in well-formed replies whose enhanced status code agrees with the reply's class
(RFC 3463 §2), must say nothing once it has closed, must stay within bounded output, and must give
back every byte it counted against the memory budget."""

from __future__ import annotations

import base64
import random
import re
from pathlib import Path

import pytest

from mailrelayd.config import Config, load_config
from mailrelayd.errors import Reply
from mailrelayd.smtp.dataread import MemoryBudget
from mailrelayd.smtp.protocol import AuthRequest, Close, MessageReceived, Phase, StartTls
from mailrelayd.users import User
from tests.conftest import base_config, write_config
from tests.test_smtp_protocol import Harness

ALICE = User("alice", "x", ("@example.com",))
REPLY_LINE = re.compile(r"^([2-5][0-9][0-9])([ -])(.*)$")
ENHANCED = re.compile(r"^([245])\.[0-9]{1,3}\.[0-9]{1,3}(?: |$)")

ADDRESSES = [
    "<a@example.com>", "<>", "<postmaster>", "<Postmaster@relay.test.example>", '<"a b"@example.com>',
    "<c@Example.ORG>", "<x@bounces.test.example>", "<\xff\xfe@evil.example>", "<a@b@c>", "<@route:a@b.example>",
    "a@example.com", "<a@example.com", "<" + "l" * 300 + "@example.com>", "<ü@exämple.de>", "<a@[192.0.2.1]>",
    "<a@[IPv6:2001:db8::1]>", "<a@-bad-.example>", "< a@example.com >", "<a@example.com>\x00",
    "<b@example.net>",  # suppressed
]
PARAMS = ["", " SIZE=1000", " SIZE=1099511627776", " SIZE=x", " BODY=8BITMIME", " BODY=BINARYMIME", " SMTPUTF8",
          " RET=HDRS ENVID=abc", " NOTIFY=NEVER", " ORCPT=rfc822;a@example.com", " FOO=BAR", " SIZE=1 SIZE=2", " ="]


def command(rng: random.Random) -> bytes:
    """One command line (or something in its place), without the line ending."""
    kind = rng.randrange(20)
    if kind == 0:
        return rng.choice([b"EHLO client.example", b"HELO client.example", b"EHLO", b"EHLO [192.0.2.9]",
                           b"ehlo \xc3\xa9.example", b"HELO " + b"h" * 600])
    if kind in (1, 2):
        verb = rng.choice(["MAIL FROM:", "mail from:", "MAIL FROM: ", "MAIL"])
        return (verb + rng.choice(ADDRESSES) + rng.choice(PARAMS)).encode("utf-8", "surrogateescape")
    if kind in (3, 4, 5):
        verb = rng.choice(["RCPT TO:", "rcpt to:", "RCPT TO: ", "RCPT"])
        return (verb + rng.choice(ADDRESSES) + rng.choice(PARAMS)).encode("utf-8", "surrogateescape")
    if kind in (6, 7):
        return rng.choice([b"DATA", b"data", b"DATA x", b"BDAT 10 LAST"])
    if kind == 8:
        return rng.choice([b"RSET", b"NOOP", b"NOOP hello", b"VRFY a", b"EXPN list", b"HELP", b"ETRN x",
                           b"TURN", b"QUIT", b"quit now"])
    if kind == 9:
        return rng.choice([b"STARTTLS", b"STARTTLS x", b"starttls"])
    if kind == 10:
        creds = base64.b64encode(b"\x00alice\x00" + rng.choice([b"x", b"wrong", b""]))
        return rng.choice([b"AUTH PLAIN " + creds, b"AUTH PLAIN", b"AUTH LOGIN",
                           b"AUTH LOGIN " + base64.b64encode(b"alice"), b"AUTH CRAM-MD5", b"AUTH PLAIN !!!notbase64",
                           b"AUTH", b"*", b"=", base64.b64encode(b"alice"), base64.b64encode(b"x")])
    if kind == 11:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    if kind == 12:
        return b"X" * rng.choice([990, 1000, 1100, 5000])
    if kind == 13:
        return rng.choice([b"", b" ", b"\t", b"MAIL FROM:<a@example.com>\rRCPT TO:<b@example.net>", b"\x00"])
    return rng.choice([b"EHLO c.example", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA"])


def body(rng: random.Random) -> bytes:
    """A message payload and its terminator (or a payload cut short)."""
    odd = [b"From: undisclosed-recipients:;", b"", b".", b"..", b".hidden", b"text \xff\xfe",
           b"x" * rng.choice([998, 1200]), b"just a body line", b"\rbare cr", b"line\nbare lf",
           b"Received: forged", b"b@example.net"]
    lines = [b"From: a@example.com", b"Subject: hi", b"", b"Hello."]
    for _ in range(rng.randrange(0, 4)):
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(odd))
    end = rng.choice([b"\r\n.\r\n"] * 6 + [b"\n.\n", b"\r\n.\n", b"", b"\r\n.\r\nQUIT\r\n"])
    return b"\r\n".join(lines) + end


def session_script(rng: random.Random) -> list[bytes]:
    """A mostly well-behaved session (EHLO, maybe STARTTLS and AUTH, transactions), with some of its
    steps replaced by :func:`command`'s odd ones, doubled or dropped."""
    script = [b"EHLO client.example"]
    if rng.random() < 0.85:
        script += [b"STARTTLS", b"EHLO client.example"]
    if rng.random() < 0.85:
        script.append(b"AUTH PLAIN " + base64.b64encode(b"\x00alice\x00" + rng.choice([b"x", b"x", b"wrong"])))
    for _ in range(rng.randrange(1, 4)):
        sender = ADDRESSES[0] if rng.random() < 0.7 else rng.choice(ADDRESSES)
        script.append(("MAIL FROM:" + sender + rng.choice(PARAMS[:6])).encode("utf-8", "surrogateescape"))
        for _ in range(rng.randrange(1, 4)):
            rcpt = rng.choice(ADDRESSES[5:7]) if rng.random() < 0.7 else rng.choice(ADDRESSES)
            script.append(("RCPT TO:" + rcpt).encode("utf-8", "surrogateescape"))
        script += [b"DATA", body(rng)]
    script.append(b"QUIT")
    out: list[bytes] = []
    for step in script:
        roll = rng.random()
        if roll < 0.07:
            out.append(command(rng))
        elif roll < 0.09:
            continue
        elif roll < 0.11:
            out += [step, step]
        else:
            out.append(step)
    return out


def stream(rng: random.Random) -> list[bytes]:
    """The session as the pieces a client writes: usually pipelined groups that stop where RFC 2920
    §3.1 says a client must wait (after STARTTLS, AUTH and DATA, and after a payload); sometimes
    everything in one write, as a hostile or careless client does."""
    pieces: list[bytes] = []
    group = b""
    hostile = rng.random() < 0.2
    for step in session_script(rng):
        if step.endswith(b"\n") or step == b"":
            group += step  # a payload with its terminator (or a bare line)
        else:
            group += step + (b"\r\n" if rng.random() < 0.95 else rng.choice([b"\n", b"\r", b""]))
        if not hostile and (step.split(b" ")[0].upper() in (b"STARTTLS", b"AUTH", b"DATA", b"QUIT")
                            or step.endswith(b"\n") or rng.random() < 0.3):
            pieces.append(group)
            group = b""
    pieces.append(group)
    # Cut each write at random points: the protocol must not care where TCP splits the stream.
    out: list[bytes] = []
    for piece in pieces:
        while piece:
            n = rng.choice([1, 2, 7, 64, 1000, len(piece)])
            out.append(piece[:n])
            piece = piece[n:]
    return out


def check_replies(text: bytes, closed_before: bool) -> None:
    assert len(text) < 256 * 1024, "unbounded output"
    if closed_before:
        assert text == b"", f"said {text[:200]!r} after closing"
    if not text:
        return
    assert text.endswith(b"\r\n"), text[-200:]
    lines = text.decode("utf-8").split("\r\n")[:-1]
    code = None
    for line in lines:
        m = REPLY_LINE.match(line)
        assert m, f"not a reply line: {line!r}"
        if code is not None:
            assert m.group(1) == code, f"multiline reply changes code: {lines!r}"
        code = m.group(1) if m.group(2) == "-" else None
        if line[0] in "45":
            enhanced = ENHANCED.match(m.group(3))
            assert enhanced and enhanced.group(1) == line[0], f"enhanced code missing or of another class: {line!r}"
    assert code is None, f"unterminated multiline reply: {lines!r}"


def play(cfg: Config, seed: int, listener: int) -> None:
    rng = random.Random(seed)
    budget = MemoryBudget(rng.choice([1 << 30, 4096]))
    h = Harness(cfg, listener, trusted=rng.random() < 0.7, suppressed=("b@example.net",), budget=budget,
                space_error=rng.random() < 0.05, locked=rng.random() < 0.03, max_errors=rng.choice([3, 10, 20, 20]),
                greet=False)
    if cfg.listeners[listener].tls == "implicit":  # the edge greets after the handshake
        h.p.facts.tls, h.p.facts.tls_desc = True, "TLSv1.3"
    h.events = h.p.start()
    data = stream(rng)
    closed = reset = False
    pending = list(h.events)
    steps = 0
    while steps < 400:
        steps += 1
        before_closed = closed
        events = []
        if pending and isinstance(pending[0], MessageReceived | AuthRequest) and not closed and rng.random() < 0.3:
            # The outcome takes a while: meanwhile the client writes more (kept for later), or resets.
            if rng.random() < 0.3:
                h.p.connection_lost()
                closed = reset = True
            elif data:
                assert h.p.receive(data.pop(0)) == []
        elif pending:
            event = pending.pop(0)
            if isinstance(event, Close):
                closed = True
                h.p.connection_lost()
            elif isinstance(event, AuthRequest):
                if reset:  # the edge asks no more of a protocol whose connection is gone
                    continue
                events = h.p.auth_result(ALICE if event.password == b"x" else None)
            elif isinstance(event, StartTls):
                if rng.random() < 0.05:  # the handshake failed: the edge closes
                    h.p.connection_lost()
                    closed = True
                else:
                    events = h.p.tls_started("TLSv1.3")
            elif isinstance(event, MessageReceived):
                assert event.recipients and len(event.recipients) == len(event.local)
                events = h.p.message_result(rng.choice([Reply(250, "2.0.0", "Ok: queued as X"),
                                                        Reply(451, "4.3.0", "Try again"),
                                                        Reply(554, "5.6.0", "Refused")]))
                if reset:
                    # A commit outlives its connection (the edge still reports the outcome, so the
                    # protocol can free what it holds) but nothing it answers goes anywhere.
                    h.p.data_to_send()
                    assert events == [], f"{events} after the connection was gone"
        elif data and not closed:
            events = h.p.receive(data.pop(0))
        else:
            roll = rng.random()
            if closed or h.p.phase is Phase.CLOSED:
                break
            if h.p.phase is Phase.WAIT:
                raise AssertionError("waiting for an outcome that no event asked for")
            events = h.p.receive_eof() if roll < 0.6 else h.p.timeout() if roll < 0.8 else h.p.shutdown()
            if roll >= 0.8 and not events and h.p.phase is not Phase.CLOSED:
                events = h.p.receive_eof()
        check_replies(h.p.data_to_send(), before_closed)
        pending += events
    else:
        raise AssertionError("the session did not end")
    # A client that goes on writing after the close, and (once closed) the edge's late calls: all
    # ignored. (After a failed STARTTLS handshake the edge has cancelled its timers instead.)
    for piece in data[:5]:
        assert h.p.receive(piece) == []
    if h.p.phase is Phase.CLOSED:
        assert h.p.receive_eof() == h.p.timeout() == h.p.shutdown() == []
    h.p.connection_lost()  # the edge always reports it last
    assert budget.used == 0, "message bytes still counted against the memory budget after the session"
    check_replies(h.p.data_to_send(), True)


@pytest.mark.parametrize("listener", [0, 1, 2], ids=["relay", "submission", "submissions"])
def test_random_sessions_never_break_the_protocol(tmp_path: Path, tls_files: tuple[Path, Path],
                                                  listener: int) -> None:
    cfg = load_config(write_config(tmp_path, base_config(tls_files)))
    for seed in range(300):
        try:
            play(cfg, seed * 3 + listener, listener)
        except AssertionError as e:
            raise AssertionError(f"seed {seed * 3 + listener}: {e}") from e
