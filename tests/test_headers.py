"""The header-block scan and the fields we insert (mailrelayd.smtp.headers), and the From/Sender rules
built on them (mailrelayd.smtp.policy), without sockets."""

from __future__ import annotations

import email
import email.errors
import email.policy
from pathlib import Path

import pytest

from mailrelayd.config import load_config
from mailrelayd.smtp.address import Mailbox
from mailrelayd.smtp.headers import insert_fields, scan_headers
from mailrelayd.smtp.policy import INVALID_FROM, INVALID_SENDER, MULTIPLE_FROM, RELAY_DENIED, Facts, Policy
from mailrelayd.users import User
from tests.conftest import TEST_HASH, base_config, deep_merge, write_config

FIELDS = b"From: <alice@example.com>\r\nMessage-ID: <q1@relay.test.example>\r\n"


def completed(data: bytes) -> email.message.EmailMessage:
    out = insert_fields(data, scan_headers(data), FIELDS)
    return email.message_from_bytes(out, policy=email.policy.default)  # type: ignore[return-value]


def test_message_without_header_block_gets_headers_then_blank_line_then_body() -> None:
    data = b"just a body line\r\n"
    scan = scan_headers(data)
    assert (scan.end, scan.needs_separator, scan.from_values) == (0, True, [])
    out = insert_fields(data, scan, FIELDS)
    assert out == FIELDS + b"\r\n" + data
    msg = completed(data)
    assert msg["From"].addresses[0].addr_spec == "alice@example.com"
    assert msg.get_content() == "just a body line\r\n"
    assert not [d for d in msg.defects if isinstance(d, email.errors.MissingHeaderBodySeparatorDefect)]


@pytest.mark.parametrize(("data", "end", "sep", "froms"), [
    (b"Subject: x\r\nFrom: a@example.com\r\n\r\nbody\r\n", 33, False, ["a@example.com"]),
    # The first line that is not a field ends the header block; a From after it is body text.
    (b"Subject: x\r\nnot a header\r\nFrom: evil@example.org\r\n\r\n", 12, True, []),
    (b" folded first line\r\nFrom: a@example.com\r\n", 0, True, []),
    (b"From: a@example.com\r\n (Alice)\r\nX: y\r\n\r\nb\r\n", 37, False, ["a@example.com (Alice)"]),
    # Obsolete space before the colon: email's parser (and others) read this as body, so do we.
    (b"Subject : x\r\n\r\nb\r\n", 0, True, []),
    (b"From alice@example.com Mon Jan  1 00:00:00 2026\r\nbody\r\n", 0, True, []),  # mbox From_ line
    (b"Subject: header only\r\n", 22, False, []),
    (b"\r\nbody only after an empty header block\r\n", 0, False, []),
    (b"", 0, False, []),
])
def test_header_block_ends_where_receivers_end_it(data: bytes, end: int, sep: bool, froms: list[str]) -> None:
    scan = scan_headers(data)
    assert (scan.end, scan.needs_separator, scan.from_values) == (end, sep, froms)
    # Whatever we insert lands in the header block as email's parser reads it, and the body is intact.
    msg = completed(data)
    assert msg["Message-ID"] == "<q1@relay.test.example>"
    assert not [d for d in msg.defects if isinstance(d, email.errors.MissingHeaderBodySeparatorDefect)]
    out = insert_fields(data, scan, FIELDS)
    assert out == data[:end] + FIELDS + (b"\r\n" if sep else b"") + data[end:]


def test_insert_nothing_into_a_complete_message_is_the_identity() -> None:
    data = b"From: a@example.com\r\n\r\nbody\r\n"
    assert insert_fields(data, scan_headers(data), b"") is data


# --- From / Sender policy ----------------------------------------------------------------------
@pytest.fixture
def policies(tmp_path: Path, tls_files: tuple[Path, Path]) -> dict[str, Policy]:
    cfg = load_config(write_config(tmp_path, deep_merge(base_config(tls_files), {
        "relay": {"trusted_networks": ["192.0.2.0/24"]}})))
    return {lst.name: Policy(cfg, lst, lambda _a: False) for lst in cfg.listeners}


