"""Bounce and complaint families the public sisimai samples showed wrong: each rule is tested on the
shape of the family (its generator's headers and wording), with invented addresses and hosts.

1. a block list or reputation service named only by a URL ("553 http://<dnsbl>/query?ip=..."), and a
   Status X.1.3 that Sendmail writes for any bare 553: never a suppression;
2. "the address couldn't be found" (Gmail / Google Workspace "Address not found") is an unknown
   address, the sender's is not;
3. a 2.x.x Status or a success Action (Postfix's "deliverable" verification report) is no failure;
4. Apple Mail's unsubscribe request is an opt-out complaint by its own sender, believed only from a
   DKIM signature of that sender's own domain;
5. a DSN's own field lines ("Final-Recipient: rfc822; ...") are no evidence of anything;
6. "System not accepting network messages" (RFC 3463 X.3.2) with a 5xx, and RFC 7504's bare 521/556,
   mean the destination accepts no mail;
7. DragonFly Mail Agent's "There was an error delivering your mail to <a>" names its recipient,
   role addresses included, and "host <name> not found" is an unknown host;
8. Japanese bounces: raw UTF-8 in a part declared ISO-2022-JP, and the Japanese wording of the
   hard (and mailbox full) causes;
9. "not accepting mail" with a qualifier (with attachments, from your domain, larger than...) refuses
   this message or sender, not every message: never a suppression;
10. the address between the words ("Rcpt <a> does not exist", "User [a] does not exist", "mail-box
    not found") is an unknown address, the sender's is not;
11. a one-letter top-level label in an address field (DSN, ARF, X-Failed-Recipients), and a size
    limit named in the text outranking a Status 5.1.1;
12. GroupWise's tab-indented list of failed addresses;
13. a challenge-response service's request in DSN form ("Sender not pre-approved") is no feedback;
14. RFC 7505 null MX in the MTAs' own words (Exim's "an MX or SRV record indicated no SMTP service",
    Postfix's "nullMX"); the sender's null MX is no recipient's;
15. Exim's X-Failed-Recipients naming the address the bounce is returned to (mail sent to oneself), when
    the notification also lists it as failed;
16. a report quoted inline by another notification (its header section, then DSN fields or recipient
    lines) is read, not taken for the returned message;
17. Google Groups' "no permission to post" in Japanese;
18. qmail's refusals of our own name (HELO) are about us;
19. a refusal sent as an MDN (Sieve "reject", RFC 5429; Dovecot's LDA over quota): an automatic
    "deleted" disposition is a soft bounce of its Final-Recipient, never a suppression; every other
    MDN stays a read receipt;
20. a bounce whose subject quotes the returned message's ("Undeliverable: Holiday offers") is no
    auto-reply; an out-of-office subject that comes first still is;
21. an address the notification asks the reader to write to ("please send mail to help@...",
    "Contact: ...") is no recipient;
22. Momentum's ">>> <address> (Undelivered): reply" lines, and a daily limit's words outranking a
    bare 551;
23. an address alone on its line in double quotes;
24. unknown, disabled and full mailboxes in Spanish, Portuguese, Italian, French, German and Dutch;
25. the same in Chinese (simplified and traditional) and Korean, the sender's account excepted;
26. sender verification (Exim's callout, "Verification failed for <our address>") is about us,
    whatever Status the reporting MTA wrote; getaddrinfo's "Name or service not known" is an unknown
    host; IMail's "reason: address" lines name their recipient;
27. an ARF of a feedback type that does not say a person objected (or of none) is no complaint.
"""

from __future__ import annotations

import pytest

from mailrelayd.feedback.classify import HARD, POLICY, REPUTATION, SOFT, classify_status
from mailrelayd.feedback.mime import decode_bytes
from mailrelayd.feedback.parse import SUPPRESSING_KINDS, FeedbackReport, parse_feedback
from mailrelayd.feedback.report import FeedbackRecipient
from mailrelayd.feedback.trust import ReporterPolicy, decide, policy_for

NOT_SUPPRESSING = {"soft_bounce", "delayed", "reputation", "policy"}


def eml(text: str) -> bytes:
    """A message as it arrives over SMTP: CRLF line ends, raw UTF-8 where 8-bit text is written."""
    return text.replace("\n", "\r\n").encode("utf-8")


def kinds(report: FeedbackReport) -> dict[str, str]:
    return {r.address.lower(): r.kind for r in report.recipients}


RETURNED = """Return-Path: <bounces+q7a9@bounce.example.com>
From: Example News <news@example.com>
To: {to}
Subject: Spring newsletter
Date: Mon, 10 Mar 2025 09:00:00 +0000
Message-ID: <20250310090000.77f1c2@example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
"""


def sendmail_dsn(rcpt: str, status: str, diagnostic: str, reason_line: str) -> bytes:
    """A Sendmail 8 DSN: transcript text part, delivery-status part, the returned message."""
    return eml(f"""Return-Path: <>
From: Mail Delivery Subsystem <MAILER-DAEMON@mta1.example.net>
To: <bounces+q7a9@bounce.example.com>
Subject: Returned mail: see transcript for details
Date: Mon, 10 Mar 2025 10:00:04 +0100
Message-Id: <202503100900.52A904Qx011742@mta1.example.net>
Auto-Submitted: auto-generated (failure)
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="52A904Qx011742.1741597204/mta1.example.net"

This is a MIME-encapsulated message

--52A904Qx011742.1741597204/mta1.example.net

The original message was received at Mon, 10 Mar 2025 10:00:01 +0100
from relay1.example.com [198.51.100.7]

   ----- The following addresses had permanent fatal errors -----
<{rcpt}>
    (reason: {reason_line})

   ----- Transcript of session follows -----
... while talking to mx.example.org.:
>>> RCPT To:<{rcpt}>
<<< {reason_line}
550 5.1.1 <{rcpt}>... User unknown

--52A904Qx011742.1741597204/mta1.example.net
Content-Type: message/delivery-status

Reporting-MTA: dns; mta1.example.net
Received-From-MTA: DNS; relay1.example.com
Arrival-Date: Mon, 10 Mar 2025 10:00:01 +0100

Final-Recipient: RFC822; {rcpt}
Action: failed
Status: {status}
Remote-MTA: DNS; mx.example.org
Diagnostic-Code: SMTP; {diagnostic}
Last-Attempt-Date: Mon, 10 Mar 2025 10:00:04 +0100

--52A904Qx011742.1741597204/mta1.example.net
Content-Type: text/rfc822-headers

{RETURNED.format(to=rcpt)}
--52A904Qx011742.1741597204/mta1.example.net--
""")


# --- 1. block lists named by a URL; Sendmail's 5.1.3 for a bare 553 ----------------------------------

SENDMAIL_DNSBL_URL = sendmail_dsn("reader@example.org", "5.1.3", "553 http://www.spamhaus.org/query/bl?ip=192.0.2.9",
                                  "553 http://www.spamhaus.org/query/bl?ip=192.0.2.9")
SENDMAIL_BARE_553 = sendmail_dsn("reader@example.org", "5.1.3", "553 mx.example.org", "553 mx.example.org")


@pytest.mark.parametrize("raw", [SENDMAIL_DNSBL_URL, SENDMAIL_BARE_553], ids=["dnsbl-url", "bare-553"])
def test_sendmail_553_without_words_suppresses_nobody(raw: bytes) -> None:
    report = parse_feedback(raw)
    assert report.suppressions == (), report
    assert set(kinds(report).values()) <= NOT_SUPPRESSING, report


def test_the_url_of_a_block_list_is_the_reason() -> None:
    assert kinds(parse_feedback(SENDMAIL_DNSBL_URL)) == {"reader@example.org": REPUTATION}


@pytest.mark.parametrize("url", [
    "http://www.spamhaus.org/query/bl?ip=192.0.2.9",
    "https://check.spamhaus.org/listed/?searchterm=192.0.2.9",
    "http://www.spamcop.net/bl.shtml?192.0.2.9",
    "https://www.barracudacentral.org/lookups/lookup-reputation",
    "http://www.sorbs.net/lookup.shtml?192.0.2.9",
    "https://www.senderscore.org/lookup.php?lookup=192.0.2.9",
    "https://mailspike.org/iplookup.html",
    "http://www.uceprotect.net/en/rblcheck.php?ipr=192.0.2.9",
    "http://cbl.abuseat.org/lookup.cgi?ip=192.0.2.9",
    "https://ipcheck.proofpoint.com/?ip=192.0.2.9",
    "https://sendersupport.olc.protection.outlook.com/pm/",
    "https://rbl.example.net/lookup?ip=192.0.2.9",
    "https://postmaster.example.net/blocklist/192.0.2.9",
])
def test_block_list_urls(url: str) -> None:
    # The reply's only words are the URL; the code alone would say "bad destination address".
    assert classify_status("5.1.3", f"553 {url}") == (REPUTATION, "blocked")
    assert classify_status("5.1.1", f"550 5.1.1 {url}")[0] == REPUTATION


def test_other_urls_still_carry_no_reason() -> None:
    text = ("550-5.1.1 The email account that you tried to reach does not exist. "
            "https://support.google.com/mail/?p=NoSuchUser")
    assert classify_status("5.1.1", text) == (HARD, "userunknown")
    # "...#filtered" in a URL is no filter verdict; the code decides.
    assert classify_status("5.1.1", "550 5.1.1 see https://docs.example.net/errors#filtered")[0] == HARD


