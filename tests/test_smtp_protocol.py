"""The sans-I/O SMTP server protocol, its DATA reader and the PROXY header parser, in memory:
bytes in, replies and events out, state by state. No sockets, no event loop."""

from __future__ import annotations

import base64
import socket
import struct
from pathlib import Path

import pytest

from mailrelayd.config import Config, load_config
from mailrelayd.errors import Reply, SpoolFullError
from mailrelayd.smtp.dataread import NO_MEMORY, DotReader, MemoryBudget
from mailrelayd.smtp.policy import Policy
from mailrelayd.smtp.protocol import (
    AuthRequest,
    Close,
    Hooks,
    MessageReceived,
    Phase,
    ServerProtocol,
    SessionFacts,
    Settings,
    StartTls,
)
from mailrelayd.smtp.proxyproto import ProxyHeaderError, parse_header
from mailrelayd.users import User
from tests.conftest import base_config, write_config

ALICE = User("alice", "x", ("@example.com",))


@pytest.fixture
def cfg(tmp_path: Path, tls_files: tuple[Path, Path]) -> Config:
    return load_config(write_config(tmp_path, base_config(tls_files)))


class Harness:
    """A protocol plus everything it said, for assertions."""

    def __init__(self, cfg: Config, listener: int = 0, *, trusted: bool = True, suppressed: tuple[str, ...] = (),
                 budget: MemoryBudget | None = None, space_error: bool = False, locked: bool = False,
                 max_errors: int = 10, max_junk: int = 100, overshoot: int = 1000,
                 greet: bool = True) -> None:
        lcfg = cfg.listeners[listener]
        self.policy = Policy(cfg, lcfg, lambda a: a in suppressed)
        self.replies: list[str] = []
        self.draining = False

        def check_space(n: int) -> None:
            if space_error:
                raise SpoolFullError("full")

        hooks = Hooks(policy=self.policy, check_space=check_space, auth_locked=lambda ip: locked,
                      draining=lambda: self.draining, budget=budget)
        lim = cfg.limits
        settings = Settings(hostname="relay.test.example", tls_mode=lcfg.tls, submission=lcfg.mode == "submission",
                            auth_offered=self.policy.auth_offered, max_message_size=lim.max_message_size,
                            max_line_length=lim.max_line_length, max_errors=max_errors,
                            command_timeout=lim.command_timeout, data_timeout=lim.data_timeout,
                            max_junk_commands=max_junk, max_recipient_overshoot=overshoot)
        self.p = ServerProtocol(settings, hooks, SessionFacts(peer_ip="192.0.2.1", trusted=trusted))
        if greet:
            self.events = self.p.start()
            assert self.out()[-1].startswith("220 relay.test.example")

    def out(self) -> list[str]:
        lines = self.p.data_to_send().decode().split("\r\n")
        got = [x for x in lines if x]
        self.replies += got
        return got

    def send(self, data: bytes) -> list[str]:
        self.events = self.p.receive(data)
        return self.out()

    def cmd(self, line: str) -> str:
        got = self.send(line.encode() + b"\r\n")
        assert got, f"no reply to {line!r}"
        return got[-1]


def test_greeting_ehlo_and_capabilities(cfg: Config) -> None:
    h = Harness(cfg)
    assert h.p.phase is Phase.COMMAND
    lines = h.send(b"EHLO client.example\r\n")
    assert lines[0] == "250-relay.test.example"
    assert lines[-1] == "250 STARTTLS" and "250-ENHANCEDSTATUSCODES" in lines
    assert not any("AUTH" in x for x in lines)  # never before TLS
    assert h.cmd("HELO") == "501 5.5.4 Syntax: HELO hostname"
    assert h.cmd("HELO  Front Desk\tPC ") == "250 relay.test.example"  # a device's machine name
    assert h.p.facts.helo == "Front Desk PC"


def test_sequence_errors_and_unknown_commands(cfg: Config) -> None:
    h = Harness(cfg)
    assert h.cmd("MAIL FROM:<a@example.com>").startswith("503 5.5.1")
    h.cmd("EHLO c.example")
    assert h.cmd("RCPT TO:<b@example.net>").startswith("503 5.5.1")
    assert h.cmd("DATA").startswith("503 5.5.1")
    assert h.cmd("FROB").startswith("500 5.5.2")
    assert h.send(b"\xff\xfe\r\n")[-1].startswith("500 5.5.2")
    assert h.p.facts.errors == 5


