"""Unit tests of the feedback parser on hand-written fixtures, hostile input and the classifier."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mailrelayd.feedback.classify import classify_failure, classify_status
from mailrelayd.feedback.parse import (
    FeedbackRecipient,
    FeedbackReport,
    ParseOptions,
    parse_feedback,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "feedback"


def load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def kinds(report: FeedbackReport) -> dict[str, str]:
    return {r.address.lower(): r.kind for r in report.recipients}


# --- one fixture per family ------------------------------------------------------------------

FAMILIES = [
    # (fixture, report kind, {recipient: kind})
    ("dsn-hard.eml", "hard_bounce", {"nobody-here@example.net": "hard_bounce"}),
    ("dsn-soft.eml", "soft_bounce", {"full-box@example.org": "soft_bounce"}),
    ("dsn-delayed.eml", "delayed", {"slow@example.org": "delayed"}),
    ("dsn-base64.eml", "hard_bounce", {"gone@example.com": "hard_bounce"}),
    (
        "dsn-no-blank-line.eml",
        "hard_bounce",
        {"alice-gone@example.org": "hard_bounce", "bob-full@example.org": "soft_bounce"},
    ),
    ("arf-abuse.eml", "complaint", {"complainer@example.net": "complaint"}),
    ("arf-opt-out.eml", "complaint", {"leave-me@example.org": "complaint"}),
    ("jmrp.eml", "complaint", {"reader@example.org": "complaint"}),
    ("exim.eml", "hard_bounce", {"no-such-user@example.org": "hard_bounce"}),
    (
        "qmail-mixed.eml",
        "hard_bounce",
        {"ghost@example.net": "hard_bounce", "stuffed@example.net": "soft_bounce"},
    ),
    ("postfix-plain-policy.eml", "reputation", {"reader@example.org": "reputation"}),
    ("exchange-plain.eml", "hard_bounce", {"departed@example.org": "hard_bounce"}),
    ("autoreply.eml", "not_feedback", {}),
    ("delivered-dsn.eml", "not_feedback", {}),
    ("mdn.eml", "not_feedback", {}),
    ("arf-auth-failure.eml", "not_feedback", {}),
    ("ordinary.eml", "not_feedback", {}),
    ("broken-mime.eml", "not_feedback", {}),
    # RFC 6533: message/global-delivery-status, utf-8 address type, U-label domain (IDNA-encoded).
    ("dsn-global-utf8.eml", "hard_bounce", {"josé@xn--exmple-cua.net": "hard_bounce"}),
    ("postfix-plain-utf8.eml", "hard_bounce", {"josé@xn--exmple-cua.net": "hard_bounce"}),
    # About our sending, not the recipient: blocklist, PTR, DMARC (5.7.26), rate limit, local policy.
    ("dsn-blocklist.eml", "reputation", {"reader@example.net": "reputation"}),
    ("dsn-gmail-ptr.eml", "reputation", {"reader@gmail.example": "reputation"}),
    ("dsn-dmarc-5.7.26.eml", "reputation", {"reader@gmail.example": "reputation"}),
    ("dsn-rate-limit.eml", "policy", {"reader@example.net": "policy"}),
    ("dsn-policy-local.eml", "policy", {"reader@example.org": "policy"}),
    # Vague codes with a clear diagnostic; a disabled account (5.7.13); a network failure.
    ("dsn-vague-5.0.0.eml", "hard_bounce", {"left@example.org": "hard_bounce"}),
    ("dsn-4xx-user-unknown.eml", "hard_bounce", {"unverified@example.org": "hard_bounce"}),
    ("dsn-suspended-5.7.13.eml", "hard_bounce", {"sleeper@example.org": "hard_bounce"}),
    ("dsn-network-error.eml", "soft_bounce", {"reader@example.org": "soft_bounce"}),
    # A bounce that names nobody: not feedback by itself (only a VERP token can attribute it).
    ("bounce-no-recipient.eml", "not_feedback", {}),
    # Amazon SES notifications by mail (plain and in the SNS envelope).
    ("ses-bounce-permanent.eml", "hard_bounce", {"gone@example.org": "hard_bounce"}),
    ("ses-bounce-transient-sns.eml", "soft_bounce", {"stuffed@example.org": "soft_bounce"}),
    ("ses-bounce-suppressed.eml", "hard_bounce", {"listed@example.org": "hard_bounce"}),
    ("ses-complaint.eml", "complaint", {"annoyed@example.org": "complaint"}),
    ("ses-delivery.eml", "not_feedback", {}),
    # ARF variants: fields in a text/plain part; base64 fields without Original-Rcpt-To.
    ("arf-fields-in-text.eml", "complaint", {"grumpy@example.net": "complaint"}),
    ("arf-base64-no-rcpt.eml", "complaint", {"pat@example.net": "complaint"}),
]


@pytest.mark.parametrize(("fixture", "kind", "recipients"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family(fixture: str, kind: str, recipients: dict[str, str]) -> None:
    report = parse_feedback(load(fixture))
    assert report.kind == kind, report
    assert kinds(report) == recipients


def test_every_fixture_is_covered() -> None:
    assert {f.name for f in FIXTURES.glob("*.eml")} == {f[0] for f in FAMILIES}


def test_crlf_gives_the_same_result() -> None:
    for fixture, _kind, _recipients in FAMILIES:
        raw = load(fixture)
        assert parse_feedback(raw.replace(b"\n", b"\r\n")) == parse_feedback(raw), fixture


def test_unattributed_verdict_for_a_bounce_naming_nobody() -> None:
    """A VERP token can still attribute it: the text's own status says what happened."""
    report = parse_feedback(load("bounce-no-recipient.eml"))
    assert report.unattributed is not None
    assert (report.unattributed.kind, report.unattributed.reason) == ("hard_bounce", "userunknown")
    assert parse_feedback(load("ordinary.eml")).unattributed is None