def test_a_status_5_1_3_alone_is_no_evidence() -> None:
    assert classify_status("5.1.3", "553 mx.example.org")[0] == SOFT
    assert classify_status("5.1.3", "")[0] == SOFT
    # The remote server's own 5.1.3, or words, still decide.
    assert classify_status("5.1.3", "553 5.1.3 <a@example.org>... Bad destination mailbox address syntax")[0] == HARD
    assert classify_status("5.1.3", "553 5.1.3 mx.example.org")[0] == HARD
    assert classify_status("5.1.3", "553 <a@example.org>... User unknown")[0] == HARD


# --- 2. "Address not found" -------------------------------------------------------------------------


def google_dsn(rcpt: str, text: str, fields: str) -> bytes:
    """A Gmail / Google Workspace DSN: text and HTML alternatives, then a delivery-status part."""
    html = text.replace("\n", "<br>\n")
    return eml(f"""Return-Path: <>
From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: bounces+q7a9@bounce.example.com
Auto-Submitted: auto-replied
Subject: Delivery Status Notification (Failure)
Message-ID: <67cecb25.050a0220.1f1a7.9d1bSMTPIN_ADDED_MISSING@mx.google.com>
Date: Mon, 10 Mar 2025 03:00:05 -0700 (PDT)
MIME-Version: 1.0
Content-Type: multipart/report; boundary="000000000000b1c2d3e4f5a6b7c8"; report-type=delivery-status

--000000000000b1c2d3e4f5a6b7c8
Content-Type: multipart/alternative; boundary="000000000000c2d3e4f5a6b7c8d9"

--000000000000c2d3e4f5a6b7c8d9
Content-Type: text/plain; charset="UTF-8"


** Address not found **

{text}

Learn more here: https://support.google.com/mail/?p=NoSuchUser

--000000000000c2d3e4f5a6b7c8d9
Content-Type: text/html; charset="UTF-8"

<html><body><h2>Address not found</h2><p>{html}</p></body></html>

--000000000000c2d3e4f5a6b7c8d9--

--000000000000b1c2d3e4f5a6b7c8
Content-Type: message/delivery-status

Reporting-MTA: dns; googlemail.com
Arrival-Date: Mon, 10 Mar 2025 03:00:04 -0700 (PDT)

Final-Recipient: rfc822; {rcpt}
Action: failed
{fields}
Last-Attempt-Date: Mon, 10 Mar 2025 03:00:05 -0700 (PDT)

--000000000000b1c2d3e4f5a6b7c8
Content-Type: message/rfc822

{RETURNED.format(to=rcpt)}
Hello.

--000000000000b1c2d3e4f5a6b7c8--
""")


GMAIL_ADDRESS_NOT_FOUND = google_dsn(
    "gone@example.org",
    "Your message wasn't delivered to gone@example.org because the address couldn't be found, or is\n"
    "unable to receive mail.", "Status: 5.0.0")
GSUITE_ADDRESS_NOT_FOUND = google_dsn(
    "gone@example.org",
    "Your message wasn't delivered to gone@example.org because the address couldn't be found. Check for\n"
    "typos or unnecessary spaces and try again.", "Status: 5.0.0")
# The same page when the remote server refused our *sender*: its reply decides.
GSUITE_SENDER_REJECTED = google_dsn(
    "reader@example.org",
    "Your message wasn't delivered to reader@example.org because the address couldn't be found, or is\n"
    "unable to receive mail.",
    "Status: 5.1.8\nRemote-MTA: dns; mx.example.org. (192.0.2.25, the server for the domain example.org.)\n"
    "Diagnostic-Code: smtp; 501 5.1.8 Sender address rejected")


@pytest.mark.parametrize(("raw", "expected"), [
    (GMAIL_ADDRESS_NOT_FOUND, {"gone@example.org": HARD}),
    (GSUITE_ADDRESS_NOT_FOUND, {"gone@example.org": HARD}),
    (GSUITE_SENDER_REJECTED, {"reader@example.org": POLICY}),
], ids=["gmail", "workspace", "sender-rejected"])
def test_address_not_found(raw: bytes, expected: dict[str, str]) -> None:
    assert kinds(parse_feedback(raw)) == expected


@pytest.mark.parametrize(("text", "kind"), [
    ("The recipient address couldn't be found.", HARD),
    ("The email address you entered couldn't be found.", HARD),
    ("the mailbox could not be found on this server", HARD),
    ("The sender address couldn't be found.", POLICY),
    ("sender address could not be verified", POLICY),
    ("The sender's address couldn't be found.", POLICY),
    ("the domain example.org couldn't be found", HARD),
])
def test_could_not_be_found(text: str, kind: str) -> None:
    assert classify_status("5.0.0", f"550 {text}")[0] == kind


# --- 3. successes are no failures ---------------------------------------------------------------------

POSTFIX_VERIFY = eml("""Return-Path: <>
From: Mail Delivery System <MAILER-DAEMON@mx1.example.net>
To: bounces+q7a9@bounce.example.com
Subject: Mail Delivery Status Report
Date: Mon, 10 Mar 2025 10:00:04 +0100
Message-Id: <20250310090004.3F1A21C0427@mx1.example.net>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="3F1A21C0427.1741597204/mx1.example.net"

This is a MIME-encapsulated message.

--3F1A21C0427.1741597204/mx1.example.net
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx1.example.net.

Enclosed is the mail delivery report that you requested.

<reader@example.org>: delivery via mx.example.org[192.0.2.25]:25: 250 2.1.5 Ok

--3F1A21C0427.1741597204/mx1.example.net
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx1.example.net
X-Postfix-Queue-ID: 3F1A21C0427
X-Postfix-Sender: rfc822; bounces+q7a9@bounce.example.com
Arrival-Date: Mon, 10 Mar 2025 10:00:03 +0100 (CET)

Final-Recipient: rfc822; reader@example.org
Original-Recipient: rfc822;reader@example.org
Action: deliverable
Status: 2.1.5
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; 250 2.1.5 Ok

--3F1A21C0427.1741597204/mx1.example.net--
""")


def test_a_success_report_is_not_feedback() -> None:
    report = parse_feedback(POSTFIX_VERIFY)
    assert (report.kind, report.recipients) == ("not_feedback", ()), report
    # A 2.x.x Status is a success whatever the Action says.
    odd = POSTFIX_VERIFY.replace(b"Action: deliverable", b"Action: failed")
    assert parse_feedback(odd).recipients == ()
    # The failures of a mixed report are still read.
    mixed = POSTFIX_VERIFY.replace(
        b"Diagnostic-Code: smtp; 250 2.1.5 Ok\r\n",
        b"Diagnostic-Code: smtp; 250 2.1.5 Ok\r\n\r\nFinal-Recipient: rfc822; gone@example.org\r\n"
        b"Action: undeliverable\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.example.org\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown\r\n")
    assert kinds(parse_feedback(mixed)) == {"gone@example.org": HARD}


# --- 4. Apple Mail's unsubscribe request ---------------------------------------------------------------

APPLE_UNSUBSCRIBE = eml("""Return-Path: <reader@icloud.example>
Date: Mon, 10 Mar 2025 10:12:31 +0000 (UTC)
From: reader@icloud.example
Reply-To: reader@icloud.example
To: unsubscribe-q7a9.3kx81f@lists.example.com
Message-ID: <5E0D9A3B-7C41-4F2E-9B11-2A8C7D3E6F10@icloud.example>
Subject: unsubscribe
MIME-Version: 1.0
Content-Type: text/plain; charset=UTF-8
Content-Transfer-Encoding: quoted-printable
DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=icloud.example; s=1a1hai; t=1741601551;
\tbh=2jmj7l5rSw0yVb/vlWAYkK/YBwk=; h=Content-Type:From:Mime-Version:Date:Subject:Message-Id:To;
\tb=Qm9ndXMgc2lnbmF0dXJlIGZvciBhIHRlc3Q=
Auto-Submitted: auto-replied
X-Apple-Unsubscribe: true

Apple Mail sent this email to unsubscribe from the message =E2=80=9CSpring news=
letter=E2=80=9D.
""")


def test_apple_unsubscribe_is_an_opt_out_complaint() -> None:
    report = parse_feedback(APPLE_UNSUBSCRIBE)
    assert (report.kind, report.feedback_type, report.parser) == ("complaint", "opt-out", "unsubscribe"), report
    assert kinds(report) == {"reader@icloud.example": "complaint"}


def test_unsubscribe_lookalikes_are_no_complaint() -> None:
    # The header only counts from the client, not in a bounce of the request or without the header.
    bounced = APPLE_UNSUBSCRIBE.replace(b"From: reader@icloud.example",
                                        b"From: Mail Delivery System <MAILER-DAEMON@mx.example.com>")
    assert parse_feedback(bounced).kind != "complaint"
    plain = APPLE_UNSUBSCRIBE.replace(b"X-Apple-Unsubscribe: true\r\n", b"")
    report = parse_feedback(plain)
    assert (report.kind, report.recipients) == ("not_feedback", ())


def test_an_unsubscribe_request_is_believed_only_from_its_senders_own_domain() -> None:
    report = parse_feedback(APPLE_UNSUBSCRIBE)
    listed = ReporterPolicy.from_config(["icloud.example", "fbl.example.net", "192.0.2.0/24"])
    own = policy_for(report, listed)
    assert own.domains == frozenset({"icloud.example"}) and own.networks == ()
    # Another listed domain's signature, or a listed network, does not vouch for this From.
    other = parse_feedback(APPLE_UNSUBSCRIBE.replace(b"From: reader@icloud.example", b"From: ceo@example.net"))
    assert policy_for(other, listed) == ReporterPolicy()
    sub = parse_feedback(APPLE_UNSUBSCRIBE.replace(b"From: reader@icloud.example", b"From: a@mail.icloud.example"))
    assert policy_for(sub, listed).domains == frozenset({"icloud.example"})
    # Other complaints keep the whole list, and the decision is the one for every complaint.
    arf = FeedbackReport("complaint", (FeedbackRecipient("c@example.net", "complaint"),), parser="arf")
    assert policy_for(arf, listed) == listed
    d = decide(report, verp=None, sent={"reader@icloud.example": "reader@icloud.example"}, reporter_trusted=False,
               require_verp=False)
    assert d.actions == () and d.untrusted == ("reader@icloud.example",)
    d = decide(report, verp=None, sent={"reader@icloud.example": "reader@icloud.example"}, reporter_trusted=True,
               require_verp=False)
    assert [(a.address, a.kind) for a in d.actions] == [("reader@icloud.example", "complaint")]


