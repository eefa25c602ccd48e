"""The feedback parser against input nobody wrote by hand: seeded random bytes, DSNs and ARF reports
built with the ``email`` package and then cut, flipped and spliced, absurd MIME structures, bogus
charsets and encodings, and ~1-2 MB inputs built from the fragments the parser's regular
expressions (and those of the libraries it drives) could backtrack on.

Whatever arrives, :func:`parse_feedback` must answer with a report of a known kind without going
through its last-resort ``except`` (an exception inside means a real report can be lost the same
way), within a bound far below a hang; and mail that is no report at all must never name anyone
to suppress, however much trust the rest of the pipeline grants it. Deterministic (fixed seeds),
no dependencies beyond the standard library.
"""

from __future__ import annotations

import base64
import random
import string
import time
from collections.abc import Callable
from email.message import Message
from email.mime.application import MIMEApplication
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from mailrelayd.feedback.mime import MAX_INPUT_BYTES
from mailrelayd.feedback.parse import SUPPRESSING_KINDS, FeedbackReport, parse_feedback
from mailrelayd.feedback.trust import VerpMatch, decide

SEED = 0x5EED_FEED
KINDS = {"hard_bounce", "soft_bounce", "complaint", "delayed", "reputation", "policy", "not_feedback", "unparsable"}
# CPU seconds per parse (CPU time, so that other work on the machine counts less). A normal
# report takes a few ms and the inputs here 0.05 s typically, a few tenths of a second at most
# (16,000 short lines, or header-like lines in a feedback report); the quadratic and cubic cases
# this guards against took from 5 s to hours.
BOUND = 3.0
MB = 1024 * 1024


def parse(raw: bytes) -> FeedbackReport:
    """parse_feedback with the checks every input must pass."""
    start = time.process_time()
    report = parse_feedback(raw)
    elapsed = time.process_time() - start
    assert isinstance(report, FeedbackReport)
    assert not report.detail.startswith("parser error"), (report.detail, raw[:300])
    assert report.kind in KINDS, report
    assert len(report.recipients) <= 100
    assert all(r.address and r.kind in KINDS for r in report.recipients), report.recipients
    assert elapsed < BOUND, f"{elapsed:.2f} CPU s for {len(raw)} bytes starting {raw[:200]!r}"
    return report


# --- building blocks --------------------------------------------------------------------------

WORDS = [
    "the", "meeting", "is", "moved", "to", "thursday", "please", "find", "attached", "agenda", "minutes", "budget",
    "invoice", "for", "march", "thanks", "regards", "hello", "team", "update", "project", "review", "call",
    "tomorrow", "lunch", "office", "schedule", "report", "quarterly", "numbers", "draft", "document", "link",
    "calendar", "photo", "weekend", "trip", "question", "answer",
]
DOMAINS = ["example.org", "example.net", "mail.example.com", "xn--exmple-cua.net", "sub.domain.example"]


def addr(rng: random.Random) -> str:
    local = "".join(rng.choice(string.ascii_lowercase + string.digits + "._-+") for _ in range(rng.randint(1, 12)))
    return f"{local.strip('.') or 'x'}@{rng.choice(DOMAINS)}"


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, n)))


def original_message(rng: random.Random, to: str) -> Message:
    orig = MIMEText(sentence(rng, 40) + "\n")
    orig["From"] = "App <app@example.com>"
    orig["To"] = to
    orig["Subject"] = sentence(rng, 6)
    orig["Message-ID"] = f"<{rng.getrandbits(64):x}@example.com>"
    orig["Return-Path"] = "<bounces+abc@bounces.example.com>"
    return orig


DIAGNOSTICS = [
    ("5.1.1", "smtp; 550 5.1.1 <{a}>: Recipient address rejected: User unknown"),
    ("5.2.2", "smtp; 552 5.2.2 Mailbox full"),
    ("4.4.7", "X-Postfix; delivery temporarily suspended: connection timed out"),
    ("5.7.1", "smtp; 554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org"),
    ("5.0.0", "smtp; 550 No such user here"),
    ("2.0.0", "smtp; 250 2.0.0 OK"),
]