def test_ses_details() -> None:
    report = parse_feedback(load("ses-bounce-permanent.eml"))
    assert report.parser == "ses" and report.original_from == "news@example.com"
    assert report.original_message_id == "<newsletter-2025-03@example.com>"
    assert report.recipients[0].status == "5.1.1"


def test_utf8_address_forms() -> None:
    from mailrelayd.feedback.addresses import address_from_field, find_addresses, normalise_address

    # RFC 6533 section 3: \x{HEX} escapes in a utf-8 address field.
    assert address_from_field("utf-8; jos\\x{E9}@ex\\x{E4}mple.net") == "josé@exämple.net"
    assert normalise_address("jose\u0301@EXÄMPLE.net") == "josé@xn--exmple-cua.net"  # NFC, A-label
    # In free text only a delimited UTF-8 address is taken (surrounding letters must not run in).
    assert find_addresses("宛先kijitora@example.jp <josé@exämple.net>") == ["kijitora@example.jp", "josé@exämple.net"]


def test_dsn_details() -> None:
    report = parse_feedback(load("dsn-hard.eml"))
    (recipient,) = report.recipients
    # Domain lowercased, local part as reported (RFC 5321 section 2.4).
    assert recipient == FeedbackRecipient(
        address="Nobody-Here@example.net",
        kind="hard_bounce",
        status="5.1.1",
        reason="userunknown",
        diagnostic="550 5.1.1 <nobody-here@example.net>: Recipient address rejected: "
        "User unknown in virtual mailbox table",
        remote_mta="mail.example.net",
    )
    assert report.original_from == "news@example.com"
    assert report.original_message_id == "<newsletter-2025-03@example.com>"
    assert report.original_return_path == "bounces+01jd3k5q8z7xm-0-abcdefghjk@bounce.example.com"
    assert report.original_envelope_id == "01JD3K5Q8Z7XM"
    assert report.parser == "dsn"
    assert report.suppressions == report.recipients