# --- 5. a DSN's own fields are no evidence ----------------------------------------------------------------

# An MTA that writes the delivery-status fields into its text/plain notification; the remote server's
# reply carried nothing but its code.
DSN_FIELDS_IN_TEXT = eml(f"""Return-Path: <>
From: Mail Delivery System <MAILER-DAEMON@gw.example.net>
To: bounces+q7a9@bounce.example.com
Subject: Undelivered Mail Returned to Sender
Date: Mon, 10 Mar 2025 10:00:04 +0100
Message-ID: <ndr.20250310100004.81@gw.example.net>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

The following message could not be delivered.

Reporting-MTA: dns; gw.example.net
Arrival-Date: Mon, 10 Mar 2025 10:00:02 +0100

Final-Recipient: rfc822; gone@example.org
Original-Recipient: rfc822; gone@example.org
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550

------ This is a copy of the message, including all the headers. ------

{RETURNED.format(to="gone@example.org")}
Hello.
""")


def test_dsn_field_lines_are_no_evidence() -> None:
    assert kinds(parse_feedback(DSN_FIELDS_IN_TEXT)) == {"gone@example.org": HARD}
    assert classify_status("5.1.1", "Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1")[0] == HARD
    assert classify_status("5.1.1", "Final-Recipient: RFC822;a@example.org Content-Type: message/rfc822")[0] == HARD
    # RFC 5322 named as a rule the message broke still is a cause.
    assert classify_status("5.6.0", "550 5.6.0 message does not comply with RFC 5322")[0] == POLICY


# --- 6. the destination accepts no mail -------------------------------------------------------------------

POSTFIX_NOT_ACCEPTING = eml(f"""Return-Path: <>
From: MAILER-DAEMON@mx1.example.net (Mail Delivery System)
To: bounces+q7a9@bounce.example.com
Subject: Undelivered Mail Returned to Sender
Date: Mon, 10 Mar 2025 10:00:04 +0100
Message-Id: <20250310090004.4A7B31C0511@mx1.example.net>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="4A7B31C0511.1741597204/mx1.example.net"

--4A7B31C0511.1741597204/mx1.example.net
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx1.example.net.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<info@parked.example>: host mx.parked.example[192.0.2.44] said: 521 5.3.2
    <info@parked.example>: Recipient address rejected: System not accepting
    network messages (in reply to RCPT TO command)

--4A7B31C0511.1741597204/mx1.example.net
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx1.example.net
Arrival-Date: Mon, 10 Mar 2025 10:00:03 +0100 (CET)

Final-Recipient: rfc822; info@parked.example
Action: failed
Status: 5.3.2
Remote-MTA: dns; mx.parked.example
Diagnostic-Code: smtp; 521 5.3.2 <info@parked.example>: Recipient address
    rejected: System not accepting network messages

--4A7B31C0511.1741597204/mx1.example.net
Content-Type: text/rfc822-headers

{RETURNED.format(to="info@parked.example")}
--4A7B31C0511.1741597204/mx1.example.net--
""")


def test_not_accepting_network_messages() -> None:
    assert kinds(parse_feedback(POSTFIX_NOT_ACCEPTING)) == {"info@parked.example": HARD}
    assert classify_status("5.3.2", "554 5.3.2 System not accepting network messages") == (HARD, "notaccept")
    # Transient: the host is down for maintenance.
    assert classify_status("4.3.2", "421 4.3.2 System not accepting network messages")[0] == SOFT


def test_rfc7504_reply_codes() -> None:
    assert classify_status("", "521 mx.parked.example") == (HARD, "notaccept")
    assert classify_status("", "556 parked.example") == (HARD, "notaccept")
    # Words or an enhanced code of another cause still decide.
    assert classify_status("", "521 5.7.1 client host blocked using dnsbl.example.net")[0] == REPUTATION
    assert classify_status("", "521 5.2.1 mailbox full")[0] == SOFT
    assert classify_status("", "521 Service not available, closing transmission channel")[0] == SOFT


# --- 7. DragonFly Mail Agent --------------------------------------------------------------------------------


def dma_bounce(rcpt: str, reason: str) -> bytes:
    """DragonFly Mail Agent: no MIME, the reason after the lead sentence, then the returned headers."""
    return eml(f"""Received: from MAILER-DAEMON
\tid 1f3a2
\tby dma.example.net (DragonFly Mail Agent v0.13);
\tMon, 10 Mar 2025 10:00:04 +0100
X-Original-To: <{rcpt}>
From: MAILER-DAEMON <>
To: bounces+q7a9@bounce.example.com
Subject: Mail delivery failed
Message-Id: <1f3a2@dma.example.net>
Date: Mon, 10 Mar 2025 10:00:04 +0100

This is the DragonFly Mail Agent v0.13 at dma.example.net.

There was an error delivering your mail to <{rcpt}>.

{reason}

Message headers follow.

Received: from relay1 (uid 1001)
\t(envelope-from bounces+q7a9@bounce.example.com)
\tid 1f3a0
\tby dma.example.net (DragonFly Mail Agent v0.13);
\tMon, 10 Mar 2025 10:00:03 +0100
Subject: Spring newsletter
To: <{rcpt}>
Date: Mon, 10 Mar 2025 10:00:03 +0100
Message-Id: <20250310090003.1f3a0@example.com>
From: <news@example.com>
""")


@pytest.mark.parametrize(("raw", "expected"), [
    (dma_bounce("postmaster@gone-corp.example", "DNS lookup failure: host gone-corp.example not found"),
     {"postmaster@gone-corp.example": HARD}),
    (dma_bounce("root@old.example", "DNS lookup failure: host old.example not found"), {"root@old.example": HARD}),
    (dma_bounce("info@parked.example",
                "mx.parked.example [192.0.2.44] did not like our RCPT TO:\n521 5.3.2 <info@parked.example>: "
                "Recipient address rejected: System not accepting network messages."),
     {"info@parked.example": HARD}),
], ids=["postmaster-no-domain", "root-no-domain", "not-accepting"])
def test_dragonfly(raw: bytes, expected: dict[str, str]) -> None:
    report = parse_feedback(raw)
    assert kinds(report) == expected, report


def test_error_delivering_phrasings_name_the_recipient() -> None:
    from mailrelayd.feedback.textbounce import find_recipients

    for line in ("There was an error delivering your mail to <postmaster@a.example>.",
                 "An error occurred while delivering this message to postmaster@a.example",
                 "Problem delivering mail to <postmaster@a.example>:"):
        assert find_recipients(line, set()) == ["postmaster@a.example"], line
    # A role address anywhere else is still no recipient.
    assert find_recipients("Please contact postmaster@a.example for help.", set()) == []


@pytest.mark.parametrize(("text", "kind"), [
    ("DNS lookup failure: host gone-corp.example not found", HARD),
    ("Host mx.gone.example not found", HARD),
    ("Host or domain name not found. Name service error for name=gone.example type=A: Host not found", HARD),
    ("Host or domain name not found. Name service error for name=slow.example type=MX: Host not found, "
     "try again", SOFT),
])
def test_host_not_found(text: str, kind: str) -> None:
    assert classify_status("5.0.0" if kind == HARD else "4.0.0", text)[0] == kind


# --- 8. Japanese ----------------------------------------------------------------------------------------------

# Lotus Domino in Japanese: raw UTF-8 in a text part declared ISO-2022-JP, and in the Diagnostic-Code.
DOMINO_JA_TEXT = "ユーザー Yamada Hanako (gone@example.co.jp) は Domino ディレクトリには見つかりません。"
DOMINO_JA = eml(f"""Return-Path: <MAILER-DAEMON@mail.example.co.jp>
From: Postmaster@example.co.jp
To: bounces+q7a9@bounce.example.com
Subject: DELIVERY FAILURE: {DOMINO_JA_TEXT}
Date: Mon, 10 Mar 2025 18:00:04 +0900
MIME-Version: 1.0
Message-ID: <OF0A1B2C3D.4E5F6071-ON49258C4A.00312345-49258C4A.00312346@example.co.jp>
Content-Type: multipart/report; report-type=delivery-status; boundary="==IFJRGLKFGIR25431UHRUHIHD"

--==IFJRGLKFGIR25431UHRUHIHD
Content-Type: text/plain; charset=ISO-2022-JP
Content-Transfer-Encoding: 7bit

Your message

  Subject: Spring newsletter

was not delivered to:

  gone@example.co.jp

because:

  {DOMINO_JA_TEXT}


--==IFJRGLKFGIR25431UHRUHIHD
Content-Type: message/delivery-status

Reporting-MTA: dns;mail.example.co.jp

Final-Recipient: rfc822;gone@example.co.jp
Action: failed
Status: 5.0.0
Diagnostic-Code: X-Notes; {DOMINO_JA_TEXT}

--==IFJRGLKFGIR25431UHRUHIHD
Content-Type: message/rfc822

{RETURNED.format(to="gone@example.co.jp")}
Hello.

--==IFJRGLKFGIR25431UHRUHIHD--
""")