def test_transaction_to_message_event_and_reply(cfg: Config) -> None:
    h = Harness(cfg)
    h.cmd("EHLO c.example")
    assert h.cmd("MAIL FROM:<a@example.com> BODY=8BITMIME") == "250 2.1.0 Ok"
    assert h.cmd("RCPT TO:<b@Example.NET>") == "250 2.1.5 Ok"
    assert h.cmd("RCPT TO:<x@bounces.test.example>") == "250 2.1.5 Ok"
    assert h.cmd("DATA").startswith("354")
    assert h.p.phase is Phase.DATA and h.p.current_timeout == cfg.limits.data_timeout
    assert h.send(b"Subject: x\r\n\r\n..dot\r\n") == []
    assert h.send(b".\r\nQUIT\r\n") == []  # the pipelined QUIT waits for the commit
    assert h.p.phase is Phase.WAIT
    (ev,) = h.events
    assert isinstance(ev, MessageReceived)
    assert ev.recipients == ("b@example.net", "x@bounces.test.example") and ev.local == (False, True)
    assert ev.body == b"Subject: x\r\n\r\n.dot\r\n"  # dot-stuffing removed
    h.events = h.p.message_result(Reply(250, "2.0.0", "Ok: queued as Q1"))
    assert h.out() == ["250 2.0.0 Ok: queued as Q1", "221 2.0.0 Bye"]
    assert h.events == [Close("quit")] and h.p.facts.messages == 1


def test_pipelined_commands_in_one_read(cfg: Config) -> None:
    h = Harness(cfg)
    got = h.send(b"EHLO c.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
                 b"x\r\n.\r\n")
    assert got[-3:] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert isinstance(h.events[0], MessageReceived) and h.events[0].body == b"x\r\n"


def test_refused_recipients_are_not_session_errors(cfg: Config) -> None:
    h = Harness(cfg, suppressed=tuple(f"s{i}@example.net" for i in range(20)), max_errors=3)
    h.cmd("EHLO c.example")
    h.cmd("MAIL FROM:<a@example.com>")
    for i in range(20):
        assert h.cmd(f"RCPT TO:<s{i}@example.net>").startswith("550 5.7.1")
    for i in range(cfg.limits.max_recipients):
        assert h.cmd(f"RCPT TO:<ok{i}@example.net>") == "250 2.1.5 Ok"
    for i in range(15):
        assert h.cmd(f"RCPT TO:<over{i}@example.net>").startswith("452 4.5.3")
    assert h.p.facts.errors == 0 and h.p.phase is Phase.COMMAND
    assert h.cmd("DATA").startswith("354")


def test_recipients_that_add_nothing_count_as_errors_past_the_overshoot(cfg: Config) -> None:
    h = Harness(cfg, suppressed=("s@example.net",), max_errors=3, overshoot=5)
    h.cmd("EHLO c.example")
    h.cmd("MAIL FROM:<a@example.com>")
    for _ in range(8):  # suppressed recipients are the list's, not the client's doing: never counted
        assert h.cmd("RCPT TO:<s@example.net>").startswith("550 5.7.1")
    for i in range(cfg.limits.max_recipients):
        assert h.cmd(f"RCPT TO:<ok{i}@example.net>") == "250 2.1.5 Ok"
    for i in range(3):
        assert h.cmd(f"RCPT TO:<over{i}@example.net>").startswith("452 4.5.3")
    for _ in range(2):
        assert h.cmd("RCPT TO:<ok0@example.net>") == "250 2.1.5 Ok (duplicate recipient)"
    assert h.p.facts.errors == 0
    assert h.cmd("RCPT TO:<ok1@example.net>") == "250 2.1.5 Ok (duplicate recipient)"  # the sixth
    assert h.cmd("RCPT TO:<over9@example.net>").startswith("452 4.5.3")
    assert h.p.facts.errors == 2 and h.p.phase is Phase.COMMAND
    assert h.send(b"RCPT TO:<ok2@example.net>\r\n")[-1] == "421 4.7.0 Too many errors, closing connection"
    # A new transaction starts from nothing.
    h2 = Harness(cfg, max_errors=1, overshoot=1)
    h2.cmd("EHLO c.example")
    for _ in range(3):
        h2.cmd("MAIL FROM:<a@example.com>")
        h2.cmd("RCPT TO:<b@example.net>")
        assert h2.cmd("RCPT TO:<b@example.net>").endswith("(duplicate recipient)")
        assert h2.cmd("RSET") == "250 2.0.0 Ok"
    assert h2.p.facts.errors == 0