ALICE = Facts("127.0.0.1", True, User("alice", TEST_HASH, ("@example.com",)))


@pytest.mark.parametrize(("headers", "refusal"), [
    (b"From: undisclosed-recipients:;\r\n", INVALID_FROM),
    (b"From: ceo@victim.com@example.com\r\n", INVALID_FROM),
    (b"From: ceo@victim.com <alice@example.com>\r\n", INVALID_FROM),
    (b"From: Team: alice@example.com;\r\n", INVALID_FROM),
    (b"From: alice@example.com\r\nSender: x:;\r\n", INVALID_SENDER),
    (b"From: alice@example.com\r\nSender: a@example.com, b@example.com\r\n", INVALID_SENDER),
    (b"From: a@example.com, b@example.com\r\n", MULTIPLE_FROM),
    (b"From: a@example.com\r\nFrom: b@example.com\r\n", MULTIPLE_FROM),
])
def test_from_without_single_valid_mailbox_is_refused_5_7_1(policies: dict[str, Policy], headers: bytes,
                                                           refusal: object) -> None:
    scan = scan_headers(headers + b"\r\nbody\r\n")
    r = policies["submission"].check_headers(ALICE, scan, outbound=True)
    assert r == refusal
    assert r is not None and (r.code, r.enhanced) == (550, "5.7.1")
    # Trusted relay clients are held to the same rule (we sign what they send too).
    assert policies["relay"].check_headers(Facts("192.0.2.1", False, None), scan, outbound=True) == refusal


@pytest.mark.parametrize("headers", [
    b"From: Alice <alice@example.com>\r\n",
    b"From: John Q. Public <jqp@example.com>\r\n",
    b'From: "a b"@example.com\r\n',
    b"From: a@example.com, b@example.com\r\nSender: alice@example.com\r\n",
    b"Subject: no From: the session adds one from the envelope\r\n",
])
def test_valid_from_is_accepted(policies: dict[str, Policy], headers: bytes) -> None:
    scan = scan_headers(headers + b"\r\nbody\r\n")
    assert policies["submission"].check_headers(ALICE, scan, outbound=True) is None


def test_postmaster_is_accepted_from_anyone_and_handled_locally(policies: dict[str, Policy]) -> None:
    relay = policies["relay"]
    assert relay.postmaster_domain == "bounces.test.example"
    stranger = Facts("203.0.113.9", False, None)
    pm = Mailbox("postmaster", relay.postmaster_domain)
    assert relay.check_rcpt(stranger, False, pm, 0) == (None, True)
    # ... but not a licence to relay elsewhere.
    assert relay.check_rcpt(stranger, False, Mailbox("postmaster", "elsewhere.example"), 0) == (RELAY_DENIED, False)


def test_postmaster_domain_falls_back_to_hostname(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    data = base_config(tls_files)
    data["relay"]["local_domains"] = []
    cfg = load_config(write_config(tmp_path, data))
    assert Policy(cfg, cfg.listeners[0], lambda _a: False).postmaster_domain == "relay.test.example"


@pytest.mark.parametrize(("data", "want"), [
    (b"Message-ID: <a@b.example>\r\n\r\nx", "<a@b.example>"),
    (b"Message-ID:\r\n <a@b.example>\r\n\r\nx", "<a@b.example>"),  # folded after the colon (some MUAs do)
    (b"Message-ID: <a@b.example>\r\n\tSubject: not a field\r\nMessage-ID: <c@d>\r\n\r\nx",
     "<a@b.example> Subject: not a field"),
    (b"Subject: x\r\n\r\nx", ""),
])
def test_message_id_is_unfolded(data: bytes, want: str) -> None:
    assert scan_headers(data).message_id == want