def test_domino_in_japanese() -> None:
    report = parse_feedback(DOMINO_JA)
    assert kinds(report) == {"gone@example.co.jp": HARD}, report
    assert report.recipients[0].reason == "userunknown"
    # The same notification without its delivery-status part (a gateway dropped it).
    start = DOMINO_JA.index(b"--==IFJRGLKFGIR25431UHRUHIHD\r\nContent-Type: message/delivery-status")
    end = DOMINO_JA.index(b"--==IFJRGLKFGIR25431UHRUHIHD\r\nContent-Type: message/rfc822")
    text_only = (DOMINO_JA[:start] + DOMINO_JA[end:]).replace(b"multipart/report; report-type=delivery-status;",
                                                             b"multipart/mixed;")
    assert kinds(parse_feedback(text_only)) == {"gone@example.co.jp": HARD}


def test_text_in_another_charset_than_declared() -> None:
    text = "宛先のメールアドレスは存在しません。"
    assert decode_bytes(text.encode("utf-8"), "iso-2022-jp") == text
    assert decode_bytes(text.encode("utf-8"), "us-ascii") == text
    assert decode_bytes(text.encode("iso2022_jp"), None) == text
    assert decode_bytes(text.encode("euc_jp"), "iso-2022-jp") == text
    # Declared right: as declared; undecodable in every candidate: replacement characters, no error.
    assert decode_bytes(text.encode("shift_jis"), "shift_jis") == text
    assert decode_bytes("café".encode("latin-1"), "latin-1") == "café"
    assert decode_bytes(b"caf\xe9 \xff", None) == "caf\ufffd \ufffd"


@pytest.mark.parametrize(("status", "text", "kind"), [
    ("5.0.0", "550 宛先不明のため配信できませんでした", HARD),
    ("5.0.0", "550 指定されたメールアドレスは存在しません", HARD),
    ("5.0.0", "550 存在しないユーザです", HARD),
    ("5.0.0", "550 ﾕｰｻﾞｰ neko は見つかりません", HARD),  # half-width katakana
    ("5.0.0", "550 ドメイン example.jp が見つかりません", HARD),
    ("5.1.1", "550 5.1.1 メールボックスの容量を超えています", SOFT),
    ("5.0.0", "552 受信箱が満杯です", SOFT),
    ("5.0.0", "550 送信者のアドレスが存在しません", POLICY),
    ("4.0.0", "450 宛先不明", SOFT),
])
def test_japanese_causes(status: str, text: str, kind: str) -> None:
    assert classify_status(status, text)[0] == kind


def test_no_new_rule_suppresses_on_these_lookalikes() -> None:
    for raw in (SENDMAIL_DNSBL_URL, SENDMAIL_BARE_553, GSUITE_SENDER_REJECTED, POSTFIX_VERIFY):
        assert not any(r.kind in SUPPRESSING_KINDS for r in parse_feedback(raw).recipients)


@pytest.mark.parametrize("run", [
    "host " * 2_000, "host a" + "." * 4_000, "error delivering your mail to " * 1_000, "ユーザー" * 3_000,
    "http://spamhaus." * 1_000, "www." * 4_000, "rfc822;" * 2_000, "\x1b$B" * 10_000,
])
def test_new_rules_stay_linear(run: str) -> None:
    import time

    from mailrelayd.feedback.textbounce import find_recipients

    start = time.process_time()
    classify_status("5.0.0", run)
    find_recipients(run, set())
    decode_bytes(run.encode("utf-8"), "iso-2022-jp")
    parse_feedback(dma_bounce("postmaster@gone-corp.example", run[:20_000]))
    assert time.process_time() - start < 1.0


# --- 9. "not accepting mail" with a qualifier: a refusal of this message or sender -------------------------

# AOL's plain-text notification: the recipients refuse mail of this content (the list is tab-indented).
AOL_LEAD = ("Sorry news@example.com. Your mail to the following recipients could not be delivered because they "
            "are not accepting mail with attachments or embedded images:")
AOL_CONTENT_REFUSAL = eml(f"""Return-Path: <>
From: Mail Delivery Subsystem <MAILER-DAEMON@aol.com>
To: bounces+q7a9@bounce.example.com
Subject: Returned mail: Mail with attachments not accepted
Date: Mon, 10 Mar 2025 10:00:04 -0500
Message-ID: <202503101500.4a7c3e1f@aol.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

{AOL_LEAD}
\treaderbee77

""")


def test_aol_content_refusal_suppresses_nobody() -> None:
    report = parse_feedback(AOL_CONTENT_REFUSAL)
    assert report.suppressions == (), report
    assert kinds(report) == {"readerbee77@aol.com": POLICY}, report


@pytest.mark.parametrize(("text", "kind"), [
    ("550 they are not accepting mail with attachments or embedded images", POLICY),
    ("550 we do not accept e-mail containing links", POLICY),
    ("550 this mailbox does not accept mail that contains executable files", POLICY),
    ("550 does not accept mail of this type", POLICY),
    ("550 the recipient does not accept mail from your domain", POLICY),
    ("550 this user is not accepting any mail from this sender", POLICY),
    ("552 we do not accept mail larger than 10 MB", SOFT),
    # Alone, the destination takes no mail at all.
    ("550 5.1.10 example.org does not accept mail", HARD),
    ("556 5.1.10 example.org does not accept mail (null MX)", HARD),
    ("550 5.1.10 recipient domain accepts no mail", HARD),
    ("550 this account is not accepting mail", HARD),
])
def test_not_accepting_mail_with_a_qualifier(text: str, kind: str) -> None:
    assert classify_status("5.0.0", text)[0] == kind


# --- 10. the address between the words: "Rcpt <a> does not exist" ----------------------------------------


def postfix_dsn(rcpt: str, status: str, diagnostic: str) -> bytes:
    """A Postfix DSN whose notification only quotes the remote server's reply."""
    return eml(f"""Return-Path: <>
From: MAILER-DAEMON@mx1.example.net (Mail Delivery System)
To: bounces+q7a9@bounce.example.com
Subject: Undelivered Mail Returned to Sender
Date: Mon, 10 Mar 2025 10:00:04 +0100
Message-Id: <20250310090004.5B8C42D0622@mx1.example.net>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="5B8C42D0622.1741597204/mx1.example.net"

--5B8C42D0622.1741597204/mx1.example.net
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx1.example.net.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<{rcpt}>: host mx.example.org[192.0.2.25] said: {diagnostic} (in reply to
    RCPT TO command)

--5B8C42D0622.1741597204/mx1.example.net
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx1.example.net
Arrival-Date: Mon, 10 Mar 2025 10:00:03 +0100 (CET)

Final-Recipient: rfc822; {rcpt}
Action: failed
Status: {status}
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; {diagnostic}

--5B8C42D0622.1741597204/mx1.example.net
Content-Type: text/rfc822-headers

{RETURNED.format(to=rcpt)}
--5B8C42D0622.1741597204/mx1.example.net--
""")


RCPT_DOES_NOT_EXIST = postfix_dsn("gone@example.org", "5.0.0", "554 Rcpt <gone@example.org> does not exist")
USER_BRACKETED_DOES_NOT_EXIST = postfix_dsn("gone@example.org", "5.0.0",
                                            "550 User [gone@example.org] does not exist")
QMAIL_BADRCPTTO = postfix_dsn("gone@example.org", "5.0.0", "553 sorry, badrcptto(user mail-box not found) (#5.7.1)")
SENDER_DOES_NOT_EXIST = postfix_dsn("reader@example.org", "5.0.0",
                                    "550 Sender <bounces+q7a9@bounce.example.com> does not exist")


@pytest.mark.parametrize(("raw", "expected"), [
    (RCPT_DOES_NOT_EXIST, {"gone@example.org": HARD}),
    (USER_BRACKETED_DOES_NOT_EXIST, {"gone@example.org": HARD}),
    (QMAIL_BADRCPTTO, {"gone@example.org": HARD}),
    (SENDER_DOES_NOT_EXIST, {"reader@example.org": POLICY}),
], ids=["rcpt-angled", "user-bracketed", "badrcptto-mail-box", "sender"])
def test_the_address_between_the_words(raw: bytes, expected: dict[str, str]) -> None:
    assert kinds(parse_feedback(raw)) == expected


@pytest.mark.parametrize(("text", "kind"), [
    ("554 Rcpt <gone@example.org> does not exist", HARD),
    ("550 User [gone@example.org] does not exist", HARD),
    ("550 mailbox 'gone@example.org' does not exist", HARD),
    ("550 Recipient (gone@example.org) not found", HARD),
    ("550 user mail-box not found", HARD),
    ("550 mail-box unavailable", HARD),
    ("552 mail-box is full", SOFT),
    # The sender's address, however written, is no recipient's.
    ("550 sender address does not exist", POLICY),
    ("550 the sender mailbox does not exist", POLICY),
    ("553 sender <bounces+q7a9@bounce.example.com> not found", POLICY),
    ("553 MAIL FROM:<bounces+q7a9@bounce.example.com> does not exist", POLICY),
    ("550 return address <bounces+q7a9@bounce.example.com> does not exist", POLICY),
])
def test_address_level_wording(text: str, kind: str) -> None:
    assert classify_status("5.0.0", text)[0] == kind


# --- 11. one-letter top-level labels in address fields; a size limit outranks 5.1.1 ------------------------

