"""RFC 3464 delivery status notifications: the ``message/delivery-status`` fields."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailrelayd.feedback.addresses import address_from_field
from mailrelayd.feedback.fields import Group, first, parse_groups

_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
# Actions that report a success (RFC 3464 section 2.3.3: delivered, relayed, expanded), and Postfix's
# address-verification report (``sendmail -bv``: "deliverable", with a 2.x.x Status).
SUCCESS_ACTIONS = frozenset({"delivered", "relayed", "expanded", "deliverable"})
_DSN_FIELD_HINT = re.compile(
    r"^(final-recipient|original-recipient|action|status)\s*:", re.IGNORECASE | re.MULTILINE
)


@dataclass(frozen=True)
class DsnRecipient:
    """One per-recipient group (RFC 3464 section 2.3)."""

    address: str
    action: str  # lowercased first word: failed, delayed, delivered, relayed, expanded (or "")
    status: str  # "5.1.1" or ""
    diagnostic: str  # Diagnostic-Code without its type ("smtp; ")
    remote_mta: str  # Remote-MTA without its type ("dns; ")

    @property
    def succeeded(self) -> bool:
        """A success, not a failure: a success Action, or a 2.x.x Status (RFC 3463 section 3.1)."""
        return self.action in SUCCESS_ACTIONS or self.status.startswith("2.")


@dataclass(frozen=True)
class DsnFields:
    """Parsed content of a delivery-status part."""

    envelope_id: str
    reporting_mta: str
    recipients: tuple[DsnRecipient, ...]


def _strip_type(value: str) -> str:
    """``smtp; 550 ...`` → ``550 ...`` (RFC 3464 section 2.1.2 typed fields)."""
    head, sep, rest = value.partition(";")
    if sep and head.strip() and " " not in head.strip() and len(head) < 40:
        return rest.strip()
    return value.strip()


def normalise_status(value: str) -> str:
    """First ``class.subject.detail`` in a Status field: ``4.0.0 (unknown failure)`` → ``4.0.0``."""
    match = _STATUS.search(value)
    return match.group(0) if match else ""


def _recipient(group: Group) -> DsnRecipient | None:
    final = address_from_field(first(group, "final-recipient"))
    original = address_from_field(first(group, "original-recipient"))
    actual = address_from_field(first(group, "x-actual-recipient"))
    # Final-Recipient is mandatory, but some MTAs put a route ("@mx.example.org") or a
    # program there; the Original-Recipient then names the address we sent to.
    address = final or original or actual
    if not address:
        return None
    status = normalise_status(first(group, "status"))
    diagnostic = _strip_type(first(group, "diagnostic-code"))
    action = first(group, "action").lower().split(" ")[0].strip(";,") if first(group, "action") else ""
    if not action:
        # Section 2.3.3 makes Action mandatory; infer it from the status class when missing.
        code = status or normalise_status(diagnostic)
        action = {"5": "failed", "4": "delayed", "2": "delivered"}.get(code[:1], "failed")
    if action == "expired":  # SendGrid and others
        action = "failed"
    return DsnRecipient(address, action, status, diagnostic, _strip_type(first(group, "remote-mta")))


def parse_delivery_status(text: str) -> DsnFields:
    """Parse the text of a ``message/delivery-status`` part (lenient; never raises).

    Handles per-recipient groups written without the separating blank line and per-message
    fields run together with the first recipient group.
    """
    groups = parse_groups(text)
    envelope_id = reporting_mta = ""
    recipients: list[DsnRecipient] = []
    for group in groups:
        names = {name for name, _ in group}
        if not envelope_id:
            envelope_id = first(group, "original-envelope-id")
        if not reporting_mta:
            reporting_mta = _strip_type(first(group, "reporting-mta"))
        if names & {"final-recipient", "original-recipient", "x-actual-recipient"}:
            recipient = _recipient(group)
            if recipient is not None:
                recipients.append(recipient)
    return DsnFields(envelope_id, reporting_mta, tuple(recipients))


def looks_like_delivery_status(text: str) -> bool:
    """True when free text carries DSN fields (some MTAs paste them into a text/plain part)."""
    found = {m.group(1).lower() for m in _DSN_FIELD_HINT.finditer(text)}
    return "final-recipient" in found and ("action" in found or "status" in found)
