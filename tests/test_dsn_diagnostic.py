"""The DSN quotes the remote's reply once: in the text after "host X said:" and as the
Diagnostic-Code (RFC 3464 §2.3.6, ``smtp; <reply>``), never wrapped in our own wording."""

from __future__ import annotations

import email
import email.policy
import re

from mailrelayd.delivery.dsn import DsnRecipient, build_dsn
from mailrelayd.delivery.scheduler import _diagnostic, _reply_text
from mailrelayd.delivery.transport import RcptResult
from tests.support.sink import Sink
from tests.test_delivery_e2e import _dsn_in, _route, _submit, _wait_states

REPLY = "550 5.1.1 <gone@dest.test>: Recipient address rejected: No such user"


def _parts(dsn: email.message.EmailMessage) -> tuple[str, str]:
    text, status = "", ""
    for part in dsn.walk():
        if part.get_content_type() == "text/plain" and not text:
            text = part.get_content()
        elif part.get_content_type() == "message/delivery-status":
            status = "\n".join(str(b) for b in part.get_payload())
    return text, status


async def test_dsn_quotes_the_remote_reply_once(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        sink.rcpt_replies["gone@dest.test"] = REPLY
        d = await start_daemon(_route(sink))
        qid = await _submit(d.port("submission"), client_tls, ["gone@dest.test"])
        await _wait_states(d, qid, {"gone@dest.test": "bounced"})
        await sink.wait_for(1)
        (dsn,) = _dsn_in(sink)
        text, status = _parts(dsn)
        flat_text = " ".join(text.split())
        flat_status = " ".join(status.split())
        assert flat_text.count("said:") == 1, flat_text
        assert flat_text.count("550 5.1.1") == 1, flat_text
        assert f"<gone@dest.test>: host 127.0.0.1 said: {REPLY} (in reply to RCPT TO command)" in flat_text
        assert re.search(r"Diagnostic-Code: smtp; " + re.escape(REPLY) + r"(\s|$)", flat_status), flat_status
        assert "said" not in flat_status and "Remote-MTA: dns; 127.0.0.1" in flat_status
        # The spool keeps the reply as received, too (queue show, expiry DSNs).
        outcomes = await d.spool.recipient_outcomes(qid)
        assert outcomes["gone@dest.test"] == ("bounced", REPLY)
    finally:
        await sink.stop()


def test_reply_without_enhanced_code_is_kept_verbatim() -> None:
    res = RcptResult("x@y.example", 550, "5.0.0", "host mx said: 550 no such user (in reply to RCPT TO)",
                     "mx.y.example", "550 no such user", "RCPT TO")
    assert _diagnostic(res) == "550 no such user" == _reply_text(res)


def test_own_failure_is_not_an_smtp_diagnostic() -> None:
    """A connect timeout is our explanation: no reply code, X- diagnostic type, no 'said:'."""
    res = RcptResult("x@y.example", 451, "4.4.1", "connect to mx.y.example[192.0.2.1]:25: timed out")
    diag = _diagnostic(res)
    assert diag == "4.4.1 connect to mx.y.example[192.0.2.1]:25: timed out"
    raw = build_dsn(reporting_mta="relay.example", to="a@example.com", original=b"Subject: s\r\n\r\nb\r\n",
                    queue_id="Q1", arrival_date=0, action="failed", now=10,
                    recipients=[DsnRecipient("x@y.example", "4.4.1", diag, "mx.y.example", 10)])
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    text, status = _parts(msg)
    assert "said:" not in text and "<x@y.example>: 4.4.1 connect to" in " ".join(text.split())
    assert "Diagnostic-Code: X-Mailrelayd; 4.4.1 connect to" in " ".join(status.split())