QUOTA_ONE_LETTER_TLD = postfix_dsn("reader@corp.q", "4.0.0", "452 <reader@corp.q> Mailbox size limit")
UNKNOWN_ONE_LETTER_TLD = postfix_dsn("gone@corp.q", "5.1.1", "550 5.1.1 <gone@corp.q>: User unknown")
EXIM_ONE_LETTER_TLD = eml("""Return-Path: <>
From: Mail Delivery System <Mailer-Daemon@mx1.example.net>
To: bounces+q7a9@bounce.example.com
Subject: Mail delivery failed: returning message to sender
Date: Mon, 10 Mar 2025 10:00:04 +0100
Message-Id: <E1trXYZ-0001Ab-7Q@mx1.example.net>
X-Failed-Recipients: gone@corp.q
Auto-Submitted: auto-replied

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  gone@corp.q
    host mx.corp.q [192.0.2.25]
    SMTP error from remote mail server after RCPT TO:<gone@corp.q>:
    550 5.1.1 User unknown

------ This is a copy of the message, including all the headers. ------

Return-Path: <bounces+q7a9@bounce.example.com>
From: Example News <news@example.com>
To: gone@corp.q
Subject: Spring newsletter
""")
ARF_ONE_LETTER_TLD = eml("""Return-Path: <fbl@isp.example.net>
From: Feedback Loop <fbl@isp.example.net>
To: fbl-reports@example.com
Subject: Abuse report
Date: Mon, 10 Mar 2025 10:00:04 +0000
Message-ID: <arf-20250310-0001@isp.example.net>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="arf-boundary-1"

--arf-boundary-1
Content-Type: text/plain; charset=us-ascii

This is an abuse report for a message received from 198.51.100.7.

--arf-boundary-1
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: ExampleFBL/1.0
Version: 1
Original-Mail-From: <bounces+q7a9@bounce.example.com>
Original-Rcpt-To: <reader@corp.q>
Source-IP: 198.51.100.7

--arf-boundary-1
Content-Type: text/rfc822-headers

Return-Path: <bounces+q7a9@bounce.example.com>
From: Example News <news@example.com>
To: reader@corp.q
Subject: Spring newsletter

--arf-boundary-1--
""")


@pytest.mark.parametrize(("raw", "expected"), [
    (QUOTA_ONE_LETTER_TLD, {"reader@corp.q": SOFT}),
    (UNKNOWN_ONE_LETTER_TLD, {"gone@corp.q": HARD}),
    (EXIM_ONE_LETTER_TLD, {"gone@corp.q": HARD}),
    (ARF_ONE_LETTER_TLD, {"reader@corp.q": "complaint"}),
], ids=["dsn-soft", "dsn-hard", "x-failed-recipients", "arf"])
def test_one_letter_tld_in_address_fields(raw: bytes, expected: dict[str, str]) -> None:
    assert kinds(parse_feedback(raw)) == expected


def test_one_letter_tld_only_in_address_fields() -> None:
    from mailrelayd.feedback.addresses import address_from_field, find_addresses, is_plausible_recipient

    assert address_from_field("rfc822; <reader@corp.q>") == "reader@corp.q"
    assert is_plausible_recipient("reader@corp.q", from_field=True)
    # Free text keeps the two-letter minimum.
    assert find_addresses("write to reader@corp.q or see readme@host.x") == []
    assert not is_plausible_recipient("reader@corp.q")


SIZE_WITH_5_1_1 = postfix_dsn("reader@example.org", "5.1.1",
                              "550 RCPT TO:<reader@example.org> max message size exceeded")


def test_a_size_limit_outranks_status_5_1_1() -> None:
    report = parse_feedback(SIZE_WITH_5_1_1)
    assert kinds(report) == {"reader@example.org": SOFT}, report
    assert report.recipients[0].reason == "exceedlimit"


@pytest.mark.parametrize(("text", "reason"), [
    ("550 max message size exceeded", "exceedlimit"),
    ("552 maximum message size exceeded", "exceedlimit"),
    ("552 size limit exceeded", "exceedlimit"),
    ("552 message size exceeded", "exceedlimit"),
    ("552 exceeded the maximum message size", "exceedlimit"),
    ("552 message exceeds the allowed size", "exceedlimit"),
    ("552 mail too large", "exceedlimit"),
    ("552 e-mail is larger than the limit", "exceedlimit"),
    ("552 mailbox size exceeded", "mailboxfull"),
    ("User mailbox exceeds allowed size: reader@example.org", "mailboxfull"),
])
def test_size_wording(text: str, reason: str) -> None:
    assert classify_status("5.1.1", text) == (SOFT, reason)


# --- 12. GroupWise lists its failed addresses indented by a tab ---------------------------------------------

GROUPWISE_TAB = eml("""Return-Path: <>
From: Mail Delivery System <postmaster@gw.example.net>
To: bounces+q7a9@bounce.example.com
Subject: Message status - undeliverable
Date: Mon, 10 Mar 2025 10:00:04 +0100
Message-ID: <67CEB0A4.A1B2C3D4@gw.example.net>
X-Mailer: Novell GroupWise Internet Agent 8.0.3
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="=__PartA1B2C3D4.0__="

This is a MIME message. If you are reading this text, you may want to
consider changing to a mail reader or gateway that understands how to
properly handle MIME multipart messages.

--=__PartA1B2C3D4.0__=
Content-Type: text/plain; charset=UTF-8
Content-Transfer-Encoding: quoted-printable
Content-Disposition: inline

The message that you sent was undeliverable to the following:

\tgone@example.org (user not found)
\tfull@example.org (mailbox full)


--=__PartA1B2C3D4.0__=--
""")


def test_groupwise_tab_indented_list() -> None:
    report = parse_feedback(GROUPWISE_TAB)
    assert report.parser == "format:groupwise", report
    assert kinds(report) == {"gone@example.org": HARD, "full@example.org": SOFT}, report


# --- 13. challenge-response requests in DSN form ----------------------------------------------------------


def challenge_dsn(group: str) -> bytes:
    """A challenge-response service's notice as a multipart/report: a request to the sender to get
    themselves approved, with a delivery-status part whose Diagnostic-Code is the service's notice."""
    return eml(f"""Return-Path: <noreply@screen.example.net>
From: noreply@screen.example.net
Reply-To: reader@example.org
To: bounces+q7a9@bounce.example.com
Subject: Re: Spring newsletter (Action Required)
Date: Mon, 10 Mar 2025 10:00:04 -0800
Message-ID: <1741600000.77.screen@app3.screen.example.net>
MIME-Version: 1.0
Content-Type: multipart/report; boundary="----=_Part_77_1741600000"; report-type=delivery-status

------=_Part_77_1741600000
Content-Type: text/plain; charset=us-ascii

Hello,

Your message about "Spring newsletter" has been held.
Please add yourself to my guest list so your messages reach my inbox:
https://screen.example.net/approve?t=4711

------=_Part_77_1741600000
Content-Type: message/delivery-status

Reporting-MTA: dns; screen.example.net
Action: failed
Arrival-Date: Mon, 10 Mar 2025 09:59:58 -0800

{group}

------=_Part_77_1741600000
Content-Type: message/rfc822

{RETURNED.format(to="reader@example.org")}
Hello.

------=_Part_77_1741600000--
""")


CHALLENGE_NOT_PRE_APPROVED = challenge_dsn(
    "Final-Recipient: rfc822; reader@example.org\n"
    "Diagnostic-Code: X-Screen-Notice; Sender not pre-approved.  Follow the instructions in the notice above\n"
    "Status: 4.7.0")
CHALLENGE_CONFIRMATION = challenge_dsn(
    "Final-Recipient: rfc822; reader@example.org\nAction: failed\nStatus: 5.7.1\n"
    "Diagnostic-Code: smtp; 550 5.7.1 Confirmation of the sender is requested (challenge-response)")
# Challenge wording beside a missing address: still a bounce.
CHALLENGE_BUT_UNKNOWN = challenge_dsn(
    "Final-Recipient: rfc822; gone@example.org\nAction: failed\nStatus: 5.1.1\n"
    "Diagnostic-Code: smtp; 550 5.1.1 <gone@example.org>: user unknown (challenge-response filter)")


@pytest.mark.parametrize("raw", [CHALLENGE_NOT_PRE_APPROVED, CHALLENGE_CONFIRMATION],
                         ids=["not-pre-approved", "confirmation-requested"])
def test_challenge_response_dsn_is_not_feedback(raw: bytes) -> None:
    report = parse_feedback(raw)
    assert report.kind == "not_feedback", report
    assert report.recipients == ()


def test_challenge_wording_does_not_hide_a_bounce() -> None:
    assert kinds(parse_feedback(CHALLENGE_BUT_UNKNOWN)) == {"gone@example.org": HARD}
    # An ordinary refusal naming the sender, no challenge: recorded as before.
    raw = challenge_dsn("Final-Recipient: rfc822; reader@example.org\nAction: failed\nStatus: 5.7.1\n"
                        "Diagnostic-Code: smtp; 550 5.7.1 Sender not allowed")
    assert kinds(parse_feedback(raw)) == {"reader@example.org": POLICY}


def test_no_rule_of_9_to_13_suppresses_on_these_lookalikes() -> None:
    for raw in (AOL_CONTENT_REFUSAL, SENDER_DOES_NOT_EXIST, QUOTA_ONE_LETTER_TLD, SIZE_WITH_5_1_1,
                CHALLENGE_NOT_PRE_APPROVED, CHALLENGE_CONFIRMATION):
        assert parse_feedback(raw).suppressions == ()


@pytest.mark.parametrize("run", [
    "not accepting mail " * 1_000, "user <a@b.example> " * 1_000, "size " * 4_000, "exceeded " * 2_000,
    "sender not " * 2_000, "mail-box " * 2_000, "[<" * 8_000,
])
def test_rules_9_to_13_stay_linear(run: str) -> None:
    import time

    from mailrelayd.feedback.textbounce import is_challenge_notice

    start = time.process_time()
    classify_status("5.0.0", run)
    is_challenge_notice(run)
    parse_feedback(postfix_dsn("reader@example.org", "5.0.0", run[:4_000]))
    assert time.process_time() - start < 1.0