def test_delayed_dsn_is_delayed_even_for_a_permanent_looking_text() -> None:
    raw = load("dsn-delayed.eml").replace(b"Connection\n    timed out", b"User unknown")
    report = parse_feedback(raw)
    assert kinds(report) == {"slow@example.org": "delayed"}
    assert report.suppressions == ()


def test_arf_details() -> None:
    report = parse_feedback(load("arf-abuse.eml"))
    assert report.feedback_type == "abuse"
    assert report.original_from == "deals@example.com"
    assert report.original_return_path == "bounces+01jd3k5q8z7xm-5-abcdefghjk@bounce.example.com"
    assert report.original_message_id == "<sale-2025@example.com>"
    opt_out = parse_feedback(load("arf-opt-out.eml"))
    assert opt_out.feedback_type == "opt-out"


def test_arf_without_recipient_is_a_complaint_that_suppresses_nobody() -> None:
    raw = load("arf-abuse.eml").replace(b"Original-Rcpt-To: <complainer@example.net>\n", b"")
    raw = raw.replace(b"To: complainer@example.net", b"To: undisclosed-recipients:;")
    report = parse_feedback(raw)
    assert report.kind == "complaint"
    assert report.recipients == ()


def test_arf_falls_back_to_the_single_to_of_the_reported_message() -> None:
    raw = load("arf-abuse.eml").replace(b"Original-Rcpt-To: <complainer@example.net>\n", b"")
    assert kinds(parse_feedback(raw)) == {"complainer@example.net": "complaint"}


@pytest.mark.parametrize("ftype", [b"not-spam", b"auth-failure", b"other"])
def test_arf_types_that_are_not_complaints(ftype: bytes) -> None:
    raw = load("arf-abuse.eml").replace(b"Feedback-Type: abuse", b"Feedback-Type: " + ftype)
    report = parse_feedback(raw)
    assert report.kind == "not_feedback"
    assert report.suppressions == ()


def test_jmrp_without_wrapper() -> None:
    raw = (
        b"X-HmXmrOriginalRecipient: <reader@example.org>\nFrom: Offers <offers@example.com>\n"
        b"To: alias@example.net\nSubject: offer\n\nBuy now.\n"
    )
    report = parse_feedback(raw)
    assert report.kind == "complaint"
    assert kinds(report) == {"reader@example.org": "complaint"}
    assert report.original_from == "offers@example.com"


def test_auto_reply_with_bounce_words_suppresses_nobody() -> None:
    report = parse_feedback(load("autoreply.eml"))
    assert report.parser == "autoreply"
    assert report.suppressions == ()


def test_auto_reply_headers_alone() -> None:
    raw = b"From: a@example.org\nTo: b@example.com\nSubject: Re: hi\nAuto-Submitted: auto-replied\n\nAway.\n"
    assert parse_feedback(raw).kind == "not_feedback"


def test_multi_recipient_text_bounce_classifies_each_recipient_on_its_own_lines() -> None:
    report = parse_feedback(load("qmail-mixed.eml"))
    by_address = {r.address: r for r in report.recipients}
    assert by_address["ghost@example.net"].reason == "userunknown"
    assert by_address["stuffed@example.net"].reason == "mailboxfull"
    assert [r.address for r in report.suppressions] == ["ghost@example.net"]


def test_sender_address_is_never_reported() -> None:
    for fixture, _kind, _recipients in FAMILIES:
        report = parse_feedback(load(fixture))
        for recipient in report.recipients:
            assert not recipient.address.startswith("bounces+"), fixture
            assert recipient.address.split("@")[1] != "bounce.example.com", fixture