@pytest.mark.parametrize("path", ["a@bücher.example", "jösé@example.com", "a@例え.テスト"])
def test_a_non_ascii_sender_needs_smtputf8(cfg: Config, path: str) -> None:
    # RFC 6531 §3.4: the domain too (its A-label form must not hide it).
    h = Harness(cfg)
    h.cmd("EHLO c.example")
    assert h.cmd(f"MAIL FROM:<{path}>") == "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter"
    assert h.cmd(f"MAIL FROM:<{path}> SMTPUTF8") == "250 2.1.0 Ok"
    assert h.p.tx is not None and h.p.tx.smtputf8


def test_command_line_limit_counts_the_crlf(cfg: Config) -> None:
    h = Harness(cfg)
    n = cfg.limits.max_line_length
    assert h.send(b"NOOP " + b"x" * (n - 7) + b"\r\n") == ["250 2.0.0 Ok"]  # n octets with the CRLF
    assert h.send(b"NOOP " + b"x" * (n - 6) + b"\r\n") == ["500 5.5.2 Line too long"]
    assert h.send(b"NOOP " + b"x" * (n - 6) + b"\n") == ["250 2.0.0 Ok"]  # a bare LF is one octet


def test_rfc_details_of_commands_and_parameters(cfg: Config) -> None:
    h = Harness(cfg)
    assert h.cmd("EHLO\tc.example").startswith("250 ")  # a tab after the verb, as Postfix takes it
    assert h.p.facts.helo == "c.example"
    assert h.cmd("VRFY") == "501 5.5.4 Syntax: VRFY address"  # RFC 5321 §4.1.1.6
    assert h.cmd("VRFY postmaster").startswith("252 ")
    assert h.cmd("MAIL FROM:<a@example.com> SMTPUTF8=yes").startswith("555 5.5.4")  # RFC 6531 §3.4
    assert h.cmd("MAIL FROM:<a@example.com>x").startswith("501 5.5.4")
    assert h.cmd("MAIL FROM:a@example.com SIZE=100") == "250 2.1.0 Ok"  # a bare path, then parameters
    assert h.cmd("RCPT TO:<b@example.net>x").startswith("501 5.5.4")
    assert h.cmd("RCPT TO:<b@example.net>") == "250 2.1.5 Ok"


def test_duplicate_recipient_once(cfg: Config) -> None:
    h = Harness(cfg)
    h.cmd("EHLO c.example")
    h.cmd("MAIL FROM:<a@example.com>")
    assert h.cmd("RCPT TO:<a@x.example>") == "250 2.1.5 Ok"
    assert h.cmd("RCPT TO:<a@X.EXAMPLE.>").startswith("250 2.1.5")
    assert h.p.tx is not None and h.p.tx.rcpts == ["a@x.example"]


def test_too_many_errors_closes_with_421(cfg: Config) -> None:
    h = Harness(cfg, max_errors=3)
    for _ in range(3):
        h.cmd("FROB")
    assert h.replies[-1] == "421 4.7.0 Too many errors, closing connection"
    assert h.events == [Close("too_many_errors")] and h.p.phase is Phase.CLOSED
    assert h.send(b"NOOP\r\n") == []


def test_junk_commands_count_as_errors_past_the_limit(cfg: Config) -> None:
    # A client that only sends NOOPs (or RSET, VRFY, HELP, EHLO again) would otherwise keep its
    # slot for ever, each command re-arming the idle timer.
    h = Harness(cfg, max_errors=3, max_junk=4)
    h.cmd("EHLO c.example")
    for verb in ("NOOP", "RSET", "VRFY x", "HELP"):
        assert h.cmd(verb)[:3] in ("250", "252", "214")
    assert h.p.facts.errors == 0
    assert h.cmd("EHLO c.example").startswith("250 ")  # the fifth: answered, and an error
    assert h.cmd("NOOP") == "250 2.0.0 Ok"
    assert h.p.facts.errors == 2 and h.p.phase is Phase.COMMAND
    assert h.send(b"NOOP\r\n") == ["250 2.0.0 Ok", "421 4.7.0 Too many errors, closing connection"]
    assert h.events == [Close("too_many_errors")]
    assert any("too many commands that move no mail" in r for r in h.p.facts.rejections)


