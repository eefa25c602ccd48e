"""Named recognizers: each looks at the one :class:`~mailrelayd.feedback.tree.MessageTree` and
returns evidence (a :class:`FeedbackReport` naming recipients and their kinds) or ``None``.

:data:`RECOGNIZERS` is the ordered list :func:`mailrelayd.feedback.parse.parse_feedback` runs;
the order is the weight of the evidence: standard machine-readable reports first (RFC 5965 ARF,
Microsoft JMRP, RFC 8098 MDN, RFC 3464/6533 DSN; before the DSN, the gate that stops at bounces
a person forwarded), then provider notifications (Amazon SES),
then the gate that stops at auto-replies and ordinary mail, then DSN fields pasted into text,
the bounce formats of older and proprietary mail systems (:mod:`mailrelayd.feedback.legacy`),
and the plain-text heuristics. Every hard/soft decision is
:func:`mailrelayd.feedback.classify.classify_failure`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from mailrelayd.feedback.addresses import address_from_field, find_addresses, is_plausible_recipient, normalise_address
from mailrelayd.feedback.arf import (
    COMPLAINT_TYPES,
    NOT_COMPLAINT_TYPES,
    looks_like_feedback_report,
    parse_feedback_report,
)
from mailrelayd.feedback.classify import HARD, POLICY, SOFT, Classification, bucket, classify_failure
from mailrelayd.feedback.dsn import looks_like_delivery_status, normalise_status, parse_delivery_status
from mailrelayd.feedback.fields import first, parse_groups
from mailrelayd.feedback.legacy import LegacyResult, find_legacy
from mailrelayd.feedback.mime import header_str, parse_bytes, part_text
from mailrelayd.feedback.report import (
    COMPLAINT,
    DELAYED,
    NOT_FEEDBACK,
    SEVERITY,
    SOFT_BOUNCE,
    UNPARSABLE,
    UNSUBSCRIBE_PARSER,
    FeedbackRecipient,
    FeedbackReport,
)
from mailrelayd.feedback.textbounce import (
    excluded_addresses,
    find_recipients,
    forwarded_by_person,
    from_mail_system,
    is_auto_reply,
    is_challenge_notice,
    is_warning,
    later_snippets,
    looks_like_bounce,
    named_on_recipient_line,
    returned_recipient,
    snippet_for,
    transcript_reply,
    without_successful_replies,
)
from mailrelayd.feedback.tree import ARF_TYPE, DSN_TYPES, MDN_TYPES, MessageTree, first_address

# The legacy formats read the whole tree, the returned message included: they get this much of it.
LEGACY_MAX_BYTES = 32 * 1024
MAX_RECIPIENTS = 100
_GENERIC_REASONS = frozenset({"onhold", ""})
# A failure's enhanced status code in bounce text. A 2.x.x there is a step that worked (the "250
# 2.1.0 Ok" to MAIL FROM in a quoted session transcript), never the recipient's failure.
_FAILURE_STATUS = re.compile(r"\b[45]\.\d{1,3}\.\d{1,3}\b")
_HEADER_START = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,60}[ \t]*:")


@dataclass(frozen=True)
class ParseOptions:
    """Which groups of recognizers run. All on in production; the bench switches them off one by one."""

    standard: bool = True
    legacy: bool = True
    heuristics: bool = True


DEFAULT_OPTIONS = ParseOptions()


@dataclass
class Scan:
    """State shared by the recognizers of one parse (computed once, on first need)."""

    tree: MessageTree
    options: ParseOptions
    _excluded: set[str] | None = None
    _warning: bool | None = None

    def excluded(self) -> set[str]:
        if self._excluded is None:
            self._excluded = excluded_addresses(self.tree.msg, self.tree.original)
        return self._excluded

    def warning(self) -> bool:
        if self._warning is None:
            self._warning = is_warning(self.tree.msg, self.tree.text())
        return self._warning


Recognizer = Callable[[Scan], FeedbackReport | None]


# --- helpers ----------------------------------------------------------------------------------


def report(
    tree: MessageTree, kind: str, *, recipients: tuple[FeedbackRecipient, ...] = (),
    succeeded: tuple[str, ...] = (), **kw: str
) -> FeedbackReport:
    """A report with the tree's original-message fields; ``kind`` is the worst recipient's."""
    if recipients:
        kind = max((r.kind for r in recipients), key=lambda k: SEVERITY.get(k, 0))
    if tree.original is None and kind in SEVERITY:
        _inline_original(tree)
    return FeedbackReport(
        kind=kind,
        recipients=recipients,
        succeeded=succeeded,
        original_message_id=kw.pop("original_message_id", tree.original_message_id),
        original_from=kw.pop("original_from", tree.original_from),
        original_return_path=kw.pop("original_return_path", tree.original_return_path),
        **kw,
    )


def _inline_original(tree: MessageTree) -> None:
    """Fill ``tree.original_*`` from a returned message quoted as text after the notification."""
    from email.parser import HeaderParser
    from email.policy import compat32

    lines = tree.returned_text()[:16384].split("\n")
    start = 0 if lines and _HEADER_START.match(lines[0]) else 1  # skip the marker line
    while start < len(lines) and not lines[start].strip():
        start += 1
    if start >= len(lines) or not _HEADER_START.match(lines[start]):
        return
    try:
        headers = HeaderParser(policy=compat32).parsestr("\n".join(lines[start:]), headersonly=True)
    except Exception:
        return
    tree.original_from = tree.original_from or first_address(header_str(headers, "from"))
    tree.original_message_id = tree.original_message_id or header_str(headers, "message-id").strip()
    tree.original_return_path = tree.original_return_path or first_address(header_str(headers, "return-path"))


def dedupe(recipients: list[FeedbackRecipient]) -> tuple[FeedbackRecipient, ...]:
    """One entry per address (case-insensitive), keeping the most severe."""
    best: dict[str, FeedbackRecipient] = {}
    for recipient in recipients:
        key = recipient.address.lower()
        current = best.get(key)
        if current is None or SEVERITY.get(recipient.kind, 0) > SEVERITY.get(current.kind, 0):
            best[key] = recipient
    return tuple(best.values())[:MAX_RECIPIENTS]


def _delayed_reason(result: Classification) -> str:
    return "expired" if result.reason in _GENERIC_REASONS else result.reason


# --- standard reports -------------------------------------------------------------------------


def recognize_arf(scan: Scan) -> FeedbackReport | None:
    """RFC 5965 ARF: the complainer is Original-Rcpt-To (or the opt-out draft's Removal-Recipient).

    Variants seen in the wild: the report fields in a ``text/plain`` part (or the whole body)
    instead of ``message/feedback-report``, base64-encoded fields, no Feedback-Type, the
    original only as ``text/rfc822-headers``.
    """
    tree = scan.tree
    text = tree.report_text(ARF_TYPE)
    if not text:
        text = _arf_in_text(tree)
        if not text:
            return None
    fields = parse_feedback_report(text)
    ftype = fields.feedback_type
    return_path = fields.original_mail_from or tree.original_return_path
    if ftype not in COMPLAINT_TYPES:
        # RFC 5965 §7.3's registry: only the types that say a person objected to the mail are
        # complaints; anything else (auth-failure, not-spam, other, a type we do not know, none at
        # all) is no reason to stop mailing anyone.
        return report(tree, NOT_FEEDBACK, feedback_type=ftype,
                      detail=f"feedback type {ftype or '(none)'} is not a complaint",
                      parser="arf", original_return_path=return_path)
    addresses = list(fields.original_rcpt_to or fields.removal_recipients)
    if not addresses and tree.original is not None:
        # No Original-Rcpt-To: the reported message's single To address, if it has one.
        found = [a for a in find_addresses(header_str(tree.original, "to")) if is_plausible_recipient(a)]
        if len(found) == 1:
            addresses = found
    recipients = dedupe([
        FeedbackRecipient(normalise_address(a), COMPLAINT, reason="feedback", diagnostic=ftype or "abuse")
        for a in addresses if normalise_address(a)
    ])
    return report(tree, COMPLAINT, recipients=recipients, feedback_type=ftype or "abuse",
                  detail="" if recipients else "complaint without a recoverable recipient", parser="arf",
                  original_return_path=return_path)


def _arf_in_text(tree: MessageTree) -> str:
    """ARF fields written into a text part of a feedback report instead of their own part."""
    for leaf in tree.leaves:
        if leaf.in_original or not leaf.ctype.startswith("text/") or leaf.ctype == "text/html":
            continue
        text = part_text(leaf.part, 16 * 1024)
        if looks_like_feedback_report(text, strict=tree.report_type != "feedback-report"):
            return text
    return ""


def recognize_jmrp(scan: Scan) -> FeedbackReport | None:
    """Microsoft JMRP: a reported message carrying ``X-HmXmrOriginalRecipient`` (wrapped or not)."""
    tree = scan.tree
    # The reported message's headers may also come as a text/rfc822-headers part (tree.original).
    candidates = [*tree.nodes, *([(1, tree.original)] if tree.original is not None else [])]
    for depth, part in candidates:
        value = header_str(part, "x-hmxmroriginalrecipient")
        if not value:
            continue
        found = [a for a in find_addresses(value) if normalise_address(a)]
        recipients = tuple(
            FeedbackRecipient(normalise_address(a), COMPLAINT, reason="feedback", diagnostic="jmrp")
            for a in found[:1]
        )
        original_from = first_address(header_str(part, "from")) if depth > 0 or tree.original is None else ""
        extra = {"original_from": original_from} if original_from else {}
        return report(tree, COMPLAINT, recipients=recipients, feedback_type="abuse", parser="jmrp",
                      detail="" if recipients else "complaint without a recoverable recipient", **extra)
    return None


# RFC 8098 section 3.2.6: a message "deleted" by an automatic action was never shown to anyone.
# That is how Sieve's "reject" refuses a message (RFC 5429 section 2.1.1), and Dovecot's LDA a
# message over quota: a refusal in the form of an MDN, with the reason in the text.
_MDN_DELETED = re.compile(r"automatic-action\s*/[^;]*;\s*deleted\b", re.IGNORECASE)


def recognize_mdn(scan: Scan) -> FeedbackReport | None:
    """RFC 8098 read receipts: never feedback. A refusal sent as an MDN is a soft bounce."""
    tree = scan.tree
    if tree.report_type == "disposition-notification" or tree.report_part(*MDN_TYPES) is not None:
        refused = _mdn_refusal(tree)
        if refused is not None:
            return report(tree, refused.kind, recipients=(refused,), parser="mdn",
                          detail="refused by the recipient's system (MDN, RFC 5429)")
        return report(tree, NOT_FEEDBACK, detail="read receipt (MDN, RFC 8098)", parser="mdn")
    return None


def _mdn_refusal(tree: MessageTree) -> FeedbackRecipient | None:
    """The recipient of an MDN whose disposition is an automatic ``deleted`` (see :data:`_MDN_DELETED`).

    Its reason is free text (the quota, or a user's Sieve script) with no status code: the text
    names the reason, but never makes it a hard bounce, so no MDN suppresses anyone."""
    fields = [f for group in parse_groups(tree.report_text(*MDN_TYPES), split_on_repeat=False) for f in group]
    if not _MDN_DELETED.search(first(fields, "disposition")):
        return None
    address = address_from_field(first(fields, "final-recipient") or first(fields, "original-recipient"))
    if not address or not is_plausible_recipient(address):
        return None
    address = normalise_address(address)
    text = snippet_for(tree.text(), address, ()) or tree.text()
    result = classify_failure("", text)
    kind = SOFT_BOUNCE if result.kind == HARD else result.kind
    return FeedbackRecipient(address, kind, reason=result.reason, diagnostic=" ".join(text.split())[:500])


def recognize_forwarded(scan: Scan) -> FeedbackReport | None:
    """A bounce a person forwarded (inline, or attached as a message) is that person's mail, not a
    report to us: whatever it quotes, it suppresses nobody. A message with a delivery-status part of
    its own (not inside an attached message) is a report, whoever sent it; a bounce wrapped inside
    a mail system's report is still read (the mail system is no person)."""
    tree = scan.tree
    if any(t in tree.report_parts and t not in tree.nested_reports for t in DSN_TYPES):
        return None
    if not forwarded_by_person(tree.msg, tree.text):
        return None
    return report(tree, NOT_FEEDBACK, detail="mail forwarded by a person", parser="forwarded")


def recognize_dsn(scan: Scan) -> FeedbackReport | None:
    """RFC 3464 ``message/delivery-status`` and RFC 6533 ``message/global-delivery-status``."""
    text = scan.tree.report_text(*DSN_TYPES)
    return from_dsn_text(scan, text, parser="dsn") if text else None


def from_dsn_text(scan: Scan, text: str, *, parser: str) -> FeedbackReport | None:
    tree = scan.tree
    fields = parse_delivery_status(text)
    if not fields.recipients:
        return None
    failures = [r for r in fields.recipients if not r.succeeded]
    if failures and all(is_challenge_notice(r.diagnostic) for r in failures) and not any(
            classify_failure(r.status, r.diagnostic).kind == HARD for r in failures):
        # A challenge-response system (Boxbe...) in DSN form: the recipient exists and holds the
        # message until the sender confirms; like TMDA's and BoxTrapper's requests, no feedback.
        return report(tree, NOT_FEEDBACK, detail="challenge-response request", parser=parser,
                      original_envelope_id=fields.envelope_id)
    recipients: list[FeedbackRecipient] = []
    addresses = [r.address for r in fields.recipients]
    for r in fields.recipients:
        if r.succeeded:
            continue  # RFC 3464 section 2.3.3 and RFC 3463 class 2: not failures
        address = normalise_address(r.address)
        if not address:
            continue
        status = r.status or normalise_status(r.diagnostic)
        if r.action == "delayed":
            # Still being retried: a warning, never a bounce, whatever its text says.
            result = classify_failure(status or "4.0.0", r.diagnostic)
            recipients.append(FeedbackRecipient(address, DELAYED, status, _delayed_reason(result), r.diagnostic,
                                                r.remote_mta))
            continue
        result = classify_failure(status, r.diagnostic, final=True)
        if not result.decisive:
            # No telling Diagnostic-Code: the human-readable part may name the cause.
            snippet = snippet_for(tree.text(), r.address, addresses)
            if snippet:
                from_text = classify_failure(status, snippet, final=True)
                if from_text.decisive or result.reason in _GENERIC_REASONS:
                    result = from_text
        recipients.append(FeedbackRecipient(address, result.kind, status, result.reason, r.diagnostic,
                                            r.remote_mta))
    succeeded = tuple(a for a in (normalise_address(r.address) for r in fields.recipients if r.succeeded) if a)
    if not recipients:
        return report(tree, NOT_FEEDBACK, detail="delivery report without failures (delivered/relayed)",
                      parser=parser, original_envelope_id=fields.envelope_id, succeeded=succeeded)
    return report(tree, SOFT_BOUNCE, recipients=dedupe(recipients), parser=parser,
                  original_envelope_id=fields.envelope_id, succeeded=succeeded)


# --- provider notifications -------------------------------------------------------------------

_JSON_START = re.compile(r'\{\s*"')
# SES bounce sub-types (bounceType Permanent) that name the address itself.
_SES_ADDRESS_SUBTYPES = {"general": "userunknown", "noemail": "userunknown", "suppressed": "suppressed",
                         "onaccountsuppressionlist": "suppressed"}
_SES_TRANSIENT_SUBTYPES = {"mailboxfull": "mailboxfull", "messagetoolarge": "mesgtoobig",
                           "contentrejected": "contenterror", "attachmentrejected": "contenterror"}


def recognize_ses(scan: Scan) -> FeedbackReport | None:
    """Amazon SES bounce/complaint notifications delivered by mail (an SNS e-mail subscription).

    The body is the notification JSON (``notificationType`` or ``eventType``: Bounce,
    Complaint, DeliveryDelay, Delivery...), possibly wrapped in the SNS envelope (``Type:
    Notification``, the JSON again as a string in ``Message``). Field names from the SES
    developer guide, "Contents of notifications for Amazon SES".
    """
    tree = scan.tree
    doc = _ses_document(tree)
    if doc is None:
        return None
    event = str(doc.get("notificationType") or doc.get("eventType") or "").lower()
    mail = doc.get("mail") if isinstance(doc.get("mail"), dict) else {}
    headers = mail.get("commonHeaders") if isinstance(mail.get("commonHeaders"), dict) else {}
    from_list = headers.get("from") if isinstance(headers.get("from"), list) else []
    extra = {
        "original_return_path": normalise_address(str(mail.get("source") or "")) or tree.original_return_path,
        "original_from": first_address(str(from_list[0])) if from_list else tree.original_from,
        "original_message_id": str(headers.get("messageId") or mail.get("messageId") or tree.original_message_id),
    }
    if event == "bounce":
        return _ses_bounce(tree, doc.get("bounce"), extra)
    if event == "complaint":
        return _ses_complaint(tree, doc.get("complaint"), extra)
    if event == "deliverydelay":
        delay = doc.get("deliveryDelay") if isinstance(doc.get("deliveryDelay"), dict) else {}
        recipients = [
            FeedbackRecipient(normalise_address(str(r.get("emailAddress", ""))), DELAYED, str(r.get("status") or ""),
                              "expired", str(r.get("diagnosticCode") or ""))
            for r in _dicts(delay.get("delayedRecipients")) if normalise_address(str(r.get("emailAddress", "")))
        ]
        return report(tree, DELAYED, recipients=dedupe(recipients), parser="ses", **extra)
    return report(tree, NOT_FEEDBACK, detail=f"SES {event or 'unknown'} notification", parser="ses", **extra)


def _dicts(value: object) -> list[dict[str, object]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _ses_bounce(tree: MessageTree, bounce: object, extra: dict[str, str]) -> FeedbackReport:
    bounce = bounce if isinstance(bounce, dict) else {}
    btype = str(bounce.get("bounceType") or "").lower()
    subtype = str(bounce.get("bounceSubType") or "").replace(" ", "").lower()
    recipients: list[FeedbackRecipient] = []
    for r in _dicts(bounce.get("bouncedRecipients")):
        address = normalise_address(str(r.get("emailAddress") or ""))
        if not address:
            continue
        status = normalise_status(str(r.get("status") or ""))
        diagnostic = str(r.get("diagnosticCode") or "")
        result = classify_failure(status, diagnostic, final=btype == "permanent")
        kind, reason = result.kind, result.reason
        if btype == "permanent" and subtype in _SES_ADDRESS_SUBTYPES and kind != HARD and (
                result.evidence == "none" or (subtype != "general" and not result.decisive)):
            # SES itself says the address is unusable (NoEmail, Suppressed; General only when
            # the remote gave no reason at all) and the remote text names no other cause.
            kind, reason = HARD, _SES_ADDRESS_SUBTYPES[subtype]
        elif btype == "transient" and kind == HARD:
            kind = SOFT
        if kind == SOFT and reason in _GENERIC_REASONS and subtype in _SES_TRANSIENT_SUBTYPES:
            reason = _SES_TRANSIENT_SUBTYPES[subtype]
            kind = bucket(SOFT, reason)
        recipients.append(FeedbackRecipient(address, kind, status, reason, diagnostic,
                                            str(bounce.get("remoteMtaIp") or "")))
    if not recipients:
        return report(tree, UNPARSABLE, detail="SES bounce without a recipient", parser="ses", **extra)
    return report(tree, SOFT_BOUNCE, recipients=dedupe(recipients), parser="ses", **extra)


def _ses_complaint(tree: MessageTree, complaint: object, extra: dict[str, str]) -> FeedbackReport:
    complaint = complaint if isinstance(complaint, dict) else {}
    ftype = str(complaint.get("complaintFeedbackType") or "abuse").lower()
    if ftype in NOT_COMPLAINT_TYPES:
        return report(tree, NOT_FEEDBACK, feedback_type=ftype, detail=f"SES complaint type {ftype}",
                      parser="ses", **extra)
    recipients = dedupe([
        FeedbackRecipient(normalise_address(str(r.get("emailAddress") or "")), COMPLAINT, reason="feedback",
                          diagnostic=ftype)
        for r in _dicts(complaint.get("complainedRecipients")) if normalise_address(str(r.get("emailAddress") or ""))
    ])
    return report(tree, COMPLAINT, recipients=recipients, feedback_type=ftype, parser="ses",
                  detail="" if recipients else "complaint without a recoverable recipient", **extra)


def _ses_document(tree: MessageTree) -> dict[str, object] | None:
    text = tree.text()
    if "notificationType" not in text and "eventType" not in text:
        # The notification as an attachment (application/json) rather than the body.
        text = "\n".join(part_text(leaf.part, 64 * 1024) for leaf in tree.leaves
                          if leaf.ctype == "application/json" and not leaf.in_original)
    if "notificationType" not in text and "eventType" not in text:
        return None
    # strict=False: mail transport folds long lines, leaving raw line breaks inside JSON strings.
    decoder = json.JSONDecoder(strict=False)
    for match in _JSON_START.finditer(text[:64 * 1024]):
        try:
            doc, _end = decoder.raw_decode(text, match.start())
        except (ValueError, RecursionError):  # RecursionError: nesting past the recursion limit
            continue
        if isinstance(doc, dict) and isinstance(doc.get("Message"), str) and doc.get("Type") == "Notification":
            try:
                doc = decoder.decode(doc["Message"])
            except (ValueError, RecursionError):
                continue
        if isinstance(doc, dict) and ("notificationType" in doc or "eventType" in doc) and "mail" in doc:
            return doc
    return None


def recognize_unsubscribe(scan: Scan) -> FeedbackReport | None:
    """A mail client's unsubscribe request: Apple Mail's "Unsubscribe" button sends a message of its
    user's own to the ``mailto:`` of the List-Unsubscribe header (RFC 2369), marked
    ``X-Apple-Unsubscribe: true`` (and ``Auto-Submitted: auto-replied``, so it comes before the
    auto-reply gate). An opt-out complaint whose complainer is the message's own From: the trust
    rules believe it only from a DKIM signature of the complainer's own domain
    (:func:`mailrelayd.feedback.trust.policy_for`)."""
    tree = scan.tree
    if header_str(tree.msg, "x-apple-unsubscribe").strip().lower() != "true" or from_mail_system(tree.msg):
        return None
    found = [normalise_address(a) for a in find_addresses(header_str(tree.msg, "from"))]
    found = [a for a in found if a]
    recipients = (FeedbackRecipient(found[0], COMPLAINT, reason="feedback", diagnostic="opt-out"),) \
        if len(found) == 1 else ()
    return report(tree, COMPLAINT, recipients=recipients, feedback_type="opt-out", parser=UNSUBSCRIBE_PARSER,
                  detail="" if recipients else "complaint without a recoverable recipient")


# --- the gate ---------------------------------------------------------------------------------


def recognize_not_bounce(scan: Scan) -> FeedbackReport | None:
    """RFC 3834 auto-replies and mail that does not present itself as a bounce stop here."""
    tree = scan.tree
    # Auto-replies are answered by people's mailboxes, bounces by mail systems (which also set
    # Auto-Submitted: auto-replied, so the header alone does not tell them apart).
    if is_auto_reply(tree.msg) and not from_mail_system(tree.msg):
        return report(tree, NOT_FEEDBACK, detail="auto-reply", parser="autoreply")
    if not looks_like_bounce(tree.msg, tree.text()):
        return nothing_found(tree, "not a bounce or complaint")
    return None


# --- non-standard bounces ---------------------------------------------------------------------


def recognize_dsn_in_text(scan: Scan) -> FeedbackReport | None:
    """DSN fields pasted into a text part."""
    text = scan.tree.text()
    return from_dsn_text(scan, text, parser="heuristic:dsn-in-text") if looks_like_delivery_status(text) else None


def recognize_legacy(scan: Scan) -> FeedbackReport | None:
    """Bounce formats of older and proprietary mail systems (:mod:`mailrelayd.feedback.legacy`):
    addresses only; each is classified from the text about it."""
    tree = scan.tree
    msg = tree.msg if len(tree.data) <= LEGACY_MAX_BYTES else parse_bytes(tree.data[:LEGACY_MAX_BYTES])
    result = find_legacy(msg)
    if result is None:
        return None
    excluded = _legacy_excluded(scan, result)
    usable = [
        a for a in (*result.permanent, *result.temporary)
        if is_plausible_recipient(a, from_field=result.from_field) and normalise_address(a).lower() not in excluded
    ]
    if not usable:
        return None
    return from_addresses(scan, usable, result.temporary, parser=f"format:{result.family}")


def _legacy_excluded(scan: Scan, result: LegacyResult) -> set[str]:
    """The addresses a legacy family's finding may not name (see :func:`excluded_addresses`).

    The report's own To/From and the original's sender are excluded so that a format read from
    lines of text does not take the bounce's addressee for the failed recipient. An address field
    the bouncing server wrote for exactly the failed recipients (Exim's ``X-Failed-Recipients``) is
    no such guess: when it names a single address and the notification lists that same address as
    a failed recipient (alone on its line, ``<address>: reason``), the address failed even though
    the bounce is addressed to it too (mail sent to oneself, a test address).
    """
    excluded = scan.excluded()
    if not result.from_field:
        return excluded
    named = {normalise_address(a).lower() for a in (*result.permanent, *result.temporary)} - {""}
    if len(named) != 1 or not named <= excluded:
        return excluded
    (address,) = named
    if not named_on_recipient_line(scan.tree.text(), address):
        return excluded
    return excluded - named


def recognize_text(scan: Scan) -> FeedbackReport | None:
    """Recipient lines of common plain-text formats, then a returned message's single To."""
    tree = scan.tree
    text = tree.text()
    excluded = scan.excluded()
    addresses = find_recipients(text, excluded)
    if addresses:
        return from_addresses(scan, addresses, (), parser="heuristic:text")
    # The bounce names nobody at all (old Sendmail: "Deferred: Connection timed out"): the
    # returned message's single To is the recipient it is about. Not when the text names an
    # address we excluded (it may be the real one, equal to a sender address).
    to = ""
    if not find_recipients(text, set()):
        to = returned_recipient(tree.returned_text(), excluded)
        if not to and tree.original is not None:
            to = returned_recipient("To: " + header_str(tree.original, "to"), excluded)
    if to:
        return from_addresses(scan, [to], (), parser="heuristic:returned-to")
    return None


def from_addresses(scan: Scan, addresses: list[str], temporary: tuple[str, ...], *, parser: str) -> FeedbackReport:
    text = scan.tree.text()
    warning = scan.warning()
    recipients: list[FeedbackRecipient] = []
    for address in addresses:
        normalised = normalise_address(address)
        if not normalised:
            continue
        snippet = snippet_for(text, address, addresses)
        status = _failure_status(snippet)
        if warning or address in temporary:
            result = classify_failure(status or "4.0.0", snippet or text)
            kind, reason = DELAYED, _delayed_reason(result)
        else:
            result, status, snippet = _recipient_verdict(text, address, addresses, snippet, status)
            kind, reason = result.kind, result.reason
        recipients.append(FeedbackRecipient(normalised, kind, status, reason, " ".join(snippet.split())[:500]))
    return report(scan.tree, SOFT_BOUNCE, recipients=dedupe(recipients), parser=parser)


def _failure_status(text: str) -> str:
    match = _FAILURE_STATUS.search(text)
    return match.group(0) if match else ""


def _recipient_verdict(
    text: str, address: str, addresses: list[str], snippet: str, status: str
) -> tuple[Classification, str, str]:
    """(classification, status, the lines it read) of one recipient of a plain-text bounce.

    The evidence, most specific first, the first that names a cause deciding: the remote server's
    reply to this recipient's ``RCPT TO`` in a quoted session transcript; the lines about its first
    mention; the lines about its later mentions (Exchange's section for administrators, a
    transcript). Only the lines about this recipient count when there are several (another one's
    "user unknown" must not suppress it); with one, the whole notification is about it and is read
    last. A status code alone (no words) is kept over no evidence at all.
    """
    reply = transcript_reply(text, address)
    if reply:
        reply_status = _failure_status(reply)
        from_reply = classify_failure(reply_status, reply, final=True)
        if from_reply.decisive:
            return from_reply, reply_status, reply
    # The replies of a quoted transcript that accepted a step are no evidence ("250 2.1.5 Ok").
    result = classify_failure(status, without_successful_replies(snippet), final=True)
    if not result.decisive:
        for lines in ([reply] if reply else []) + later_snippets(text, address, addresses):
            lines = without_successful_replies(lines)
            lines_status = _failure_status(lines)
            candidate = classify_failure(lines_status, lines, final=True)
            if candidate.decisive or (candidate.evidence == "code" and result.evidence == "none"):
                result, status, snippet = candidate, lines_status, lines
                if candidate.decisive:
                    break
    if not result.decisive and len(addresses) == 1:
        whole = without_successful_replies(text)
        result = classify_failure(status or _failure_status(whole), whole, final=True)
    return result, status, snippet


def nothing_found(tree: MessageTree, detail: str) -> FeedbackReport:
    """No recipient anywhere. A message carrying a report part is a broken report, not "not
    feedback": call it unparsable so it is counted and kept for inspection. Either way, say what
    the text's codes and words give (``unattributed``) for a VERP-identified recipient."""
    broken = tree.report_part(*DSN_TYPES) is not None
    text = tree.text()
    if broken or looks_like_bounce(tree.msg, text):
        result = classify_failure(normalise_status(text), text)
        kind = DELAYED if is_warning(tree.msg, text) else result.kind
        unattributed = FeedbackRecipient("", kind, normalise_status(text), result.reason, " ".join(text.split())[:500])
    else:
        unattributed = None
    out = report(tree, UNPARSABLE if broken else NOT_FEEDBACK,
                 detail="delivery-status report without a usable recipient" if broken else detail, parser="none")
    return FeedbackReport(**{**out.__dict__, "unattributed": unattributed})


# The order is the weight of the evidence (see the module docstring). Each entry: (name, group, recognizer).
RECOGNIZERS: tuple[tuple[str, str, Recognizer], ...] = (
    ("arf", "standard", recognize_arf),
    ("jmrp", "standard", recognize_jmrp),
    ("mdn", "standard", recognize_mdn),
    ("forwarded", "gate", recognize_forwarded),
    ("dsn", "standard", recognize_dsn),
    ("ses", "standard", recognize_ses),
    ("unsubscribe", "standard", recognize_unsubscribe),
    ("not-bounce", "gate", recognize_not_bounce),
    ("dsn-in-text", "heuristics", recognize_dsn_in_text),
    ("legacy", "legacy", recognize_legacy),
    ("text", "heuristics", recognize_text),
)

__all__ = ["DEFAULT_OPTIONS", "POLICY", "RECOGNIZERS", "ParseOptions", "Scan", "nothing_found"]