@pytest.mark.parametrize(
    "options",
    [ParseOptions(legacy=False), ParseOptions(heuristics=False), ParseOptions(standard=False)],
    ids=["no-legacy", "no-heuristics", "no-standard"],
)
def test_options_switch_parts_off(options: ParseOptions) -> None:
    report = parse_feedback(load("exim.eml"), options=options)
    full = parse_feedback(load("exim.eml"))
    assert full.parser == "format:exim"
    if options.legacy:
        assert report.parser == "format:exim"
    else:
        assert report.parser == "heuristic:text"
    assert kinds(report) == {"no-such-user@example.org": "hard_bounce"}
    standard = parse_feedback(load("dsn-hard.eml"), options=options)
    assert (standard.parser == "dsn") == options.standard


# --- hostile input ---------------------------------------------------------------------------


def _nested_multipart(depth: int) -> bytes:
    out = [
        b"From: MAILER-DAEMON@example.net\nSubject: Undelivered Mail\n"
        b"Content-Type: multipart/mixed; boundary=b0\n\n"
    ]
    for i in range(depth):
        out.append(b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (i, i + 1))
    out.append(b"--b%d\nContent-Type: text/plain\n\n<user@example.org>: 550 5.1.1 user unknown\n" % depth)
    out.extend(b"--b%d--\n" % i for i in range(depth, -1, -1))
    return b"".join(out)