def test_junk_count_starts_again_with_each_accepted_message(cfg: Config) -> None:
    # Postfix's client sends RSET before each message on a reused connection: a long-lived
    # session that moves mail is never closed for it.
    h = Harness(cfg, max_errors=2, max_junk=2)
    h.cmd("EHLO c.example")
    for n in range(5):
        for _ in range(2):
            assert h.cmd("RSET") == "250 2.0.0 Ok"
        h.cmd("MAIL FROM:<a@example.com>")
        h.cmd("RCPT TO:<b@example.net>")
        h.cmd("DATA")
        h.send(b"x\r\n.\r\n")
        h.events = h.p.message_result(Reply(250, "2.0.0", f"Ok: queued as Q{n}"))
        assert h.out() == [f"250 2.0.0 Ok: queued as Q{n}"]
    assert h.p.facts.errors == 0 and h.p.facts.messages == 5
    # A refused message does not reset the count.
    for _ in range(2):
        h.cmd("NOOP")
    h.cmd("MAIL FROM:<a@example.com>")
    h.cmd("RCPT TO:<b@example.net>")
    h.cmd("DATA")
    h.send(b"x\r\n" + b"y" * 2000 + b"\r\n.\r\n")  # a line over max_line_length: 500 5.5.2 ...
    assert h.p.facts.errors == 1
    assert h.send(b"NOOP\r\n") == ["250 2.0.0 Ok", "421 4.7.0 Too many errors, closing connection"]


def test_ehlo_after_starttls_is_not_junk(cfg: Config) -> None:
    h = Harness(cfg, max_junk=0, max_errors=1)
    h.cmd("EHLO c.example")
    assert h.cmd("STARTTLS").startswith("220")
    h.events = h.p.tls_started("TLSv1.3")
    assert h.cmd("EHLO c.example").startswith("250 ") and h.p.facts.errors == 0
    assert h.p.phase is Phase.COMMAND


def test_mail_size_and_space(cfg: Config) -> None:
    h = Harness(cfg, space_error=True)
    h.cmd("EHLO c.example")
    assert h.cmd("MAIL FROM:<a@example.com> SIZE=1099511627776").startswith("552 5.3.4")
    assert h.cmd("MAIL FROM:<a@example.com> SIZE=1000").startswith("452 4.3.1")
    assert h.cmd("MAIL FROM:<a@example.com> SIZE=x").startswith("501")
    # RFC 1870: 1*20DIGIT, ASCII only ("²", "①" and "٣" are digits to str.isdigit()).
    for size in ("²", "1²", "①", "٣", "1" * 21, "-1", "+5"):
        h2 = Harness(cfg)
        h2.cmd("EHLO c.example")
        assert h2.send(f"MAIL FROM:<a@example.com> SIZE={size}\r\n".encode()) == ["501 5.5.4 SIZE takes a number"]
    assert h.cmd("MAIL FROM:<a@example.com> FOO=1").startswith("555")


def test_data_refusals_keep_the_session_in_step(cfg: Config) -> None:
    h = Harness(cfg)
    h.cmd("EHLO c.example")
    for payload, want in ((b"a\nb\r\n.\r\n", "550 5.6.0"), (b"x" * 1200 + b"\r\n.\r\n", "500 5.5.2")):
        h.cmd("MAIL FROM:<a@example.com>")
        h.cmd("RCPT TO:<b@example.net>")
        h.cmd("DATA")
        assert h.send(payload)[-1].startswith(want)
        assert h.p.phase is Phase.COMMAND and h.p.tx is None
    assert h.cmd("NOOP") == "250 2.0.0 Ok"


