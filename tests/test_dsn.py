"""Tests of the DSN builder (mailrelayd.delivery.dsn): structure, RFC 3464 fields, safety, round trips."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage, Message
from email.utils import parseaddr, parsedate_to_datetime

import pytest

from mailrelayd.delivery.dsn import DsnRecipient, build_dsn
from mailrelayd.feedback.parse import parse_feedback

HOST = "mx.example.net"
ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 5 * 86400.0
ORIGINAL = (
    b"Received: from client.example.org (client.example.org [192.0.2.10])\r\n"
    b"\tby mx.example.net with ESMTPS id Q1A2B3\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com, carol@example.org\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
    b"\r\n"
    b"SECRET BODY LINE that must never be returned\r\n"
)
BOB = DsnRecipient(
    "bob@example.com",
    "5.1.1",
    "550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown in virtual mailbox table",
    "mx1.example.com",
    NOW - 60,
)
CAROL = DsnRecipient("carol@example.org", "4.4.7", "delivery time expired", "", NOW)


def build(**overrides: object) -> bytes:
    """Call build_dsn the way the scheduler does (keywords), with defaults for a bounce."""
    kwargs: dict[str, object] = dict(
        reporting_mta=HOST,
        to="alice@example.org",
        original=ORIGINAL,
        queue_id="Q1A2B3",
        arrival_date=ARRIVAL,
        action="failed",
        now=NOW,
        recipients=[BOB, CAROL],
    )
    kwargs.update(overrides)
    return build_dsn(**kwargs)  # type: ignore[arg-type]


def parse(out: bytes) -> EmailMessage:
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects, msg.defects
    return msg


def parts(msg: EmailMessage) -> list[EmailMessage]:
    assert msg.get_content_type() == "multipart/report"
    return list(msg.iter_parts())  # type: ignore[arg-type]


def status_blocks(msg: EmailMessage) -> list[Message]:
    """The delivery-status part as the stdlib parses it: one Message per field block."""
    part = parts(msg)[1]
    assert part.get_content_type() == "message/delivery-status"
    payload = part.get_payload()
    assert isinstance(payload, list)
    for block in payload:
        assert not block.defects, block.defects
    return payload


def text_of(part: Message) -> str:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data.decode(part.get_content_charset() or "ascii")


# --- structure -----------------------------------------------------------------------------------


def test_failed_two_recipients_structure_and_top_headers() -> None:
    msg = parse(build())
    name, addr = parseaddr(str(msg["From"]))
    assert (name, addr) == ("Mail Delivery System", f"MAILER-DAEMON@{HOST}")
    assert str(msg["To"]) == "alice@example.org"
    assert b"\r\nTo: <alice@example.org>\r\n" in build()
    assert str(msg["Subject"]) == "Undelivered Mail Returned to Sender"
    assert str(msg["Auto-Submitted"]) == "auto-replied"
    assert str(msg["MIME-Version"]) == "1.0"
    assert re.fullmatch(rf"<[^<>@\s]+@{re.escape(HOST)}>", str(msg["Message-ID"]))
    assert parsedate_to_datetime(str(msg["Date"])).timestamp() == NOW
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_failed_delivery_status_fields() -> None:
    blocks = status_blocks(parse(build()))
    assert len(blocks) == 3  # per-message fields + one block per recipient
    per_message, bob, carol = blocks
    assert per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert per_message["X-Mailrelayd-Queue-ID"] == "Q1A2B3"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert per_message["Original-Envelope-Id"] is None
    assert per_message["Final-Recipient"] is None

    assert bob["Final-Recipient"] == "rfc822; bob@example.com"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.example.com"
    # Folded on the wire, unfolded by the parser: the full reply survives.
    assert " ".join(bob["Diagnostic-Code"].split()) == f"smtp; {BOB.diagnostic}"
    assert parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW - 60

    assert carol["Final-Recipient"] == "rfc822; carol@example.org"
    assert carol["Action"] == "failed"
    assert carol["Status"] == "4.4.7"
    assert carol["Remote-MTA"] is None  # expired without any remote answer
    assert carol["Diagnostic-Code"] == "X-Mailrelayd; delivery time expired"
    assert parsedate_to_datetime(carol["Last-Attempt-Date"]).timestamp() == NOW


def test_failed_text_part_and_original_headers_without_body() -> None:
    out = build()
    text_part, _, headers_part = parts(parse(out))
    text = text_of(text_part)
    assert f"This is the mail system at host {HOST}." in text
    flat = " ".join(text.split())
    assert "your message could not be delivered to one or more recipients" in flat
    assert f"<bob@example.com>: host mx1.example.com said: {BOB.diagnostic}" in flat
    assert "<carol@example.org>: delivery time expired" in flat

    headers = text_of(headers_part)
    assert "Subject: quarterly numbers" in headers
    assert "Message-ID: <orig-1@example.org>" in headers
    assert "\tby mx.example.net with ESMTPS id Q1A2B3" in headers  # folded Received kept as is
    assert b"SECRET BODY" not in out


def test_no_diagnostic_no_remote_mta_omits_optional_fields() -> None:
    r = DsnRecipient("dave@example.com", "5.7.1", "", "", NOW)
    _, dave = status_blocks(parse(build(recipients=[r])))
    assert dave["Status"] == "5.7.1"
    assert dave["Remote-MTA"] is None
    assert dave["Diagnostic-Code"] is None


def test_envelope_id_and_invalid_status_fallback() -> None:
    recipients = [
        DsnRecipient("a@example.com", "garbage", "550 5.2.2 mailbox full", "mx.example.com", NOW),
        DsnRecipient("b@example.com", "", "no code here", "", NOW),
    ]
    per_message, a, b = status_blocks(parse(build(recipients=recipients, envelope_id="env-42")))
    assert per_message["Original-Envelope-Id"] == "env-42"
    assert a["Status"] == "5.2.2"  # taken from the reply
    assert b["Status"] == "5.0.0"  # nothing usable: generic permanent failure


def test_delayed() -> None:
    r = DsnRecipient("slow@example.org", "4.2.2", "452 4.2.2 mailbox full", "mx.example.org", NOW)
    out = build(action="delayed", recipients=[r])
    msg = parse(out)
    assert str(msg["Subject"]) == "Delayed Mail (still being retried)"
    text = text_of(parts(msg)[0])
    assert "THIS IS A WARNING ONLY" in text
    assert "keep trying" in text
    _, block = status_blocks(msg)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.2.2"
    assert block["Will-Retry-Until"] is None
    report = parse_feedback(out)
    assert report.kind == "delayed"
    assert [(x.address, x.kind, x.status) for x in report.recipients] == [("slow@example.org", "delayed", "4.2.2")]


@pytest.mark.parametrize("action", ["bounced", "", "FAILED"])
def test_unknown_action_rejected(action: str) -> None:
    with pytest.raises(ValueError):
        build(action=action)


def test_empty_recipients_or_null_sender_rejected() -> None:
    with pytest.raises(ValueError):
        build(recipients=[])
    with pytest.raises(ValueError):
        build(to="")


# --- wire safety -----------------------------------------------------------------------------


VARIANTS = {
    "failed": {},
    "delayed": {"action": "delayed"},
    "lf-8bit-original": {"original": b"Subject: caf\xc3\xa9\nFrom: a@example.org\n\nbody\n"},
    "latin1-original": {"original": b"Subject: caf\xe9\r\n\r\nbody"},
    "empty-original": {"original": b""},
    "long-diagnostic": {"recipients": [DsnRecipient("x@example.com", "5.0.0", "550 " + "y" * 5000, "mx", NOW)]},
    "non-ascii": {"recipients": [DsnRecipient("jöran@bücher.example", "5.1.1", "550 5.1.1 nö", "mx", NOW)]},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_crlf_only_and_line_lengths(variant: str) -> None:
    out = build(**VARIANTS[variant])
    assert re.search(rb"(?<!\r)\n", out) is None, "bare LF"
    assert re.search(rb"\r(?!\n)", out) is None, "bare CR"
    assert out.endswith(b"\r\n")
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    assert out.isascii()  # the sender is ASCII: the whole DSN is 7-bit
    parse(out)


def test_header_injection_in_diagnostic_and_remote_mta() -> None:
    evil = DsnRecipient(
        "bob@example.com\r\nBcc: victim2@evil.example",
        "5.1.1",
        "550 5.1.1 oops\r\nBcc: victim@evil.example\r\n\r\nFinal-Recipient: rfc822; ghost@evil.example\r\n"
        "\r\n--=_mailrelayd_x\r\nContent-Type: text/html\r\n",
        "mx.evil.example\r\nX-Evil: 1",
        NOW,
    )
    out = build(recipients=[evil], to="alice@example.org\r\nBcc: victim3@evil.example")
    msg = parse(out)
    assert msg["Bcc"] is None
    assert b"\r\nTo: <alice@example.org Bcc: victim3@evil.example>\r\n" in out  # one line, no new field
    blocks = status_blocks(msg)
    assert len(blocks) == 2  # no injected per-recipient group
    block = blocks[1]
    assert block["Bcc"] is None and block["X-Evil"] is None
    assert block["Remote-MTA"] == "dns; mx.evil.example"
    diagnostic = " ".join(block["Diagnostic-Code"].split())
    assert diagnostic.startswith("smtp; 550 5.1.1 oops Bcc: victim@evil.example Final-Recipient:")
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    for line in out.split(b"\r\n"):
        assert not line.startswith((b"Bcc:", b"X-Evil:", b"Final-Recipient: rfc822; ghost"))
    report = parse_feedback(out)
    assert [r.address for r in report.recipients] == ["bob@example.com"]


def test_long_diagnostic_is_truncated_and_folded() -> None:
    words = " ".join(f"word{i}" for i in range(2000))
    recipients = [
        DsnRecipient("a@example.com", "5.0.0", "550 " + words, "mx.example.com", NOW),
        DsnRecipient("b@example.com", "5.0.0", "550 " + "z" * 4000, "mx.example.com", NOW),
    ]
    out = build(recipients=recipients)
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    _, a, b = status_blocks(parse(out))
    assert a["Diagnostic-Code"].startswith("smtp; 550 word0 word1")
    assert a["Diagnostic-Code"].endswith("...")
    assert len(a["Diagnostic-Code"]) < 1000
    assert b["Diagnostic-Code"].startswith("smtp; 550 zzz")
    assert len(b["Diagnostic-Code"]) < 1000


# --- the original message -------------------------------------------------------------------


def test_original_with_lf_endings_and_8bit_bytes() -> None:
    original = b"From: J\xc3\xb6ran <joran@example.org>\nSubject: caf\xc3\xa9\nX-Long: a\n\tb\n\nbody \xff\xfe\n"
    out = build(original=original)
    assert out.isascii()
    headers_part = parts(parse(out))[2]
    assert headers_part.get_content_type() == "text/rfc822-headers"
    assert headers_part["Content-Transfer-Encoding"] == "base64"
    assert headers_part.get_content_charset() == "utf-8"
    data = headers_part.get_payload(decode=True)
    assert data == b"From: J\xc3\xb6ran <joran@example.org>\r\nSubject: caf\xc3\xa9\r\nX-Long: a\r\n\tb\r\n"
    assert b"body" not in data


def test_original_with_non_utf8_bytes() -> None:
    out = build(original=b"Subject: caf\xe9\r\nFrom: a@example.org\r\n\r\nbody")
    headers_part = parts(parse(out))[2]
    assert headers_part.get_content_charset() == "unknown-8bit"
    assert headers_part.get_payload(decode=True) == b"Subject: caf\xe9\r\nFrom: a@example.org\r\n"


def test_empty_original_has_no_headers_part() -> None:
    msg = parse(build(original=b""))
    assert [p.get_content_type() for p in parts(msg)] == ["text/plain", "message/delivery-status"]
    assert "attached" not in text_of(parts(msg)[0])
    assert len(status_blocks(msg)) == 3


@pytest.mark.parametrize(
    "original",
    [
        b"\x00\xff garbage without any header",
        b"\r\n\r\n\r\n",
        b"\n",
        b" continuation first\r\nA: b\r\n",
        b"--=_mailrelayd_\r\n",
    ],
)
def test_garbage_original_does_not_crash(original: bytes) -> None:
    msg = parse(build(original=original))
    assert [p.get_content_type() for p in parts(msg)][:2] == ["text/plain", "message/delivery-status"]
    assert len(parts(msg)) == 2


def test_original_without_separator_keeps_header_fields_only() -> None:
    out = build(original=b"Subject: no body\r\nFrom: a@example.org\r\nthis line is not a header\r\nX: y")
    headers = text_of(parts(parse(out))[2])
    assert headers.splitlines() == ["Subject: no body", "From: a@example.org"]


def test_huge_header_section_is_capped() -> None:
    original = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"v" * 80) for i in range(5000)) + b"\r\nbody"
    out = build(original=original)
    headers = parts(parse(out))[2].get_payload(decode=True)
    assert isinstance(headers, bytes)
    assert 0 < len(headers) <= 70 * 1024
    assert headers.endswith(b"v\r\n")  # cut at a field boundary


# --- round trips ----------------------------------------------------------------------------


def test_parse_back_with_stdlib_email() -> None:
    msg = parse(build(envelope_id="ENV-1"))
    payload = parts(msg)[1].get_payload()
    assert isinstance(payload, list)
    fields = [dict(block.items()) for block in payload]
    assert fields[0] == {
        "Reporting-MTA": f"dns; {HOST}",
        "X-Mailrelayd-Queue-ID": "Q1A2B3",
        "Original-Envelope-Id": "ENV-1",
        "Arrival-Date": "Tue, 14 Nov 2023 22:13:20 +0000",
    }
    assert [f["Final-Recipient"] for f in fields[1:]] == ["rfc822; bob@example.com", "rfc822; carol@example.org"]
    assert [f["Action"] for f in fields[1:]] == ["failed", "failed"]
    assert [f["Status"] for f in fields[1:]] == ["5.1.1", "4.4.7"]


def test_round_trip_through_feedback_parser() -> None:
    report = parse_feedback(build(envelope_id="ENV-1"))
    assert report.parser == "dsn"
    assert report.kind == "hard_bounce"
    got = {r.address: (r.kind, r.status, r.remote_mta) for r in report.recipients}
    assert got == {
        "bob@example.com": ("hard_bounce", "5.1.1", "mx1.example.com"),
        "carol@example.org": ("soft_bounce", "4.4.7", ""),
    }
    assert {r.address for r in report.suppressions} == {"bob@example.com"}
    bob = next(r for r in report.recipients if r.address == "bob@example.com")
    assert bob.diagnostic == BOB.diagnostic
    assert bob.reason == "userunknown"
    assert report.original_envelope_id == "ENV-1"
    assert report.original_message_id == "<orig-1@example.org>"
    assert report.original_from == "alice@example.org"


def test_non_ascii_recipient_uses_utf8_address_type() -> None:
    r = DsnRecipient("jöran@bücher.example", "5.1.1", "550 5.1.1 unknown", "mx.bücher.example", NOW)
    out = build(recipients=[r])
    assert out.isascii()
    msg = parse(out)
    _, block = status_blocks(msg)
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}ran@b\\x{FC}cher.example"  # RFC 6533 utf-8-addr-xtext
    assert block["Remote-MTA"] == "dns; mx.xn--bcher-kva.example"
    text_part = parts(msg)[0]
    assert text_part["Content-Transfer-Encoding"] == "quoted-printable"
    assert "<jöran@bücher.example>" in text_of(text_part)
    parse_feedback(out)  # must not crash (our parser only knows ASCII addresses)


def test_non_ascii_sender_does_not_crash() -> None:
    out = build(to="jöran@bücher.example")
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert "jöran@bücher.example" in str(msg["To"])
    assert len(status_blocks(msg)) == 3  # type: ignore[arg-type]


def test_boundary_is_unique_per_message() -> None:
    first, second = parse(build()), parse(build())
    assert first.get_boundary() != second.get_boundary()
    assert str(first["Message-ID"]) != str(second["Message-ID"])
    boundary = first.get_boundary()
    assert boundary is not None and boundary.startswith("=_")  # cannot occur in QP or base64 text
