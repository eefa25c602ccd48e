"""What the parser says about one inbound message: :class:`FeedbackReport` and its recipients."""

from __future__ import annotations

from dataclasses import dataclass

from mailrelayd.feedback.classify import HARD, POLICY, REPUTATION, SOFT

HARD_BOUNCE = HARD
SOFT_BOUNCE = SOFT
COMPLAINT = "complaint"
# A delay notice (DSN Action: delayed, "THIS IS A WARNING ONLY"): the message is still being
# retried and usually arrives. Never a bounce (RFC 3464 section 2.3.3).
DELAYED = "delayed"
NOT_FEEDBACK = "not_feedback"
UNPARSABLE = "unparsable"
# Severity for the report's overall kind (the worst recipient).
SEVERITY = {COMPLAINT: 5, HARD_BOUNCE: 4, SOFT_BOUNCE: 3, REPUTATION: 2, POLICY: 2, DELAYED: 1}
SUPPRESSING_KINDS = frozenset({HARD_BOUNCE, COMPLAINT})
# Recipient kinds that are recorded against the recipient (soft ones count toward the threshold).
RECIPIENT_KINDS = frozenset({HARD_BOUNCE, SOFT_BOUNCE, COMPLAINT})
SENDER_KINDS = frozenset({REPUTATION, POLICY})
# The parser of a complaint its complainer sent themselves (a mail client's unsubscribe request):
# no third party vouches for it (see mailrelayd.feedback.trust.policy_for).
UNSUBSCRIBE_PARSER = "unsubscribe"


@dataclass(frozen=True)
class FeedbackRecipient:
    """One address a report is about.

    ``address`` is normalised (surrounding ``<>`` removed, domain lowercased and IDNA-encoded,
    no trailing dot; the local part as reported, UTF-8 allowed). ``kind`` is ``hard_bounce``,
    ``soft_bounce``, ``complaint``, ``delayed``, or ``reputation`` / ``policy`` (the failure is
    about the sender); only hard bounces and complaints lead to suppression. ``reason`` uses
    sisimai's names (``userunknown``, ``mailboxfull``, ``feedback``, ``expired``...).
    """

    address: str
    kind: str
    status: str = ""
    reason: str = ""
    diagnostic: str = ""
    remote_mta: str = ""


@dataclass(frozen=True)
class FeedbackReport:
    """The classification of one inbound message.

    ``kind`` is the worst recipient kind (see :data:`SEVERITY`), or, with no recipient,
    ``complaint`` (a complaint whose complainer is redacted), ``not_feedback`` (auto-replies,
    read receipts, delivered DSNs, auth-failure reports, ordinary mail) or ``unparsable``
    (nothing that looks like a message, or a report without a usable recipient).
    ``original_*`` describe the returned or reported message when the report carries it:
    ``original_from`` is its header From (for per-sending-domain metrics),
    ``original_return_path`` its envelope sender (may be our VERP address),
    ``original_envelope_id`` the DSN ``Original-Envelope-Id`` (RFC 3461 ENVID).
    ``parser`` names the recognizer that decided (``dsn``, ``arf``, ``jmrp``, ``ses``,
    ``format:<family>`` (see :mod:`~mailrelayd.feedback.legacy`), ``heuristic:<name>``,
    ``autoreply``...). ``unattributed`` (address ``""``): when no recipient could be named, what
    the report's text and status codes say about the failure, so that a recipient identified by
    a VERP token can still be classified.
    """

    kind: str
    recipients: tuple[FeedbackRecipient, ...] = ()
    feedback_type: str = ""
    original_message_id: str = ""
    original_from: str = ""
    original_envelope_id: str = ""
    original_return_path: str = ""
    detail: str = ""
    parser: str = ""
    unattributed: FeedbackRecipient | None = None
    succeeded: tuple[str, ...] = ()
    """Addresses the report says were delivered, relayed or expanded (RFC 3464 §2.3.3): never the
    failed recipient of a VERP token that names one of them."""

    @property
    def suppressions(self) -> tuple[FeedbackRecipient, ...]:
        """Recipients that should be suppressed (hard bounces and complaints)."""
        return tuple(r for r in self.recipients if r.kind in SUPPRESSING_KINDS)