def test_starttls_discards_pipelined_plaintext_and_resets(cfg: Config) -> None:
    h = Harness(cfg)
    h.cmd("EHLO c.example")
    got = h.send(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\n")
    assert got == ["220 2.0.0 Ready to start TLS"]
    assert h.events == [StartTls()] and h.p.phase is Phase.WAIT
    h.events = h.p.tls_started("using TLSv1.3")
    assert h.p.facts.tls and h.p.facts.helo is None
    assert h.out() == []  # the injected MAIL was never answered
    assert h.cmd("MAIL FROM:<a@example.com>").startswith("503")  # EHLO again first (RFC 3207 §4.2)
    assert "250-AUTH PLAIN LOGIN" not in h.send(b"EHLO c.example\r\n")  # relay listener: no AUTH
    assert h.cmd("STARTTLS").startswith("503 5.5.1")


def test_auth_plain_and_login_events(cfg: Config) -> None:
    h = Harness(cfg, listener=1)  # submission
    h.cmd("EHLO c.example")
    assert h.cmd("AUTH PLAIN x").startswith("530 5.7.0")  # not before TLS
    assert h.cmd("MAIL FROM:<a@example.com>").startswith("530 5.7.0")
    h.p.facts.tls = True
    h.cmd("EHLO c.example")
    assert h.cmd("AUTH PLAIN") == "334 "
    h.send(base64.b64encode(b"\0alice\0pw") + b"\r\n")
    assert h.events == [AuthRequest("PLAIN", b"alice", b"pw")] and h.p.phase is Phase.WAIT
    h.events = h.p.auth_result(None)
    assert h.out() == ["535 5.7.8 Authentication credentials invalid"]
    assert h.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert h.cmd(base64.b64encode(b"alice").decode()) == "334 UGFzc3dvcmQ6"
    h.send(base64.b64encode(b"pw2") + b"\r\n")
    assert h.events == [AuthRequest("LOGIN", b"alice", b"pw2")]
    h.events = h.p.auth_result(ALICE)
    assert h.out() == ["235 2.7.0 Authentication successful"]
    assert h.cmd("MAIL FROM:<x@example.com>") == "250 2.1.0 Ok"
    assert h.cmd("AUTH PLAIN").startswith("503")


def test_auth_abort_bad_base64_and_lockout(cfg: Config) -> None:
    h = Harness(cfg, listener=1)
    h.p.facts.tls = True
    h.cmd("EHLO c.example")
    h.cmd("AUTH LOGIN")
    assert h.cmd("*").startswith("501 5.7.0")
    assert h.cmd("AUTH PLAIN !!!").startswith("501 5.5.2")
    h2 = Harness(cfg, listener=1, locked=True)
    h2.p.facts.tls = True
    h2.cmd("EHLO c.example")
    assert h2.cmd("AUTH PLAIN AGFsaWNlAHB3").startswith("421 4.7.0")
    assert h2.events == [Close("auth_throttled")]


def test_long_lines(cfg: Config) -> None:
    h = Harness(cfg)
    got = h.send(b"NOOP " + b"x" * 3000)  # no LF yet: nothing until the line ends
    assert got == []
    assert h.send(b"y\r\nNOOP\r\n") == ["500 5.5.2 Line too long", "250 2.0.0 Ok"]


def test_eof_by_state(cfg: Config) -> None:
    # Between commands: close at once.
    h = Harness(cfg)
    assert h.p.receive_eof() == [Close("client_eof")]
    # Complete commands sent before the FIN are still answered.
    h = Harness(cfg)
    h.events = h.p.receive(b"EHLO c.example\r\nNOOP\r\n")
    h.out()
    # Mid-DATA: the partial message is dropped.
    h.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\npartial")
    assert h.p.receive_eof() == [Close("client_eof")]
    # After the final dot: the commit's reply still goes out, then the close.
    h = Harness(cfg)
    h.send(b"EHLO c.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nx\r\n.\r\n")
    assert h.p.receive_eof() == [] and h.p.phase is Phase.WAIT
    h.events = h.p.message_result(Reply(250, "2.0.0", "Ok: queued as Q"))
    assert h.out() == ["250 2.0.0 Ok: queued as Q"] and h.events == [Close("client_eof")]


def test_timeout_and_shutdown(cfg: Config) -> None:
    h = Harness(cfg)
    assert h.p.timeout() == [Close("timeout")]
    assert h.out() == ["421 4.4.2 Timeout exceeded, closing connection"]
    h = Harness(cfg)
    h.cmd("EHLO c.example")
    h.cmd("MAIL FROM:<a@example.com>")
    assert h.p.shutdown() == []  # busy: left to finish
    h.draining = True
    h.cmd("RSET")
    assert h.p.shutdown() == [Close("draining")]
    assert h.out() == ["421 4.3.2 Service shutting down, try again later"]


def test_pregreet_talking_before_the_greeting_is_refused(cfg: Config) -> None:
    # The edge holds the 220 back (greet_delay); any byte before it is a refusal and a close.
    h = Harness(cfg, greet=False)
    assert h.p.phase is Phase.NEW
    assert h.send(b"EHLO c.example\r\n") == ["554 5.5.1 Protocol error: talked before greeting"]
    assert h.events == [Close("pregreet")] and h.p.phase is Phase.CLOSED
    assert h.p.facts.commands == 0  # nothing it said was interpreted
    assert h.p.start() == [] and h.out() == []  # the held-back greeting never goes out
    assert h.send(b"MAIL FROM:<a@example.com>\r\n") == []
    # A single byte is enough (a bare CRLF too).
    h = Harness(cfg, greet=False)
    assert h.send(b"\r") == ["554 5.5.1 Protocol error: talked before greeting"]


@pytest.mark.parametrize("rcpt", ["a@192.0.2.1", "a@example.123"])
def test_an_all_numeric_top_level_domain_is_refused_at_rcpt(cfg: Config, rcpt: str) -> None:
    """RFC 1123 §2.1: "a@192.0.2.1" is an address literal without its brackets. Refused at RCPT with
    the reason, rather than accepted and bounced later for want of an MX."""
    h = Harness(cfg)
    h.cmd("EHLO c.example")
    assert h.cmd("MAIL FROM:<a@example.com>").startswith("250")
    assert h.cmd(f"RCPT TO:<{rcpt}>") == ("553 5.1.3 Bad recipient address syntax: all-numeric top-level domain"
                                         " (an IP address is written in [brackets])")
    assert h.cmd("RCPT TO:<a@123.example>").startswith("250")


CSRF_POST = (b"POST / HTTP/1.1\r\nHost: relay.example:2525\r\nContent-Type: text/plain\r\n"
             b"Content-Length: 120\r\n\r\nEHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
             b"DATA\r\nSubject: spam\r\n\r\nspam\r\n.\r\n")


@pytest.mark.parametrize("request_line", [b"POST / HTTP/1.1", b"get /favicon.ico HTTP/1.0", b"CONNECT mx:25 HTTP/1.1"])
def test_an_http_request_ends_the_session_before_its_body(cfg: Config, request_line: bytes) -> None:
    """A browser made to POST SMTP commands to a relay port (cross-protocol request forgery) from a
    trusted network: the request line closes the session, nothing after it is read."""
    h = Harness(cfg)
    got = h.send(CSRF_POST.replace(b"POST / HTTP/1.1", request_line))
    assert got == ["554 5.5.1 Protocol error: HTTP request to an SMTP server"]
    assert h.events == [Close("non_smtp")] and h.p.phase is Phase.CLOSED
    assert h.p.facts.commands == 1


def test_http_methods_after_a_session_began_also_end_it(cfg: Config) -> None:
    h = Harness(cfg)
    assert h.cmd("EHLO c.example").startswith("250 ")
    assert h.send(b"GET / HTTP/1.1\r\nNOOP\r\n") == ["554 5.5.1 Protocol error: HTTP request to an SMTP server"]
    assert h.events == [Close("non_smtp")]


def test_pregreet_waiting_client_is_greeted_and_served(cfg: Config) -> None:
    h = Harness(cfg, greet=False)
    assert h.out() == []  # nothing is said before the edge's timer
    h.events = h.p.start()
    assert h.out() == ["220 relay.test.example ESMTP mailrelayd"] and h.events == []
    assert h.cmd("EHLO c.example").startswith("250 ")


def test_pregreet_eof_and_shutdown_before_the_greeting(cfg: Config) -> None:
    h = Harness(cfg, greet=False)
    assert h.p.receive_eof() == [Close("client_eof")]  # a health check that left: closed at once
    assert h.out() == []
    h = Harness(cfg, greet=False)
    assert h.p.shutdown() == [Close("draining")]
    assert h.out() == ["421 4.3.2 Service shutting down, try again later"]
    assert h.p.start() == []


def test_memory_budget_at_data(cfg: Config) -> None:
    budget = MemoryBudget(10_000)
    h = Harness(cfg, budget=budget)
    h.send(b"EHLO c.example\r\nMAIL FROM:<a@example.com> SIZE=20000\r\nRCPT TO:<b@example.net>\r\n")
    assert h.cmd("DATA").startswith("451 4.3.2")
    assert h.p.facts.errors == 0
    h.send(b"RSET\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    h.send(b"x" * 5000)
    assert budget.used == 5000
    assert h.send(b"y" * 6000 + b"\r\n.\r\n")[-1].startswith("451 4.3.2")
    assert budget.used == 0


def test_commit_outliving_its_connection_closes_the_protocol(cfg: Config) -> None:
    """A client pipelines a second message behind the first (no waiting for 354) and resets while the
    first commits. The edge still reports the commit's outcome; the protocol must not turn the bytes
    behind it into another message, which nobody would answer and whose memory nobody would free."""
    budget = MemoryBudget(1 << 20)
    h = Harness(cfg, budget=budget)
    h.send(b"EHLO c.example\r\n")
    msg = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.org>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
    h.send(msg + msg)
    assert [type(e) for e in h.events] == [MessageReceived]
    assert h.p.phase is Phase.WAIT and budget.used > 0
    h.p.connection_lost()
    assert h.p.message_result(Reply(250, "2.0.0", "Ok: queued as X")) == []
    assert h.p.phase is Phase.CLOSED and h.out() == [] and budget.used == 0
    assert h.p.receive(msg) == [] and h.out() == []
    # Without the reset, the second message follows the first.
    h = Harness(cfg, budget=budget)
    h.send(b"EHLO c.example\r\n" + msg + msg)
    assert [type(e) for e in h.p.message_result(Reply(250, "2.0.0", "Ok: queued as X"))] == [MessageReceived]


# --- the DATA reader ----------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 4096])
def test_dot_reader_any_split(chunk: int) -> None:
    wire = b"a\r\n..b\r\n.c\r\n\r\n.\r\nNEXT"
    r = DotReader(1000, 1000)
    used = None
    for i in range(0, len(wire), chunk):
        part = wire[i:i + chunk]
        used = r.feed(part)
        if used is not None:
            assert wire[i + used:] == b"NEXT"
            break
    assert used is not None
    assert r.result() == (b"a\r\n.b\r\nc\r\n\r\n", None)


def test_dot_reader_empty_body_and_smuggling() -> None:
    r = DotReader(1000, 1000)
    assert r.feed(b".\r\n") == 3
    assert r.result() == (b"", None)
    for bad in (b"a\n.\nb\r\n.\r\n", b"a\r.\r\nb\r\n.\r\n", b"a\rb\r\n.\r\n"):
        r = DotReader(1000, 1000)
        assert r.feed(bad) == len(bad)
        assert r.result()[1] is not None and r.result()[1].code == 550  # type: ignore[union-attr]


def test_dot_reader_oversize_keeps_reading_to_the_terminator() -> None:
    budget = MemoryBudget(1 << 20)
    r = DotReader(2048, 1000, budget)
    for _ in range(10):
        assert r.feed(b"x" * 998 + b"\r\n") is None
    assert budget.used == 0  # dropped: nothing held
    assert r.feed(b"\r\n.") is None
    assert r.feed(b"\r\nQUIT\r\n") == 2
    assert r.result()[1] is not None and r.result()[1].code == 552  # type: ignore[union-attr]


def test_dot_reader_budget() -> None:
    budget = MemoryBudget(100)
    r = DotReader(10_000, 1000, budget)
    assert r.feed(b"x" * 80) is None and budget.used == 80
    assert r.feed(b"y" * 80) is None and budget.used == 0
    assert r.feed(b"\r\n.\r\n") == 5
    assert r.result() == (None, NO_MEMORY)


# --- PROXY protocol -----------------------------------------------------------------------
def test_proxy_v1() -> None:
    line = b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 25\r\n"
    info, n = parse_header(line + b"EHLO")  # type: ignore[misc]
    assert (info.source_ip, info.source_port, info.dest_port, n) == ("203.0.113.9", 5555, 25, len(line))
    info, _ = parse_header(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 25\r\n")  # type: ignore[misc]
    assert info.source_ip == "2001:db8::1"
    info, _ = parse_header(b"PROXY UNKNOWN\r\n")  # type: ignore[misc]
    assert info.source_ip is None
    assert parse_header(b"PROX") is None and parse_header(b"PROXY TCP4 1.2.3.4") is None
    for bad in (b"EHLO x\r\n", b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n",
                b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n", b"PROXY " + b"x" * 120):
        with pytest.raises(ProxyHeaderError):
            parse_header(bad)


def test_proxy_v2() -> None:
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    body = socket.inet_aton("198.51.100.7") + socket.inet_aton("192.0.2.1") + struct.pack("!HH", 40000, 25)
    hdr = sig + bytes([0x21, 0x11]) + struct.pack("!H", len(body) + 3) + body + b"\x04\x00\x00"  # with a TLV
    info, n = parse_header(hdr + b"EHLO")  # type: ignore[misc]
    assert (info.source_ip, info.source_port, n) == ("198.51.100.7", 40000, len(hdr))
    assert parse_header(hdr[:10]) is None and parse_header(hdr[:20]) is None
    local = sig + bytes([0x20, 0x00, 0, 0])
    assert parse_header(local) is not None and parse_header(local)[0].source_ip is None  # type: ignore[index]
    for bad in (sig + bytes([0x31, 0x11, 0, 12]) + body, sig + bytes([0x21, 0x11, 0, 4]) + b"abcd",
                sig + bytes([0x21, 0x31, 0, 12]) + body):
        with pytest.raises(ProxyHeaderError):
            parse_header(bad)


# --- listener options ---------------------------------------------------------------------
@pytest.mark.parametrize(("over", "key"), [
    ({"listeners": [{"name": "r", "address": "127.0.0.1:0", "mode": "relay", "greet_delay": "-1s"}]},
     "listeners[0].greet_delay"),
    ({"listeners": [{"name": "r", "address": "127.0.0.1:0", "mode": "relay", "greet_delay": "2m"}]},
     "listeners[0].greet_delay"),
    ({"listeners": [{"name": "r", "address": "127.0.0.1:0", "mode": "relay", "greet_delay": True}]},
     "listeners[0].greet_delay"),
    ({"listeners": [{"name": "r", "address": "127.0.0.1:0", "mode": "relay", "proxy_networks": ["10.0.0.0/8"]}]},
     "listeners[0].proxy_networks"),
    ({"limits": {"max_message_size": "10MB", "max_data_memory": "5MB"}}, "limits.max_data_memory"),
    ({"limits": {"proxy_header_timeout": "0s"}}, "limits.proxy_header_timeout"),
])
def test_listener_and_limit_options_are_checked(tmp_path: Path, tls_files: tuple[Path, Path], over: dict,
                                                key: str) -> None:
    from mailrelayd.config import ConfigError
    from tests.conftest import deep_merge

    with pytest.raises(ConfigError) as ei:
        load_config(write_config(tmp_path, deep_merge(base_config(tls_files), over)))
    assert f"mailrelayd.toml: {key}: " in str(ei.value)


def test_greet_delay_is_normalised_and_proxy_works_with_implicit_tls(tmp_path: Path,
                                                                     tls_files: tuple[Path, Path]) -> None:
    from tests.conftest import deep_merge

    cfg = load_config(write_config(tmp_path, deep_merge(base_config(tls_files), {"listeners": [
        {"name": "mx", "address": "127.0.0.1:0", "mode": "relay", "greet_delay": "1500ms"},
        {"name": "s", "address": "127.0.0.1:0", "mode": "submission", "tls": "implicit", "proxy_protocol": True},
        {"name": "r", "address": "127.0.0.1:0", "mode": "relay", "greet_delay": 6},
    ]})))
    assert [lst.greet_delay for lst in cfg.listeners] == [1.5, 0.0, 6.0]
    assert cfg.listeners[1].proxy_protocol and cfg.listeners[1].tls == "implicit"
