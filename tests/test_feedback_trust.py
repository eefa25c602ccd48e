"""The trust model as pure functions: decide(), reporter policy, our own Received header."""

from __future__ import annotations

from mailrelayd.feedback.report import FeedbackRecipient, FeedbackReport
from mailrelayd.feedback.trust import ReporterPolicy, VerpMatch, decide, dkim_candidates, dkim_verifies, peer_ip_of

VERP = VerpMatch("ours@example.net", "example.com", "01JD3K5Q8Z7XM")


def _report(kind: str, *recipients: tuple[str, str], **kw: object) -> FeedbackReport:
    return FeedbackReport(kind, tuple(FeedbackRecipient(a, k, reason="r") for a, k in recipients), **kw)  # type: ignore[arg-type]


def _decide(report: FeedbackReport, *, verp: VerpMatch | None = None, sent: set[str] | None = None,
            trusted: bool = False, require_verp: bool = False) -> tuple[list[tuple[str, str]], list[str], str]:
    # ``sent``: the addresses as we sent to them (the spool's answer maps each, lowercased, to that).
    d = decide(report, verp=verp, sent={a.lower(): a for a in sent or ()}, reporter_trusted=trusted,
               require_verp=require_verp)
    return [(a.address, a.kind) for a in d.actions], list(d.untrusted), d.kind_label


def test_without_a_token_only_addresses_we_sent_to() -> None:
    r = _report("hard_bounce", ("a@example.net", "hard_bounce"), ("B@example.net", "soft_bounce"))
    assert _decide(r) == ([], ["a@example.net", "B@example.net"], "untrusted")
    # Acted on as we sent to it, not as the report writes it.
    assert _decide(r, sent={"b@example.net"}) == ([("b@example.net", "soft_bounce")], ["a@example.net"], "")
    assert _decide(r, sent={"a@example.net", "b@example.net"}, require_verp=True)[0] == []


def test_complaints_need_a_listed_reporter_and_a_recipient_we_sent_to() -> None:
    r = _report("complaint", ("c@example.net", "complaint"))
    assert _decide(r, sent={"c@example.net"})[0] == []
    assert _decide(r, trusted=True)[0] == []
    assert _decide(r, sent={"c@example.net"}, trusted=True)[0] == [("c@example.net", "complaint")]


def test_delays_and_sender_events_never_become_actions() -> None:
    r = _report("reputation", ("d@example.net", "delayed"), ("e@example.net", "reputation"))
    d = decide(r, verp=None, sent={"d@example.net": "d@example.net", "e@example.net": "e@example.net"},
               reporter_trusted=False, require_verp=False)
    assert d.actions == () and [e.address for e in d.sender_events] == ["e@example.net"]


def test_a_valid_token_wins() -> None:
    # The body names a forwarding target: its verdict applies to the address the token names.
    r = _report("hard_bounce", ("forwarded@elsewhere.example", "hard_bounce"))
    assert _decide(r, verp=VERP) == ([("ours@example.net", "hard_bounce")], [], "")
    # Several others named: the mildest verdict (another address's "user unknown" must not suppress ours).
    r = _report("hard_bounce", ("x@elsewhere.example", "hard_bounce"), ("y@elsewhere.example", "soft_bounce"))
    assert _decide(r, verp=VERP)[0] == [("ours@example.net", "soft_bounce")]
    # A delay at the VERP address: nothing.
    assert _decide(_report("delayed", ("ours@example.net", "delayed")), verp=VERP)[0] == []
    # Unparsable at the VERP address: a soft bounce for our recipient.
    assert _decide(FeedbackReport("unparsable"), verp=VERP)[0] == [("ours@example.net", "soft_bounce")]
    # Nobody named, but the text says why.
    text = FeedbackRecipient("", "hard_bounce", "5.1.1", "userunknown")
    assert _decide(FeedbackReport("not_feedback", unattributed=text), verp=VERP)[0] == [
        ("ours@example.net", "hard_bounce")]
    # An auto-reply at the VERP address is not a bounce.
    assert _decide(FeedbackReport("not_feedback"), verp=VERP)[0] == []


