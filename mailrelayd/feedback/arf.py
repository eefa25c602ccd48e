"""RFC 5965 Abuse Reporting Format: the ``message/feedback-report`` fields."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailrelayd.feedback.addresses import address_from_field
from mailrelayd.feedback.fields import all_values, parse_groups

# RFC 5965 section 7.3 registry plus the opt-out types of the ARF drafts. These name a
# recipient who does not want the mail: suppress them.
COMPLAINT_TYPES = frozenset({"abuse", "fraud", "virus", "opt-out", "optout", "unsubscribe", "complaint"})
# RFC 6591 auth-failure and RFC 6650 not-spam are about the message, not a wish of the
# recipient; "other" is too vague to suppress anyone on.
NOT_COMPLAINT_TYPES = frozenset({"auth-failure", "not-spam", "other", "dmarc"})
_ARF_FIELD = re.compile(
    r"^(feedback-type|user-agent|version|original-rcpt-to|original-mail-from|removal-recipient|arrival-date|"
    r"source-ip|reported-domain)[ \t]*:", re.IGNORECASE | re.MULTILINE)


def looks_like_feedback_report(text: str, *, strict: bool = True) -> bool:
    """True when free text carries RFC 5965 report fields (a report written into a text part).

    ``strict`` (no ``report-type=feedback-report`` around it) also wants a recipient field and
    one more ARF field, so that a message merely quoting "Feedback-Type:" is not a complaint.
    """
    found = {m.group(1).lower() for m in _ARF_FIELD.finditer(text[:16384])}
    if "feedback-type" not in found:
        return False
    if not strict:
        return True
    # RFC 5965 section 3.1: Feedback-Type, User-Agent and Version are the required fields.
    if {"user-agent", "version"} <= found:
        return True
    return bool(found & {"original-rcpt-to", "removal-recipient"}) and bool(
        found & {"user-agent", "version", "original-mail-from", "arrival-date", "source-ip"})


@dataclass(frozen=True)
class ArfFields:
    """The fields of a feedback report we act on."""

    feedback_type: str  # lowercased, "" when missing
    original_rcpt_to: tuple[str, ...]  # Original-Rcpt-To (RFC 5965 section 3.2), in order
    removal_recipients: tuple[str, ...]  # Removal-Recipient (ARF opt-out draft)
    original_mail_from: str  # Original-Mail-From: the envelope sender, possibly our VERP address
    reported_domain: str
    source_ip: str


def parse_feedback_report(text: str) -> ArfFields:
    """Parse the text of a ``message/feedback-report`` part (lenient; never raises)."""
    groups = parse_groups(text, split_on_repeat=False)

    def one(name: str) -> str:
        values = all_values(groups, name)
        return values[0].strip() if values else ""

    def addresses(name: str) -> tuple[str, ...]:
        out: list[str] = []
        for value in all_values(groups, name):
            address = address_from_field(value)
            if address and address not in out:
                out.append(address)
        return tuple(out)

    feedback_type = one("feedback-type").lower().split(" ")[0].strip(";") if one("feedback-type") else ""
    return ArfFields(
        feedback_type=feedback_type,
        original_rcpt_to=addresses("original-rcpt-to"),
        removal_recipients=addresses("removal-recipient"),
        original_mail_from=address_from_field(one("original-mail-from")),
        reported_domain=one("reported-domain"),
        source_ip=one("source-ip"),
    )