# --- 14. RFC 7505 null MX in the words of the MTA that found it ---------------------------------------------

EXIM_NO_SMTP_SERVICE = eml("""Return-Path: <>
From: Mail Delivery System <Mailer-Daemon@mx1.example.net>
To: bounces+q7a9@bounce.example.com
Subject: Mail delivery failed: returning message to sender
Date: Mon, 10 Mar 2025 10:00:04 +0100
Message-Id: <E1trNul-0004Zx-2c@mx1.example.net>
X-Failed-Recipients: reader@nomail.example
Auto-Submitted: auto-replied

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  reader@nomail.example
    an MX or SRV record indicated no SMTP service

------ This is a copy of the message, including all the headers. ------

""" + RETURNED.format(to="reader@nomail.example") + "\nHello.\n")


def test_exim_null_mx_wording() -> None:
    report = parse_feedback(EXIM_NO_SMTP_SERVICE)
    assert kinds(report) == {"reader@nomail.example": HARD}, report
    assert report.recipients[0].reason == "notaccept"


@pytest.mark.parametrize(("status", "text", "kind"), [
    ("", "an MX or SRV record indicated no SMTP service", HARD),
    ("5.0.0", "550 host mx.nomail.example: SRV record indicates no SMTP service", HARD),
    ("", "Domain nomail.example rejected: nullMX", HARD),
    ("5.0.0", "550 the domain nomail.example does not receive any mail", HARD),
    # A transient failure, and no SMTP service without a null MX (a closed port): no suppression.
    ("4.0.0", "451 an MX or SRV record indicated no SMTP service", SOFT),
    ("5.0.0", "550 connection refused: mx.example.org has no SMTP service running", SOFT),
    # RFC 7505 section 4.2: the *sender's* domain has the null MX.
    ("5.7.27", "550 5.7.27 Sender address has null MX", POLICY),
    ("5.0.0", "550 5.7.27 sender <bounces+q7a9@bounce.example.com> has a null MX", POLICY),
])
def test_null_mx_wordings(status: str, text: str, kind: str) -> None:
    assert classify_status(status, text)[0] == kind


# --- 15. Exim's X-Failed-Recipients naming the bounce's own addressee ----------------------------------------


def exim_to_itself(failed: str, listed: str, to: str = "alerts@example.com") -> bytes:
    """An Exim bounce of a message a mailbox sent to itself: its X-Failed-Recipients (``failed``) and the
    address it is returned to may be the same address; ``listed`` is the notification's recipient list."""
    return eml(f"""Return-Path: <>
X-Original-To: {to}
Delivered-To: {to}
From: Mail Delivery System <Mailer-Daemon@relay.example.com>
To: {to}
Subject: Mail delivery failed: returning message to sender
Date: Mon, 10 Mar 2025 10:00:04 +0100
Message-Id: <E1trSlf-0007Kq-4d@relay.example.com>
X-Failed-Recipients: {failed}
Auto-Submitted: auto-replied

This message was created automatically by the SMTP relay on relay.example.com.

A message that you sent could not be delivered to all of its recipients.
The following address(es) failed:

{listed}

------ This is a copy of the message, including all the headers. ------

Return-path: <{to}>
From: Monitoring <{to}>
To: {to}
Subject: nightly check
""")


EXIM_TO_ITSELF = exim_to_itself(
    "alerts@example.com",
    "  alerts@example.com\n    SMTP error from remote mail server after RCPT TO:<alerts@example.com>:\n"
    "    host mx.example.com [192.0.2.30]: 550 5.1.1 <alerts@example.com>: Recipient address rejected: "
    "User unknown in local recipient table")


def test_x_failed_recipients_may_name_the_bounce_addressee() -> None:
    report = parse_feedback(EXIM_TO_ITSELF)
    assert report.parser == "format:exim", report
    assert kinds(report) == {"alerts@example.com": HARD}, report


def test_the_bounce_addressee_still_needs_the_field_and_the_list() -> None:
    # The field names it but the text does not list it as failed: not taken.
    vague = exim_to_itself("alerts@example.com", "  (the remote server refused the message)\n"
                                                 "    550 5.1.1 User unknown")
    assert "alerts@example.com" not in kinds(parse_feedback(vague))
    # Two addresses in the field: the bounce's own addressee stays excluded, the other one is read.
    two = exim_to_itself("alerts@example.com, gone@example.org",
                         "  alerts@example.com\n    550 5.1.1 User unknown\n"
                         "  gone@example.org\n    550 5.1.1 User unknown")
    assert kinds(parse_feedback(two)) == {"gone@example.org": HARD}
    # Without the field, free text never takes the bounce's own addressee.
    no_field = EXIM_TO_ITSELF.replace(b"X-Failed-Recipients: alerts@example.com\r\n", b"")
    assert "alerts@example.com" not in kinds(parse_feedback(no_field))


# --- 16. a report quoted inline by another notification -----------------------------------------------------


def wrapped_report(inner_headers: str, inner_body: str) -> bytes:
    """A provider's notice (text/plain) quoting the MTA's report after an mbox ``From `` line: the
    report's own header section and body, then the returned message."""
    return eml(f"""Return-Path: <MAILER-DAEMON>
From: MAILER-DAEMON@mail.isp.example
To: bounces+q7a9@bounce.example.com
Subject: Undelivered Mail Returned to Sender
Date: Mon, 10 Mar 2025 10:00:06 +0900
Message-Id: <20250310100006.5C1D2E3F4A5B@notice.isp.example>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

We regret to inform you that the message returned below could not be
delivered to one or more destinations.

For help, please contact <helpdesk@isp.example> and include this report.

---------------------------------
From MAILER-DAEMON  Mon Mar 10 10:00:05 2025
{inner_headers}
{inner_body}
""")


POSTFIX_INNER_HEADERS = """Return-Path: <>
Received: by relay-7.isp.example (Postfix)
\tid 8A7B6C5D4E3F; Mon, 10 Mar 2025 10:00:05 +0900 (JST)
Date: Mon, 10 Mar 2025 10:00:05 +0900 (JST)
From: MAILER-DAEMON@relay-7.isp.example (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: bounces+q7a9@bounce.example.com
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="8A7B6C5D4E3F.1741568405/relay-7.isp.example"
Message-Id: <20250310010005.8A7B6C5D4E3F@relay-7.isp.example>
"""


def postfix_inner_body(rcpt: str, status: str, reply: str) -> str:
    return f"""This is a MIME-encapsulated message.

--8A7B6C5D4E3F.1741568405/relay-7.isp.example
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host relay-7.isp.example.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<{rcpt}>: host mx.example.org[192.0.2.25] said: {reply}

--8A7B6C5D4E3F.1741568405/relay-7.isp.example
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; relay-7.isp.example

Final-Recipient: rfc822; {rcpt}
Action: failed
Status: {status}
Diagnostic-Code: smtp; {reply}

--8A7B6C5D4E3F.1741568405/relay-7.isp.example
Content-Description: Undelivered Message
Content-Type: message/rfc822

{RETURNED.format(to=rcpt)}
Hello.

--8A7B6C5D4E3F.1741568405/relay-7.isp.example--"""


WRAPPED_POSTFIX_DEFERRED = wrapped_report(POSTFIX_INNER_HEADERS, postfix_inner_body(
    "reader@example.org", "4.0.0", "421 Service not available, closing transmission channel"))
WRAPPED_POSTFIX_UNKNOWN = wrapped_report(POSTFIX_INNER_HEADERS, postfix_inner_body(
    "gone@example.org", "5.1.1", "550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown"))
WRAPPED_EXIM = wrapped_report("""Return-path: <>
From: Mail Delivery System <Mailer-Daemon@mx2.isp.example>
To: bounces+q7a9@bounce.example.com
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: gone@example.org
""", """This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  gone@example.org
    SMTP error from remote mail server after RCPT TO:<gone@example.org>:
    550 5.1.1 <gone@example.org>: no such user

------ This is a copy of the message, including all the headers. ------

""" + RETURNED.format(to="gone@example.org") + "\nHello.")


@pytest.mark.parametrize(("raw", "expected"), [
    (WRAPPED_POSTFIX_DEFERRED, {"reader@example.org": SOFT}),
    (WRAPPED_POSTFIX_UNKNOWN, {"gone@example.org": HARD}),
    (WRAPPED_EXIM, {"gone@example.org": HARD}),
], ids=["postfix-deferred", "postfix-unknown", "exim"])
def test_a_report_quoted_inline_is_read(raw: bytes, expected: dict[str, str]) -> None:
    report = parse_feedback(raw)
    assert kinds(report) == expected, report


def test_a_returned_message_still_ends_the_notification() -> None:
    from mailrelayd.feedback.tree import build_tree

    # The quoted report's header section is not notification text (its To is the bounce address).
    text = build_tree(WRAPPED_POSTFIX_UNKNOWN).text()
    assert "Final-Recipient: rfc822; gone@example.org" in text
    assert "relay-7.isp.example (Mail Delivery System)" not in text
    assert "Spring newsletter" not in text
    # A returned message is no quoted report, whatever its body says: not mined for recipients.
    newsletter = RETURNED.replace("Content-Type: text/plain", "X-Campaign: 7\nContent-Type: text/plain")
    plain = eml(f"""Return-Path: <>
From: Mail Delivery System <MAILER-DAEMON@mx1.example.net>
To: bounces+q7a9@bounce.example.com
Subject: Undelivered Mail Returned to Sender
Date: Mon, 10 Mar 2025 10:00:04 +0100
Message-Id: <20250310090004.9C8B7A6F5E4D@mx1.example.net>

Your message could not be delivered to one or more recipients.

{newsletter.format(to="reader@example.org")}
Your parcel could not be delivered to:

  other@example.net
Final-Recipient: rfc822; other@example.net
Action: failed
Status: 5.1.1
""")
    assert "other@example.net" not in kinds(parse_feedback(plain))