def test_reporter_policy() -> None:
    p = ReporterPolicy.from_config(["fbl.Example.NET.", "192.0.2.0/24", "2001:db8::/32"])
    assert p.domain_listed("fbl.example.net") and p.domain_listed("a.fbl.example.net")
    assert not p.domain_listed("evil-fbl.example.net") and not p.domain_listed("example.net")
    assert p.ip_trusted("192.0.2.77") and p.ip_trusted("2001:db8::1")
    assert not p.ip_trusted("198.51.100.1") and not p.ip_trusted("not an ip")


def test_peer_ip_only_from_our_own_topmost_received_header() -> None:
    ours = (b"Received: from mx.remote.example ([192.0.2.9])\r\n"
            b"\tby relay.test.example (mailrelayd) with ESMTP id X\r\n"
            b"Received: from forged ([10.0.0.1])\r\n\tby relay.test.example (mailrelayd) with ESMTP id Y\r\n\r\nbody")
    assert peer_ip_of(ours, "relay.test.example") == "192.0.2.9"
    assert peer_ip_of(ours, "other.example") == ""
    assert peer_ip_of(b"X-Spoof: 1\r\n" + ours, "relay.test.example") == ""


def test_dkim_of_unlisted_domains_is_not_even_looked_at() -> None:
    p = ReporterPolicy.from_config(["fbl.example.net"])
    raw = (b"DKIM-Signature: v=1; a=rsa-sha256; d=evil.example; s=s1; h=from; bh=x; b=y\r\n"
           b"DKIM-Signature: v=1; a=rsa-sha256; d=FBL.example.net; s=k2; h=from; bh=x; b=y\r\n"
           b"From: feedback@fbl.example.net\r\n\r\nbody\r\n")
    assert dkim_candidates(raw, p) == [("fbl.example.net", "k2")]
    assert dkim_verifies(raw, {}) is False  # no key: never verified


def test_a_listed_domain_vouches_only_for_reports_in_its_own_name() -> None:
    # Amazon SES signs every customer's mail d=amazonses.com: an "ARF" a customer sends through SES,
    # From its own domain, carries a valid amazonses.com signature and is still not SES's word.
    p = ReporterPolicy.from_config(["amazonses.com"])
    sig = b"DKIM-Signature: v=1; a=rsa-sha256; d=amazonses.com; s=ug7n; h=from; bh=x; b=y\r\n"
    assert dkim_candidates(sig + b"From: attacker@customer.example\r\n\r\nx\r\n", p) == []
    assert dkim_candidates(sig + b"From: complaints@email-abuse.amazonses.com\r\n\r\nx\r\n", p) == \
        [("amazonses.com", "ug7n")]
    assert dkim_candidates(sig + b"From: no-reply@amazonses.com.evil.example\r\n\r\nx\r\n", p) == []
    assert dkim_candidates(sig + b"From: a@amazonses.com, b@customer.example\r\n\r\nx\r\n", p) == []


def test_an_address_named_in_another_case_is_acted_on_as_we_sent_to_it_once() -> None:
    # We sent to Eve@; the report names eve@ and EVE@: one action, on Eve@ (the suppression list's
    # key is exact when local parts are case-sensitive, so eve@ would have missed the live address).
    r = _report("hard_bounce", ("eve@example.net", "hard_bounce"), ("EVE@example.net", "hard_bounce"))
    assert _decide(r, sent={"Eve@example.net"})[0] == [("Eve@example.net", "hard_bounce")]


def test_a_token_whose_recipient_the_report_says_succeeded_is_no_bounce() -> None:
    # A list address we sent to was expanded; the report also lists one member that failed.
    r = FeedbackReport("hard_bounce", (FeedbackRecipient("member@example.net", "hard_bounce", "5.1.1", "userunknown"),),
                       succeeded=("ours@example.net",))
    assert _decide(r, verp=VERP) == ([], [], "")
    r = FeedbackReport("hard_bounce", (FeedbackRecipient("member@example.net", "hard_bounce", "5.1.1", "userunknown"),),
                       succeeded=("other@example.net",))
    assert _decide(r, verp=VERP)[0] == [("ours@example.net", "hard_bounce")]  # the report's only failure