def build_dsn(rng: random.Random) -> bytes:
    """A multipart/report; report-type=delivery-status with 1-4 recipients (RFC 3464)."""
    rcpts = [addr(rng) for _ in range(rng.randint(1, 4))]
    outer = MIMEMultipart("report", report_type="delivery-status")
    outer["From"] = rng.choice(["MAILER-DAEMON@mx.example.net", "Mail Delivery System <MAILER-DAEMON@mx.example.net>"])
    outer["To"] = "bounces+abc@bounces.example.com"
    outer["Subject"] = rng.choice(["Undelivered Mail Returned to Sender", "Delivery Status Notification (Failure)"])
    lines = "".join(f"<{a}>: host mx.{a.split('@')[1]} said: 550 5.1.1 user unknown\n" for a in rcpts)
    outer.attach(MIMEText("This is the mail system at host mx.example.net.\n\n" + lines))
    status = Message()
    status["Content-Type"] = "message/delivery-status"
    per_message = Message()
    per_message["Reporting-MTA"] = "dns; mx.example.net"
    per_message["Arrival-Date"] = "Mon, 3 Mar 2025 10:00:00 +0000"
    blocks = [per_message]
    for a in rcpts:
        code, diagnostic = rng.choice(DIAGNOSTICS)
        block = Message()
        block["Final-Recipient"] = f"rfc822; {a}"
        if rng.random() < 0.5:
            block["Original-Recipient"] = f"rfc822;{a}"
        block["Action"] = {"5": "failed", "4": "delayed", "2": "delivered"}[code[0]]
        block["Status"] = code
        block["Diagnostic-Code"] = diagnostic.format(a=a)
        blocks.append(block)
    status.set_payload(blocks)
    outer.attach(status)
    if rng.random() < 0.5:
        outer.attach(MIMEMessage(original_message(rng, rcpts[0])))
    else:
        headers = MIMEText(original_message(rng, rcpts[0]).as_string().split("\n\n")[0] + "\n", "rfc822-headers")
        outer.attach(headers)
    raw = outer.as_bytes()
    return raw.replace(b"\n", b"\r\n") if rng.random() < 0.5 else raw


def build_arf(rng: random.Random) -> bytes:
    """A multipart/report; report-type=feedback-report (RFC 5965)."""
    complainer = addr(rng)
    outer = MIMEMultipart("report", report_type="feedback-report")
    outer["From"] = "Feedback Loop <fbl@isp.example>"
    outer["To"] = "abuse@example.com"
    outer["Subject"] = "Email Feedback Report for IP 192.0.2.1"
    outer.attach(MIMEText("This is an email abuse report for an email message received from IP 192.0.2.1.\n"))
    fields = [
        f"Feedback-Type: {rng.choice(['abuse', 'fraud', 'opt-out', 'not-spam', 'auth-failure', 'virus'])}",
        "User-Agent: SomeGenerator/1.0",
        "Version: 1",
        f"Original-Mail-From: <bounces+{rng.getrandbits(32):x}@bounces.example.com>",
        f"Original-Rcpt-To: <{complainer}>",
        "Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT",
        "Source-IP: 192.0.2.1",
        "Reported-Domain: example.com",
    ]
    rest = fields[1:]
    rng.shuffle(rest)  # field order is free after Feedback-Type
    fields = [fields[0], *rest]
    report = Message()
    report["Content-Type"] = "message/feedback-report"
    report.set_payload("\n".join(fields) + "\n")
    if rng.random() < 0.3:
        report["Content-Transfer-Encoding"] = "base64"
        report.set_payload(base64.encodebytes(("\n".join(fields) + "\n").encode()).decode())
    outer.attach(report)
    outer.attach(MIMEMessage(original_message(rng, complainer)))
    raw = outer.as_bytes()
    return raw.replace(b"\n", b"\r\n") if rng.random() < 0.5 else raw