# --- 17. Google Groups in Japanese ------------------------------------------------------------------------

GOOGLE_GROUPS_JA = eml("""Return-Path: <>
From: Mail Delivery Subsystem <mailer-daemon@googlemail.example>
To: bounces+q7a9@bounce.example.com
Subject: Delivery Status Notification (Failure)
Date: Mon, 10 Mar 2025 01:00:04 -0700
Message-ID: <67cea8a4.05ab.4c3b.GMR@mx.googlemail.example>
Auto-Submitted: auto-replied
X-Failed-Recipients: readers@groups.example.com
MIME-Version: 1.0
Content-Type: text/plain; charset="UTF-8"
Content-Transfer-Encoding: 8bit

bounces+q7a9@bounce.example.com 様

送信先のグループ「readers」が存在しないか、グループにメッセージを投稿する権限がない可能性があります。

よろしくお願いいたします。

Google Groups

----- Original message -----

""" + RETURNED.format(to="readers@groups.example.com") + "\nHello.\n")


def test_google_groups_in_japanese() -> None:
    report = parse_feedback(GOOGLE_GROUPS_JA)
    assert kinds(report) == {"readers@groups.example.com": POLICY}, report
    assert report.recipients[0].reason == "rejected"


@pytest.mark.parametrize("text", [
    "The group you tried to contact (readers) may not exist, or you may not have permission to post messages "
    "to the group.",
    "グループにメッセージを投稿する権限がない可能性があります。",
    "このグループへの投稿権限がありません。",
])
def test_no_permission_to_post(text: str) -> None:
    assert classify_status("", text) == (POLICY, "rejected")


def test_no_rule_of_14_to_17_suppresses_on_these_lookalikes() -> None:
    vague = exim_to_itself("alerts@example.com", "  (the remote server refused the message)")
    for raw in (WRAPPED_POSTFIX_DEFERRED, GOOGLE_GROUPS_JA, vague):
        assert parse_feedback(raw).suppressions == ()


@pytest.mark.parametrize("run", [
    "Return-Path: <>\nFrom: MAILER-DAEMON@x.example\n\n" * 2_000, "Received: from x\n" * 4_000,
    "From MAILER-DAEMON  Mon\nReturn-Path: <a@b.example>\n" * 2_000, "mx or srv record " * 2_000,
])
def test_rules_14_to_17_stay_linear(run: str) -> None:
    import time

    start = time.process_time()
    classify_status("5.0.0", run)
    parse_feedback(wrapped_report(run[:60_000], ""))
    parse_feedback(b"From: MAILER-DAEMON@mx.example.net\nSubject: failure notice\n\n" + run.encode() * 2)
    assert time.process_time() - start < 1.0


# --- 18. qmail's refusals of our own name -------------------------------------------------------
# qmail-remote states which step failed before quoting the reply: "Connected to <ip> but my name
# was rejected." is about our HELO, whatever the reply's words ("501 5.0.0 Invalid domain name"
# reads like the recipient's domain); "... but greeting failed." is the server's banner refusal.

def qmail_bounce(rcpt: str, statement: str) -> bytes:
    return eml(f"""Return-Path: <>
From: MAILER-DAEMON@mx1.example.net
To: bounces+q7a9@bounce.example.com
Subject: failure notice
Date: Mon, 10 Mar 2025 10:00:04 +0000
Message-ID: <20250310100004.4711.qmail@mx1.example.net>

Hi. This is the qmail-send program at mx1.example.net.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<{rcpt}>:
{statement}

--- Below this line is a copy of the message.

{RETURNED.format(to=rcpt)}
hello
""")


@pytest.mark.parametrize("statement", [
    "Connected to 192.0.2.25 but my name was rejected.\nRemote host said: 501 5.0.0 Invalid domain name",
    "Connected to 192.0.2.25 but greeting failed.\nRemote host said: 554 5.7.1 mx.example.org go away",
])
def test_qmail_refusing_our_name_is_about_us(statement: str) -> None:
    report = parse_feedback(qmail_bounce("reader@example.org", statement))
    assert kinds(report) == {"reader@example.org": "reputation"}
    assert report.suppressions == ()


def test_qmail_unknown_recipient_is_still_hard() -> None:
    report = parse_feedback(qmail_bounce(
        "gone@example.org", "192.0.2.25 does not like recipient.\nRemote host said: 550 5.1.1 <gone@example.org>:"
        " Recipient address rejected: User unknown\nGiving up on 192.0.2.25."))
    assert kinds(report) == {"gone@example.org": HARD}


# --- 19. a refusal sent as an MDN ---------------------------------------------------------------------------
def mdn(rcpt: str, disposition: str, text: str) -> bytes:
    return eml(f"""Return-Path: <>
From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.org>
To: <bounces+q7a9@bounce.example.com>
Subject: Rejected: Spring newsletter
Auto-Submitted: auto-replied (rejected)
MIME-Version: 1.0
Content-Type: multipart/report; report-type=disposition-notification; boundary="b19"

--b19
Content-Type: text/plain; charset=utf-8

{text}
--b19
Content-Type: message/disposition-notification

Reporting-UA: mx.example.org; Dovecot Mail Delivery Agent
Final-Recipient: rfc822; {rcpt}
Original-Message-ID: <n1@example.com>
Disposition: {disposition}

--b19
Content-Type: message/rfc822

{RETURNED.format(to=rcpt)}
hello
--b19--
""")


@pytest.mark.parametrize(("text", "reason"), [
    ("Your message to <reader@example.org> was automatically rejected:\nQuota exceeded (mailbox for user is full)",
     "mailboxfull"),
    ("Your message to <reader@example.org> was automatically rejected:\nI am not taking mail from this list.", ""),
    # A Sieve script's words are the user's: even "unknown user" is no status anyone vouches for.
    ("Your message to <reader@example.org> was automatically rejected:\nUser unknown", ""),
])
@pytest.mark.parametrize("disposition", ["automatic-action/MDN-sent-automatically; deleted",
                                         "Automatic-Action/MDN-Sent-Automatically;deleted/error"])
def test_a_refusal_sent_as_an_mdn_is_a_soft_bounce(text: str, reason: str, disposition: str) -> None:
    report = parse_feedback(mdn("Reader@Example.ORG", disposition, text))
    assert report.kind in NOT_SUPPRESSING and report.suppressions == ()
    assert [r.address for r in report.recipients] == ["Reader@example.org"]
    assert report.recipients[0].kind in NOT_SUPPRESSING
    if reason:
        assert report.recipients[0].reason == reason


@pytest.mark.parametrize("disposition", [
    "manual-action/MDN-sent-manually; displayed",
    "automatic-action/MDN-sent-automatically; displayed",
    "manual-action/MDN-sent-manually; deleted",  # a person deleted it unread: a receipt, not a refusal
    "automatic-action/MDN-sent-automatically; processed",
])
def test_other_mdns_stay_read_receipts(disposition: str) -> None:
    report = parse_feedback(mdn("reader@example.org", disposition, "The message was displayed."))
    assert report.kind == "not_feedback" and report.recipients == ()


# --- 20. a bounce whose subject quotes an out-of-office word --------------------------------------------------
def gateway_bounce(subject: str) -> bytes:
    return eml(f"""Return-Path: <>
From: Mail Gateway <gateway@mx.example.org>
To: <bounces+q7a9@bounce.example.com>
Subject: {subject}

Your message could not be delivered to the following recipient:

    reader@example.org: 550 5.1.1 User unknown

--- Original message ---
{RETURNED.format(to="reader@example.org")}
hello
""")


@pytest.mark.parametrize("subject", ["Undeliverable: Holiday offers", "Undeliverable: Away days booked",
                                     "Returned mail: Vacation rentals, 40% off"])
def test_a_bounce_quoting_an_out_of_office_word_is_read(subject: str) -> None:
    assert kinds(parse_feedback(gateway_bounce(subject))) == {"reader@example.org": HARD}


@pytest.mark.parametrize("subject", ["Out of Office: Undeliverable invoices", "Holiday: returned mail will wait",
                                     "Automatic reply: Delivery failure"])
def test_an_auto_reply_subject_before_bounce_words_is_an_auto_reply(subject: str) -> None:
    report = parse_feedback(gateway_bounce(subject))
    assert report.kind == "not_feedback" and report.suppressions == ()


# --- 21. an address the reader is asked to write to is no recipient -----------------------------------------
def postfix_template_bounce(help_line: str, rcpt_block: str) -> bytes:
    return eml(f"""Return-Path: <>
From: MAILER-DAEMON (Mail Delivery System)
To: <bounces+q7a9@bounce.example.com>
Subject: Undelivered Mail Returned to Sender

This is the mail gateway at host gw.example.org.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

{help_line}

{rcpt_block}

--- Original message ---
{RETURNED.format(to="reader@example.org")}
hello
""")


@pytest.mark.parametrize("help_line", [
    "For further assistance, please send mail to helpdesk@example.org.",
    "If you have questions, contact:\n    helpdesk@example.org",
    "Please contact your administrator at helpdesk@example.org with this report.",
])
def test_a_contact_address_is_no_recipient(help_line: str) -> None:
    report = parse_feedback(postfix_template_bounce(
        help_line, "<reader@example.org>: host mx.example.org[192.0.2.25] said: 550 #5.1.0 Address\n"
                   "    rejected. (in reply to RCPT TO command)"))
    assert kinds(report) == {"reader@example.org": HARD}


