"""The DSNs we send, built from input we did not write: the remote's diagnostic text, its host name
and the original message's header section are whatever the other side gave us. Seeded random mixes
of line breaks, NULs, non-ASCII text, encoded words, over-long lines and broken header blocks must
still give a well-formed message (CRLF lines of at most 998 octets, RFC 5322 §2.1.1; no NUL, no bare
CR or LF), and our own feedback parser must read each one back as the bounce or delay it reports,
for the right recipient and status (RFC 3464)."""

from __future__ import annotations

import email
import email.policy
import random

from mailrelayd.delivery.dsn import DsnRecipient, build_dsn
from mailrelayd.feedback.parse import parse_feedback

PIECES = ["a", "@", "\r", "\n", "\r\n", "\x00", "é", " ", ";", "<", ">", "\t", "=?utf-8?q?x=0D=0Ay?=", "日", "x" * 300,
          "550 5.1.1 ", "Final-Recipient: rfc822; ghost@evil.example", "\r\n.\r\n", "\x7f", "\udcff"]
ORIGINAL = [b"From: a@example.org\r\n", b"Subject: =?utf-8?b?!!!?=\r\n", b"\r\n", b"\n", b"\xff\xfe", b" folded\r\n",
            b"X" * 2000, b"Received: from x\r\n", b":\r\n", b"\x00", b"body\r\n", b"Content-Type: multipart/report\r\n",
            b"--boundary\r\n", b"Final-Recipient: rfc822; ghost@evil.example\r\n", b"\r"]


def text(rng: random.Random, n: int = 30) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randrange(n)))


def test_dsns_from_hostile_input_are_well_formed_and_read_back() -> None:
    rng = random.Random(20261130)
    for case in range(400):
        action = rng.choice(["failed", "delayed"])
        status = f"{5 if action == 'failed' else 4}.{rng.randrange(8)}.{rng.randrange(10)}"
        rcpt = f"user{case}@dest{rng.randrange(100)}.example.com"
        recipient = DsnRecipient(rcpt, status, text(rng), text(rng, 8), rng.choice([0.0, 1.7e9, -1.0, 1e300]),
                                 rng.choice(["", "RCPT TO", "DATA", text(rng, 5)]))
        original = b"".join(rng.choice(ORIGINAL) for _ in range(rng.randrange(40)))
        out = build_dsn(reporting_mta=rng.choice(["relay.example.net", text(rng, 8)]), to="sender@example.org",
                        original=original, queue_id="Q" + str(case), arrival_date=rng.choice([1.7e9, 0.0, 1e300]),
                        action=action, now=1.7e9, recipients=[recipient],
                        envelope_id=rng.choice([None, text(rng, 8)]))
        where = f"case {case}"
        assert out.endswith(b"\r\n"), where
        lines = out.split(b"\r\n")[:-1]
        assert all(len(line) <= 998 for line in lines), where
        assert all(b"\r" not in line and b"\n" not in line for line in lines), where
        assert b"\x00" not in out, where
        msg = email.message_from_bytes(out, policy=email.policy.compat32)
        assert msg.get_content_type() == "multipart/report", where
        assert msg.get_param("report-type") == "delivery-status", where
        report = parse_feedback(out)
        got = [(r.address, r.status) for r in report.recipients]
        # Nothing the remote or the original message said adds or replaces a recipient.
        assert got == [(rcpt, status)], f"{where}: {got}"