def _big_attachment() -> bytes:
    head = (
        b"From: MAILER-DAEMON@example.net\nSubject: Undelivered Mail Returned to Sender\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=XX\n\n"
        b"--XX\nContent-Type: message/delivery-status\n\n"
        b"Final-Recipient: rfc822; big@example.org\nAction: failed\nStatus: 5.1.1\n\n"
        b"--XX\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
    )
    line = b"QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB\n"
    return head + line * (10 * 1024 * 1024 // len(line)) + b"--XX--\n"


HOSTILE = {
    "empty": b"",
    "whitespace": b" \r\n\r\n",
    "binary-garbage": bytes(range(256)) * 4096,
    "nul-bytes": b"\x00" * 100_000,
    "nested-1000": _nested_multipart(1000),
    "nested-rfc822": b"From: MAILER-DAEMON@example.net\n"
    + b"Content-Type: message/rfc822\n\n" * 3000
    + b"x\n",
    "10MB-attachment": _big_attachment(),
    "10MB-line": b"From: mailer-daemon@example.net\nSubject: failure notice\n\n" + b"," * 10_000_000,
    "comma-lines": (
        b"From: mailer-daemon@example.net\nSubject: failure notice\n\nfailed addresses follow:\n"
        + (b"," * 990 + b"\n") * 300
    ),
    "many-headers": b"Subject: x\n" + b"X-A: b\n" * 300_000 + b"\nbody",
    "many-parts": b"From: mailer-daemon@example.net\nContent-Type: multipart/mixed; boundary=a\n\n"
    + b"--a\n\n" * 200_000,
    "bad-charsets": (
        b"From: mailer-daemon@example.net\nSubject: =?x-bogus?B?////?= =?utf-8?Q?=FF?=\n"
        b'Content-Type: text/plain; charset="x-\xff-bogus"\nContent-Transfer-Encoding: base64\n\n'
        b"!!!not base64!!!\xff\xfe\n"
    ),
    "bare-cr": (
        b"From: mailer-daemon@example.net\rSubject: failure notice\r\r<a@example.org>:\r"
        b"Sorry, no mailbox here by that name. (#5.1.1)\r"
    ),
    "address-flood": b"From: mailer-daemon@example.net\nSubject: failure notice\n\n"
    + (b"a" * 60 + b"@" + b"b." * 100 + b"\n") * 2000,
    "dsn-flood": (
        b"From: mailer-daemon@example.net\nContent-Type: multipart/report; report-type=delivery-status; "
        b"boundary=a\n\n--a\nContent-Type: message/delivery-status\n\n"
        + b"Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1\n" * 20_000
        + b"--a--\n"
    ),
    "html-tags": b"From: mailer-daemon@example.net\nSubject: failure\nContent-Type: text/html\n\n"
    + b"<a " * 100_000,
    "not-bytes-like-str-header": b"From: =?utf-8?B?\xff\xfe?=\nTo: \xff@\xfe\n\n\xff",
}


@pytest.mark.parametrize("name", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_input_never_raises_and_is_bounded(name: str) -> None:
    start = time.perf_counter()
    report = parse_feedback(HOSTILE[name])
    elapsed = time.perf_counter() - start
    assert isinstance(report, FeedbackReport)
    assert report.kind in {"hard_bounce", "soft_bounce", "complaint", "not_feedback", "unparsable"}
    assert len(report.recipients) <= 100
    # Generous: typical worst cases take 5-250 ms here; this only catches runaway behaviour.
    assert elapsed < 3.0, f"{name} took {elapsed:.2f} s"


def test_empty_and_garbage_are_unparsable() -> None:
    assert parse_feedback(b"").kind == "unparsable"
    assert parse_feedback(bytes(range(256)) * 10).kind == "unparsable"


def test_big_attachment_still_parsed() -> None:
    report = parse_feedback(HOSTILE["10MB-attachment"])
    assert kinds(report) == {"big@example.org": "hard_bounce"}


def test_throughput_sanity() -> None:
    """1,000 mixed messages; the real bound (2 s) is measured by bench/feedback_accuracy.py."""
    blobs = [load(f[0]) for f in FAMILIES]
    start = time.perf_counter()
    for i in range(1000):
        parse_feedback(blobs[i % len(blobs)])
    assert time.perf_counter() - start < 10.0


# --- classify_status -------------------------------------------------------------------------

HARD_CASES = [
    ("5.1.1", ""),
    ("", "550 5.1.1 <x@example.org>: Recipient address rejected: User unknown in virtual mailbox table"),
    ("5.0.0", "550 5.0.0 User unknown"),
    ("", "550 No such user here"),
    ("5.1.2", "Host or domain name not found. Name service error for name=example.invalid type=A"),
    ("5.1.10", "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"),
    ("5.2.1", "550 5.2.1 The email account that you tried to reach is disabled."),
    ("5.0.0", "550 This mailbox is disabled (554.30)"),
    ("5.1.6", "551 not our user"),
    ("", "551 User not local; please try <x@example.net>"),
    ("5.5.0", "550 Requested action not taken: mailbox unavailable"),
    ("5.0.0", "554 delivery error: dd This user doesn't have a example.com account (x@example.com)"),
    ("", "Sorry, no mailbox here by that name. (#5.1.1)"),
    ("5.4.4", "550 5.4.4 Invalid domain"),
    ("5.1.10", "556 5.1.10 Recipient address has null MX"),
    ("", "The e-mail account does not exist at the organization this message was sent to."),
]

SOFT_CASES = [
    ("5.2.2", "552 5.2.2 Mailbox full"),
    ("5.1.1", "550 5.1.1 <x@example.org>: mailbox is over quota"),  # code says address, text says quota
    ("5.1.1", "550 5.7.1 IP address 192.0.2.1 blacklisted by recipient"),
    ("5.7.1", "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org"),
    (
        "5.7.26",
        "550-5.7.26 Unauthenticated email from example.com is not accepted due to domain's DMARC policy",
    ),
    ("5.7.1", "550 5.7.1 Message content rejected, UBE"),
    ("5.1.8", "553 5.1.8 Domain of sender address bounce@example.com does not exist"),
    ("5.0.0", "550 Protocol violation"),
    ("5.3.4", "552 5.3.4 Message too large"),
    ("5.7.1", "554 5.7.1 <x@example.org>: Relay access denied"),
    (
        "5.2.1",
        "550-5.2.1 The user you are trying to contact is receiving mail at a rate that prevents delivery",
    ),
    ("4.2.2", "452 4.2.2 The email account that you tried to reach is over quota"),
    ("4.1.1", "450 4.1.1 <x@example.org>: Recipient address rejected: User unknown"),  # transient
    ("", "421 Service not available, closing transmission channel"),
    ("5.0.0", ""),  # nothing says why: never suppress on no evidence
    ("", ""),
    ("5.1.1", "550 5.1.1 Refused due to recipient preferences"),
    ("5.0.0", "Host not found, try again"),
    (
        "5.2.1",
        "550 5.2.1 <filtered@example.org>: Recipient address rejected: Policy. "
        "See https://example.org/reason/#userunknown",
    ),
]


@pytest.mark.parametrize(("status", "diagnostic"), HARD_CASES)
def test_classify_hard(status: str, diagnostic: str) -> None:
    kind, reason = classify_status(status, diagnostic)
    assert kind == "hard_bounce", reason
    assert reason in {"userunknown", "hostunknown", "suspend", "hasmoved", "notaccept"}


@pytest.mark.parametrize(("status", "diagnostic"), SOFT_CASES)
def test_classify_soft(status: str, diagnostic: str) -> None:
    kind, reason = classify_status(status, diagnostic)
    assert kind in {"soft_bounce", "reputation", "policy"}, reason


KIND_CASES = [
    # Failures about our sending: reputation (blocklist, PTR, authentication) or policy.
    ("5.7.1", "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", "reputation"),
    ("5.7.1", "550-5.7.1 [2001:db8::1] Gmail has detected that this message does not meet IPv6 sending "
              "guidelines regarding PTR records and authentication.", "reputation"),
    ("5.7.26", "550-5.7.26 This mail is unauthenticated, which poses a security risk", "reputation"),
    ("5.7.25", "550 5.7.25 The IP address sending this message does not have a PTR record setup", "reputation"),
    ("5.7.23", "", "reputation"),
    ("4.7.0", "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user "
              "complaints", "reputation"),
    ("5.0.0", "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP", "reputation"),
    ("4.7.28", "421-4.7.28 Gmail has detected an unusual rate of unsolicited mail", "policy"),
    ("", "421 Too many concurrent SMTP connections from this IP address; please try again later", "policy"),
    ("5.7.1", "550 5.7.1 Message rejected due to local policy", "policy"),
    ("5.0.0", "550 Requested action not taken: mailbox unavailable (policy)", "policy"),
    # The address itself, with vague or transient-looking codes.
    ("5.7.13", "550 5.7.13 User account disabled", "hard_bounce"),
    ("5.0.0", "550 5.2.1 This mailbox has been suspended", "hard_bounce"),
    ("5.0.0", "554 delivery error: This user doesnt have a yahoo.com account", "hard_bounce"),
    # Network trouble is not an unknown host.
    ("4.4.1", "connect to mx.example.org[192.0.2.7]:25: No route to host", "soft_bounce"),
    ("5.0.0", "Host or domain name not found. Name service error for name=x.example type=MX: Host not found, "
              "try again", "soft_bounce"),
    ("4.4.3", "MX lookup failed for example.org (DNS timeout)", "soft_bounce"),
    # A Status the reporting MTA filled in (5.1.1) against the remote's own words: the words win.
    ("5.1.1", "connect to example.org[203.0.113.225]:25: Connection timed out", "soft_bounce"),
    ("5.1.1", "503 Improper sequence of commands", "policy"),
    ("5.1.1", "554 Host network not allowed", "policy"),
    ("5.1.1", "550 Connection frequency limited", "policy"),
    # ... but not when the remote's text itself carries the address-level code.
    ("5.1.1", "550 5.1.1 Recipient rejected", "hard_bounce"),
    ("5.1.1", "", "hard_bounce"),
]


@pytest.mark.parametrize(("status", "diagnostic", "kind"), KIND_CASES)
def test_classify_kind(status: str, diagnostic: str, kind: str) -> None:
    assert classify_status(status, diagnostic)[0] == kind


def test_final_failure_with_a_transient_code_and_a_clear_diagnostic() -> None:
    text = "450 4.1.1 <x@example.org>: Recipient address rejected: User unknown in local recipient table"
    assert classify_failure("4.1.1", text).kind == "soft_bounce"  # a synchronous 450: try again
    assert classify_failure("4.1.1", text, final=True).kind == "hard_bounce"  # the MTA gave up on it


def test_classify_reasons() -> None:
    assert classify_status("5.2.2", "552 5.2.2 Mailbox full") == ("soft_bounce", "mailboxfull")
    assert classify_status("", "550 5.1.1 user unknown") == ("hard_bounce", "userunknown")
    assert classify_status("", "421 4.7.0 Try again later, closing connection")[0] == "soft_bounce"
    assert classify_status("", "550 Sender address rejected")[1] == "rejected"
    assert classify_status("2.0.0", "250 ok") == ("soft_bounce", "delivered")


def test_classify_smtp_code_argument() -> None:
    # A synchronous reply where the caller split off the code.
    assert classify_status("", "User unknown", smtp_code=550) == ("hard_bounce", "userunknown")
    assert classify_status("", "User unknown", smtp_code=450)[0] == "soft_bounce"
    assert classify_status("", "not our user", smtp_code=551)[0] == "hard_bounce"


def test_classify_evidence() -> None:
    assert classify_failure("5.1.1", "").evidence == "code"
    assert classify_failure("", "mailbox full").evidence == "soft-text"
    assert classify_failure("", "user unknown").decisive
    assert classify_failure("5.0.0", "rejected").evidence == "weak-text"
    assert classify_failure("", "").evidence == "none"


@pytest.mark.parametrize("junk", ["\x00" * 10_000, "5." * 5000, "@" * 100_000, "é" * 50_000, "550 " * 10_000])
def test_classify_never_raises(junk: str) -> None:
    start = time.perf_counter()
    kind, _reason = classify_status(junk, junk)
    assert kind in {"hard_bounce", "soft_bounce", "reputation", "policy"}
    assert time.perf_counter() - start < 1.0


def test_returned_message_quoted_as_text() -> None:
    report = parse_feedback(load("exim.eml"))
    assert report.original_from == "team@example.com"
    assert report.original_message_id == "<welcome-1@example.com>"
    assert report.original_return_path == "bounces+01jd3k5q8z7xm-7-abcdefghjk@bounce.example.com"


def test_package_exports() -> None:
    import mailrelayd.feedback as feedback

    assert feedback.parse_feedback is parse_feedback
    assert callable(feedback.classify_status)


def test_auto_reply_that_looks_like_a_bounce_suppresses_nobody() -> None:
    raw = (b"From: Grace Example <grace@example.org>\nTo: news@example.com\n"
           b"Subject: Automatic reply: Undeliverable: March newsletter\nX-Autoreply: yes\n\n"
           b"I am on holiday. Your message could not be delivered to me: user unknown at the desk.\n"
           b"<grace@example.org>: 550 5.1.1 user unknown\n")
    report = parse_feedback(raw)
    assert report.kind == "not_feedback"
    assert report.parser == "autoreply"


def test_bounce_naming_nobody_uses_the_returned_message() -> None:
    raw = (b"From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.net>\nTo: news@example.com\n"
           b"Subject: Returned mail: Cannot send message for 5 days\n\n"
           b"   ----- Transcript of session follows -----\n"
           b"421 example.org (smtp)... Deferred: Connection timed out with example.org\n\n"
           b"   ----- Unsent message follows -----\n"
           b"From: news@example.com\nTo: late@example.org\nSubject: hi\n\nhi\n")
    report = parse_feedback(raw)
    assert report.parser == "heuristic:returned-to"
    assert kinds(report) == {"late@example.org": "soft_bounce"}
    assert report.original_from == "news@example.com"