def test_a_recipient_after_a_failed_contact_is_still_read() -> None:
    """'Unable to contact ... for <a>' is no request to write to anyone."""
    report = parse_feedback(postfix_template_bounce(
        "", "Unable to contact the mail server for reader@example.org: 550 5.1.1 user unknown"))
    assert kinds(report) == {"reader@example.org": HARD}


# --- 22. Momentum (Ecelerity): ">>> <address> (state): reply" ---------------------------------------------
def quoted(to: str) -> str:
    """The returned message quoted with "> ", so that its To: names nobody by itself."""
    return "\n".join("> " + line for line in (RETURNED.format(to=to) + "hello").splitlines())


def momentum_bounce(line: str) -> bytes:
    return eml(f"""Return-Path: <>
From: Mail Delivery System <mailer-daemon@mta.example.org>
To: <bounces+q7a9@bounce.example.com>
Subject: Undeliverable: Spring newsletter

This message was created automatically by the mail system.
A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

{line}

------ This is a copy of the original message, including all headers. ------
{quoted("reader@example.org")}
""")


@pytest.mark.parametrize(("line", "kind"), [
    (">>> reader@example.org (Undelivered): 550 5.1.1 <reader@example.org>: user unknown", HARD),
    # A basic 551 ("user not local") with words that say what happened: a daily limit, not a move.
    (">>> reader@example.org (Undelivered): 551 RATELIMITED: reader@example.org cannot receive any"
     " more emails today.", "policy"),
    (">>> reader@example.org (Retry timeout exceeded): 421 4.4.1 connection timed out", None),
])
def test_momentum_lines_name_their_recipient(line: str, kind: str | None) -> None:
    report = parse_feedback(momentum_bounce(line))
    got = kinds(report)
    assert list(got) == ["reader@example.org"]
    assert got["reader@example.org"] == kind if kind else got["reader@example.org"] in NOT_SUPPRESSING


# --- 23. an address alone on its line, in double quotes ------------------------------------------------------
def test_a_quoted_address_alone_on_its_line_is_the_recipient() -> None:
    report = parse_feedback(eml(f"""Return-Path: <>
From: Postmaster@example.org
To: <bounces+q7a9@bounce.example.com>
Subject: Mail Delivery Failure

Delivery of email to this address
"reader@example.org"
has failed due to a full mailbox.  We have already made numerous
attempts to deliver this message over the last few days.

The first 50 lines of your original message follow:
{quoted("reader@example.org")}
"""))
    assert kinds(report) == {"reader@example.org": SOFT}
    assert report.recipients[0].reason == "mailboxfull"


# --- 24. unknown, disabled and full mailboxes in Spanish, Portuguese, Italian, French, German, Dutch --------
@pytest.mark.parametrize("text", [
    "Esta casilla ha expirado por falta de uso.", "550 Usuario desconocido", "550 el usuario no existe",
    "550 dirección de correo inexistente", "550 usuário desconhecido", "550 o endereço não existe",
    "550 utente sconosciuto", "550 l'indirizzo non esiste", "550 Utilisateur inconnu", "550 L'adresse n'existe pas",
    "550 Benutzer unbekannt", "550 Die Adresse existiert nicht", "550 Unbekannter Empfänger",
    "550 onbekende gebruiker", "550 cuenta de correo desactivada", "550 Konto deaktiviert", "550 conta desativada",
    "550 dominio inexistente", "550 el dominio no existe", "550 domaine inconnu", "550 Unbekannte Domain",
])
def test_unknown_or_disabled_mailboxes_in_other_languages_are_hard(text: str) -> None:
    assert classify_status("", text)[0] == HARD


@pytest.mark.parametrize("text", [
    "552 buzón lleno", "552 casilla de correo llena", "552 caixa postal cheia", "552 casella piena",
    "552 boîte aux lettres pleine", "552 Postfach ist voll", "552 mailbox is vol", "552 cuota excedida",
])
def test_full_mailboxes_in_other_languages_are_soft(text: str) -> None:
    assert classify_status("", text) == (SOFT, "mailboxfull")


@pytest.mark.parametrize("text", [
    "550 la dirección del remitente no existe",  # the sender's address: about us
    "550 Die Adresse des Absenders existiert nicht",
    "554 usuario bloqueado por spam",
])
def test_other_languages_about_the_sender_are_not_hard(text: str) -> None:
    assert classify_status("", text)[0] != HARD


# --- 25. Chinese and Korean wordings (Coremail, Tencent, Naver, Daum) ---------------------------------------
@pytest.mark.parametrize(("text", "kind", "reason"), [
    ("550 用户不存在", HARD, "userunknown"), ("550 该邮件地址不存在", HARD, "userunknown"),
    ("550 Mailbox not found\uff1a收件人地址不存在", HARD, "userunknown"), ("550 用戶不存在", HARD, "userunknown"),
    ("550 帐号已被冻结", HARD, "suspend"), ("550 존재하지 않는 사용자입니다", HARD, "userunknown"),
    ("552 邮箱已满", SOFT, "mailboxfull"), ("552 收件人郵箱已滿", SOFT, "mailboxfull"),
    ("552 사서함이 가득 찼습니다", SOFT, "mailboxfull"),
])
def test_chinese_and_korean_wordings(text: str, kind: str, reason: str) -> None:
    assert classify_status("", text) == (kind, reason)


@pytest.mark.parametrize("text", ["550 发件人不存在", "550 發件人帳號不存在", "554 邮件被拒绝\uff0c发件人地址无效",
                                  "550 发信账号已被冻结"])
def test_the_senders_account_in_chinese_is_not_the_recipients(text: str) -> None:
    assert classify_status("", text)[0] != HARD


# --- 26. sender verification; "Name or service not known"; IMail's "reason: address" lines ------------------
def test_sender_verification_failure_is_about_us_not_the_recipient() -> None:
    # Sendmail relaying Exim's callout refusal: Status 5.1.1 for the recipient, but the remote could
    # not verify our return path.
    raw = sendmail_dsn("reader@example.org", "5.1.1", "550-Verification failed for <bounces+q7a9@bounce.example.com>",
                       "550-Verification failed for <bounces+q7a9@bounce.example.com>")
    report = parse_feedback(raw)
    assert kinds(report) == {"reader@example.org": POLICY}


@pytest.mark.parametrize("text", ["550 Sender verify failed", "550 5.7.1 Could not verify sender address",
                                  "550-Callout verification failed for sender <b@example.com>"])
def test_sender_verification_wordings_are_not_hard(text: str) -> None:
    assert classify_status("5.1.1", text)[0] == POLICY


def test_name_or_service_not_known_is_an_unknown_host() -> None:
    assert classify_status("5.0.0", "X-Postfix; [mx.example.org]: Name or service not known") == (HARD, "hostunknown")
    assert classify_status("4.4.3", "X-Postfix; [mx.example.org]: Temporary failure in name resolution")[0] != HARD


@pytest.mark.parametrize(("line", "kind"), [("User mailbox exceeds allowed size: reader@example.org", SOFT),
                                            ("Unknown user: reader@example.org", HARD)])
def test_imail_reason_then_address_lines(line: str, kind: str) -> None:
    report = parse_feedback(eml(f"""Return-Path: <>
From: "Postmaster" <postmaster@mail.example.org>
To: <bounces+q7a9@bounce.example.com>
Subject: Undeliverable Mail
Date: Mon, 10 Mar 2025 10:00:04 +0000
Message-Id: <11003101000.AA45656@mail.example.org>
Mime-Version: 1.0
Content-Type: text/plain; charset=us-ascii
X-Mailer: <SMTP32 v10.0>

{line}


Original message follows.

[message truncated]
"""))
    assert kinds(report) == {"reader@example.org": kind}


def test_a_line_ending_in_an_address_without_words_of_failure_names_no_one() -> None:
    report = parse_feedback(eml(f"""Return-Path: <>
From: "Postmaster" <postmaster@mail.example.org>
To: <bounces+q7a9@bounce.example.com>
Subject: Undeliverable Mail
Date: Mon, 10 Mar 2025 10:00:04 +0000
Message-Id: <11003101000.AA45657@mail.example.org>
Content-Type: text/plain; charset=us-ascii

Your message could not be delivered.
Help desk: someone@example.org


Original message follows.

{RETURNED.format(to="reader@example.org")}
Hello
"""))
    assert "someone@example.org" not in kinds(report)


# --- 27. ARF feedback types: only those that say a person objected are complaints -----------------------
@pytest.mark.parametrize(("line", "kind"), [("Feedback-Type: abuse", "complaint"),
                                            ("Feedback-Type: opt-out", "complaint"),
                                            ("Feedback-Type: miscategorized", "not_feedback"),
                                            ("Feedback-Type: delivery", "not_feedback"),
                                            ("", "not_feedback")])
def test_unknown_or_missing_feedback_types_are_no_complaint(line: str, kind: str) -> None:
    from pathlib import Path

    raw = (Path(__file__).parent / "fixtures" / "feedback" / "arf-abuse.eml").read_bytes()
    raw = raw.replace(b"Feedback-Type: abuse\n", (line + "\n").encode() if line else b"")
    raw = raw.replace(b"Feedback-Type: abuse\r\n", (line + "\r\n").encode() if line else b"")
    report = parse_feedback(raw)
    assert report.kind == kind, report
    assert not report.suppressions or kind == "complaint"