def test_the_builders_make_real_reports() -> None:
    """The mutations below start from reports the parser reads correctly."""
    rng = random.Random(SEED)
    for _ in range(30):
        dsn = parse(build_dsn(rng))
        assert dsn.parser == "dsn" and dsn.kind != "unparsable", dsn
        arf = parse(build_arf(rng))
        assert arf.parser == "arf" and arf.kind in ("complaint", "not_feedback"), arf
        assert arf.kind == "not_feedback" or len(arf.suppressions) == 1


# --- 1. no exception, whatever the bytes ------------------------------------------------------


def mutate(rng: random.Random, raw: bytes) -> bytes:
    """One to four random edits of ``raw``."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        pos = rng.randrange(len(data) + 1)
        span = rng.choice([1, 2, 8, 64, 512])
        if op == 0:  # truncate
            del data[pos:]
        elif op == 1:  # flip bytes
            for _ in range(rng.randint(1, 16)):
                if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 2:  # delete a span
            del data[pos : pos + span]
        elif op == 3:  # duplicate a span
            data[pos:pos] = data[pos : pos + span] * rng.randint(2, 50)
        elif op == 4:  # splice in a span from elsewhere
            src = rng.randrange(len(data) + 1)
            data[pos:pos] = data[src : src + span]
        elif op == 5:  # insert hostile bytes
            data[pos:pos] = rng.choice([b"\x00", b"\r", b"\xff\xfe", b"\n--", b"\n\n", b"=?", b"=\n", b"\"", b";"])
        elif op == 6:  # break or repeat a boundary line
            start = data.find(b"\n--", pos)
            if start >= 0:
                end = data.find(b"\n", start + 1)
                line = data[start : end if end >= 0 else len(data)]
                data[start : start + len(line)] = rng.choice([b"", line * rng.randint(2, 5), line[:-3], line + b"--"])
        elif op == 7:  # change a content type, charset or transfer encoding
            for needle, values in (
                (b"charset=", [b'charset="x-unknown"', b"charset=\xff", b"charset=utf-7", b'charset=""']),
                (b"Content-Transfer-Encoding: ", [b"Content-Transfer-Encoding: base64",
                                                  b"Content-Transfer-Encoding: quoted-printable",
                                                  b"Content-Transfer-Encoding: x-uuencode"]),
                (b"Content-Type: ", [b"Content-Type: message/rfc822", b"Content-Type: multipart/report",
                                     b"Content-Type: message/delivery-status", b"Content-Type: text/html",
                                     b"Content-Type: multipart/mixed; boundary=\"\""]),
            ):
                at = data.find(needle, pos)
                if at >= 0:
                    end = data.find(b"\n", at)
                    data[at : end if end >= 0 else len(data)] = rng.choice(values)
                    break
        else:  # line endings
            data = bytearray(rng.choice([bytes(data).replace(b"\r\n", b"\n"), bytes(data).replace(b"\n", b"\r"),
                                         bytes(data).replace(b"\n", b"\r\n")]))
    return bytes(data)


def test_random_bytes() -> None:
    rng = random.Random(SEED + 1)
    for _ in range(200):
        parse(rng.randbytes(rng.choice([1, 10, 100, 1000, 20_000])))
    for _ in range(80):  # mostly printable, with header-like and MIME-like pieces
        alphabet = rng.choice([b"ab: \n", b"\r\n-=?;\"<>@.", string.printable.encode(), b"\x00\n:"])
        parse(bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 5000))))


@pytest.mark.parametrize("builder", [build_dsn, build_arf], ids=["dsn", "arf"])
def test_mutated_reports(builder: Callable[[random.Random], bytes]) -> None:
    rng = random.Random(SEED + 2)
    for _ in range(150):
        parse(mutate(rng, builder(rng)))


def _nested(depth: int, ctype: bytes) -> bytes:
    out = [b"From: MAILER-DAEMON@example.net\nSubject: Undelivered Mail\n"]
    for i in range(depth):
        if ctype == b"message/rfc822":
            out.append(b"Content-Type: message/rfc822\n\nFrom: x@example.org\n")
        else:
            out.append(b'Content-Type: %s; boundary="b%d"\n\n--b%d\n' % (ctype, i, i))
    out.append(b"Content-Type: message/delivery-status\n\nFinal-Recipient: rfc822; deep@example.org\n"
               b"Action: failed\nStatus: 5.1.1\n")
    out.extend(b"--b%d--\n" % i for i in range(depth - 1, -1, -1))
    return b"".join(out)


def _parts(n: int, part: bytes, boundary: bytes = b"b", close: bool = True) -> bytes:
    head = (b"From: MAILER-DAEMON@example.net\nSubject: Undelivered Mail\n"
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"" + boundary + b"\"\n\n")
    return head + b"".join(b"--" + boundary + b"\n" + part for _ in range(n)) + (b"--" + boundary + b"--\n") * close


DS_PART = (b"Content-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example.net\n\n"
           b"Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1\n\n")
ENCODED_WORDS = [
    b"=?utf-8?B?not base64!?=", b"=?utf-8?B?////?=", b"=?x-bogus?Q?=FF=ZZ?=", b"=?utf-8?Q?", b"=??=", b"=?=?=?=",
    b"=?utf-8*en?B?w6k=?=", b"=?utf-8?X?abc?=", b"=?\xff?B?w6k=?=", b"=?utf-7?B?" + b"A" * 2000 + b"?=",
    b"=?unicode-escape?Q?=5CN{?=", b"=?punycode?Q?" + b"a" * 500 + b"?=", b"=?idna?Q?" + b"a." * 300 + b"?=",
]
STRUCTURES = {
    "multipart-nesting-5000": _nested(5000, b"multipart/mixed"),
    "report-nesting-2000": _nested(2000, b"multipart/report; report-type=delivery-status"),
    "rfc822-nesting-5000": _nested(5000, b"message/rfc822"),
    "parts-5000": _parts(5000, DS_PART),
    "empty-parts-100000": _parts(100_000, b"\n"),
    "status-blocks-100000": _parts(1, b"Content-Type: message/delivery-status\n\n" + b"Action: failed\n\n" * 100_000),
    "no-closing-boundary": _parts(3, DS_PART, close=False),
    "boundary-missing": _parts(3, DS_PART).replace(b'; boundary="b"', b""),
    "boundary-empty": _parts(3, DS_PART, boundary=b""),
    "boundary-mismatch": _parts(3, DS_PART).replace(b'boundary="b"', b'boundary="c"'),
    "boundary-duplicate-nested": _parts(3, b'Content-Type: multipart/mixed; boundary="b"\n\n' + DS_PART),
    "boundary-prefix": _parts(3, b'Content-Type: multipart/mixed; boundary="bb"\n\n--bb\n' + DS_PART),
    "boundary-1mb": _parts(2, DS_PART, boundary=b"q" * MB),
    "base64-garbage": _parts(2, b"Content-Type: message/delivery-status\nContent-Transfer-Encoding: base64\n\n"
                             + b"!!!*&^%$\xff\xfe====A=B=C\n" * 50_000),
    "base64-unpadded": _parts(2, b"Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\n"
                              + b"QUJD" * 9 + b"Q\n"),
    "qp-garbage": _parts(2, b"Content-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n\n"
                         + b"=ZZ=\n=\n=0=\xff==3D=\r\n" * 50_000),
    "uuencode-garbage": _parts(2, b"Content-Type: text/plain\nContent-Transfer-Encoding: x-uuencode\n\n"
                               + b"begin 644 x\n" + b"M" * 61 + b"\n!!!\nend\n"),
    "charset-x-unknown": _parts(2, b'Content-Type: text/plain; charset="x-unknown"\n\n\xff\xfe user unknown\n'),
    "charset-bogus": _parts(2, b"Content-Type: text/plain; charset=\"\xff\x00;;\"\n\n\x80\x81\n"),
    "charset-rfc2231": _parts(2, b"Content-Type: text/plain; charset*=''utf-8; report-type*0*=x%FF\n\n\xe9\n"),
    "charset-nul": _parts(2, b'Content-Type: text/plain; charset="utf\x00-8"\n\nuser unknown\n'),
    "charset-nul-8bit": _parts(2, b'Content-Type: text/plain; charset="utf\x00-8"\n\n\xe9chec\n'),
    "charset-nul-in-status": _parts(1, b"Content-Type: message/delivery-status\n\nReporting-MTA: dns; x\n\n"
                                    b"Final-Recipient: rfc822; a@b.example\n"
                                    b"Content-Type: text/plain; charset=\"\x00\"\nnot a field \xe9\n"),
    "json-nesting": b"From: MAILER-DAEMON@example.net\nSubject: Undelivered\n\n" + b'{"notificationType": ' * 50_000,
    "sns-json-nesting": b"From: no-reply@sns.amazonaws.com\nSubject: AWS Notification Message\n\n"
    b'{"Type": "Notification", "notificationType": "Bounce", "Message": "' + b"[" * 20_000 + b'"}\n',
    "rfc2047-malformed": b"From: " + b" ".join(ENCODED_WORDS) + b" <MAILER-DAEMON@example.net>\nSubject: "
    + b" ".join(ENCODED_WORDS) + b"\nTo: " + b"\n ".join(ENCODED_WORDS) + b"\n\n<a@example.org>: 550 5.1.1 unknown\n",
    "header-line-1mb": b"From: MAILER-DAEMON@example.net\nSubject: " + b"x" * MB + b"\n\nbody\n",
    "header-name-1mb": b"X" * MB + b": y\nFrom: MAILER-DAEMON@example.net\n\nbody\n",
    "folded-header-1mb": b"From: MAILER-DAEMON@example.net\nSubject: x" + b"\n y" * (MB // 3) + b"\n\nbody\n",
    "content-type-1mb": b"Content-Type: multipart/report; boundary=" + b"b" * MB + b"\n\n--b\n" + DS_PART,
    "content-type-params-1mb": b"Content-Type: multipart/report; report-type=delivery-status; boundary=b"
    + b"; a=b" * (MB // 5) + b"\n\n--b\n" + DS_PART + b"--b--\n",
    "nul-bytes": (_parts(3, DS_PART).replace(b"\n", b"\x00\n")),
    "nul-everywhere": bytes(b for c in _parts(3, DS_PART) for b in (c, 0)),
    "bare-cr": _parts(3, DS_PART).replace(b"\n", b"\r"),
    "mixed-line-endings": _parts(3, DS_PART).replace(b"\n", b"\r\r\n"),
    "8bit-header-names": b"Fr\xf6m: MAILER-DAEMON@example.net\n\xff\xfe: \xff\nSubject: \xe9chec\n\n\xff\n",
    "8bit-header-values": b"From: \xff\xfe <MAILER-DAEMON@ex\xe4mple.net>\nTo: \xc3\x28@\xa0\xa1.example\n"
    b"Subject: Undeliverable: \x80\x81\n\n<\xff@example.org>: 550 5.1.1 user unknown\n",
    "8bit-in-status": _parts(2, b"Content-Type: message/delivery-status\n\n"
                             b"Final-Recipient: rfc822; \xff\xfe@\xe4.example\n"
                             b"Original-Recipient: utf-8; \\x{110000}\\x{D800}@x.example\n"
                             b"Action: \xff\nStatus: 5.\xff.1\n"),
}


@pytest.mark.parametrize("name", list(STRUCTURES), ids=list(STRUCTURES))
def test_hostile_structures(name: str) -> None:
    parse(STRUCTURES[name])
    rng = random.Random(f"{SEED}-{name}")
    small = STRUCTURES[name][:64 * 1024]
    for _ in range(2):
        parse(mutate(rng, small))


# --- 2. no pathological slowness --------------------------------------------------------------

# Runs the regular expressions of mailrelayd.feedback (and of the email package, which the parser
# drives) could backtrack on.
FRAGMENTS = {
    "spaces": b" ", "tabs": b"\t ", "newlines": b"\n", "blank-lines": b" \n", "at": b"@", "lt": b"<", "gt": b">",
    "quotes": b'"', "semicolons": b";", "quote-semicolon": b'";', "equals": b"=", "dashes": b"-", "dots": b".",
    "digits": b"1", "status-codes": b"5.1.1 ", "status-dots": b"5.5.", "reply-codes": b"550 ", "address": b"a@b.",
    "address-run": b"aaaaaaaaaa@", "domain-labels": b"@a.a", "angle-address": b"<a@b.example>",
    "unclosed-angle": b"<a@b.example", "final-recipient": b"Final-Recipient: rfc822; ",
    "final-recipient-lines": b"Final-Recipient: rfc822; a@b.example\n",
    "status-lines": b"Status: 5.1.1\nAction: failed\n",
    "rfc822": b"rfc822;", "encoded-word": b"=?", "encoded-word-open": b"=?a?q?a", "url": b"http://",
    "html-tags": b"<a ", "html-script": b"<script>", "html-close": b"</", "base64": b"QUFB", "keywords": b"to ",
    "recipient-keyword": b"recipient: ", "user-mailbox": b"user mailbox", "please-reply": b"please reply to <",
    "exceed": b"exceed", "user-unknown": b"user unknown ", "markers": b"--- ", "quoted": b"> ",
    "header-like": b"X-A: b\n", "continuation": b"\n x", "json": b'{"', "json-notification": b'{"notificationType": ',
    "unicode-escape": b"\\x{", "utf8-letters": "é".encode(), "utf8-angle": "<é@é.".encode(),
    "mailer-daemon": b"mailer-daemon ",
}
TARGET = 1_500_000


def _fill(fragment: bytes) -> bytes:
    return fragment * (TARGET // len(fragment))


def _folded(fill: bytes) -> bytes:
    return b"\n ".join(fill[i : i + 900] for i in range(0, len(fill), 900))


BOUNCE = b"From: MAILER-DAEMON@mx.example.net\nSubject: Undelivered Mail Returned to Sender\n"


def _wrap(context: str, fill: bytes) -> bytes:
    if context == "text":  # a plain-text bounce whose notification is the run
        return BOUNCE + b"\nThis Message was undeliverable due to the following reason:\nuser unknown\n" + fill
    if context == "encoded":
        # The run base64-encoded (decoded text has no line length limit), small enough for the
        # legacy formats (mailrelayd.feedback.legacy) to see it whole, after the phrases and
        # headers their families look for.
        text = (b"The Postfix program\nThis Message was undeliverable due to the following reason:\n"
                b"Message from yahoo.com.\nThe following recipients did not receive this message:\n"
                + fill[: 22 * 1024] + b"\n")
        return (BOUNCE + b"X-Mailer: Novell GroupWise\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
                b"Content-Type: text/plain\nContent-Description: notification\nContent-Transfer-Encoding: base64\n\n"
                + base64.encodebytes(text)
                + b"--b\nContent-Type: text/plain\n\nuser unknown\n--b\nContent-Type: text/plain\n\n" + fill
                + b"\n--b--\n")
    if context == "html":  # HTML parts, as many as fit
        parts = [fill[i : i + 24 * 1024] for i in range(0, MAX_INPUT_BYTES, 24 * 1024)]
        return (BOUNCE + b"Content-Type: multipart/alternative; boundary=b\n\n"
                + b"".join(b"--b\nContent-Type: text/html\n\n" + part + b"\n" for part in parts) + b"--b--\n")
    if context == "headers":  # folded into the headers the parser reads, a third each
        third = _folded(fill[: MAX_INPUT_BYTES // 3])
        return (b"From: MAILER-DAEMON@mx.example.net " + third + b"\nSubject: failure notice " + third
                + b"\nTo: a@example.org " + third + b"\n\n<a@example.org>: user unknown\n")
    if context == "content-type":  # compat32 parses its parameters (boundary, charset, report-type)
        return (BOUNCE + b"Content-Type: multipart/report; report-type=delivery-status; boundary=b; x=" + _folded(fill)
                + b"\n\n--b\nContent-Type: text/plain; charset=" + _folded(fill) + b"\n\nuser unknown\n--b--\n")
    if context == "status":  # the fields of a delivery-status part
        return (BOUNCE + b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
                b"--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; " + fill[: 16 * 1024]
                + b"\n\nFinal-Recipient: rfc822; " + _folded(fill[: 16 * 1024]) + b"\nAction: failed\nStatus: "
                + fill + b"\n--b--\n")
    assert context == "arf"
    return (b"From: fbl@isp.example\nContent-Type: multipart/report; report-type=feedback-report; boundary=b\n\n"
            b"--b\nContent-Type: text/plain\n\nFeedback-Type: abuse\nUser-Agent: x\nVersion: 1\n" + fill[: 16 * 1024]
            + b"\n--b\nContent-Type: message/feedback-report\n\nFeedback-Type: abuse\nOriginal-Rcpt-To: " + fill
            + b"\n--b--\n")


# The runs tried in each place: the notification text gets those not aimed at another place.
ADDRESSES = ["at", "lt", "gt", "quotes", "address", "address-run", "angle-address", "unclosed-angle", "utf8-angle",
             "spaces", "newlines", "blank-lines"]
ELSEWHERE = {"tabs", "semicolons", "quote-semicolon", "equals", "digits", "dots", "status-dots", "encoded-word",
             "encoded-word-open", "html-tags", "html-script", "html-close", "unicode-escape"}
CONTEXTS = {
    "text": [name for name in FRAGMENTS if name not in ELSEWHERE],
    "encoded": [*ADDRESSES, "please-reply", "user-mailbox", "recipient-keyword", "user-unknown", "exceed"],
    "html": ["lt", "gt", "quotes", "spaces", "newlines", "blank-lines", "html-tags", "html-script", "html-close",
             "equals", "url"],
    "headers": [*ADDRESSES, "tabs", "semicolons", "quote-semicolon", "encoded-word", "encoded-word-open",
                "mailer-daemon", "continuation"],
    "content-type": ["spaces", "quotes", "semicolons", "quote-semicolon", "equals", "encoded-word", "continuation",
                     "newlines"],
    "status": [*ADDRESSES, "digits", "dots", "status-codes", "status-dots", "final-recipient", "final-recipient-lines",
               "status-lines", "rfc822", "unicode-escape", "semicolons", "header-like", "continuation", "base64"],
    "arf": ["at", "address", "angle-address", "newlines", "blank-lines", "final-recipient", "rfc822", "header-like",
            "continuation", "base64", "semicolons"],
}


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_adversarial_runs(context: str) -> None:
    for name in CONTEXTS[context]:
        parse(_wrap(context, _fill(FRAGMENTS[name])))


def test_adversarial_fragment_mixes() -> None:
    rng = random.Random(SEED + 3)
    names = list(FRAGMENTS)
    for _ in range(6):
        chosen = [FRAGMENTS[n] for n in rng.sample(names, rng.randint(2, 4))]
        fill = b"".join(rng.choice(chosen) for _ in range(TARGET // 8))
        parse(_wrap(rng.choice(list(CONTEXTS)), fill))


# --- 3. what is no report suppresses nobody ---------------------------------------------------


def plain_email(rng: random.Random) -> bytes:
    msg = MIMEText("\n\n".join(sentence(rng, 30) + " " + " ".join(addr(rng) for _ in range(rng.randint(0, 3)))
                               for _ in range(rng.randint(1, 8))) + "\n",
                   _charset=rng.choice(["us-ascii", "utf-8", "iso-8859-1"]))
    return _headers(rng, msg)


def multipart_email(rng: random.Random) -> bytes:
    msg = MIMEMultipart(rng.choice(["mixed", "alternative", "related", "digest"]))
    for _ in range(rng.randint(1, 6)):
        kind = rng.randrange(5)
        if kind == 0:
            part: Message = MIMEText(sentence(rng, 40) + f"\nreply to {addr(rng)}\n")
        elif kind == 1:
            part = MIMEText(f"<html><body><p>{sentence(rng, 40)}</p><a href='mailto:{addr(rng)}'>me</a></body></html>",
                            "html")
        elif kind == 2:
            part = MIMEApplication(rng.randbytes(rng.randint(0, 4000)), "octet-stream")
        elif kind == 3:
            inner = MIMEText(sentence(rng, 20) + "\n")
            inner["From"], inner["To"], inner["Subject"] = addr(rng), addr(rng), sentence(rng, 4)
            part = MIMEMessage(inner)
        else:
            part = MIMEText(f"BEGIN:VCALENDAR\nORGANIZER:mailto:{addr(rng)}\nEND:VCALENDAR\n", "calendar")
        msg.attach(part)
    return _headers(rng, msg)


def _headers(rng: random.Random, msg: Message) -> bytes:
    msg["From"] = f"{rng.choice(WORDS).title()} <{addr(rng)}>"
    msg["To"] = ", ".join(addr(rng) for _ in range(rng.randint(1, 3)))
    if rng.random() < 0.5:
        msg["Cc"] = addr(rng)
    msg["Subject"] = sentence(rng, 8)
    msg["Message-ID"] = f"<{rng.getrandbits(64):x}@{rng.choice(DOMAINS)}>"
    return msg.as_bytes()


def assert_suppresses_nobody(raw: bytes) -> None:
    report = parse(raw)
    assert report.kind not in SUPPRESSING_KINDS, report
    assert report.suppressions == (), report
    assert report.unattributed is None or report.unattributed.kind not in SUPPRESSING_KINDS, report
    # Whatever the rest of the pipeline trusts (we sent to every address named, the reporter is
    # listed, even a valid VERP token), no suppressing verdict may come out of it.
    named = {r.address.lower() for r in report.recipients}
    for verp in (None, VerpMatch("someone@example.org", "example.com", "Q1")):
        decision = decide(report, verp=verp, sent=named, reporter_trusted=True, require_verp=False)
        assert not [a for a in decision.actions if a.kind in SUPPRESSING_KINDS], (decision, report)


@pytest.mark.parametrize("builder", [plain_email, multipart_email], ids=["plain", "multipart"])
def test_ordinary_mail_suppresses_nobody(builder: Callable[[random.Random], bytes]) -> None:
    rng = random.Random(SEED + 4)
    for _ in range(100):
        raw = builder(rng)
        assert_suppresses_nobody(raw)
        assert_suppresses_nobody(mutate(rng, raw))


def test_random_bytes_suppress_nobody() -> None:
    rng = random.Random(SEED + 5)
    for _ in range(300):
        assert_suppresses_nobody(rng.randbytes(rng.choice([10, 200, 5000])))
    for name in STRUCTURES:
        if b"Final-Recipient" not in STRUCTURES[name] and b"user unknown" not in STRUCTURES[name]:
            assert_suppresses_nobody(STRUCTURES[name])
