"""Turn one inbound message into a feedback classification.

Entry point: :func:`parse_feedback`. The decision chain, first match wins:

1. **Standard reports** (``ParseOptions.standard``):
   RFC 5965 ARF (``message/feedback-report``), Microsoft JMRP (a returned message carrying
   ``X-HmXmrOriginalRecipient``), RFC 8098 MDN (``message/disposition-notification``: never
   feedback), RFC 3464 DSN (``message/delivery-status``, also base64-encoded, also status
   groups without blank lines between them).
2. **Not a bounce at all**: a message that does not present itself as a bounce (sender,
   subject, text) but as an RFC 3834 auto-reply, or any other ordinary mail.
3. **flufl.bounce** (``ParseOptions.flufl``): Mailman's detectors for non-standard bounces give
   the addresses; each is classified from the text about it.
4. **Own heuristics** (``ParseOptions.heuristics``): DSN fields pasted into text, recipient
   lines of common plain-text formats, delay warnings.

Whatever finds the recipients, the hard/soft decision for each one is
:func:`mailrelayd.feedback.classify.classify_status`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message
from email.parser import HeaderParser
from email.policy import compat32

from mailrelayd.feedback.addresses import find_addresses, is_plausible_recipient, normalise_address
from mailrelayd.feedback.arf import COMPLAINT_TYPES, parse_feedback_report
from mailrelayd.feedback.classify import HARD, SOFT, classify_failure, classify_status
from mailrelayd.feedback.dsn import looks_like_delivery_status, normalise_status, parse_delivery_status
from mailrelayd.feedback.fields import block_text
from mailrelayd.feedback.flufl_adapter import run_flufl
from mailrelayd.feedback.mime import (
    Leaf,
    content_type,
    header_str,
    leaves,
    parse_bytes,
    part_text,
    prepare_raw,
    walk,
)
from mailrelayd.feedback.textbounce import (
    excluded_addresses,
    find_recipients,
    from_mail_system,
    is_auto_reply,
    is_warning,
    looks_like_bounce,
    returned_recipient,
    snippet_for,
    split_notification,
)

HARD_BOUNCE = HARD
SOFT_BOUNCE = SOFT
COMPLAINT = "complaint"
NOT_FEEDBACK = "not_feedback"
UNPARSABLE = "unparsable"
# Order of severity for the report's overall kind.
_SEVERITY = {COMPLAINT: 3, HARD_BOUNCE: 2, SOFT_BOUNCE: 1}
SUPPRESSING_KINDS = frozenset({HARD_BOUNCE, COMPLAINT})

# flufl.bounce reads the whole tree; it only gets this much of the message (see flufl_adapter).
FLUFL_MAX_BYTES = 32 * 1024
_MAX_RECIPIENTS = 100
_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
_HEADER_TYPES = ("text/rfc822-headers", "text/rfc822-header", "message/rfc822-headers", "text/rfc822")
_MESSAGE_TYPES = ("message/rfc822", "message/global", "message/partial")
_GENERIC_REASONS = frozenset({"onhold", ""})
_HEADER_START = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,60}[ \t]*:")


@dataclass(frozen=True)
class ParseOptions:
    """Which parts of the chain run. All on in production; the bench switches them off one by one."""

    standard: bool = True
    flufl: bool = True
    heuristics: bool = True


DEFAULT_OPTIONS = ParseOptions()


@dataclass(frozen=True)
class FeedbackRecipient:
    """One address a report is about.

    ``address`` is normalised (surrounding ``<>`` removed, domain lowercased, no trailing dot;
    the local part as reported). ``kind`` is ``hard_bounce``, ``soft_bounce`` or ``complaint``;
    only hard bounces and complaints lead to suppression. ``reason`` uses sisimai's names
    (``userunknown``, ``mailboxfull``, ``feedback``, ``expired``...).
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

    ``kind`` is the worst recipient kind (complaint > hard_bounce > soft_bounce), or, with no
    recipient, ``complaint`` (a complaint whose complainer is redacted), ``not_feedback``
    (auto-replies, read receipts, delivered DSNs, auth-failure reports, ordinary mail) or
    ``unparsable`` (nothing that looks like a message). ``original_*`` describe the returned
    or reported message when the report carries it: ``original_from`` is its header From (for
    per-sending-domain metrics), ``original_return_path`` its envelope sender (may be our VERP
    address), ``original_envelope_id`` the DSN ``Original-Envelope-Id`` (RFC 3461 ENVID).
    ``parser`` names the part of the chain that decided (``dsn``, ``arf``, ``jmrp``,
    ``flufl:<detector>``, ``heuristic:<name>``, ``autoreply``...).
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

    @property
    def suppressions(self) -> tuple[FeedbackRecipient, ...]:
        """Recipients that should be suppressed (hard bounces and complaints)."""
        return tuple(r for r in self.recipients if r.kind in SUPPRESSING_KINDS)


@dataclass
class _Context:
    msg: Message
    leaves: list[Leaf]
    original: Message | None
    original_from: str = ""
    original_message_id: str = ""
    original_return_path: str = ""
    notification: tuple[str, str] | None = field(default=None)

    def text(self) -> str:
        """The reporting system's own text (computed once)."""
        if self.notification is None:
            self.notification = split_notification(self.leaves)
        return self.notification[0]

    def returned_text(self) -> str:
        """Text after the returned-message marker (a returned message quoted inline)."""
        self.text()
        return self.notification[1] if self.notification else ""


def parse_feedback(raw: bytes, *, options: ParseOptions = DEFAULT_OPTIONS) -> FeedbackReport:
    """Classify one raw inbound message (bytes as received over SMTP, CRLF or LF).

    Never raises: broken or hostile input yields ``unparsable`` or ``not_feedback``. Work is
    bounded: at most 256 KiB of input is parsed, nesting and part counts are capped (see
    :mod:`mailrelayd.feedback.mime`).
    """
    try:
        return _parse(raw, options)
    except Exception as exc:  # the last line of defence: a report must never crash the daemon
        return FeedbackReport(UNPARSABLE, detail=f"parser error: {type(exc).__name__}")


def _parse(raw: bytes, options: ParseOptions) -> FeedbackReport:
    if not isinstance(raw, bytes | bytearray) or not raw.strip():
        return FeedbackReport(UNPARSABLE, detail="empty input")
    data = prepare_raw(bytes(raw))
    msg = parse_bytes(data)
    if not msg.keys():
        return FeedbackReport(UNPARSABLE, detail="no header section")
    ctx = _context(msg)

    if options.standard:
        report = _standard(ctx)
        if report is not None:
            return report

    text = ctx.text()
    # RFC 3834 auto-replies are answered by people's mailboxes, bounces by mail systems (which
    # also set Auto-Submitted: auto-replied, so the header alone does not tell them apart).
    if is_auto_reply(msg) and not from_mail_system(msg):
        return _report(ctx, NOT_FEEDBACK, detail="auto-reply", parser="autoreply")
    if not looks_like_bounce(msg, text):
        return _nothing_found(ctx, "not a bounce or complaint")

    warning = is_warning(msg, text)
    excluded = excluded_addresses(msg, ctx.original)
    if options.heuristics and looks_like_delivery_status(text):
        report = _from_dsn_text(ctx, text, parser="heuristic:dsn-in-text")
        if report is not None:
            return report
    if options.flufl:
        report = _from_flufl(ctx, data, text, excluded, warning)
        if report is not None:
            return report
    if options.heuristics:
        addresses = find_recipients(text, excluded)
        if addresses:
            return _from_addresses(ctx, addresses, (), text, warning, parser="heuristic:text")
        # The bounce names nobody at all (old Sendmail: "Deferred: Connection timed out"): the
        # returned message's single To is the recipient it is about. Not when the text names
        # an address we excluded (it may be the real one, equal to a sender address).
        to = ""
        if not find_recipients(text, set()):
            to = returned_recipient(ctx.returned_text(), excluded)
            if not to and ctx.original is not None:
                to = returned_recipient("To: " + header_str(ctx.original, "to"), excluded)
        if to:
            return _from_addresses(ctx, [to], (), text, warning, parser="heuristic:returned-to")
    return _nothing_found(ctx, "bounce-like message without a recipient")


# --- context --------------------------------------------------------------------------


def _context(msg: Message) -> _Context:
    parts = leaves(msg)
    original = _find_original(msg)
    ctx = _Context(msg, parts, original)
    if original is not None:
        ctx.original_from = _first_address(header_str(original, "from"))
        ctx.original_message_id = header_str(original, "message-id").strip()
        ctx.original_return_path = _first_address(header_str(original, "return-path"))
    return ctx


def _find_original(msg: Message) -> Message | None:
    """The returned/reported message (or its headers) attached to a report."""
    for depth, part in walk(msg):
        if depth == 0:
            continue
        ctype = content_type(part)
        if ctype in _MESSAGE_TYPES:
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        elif ctype in _HEADER_TYPES:
            try:
                return HeaderParser(policy=compat32).parsestr(part_text(part))
            except Exception:
                continue
    return None


def _inline_original(ctx: _Context) -> None:
    """Fill ``ctx.original_*`` from a returned message quoted as text after the notification."""
    lines = ctx.returned_text()[:16384].split("\n")
    start = 0 if lines and _HEADER_START.match(lines[0]) else 1  # skip the marker line
    while start < len(lines) and not lines[start].strip():
        start += 1
    if start >= len(lines) or not _HEADER_START.match(lines[start]):
        return
    try:
        headers = HeaderParser(policy=compat32).parsestr("\n".join(lines[start:]), headersonly=True)
    except Exception:
        return
    ctx.original_from = ctx.original_from or _first_address(header_str(headers, "from"))
    ctx.original_message_id = ctx.original_message_id or header_str(headers, "message-id").strip()
    ctx.original_return_path = ctx.original_return_path or _first_address(header_str(headers, "return-path"))


def _first_address(value: str) -> str:
    found = find_addresses(value)
    return normalise_address(found[0]) if found else ""


def _report(
    ctx: _Context, kind: str, *, recipients: tuple[FeedbackRecipient, ...] = (), **kw: str
) -> FeedbackReport:
    if recipients:
        kind = max((r.kind for r in recipients), key=lambda k: _SEVERITY.get(k, 0))
    if ctx.original is None and kind in _SEVERITY:
        _inline_original(ctx)
    return FeedbackReport(
        kind=kind,
        recipients=recipients,
        original_message_id=kw.pop("original_message_id", ctx.original_message_id),
        original_from=kw.pop("original_from", ctx.original_from),
        original_return_path=kw.pop("original_return_path", ctx.original_return_path),
        **kw,
    )


def _dedupe(recipients: list[FeedbackRecipient]) -> tuple[FeedbackRecipient, ...]:
    """One entry per address (case-insensitive), keeping the most severe."""
    best: dict[str, FeedbackRecipient] = {}
    for recipient in recipients:
        key = recipient.address.lower()
        current = best.get(key)
        if current is None or _SEVERITY.get(recipient.kind, 0) > _SEVERITY.get(current.kind, 0):
            best[key] = recipient
    return tuple(best.values())[:_MAX_RECIPIENTS]


# --- standard reports -------------------------------------------------------------------


def _standard(ctx: _Context) -> FeedbackReport | None:
    report_type = ""
    for depth, part in walk(ctx.msg):
        if depth <= 2 and content_type(part) == "multipart/report":
            report_type = part.get_param("report-type") or ""
            report_type = report_type.lower() if isinstance(report_type, str) else ""
            break
    arf_part = _first_leaf(ctx, ("message/feedback-report",))
    if arf_part is not None:
        return _from_arf(ctx, arf_part)
    jmrp = _from_jmrp(ctx)
    if jmrp is not None:
        return jmrp
    if report_type == "disposition-notification" or _first_leaf(ctx, ("message/disposition-notification",)):
        return _report(ctx, NOT_FEEDBACK, detail="read receipt (MDN, RFC 8098)", parser="mdn")
    dsn_part = _first_leaf(ctx, _DSN_TYPES)
    if dsn_part is not None:
        return _from_dsn_text(ctx, block_text(dsn_part), parser="dsn")
    return None


def _nothing_found(ctx: _Context, detail: str) -> FeedbackReport:
    """No recipient anywhere. A message carrying an RFC 3464 report part is a broken report, not
    "not feedback": call it unparsable so it is counted and kept for inspection."""
    if _first_leaf(ctx, _DSN_TYPES) is not None:
        return _report(ctx, UNPARSABLE, detail="delivery-status report without a usable recipient", parser="none")
    return _report(ctx, NOT_FEEDBACK, detail=detail, parser="none")


def _first_leaf(ctx: _Context, types: tuple[str, ...]) -> Message | None:
    for depth, part in walk(ctx.msg):
        if content_type(part) in types and depth <= 6:
            return part
    return None


def _from_arf(ctx: _Context, part: Message) -> FeedbackReport:
    """RFC 5965 section 3: the complainer is Original-Rcpt-To (or the opt-out draft's Removal-Recipient)."""
    fields = parse_feedback_report(block_text(part))
    ftype = fields.feedback_type
    return_path = fields.original_mail_from or ctx.original_return_path
    if ftype and ftype not in COMPLAINT_TYPES:
        return _report(
            ctx,
            NOT_FEEDBACK,
            feedback_type=ftype,
            detail=f"feedback type {ftype} is not a complaint",
            parser="arf",
            original_return_path=return_path,
        )
    addresses = list(fields.original_rcpt_to or fields.removal_recipients)
    if not addresses and ctx.original is not None:
        # No Original-Rcpt-To: the reported message's single To address, if it has one.
        found = [a for a in find_addresses(header_str(ctx.original, "to")) if is_plausible_recipient(a)]
        if len(found) == 1:
            addresses = found
    recipients = _dedupe(
        [
            FeedbackRecipient(normalise_address(a), COMPLAINT, reason="feedback", diagnostic=ftype or "abuse")
            for a in addresses
            if normalise_address(a)
        ]
    )
    detail = "" if recipients else "complaint without a recoverable recipient"
    return _report(
        ctx,
        COMPLAINT,
        recipients=recipients,
        feedback_type=ftype or "abuse",
        detail=detail,
        parser="arf",
        original_return_path=return_path,
    )


def _from_jmrp(ctx: _Context) -> FeedbackReport | None:
    """Microsoft JMRP: a reported message carrying ``X-HmXmrOriginalRecipient`` (wrapped or not)."""
    for depth, part in walk(ctx.msg):
        if depth > 4:
            continue
        value = header_str(part, "x-hmxmroriginalrecipient")
        if not value:
            continue
        found = [a for a in find_addresses(value) if normalise_address(a)]
        recipients = tuple(
            FeedbackRecipient(normalise_address(a), COMPLAINT, reason="feedback", diagnostic="jmrp")
            for a in found[:1]
        )
        original_from = (
            _first_address(header_str(part, "from")) if depth > 0 or ctx.original is None else None
        )
        extra = {"original_from": original_from} if original_from else {}
        return _report(
            ctx,
            COMPLAINT,
            recipients=recipients,
            feedback_type="abuse",
            parser="jmrp",
            detail="" if recipients else "complaint without a recoverable recipient",
            **extra,
        )
    return None


def _from_dsn_text(ctx: _Context, text: str, *, parser: str) -> FeedbackReport | None:
    fields = parse_delivery_status(text)
    if not fields.recipients:
        return None
    recipients: list[FeedbackRecipient] = []
    addresses = [r.address for r in fields.recipients]
    for r in fields.recipients:
        if r.action in ("delivered", "relayed", "expanded"):
            continue  # RFC 3464 section 2.3.3: not failures
        address = normalise_address(r.address)
        if not address:
            continue
        status = r.status or normalise_status(r.diagnostic)
        if r.action == "delayed":
            kind, reason = SOFT, classify_status(status or "4.0.0", r.diagnostic)[1]
            if kind == SOFT and reason in _GENERIC_REASONS:
                reason = "expired"
        else:
            result = classify_failure(status, r.diagnostic)
            if not result.decisive:
                # No telling Diagnostic-Code: the human-readable part may name the cause.
                snippet = snippet_for(ctx.text(), r.address, addresses)
                if snippet:
                    from_text = classify_failure(status, snippet)
                    if from_text.decisive or result.reason in _GENERIC_REASONS:
                        result = from_text
            kind, reason = result.kind, result.reason
        recipients.append(FeedbackRecipient(address, kind, status, reason, r.diagnostic, r.remote_mta))
    if not recipients:
        return _report(
            ctx,
            NOT_FEEDBACK,
            detail="delivery report without failures (delivered/relayed)",
            parser=parser,
            original_envelope_id=fields.envelope_id,
        )
    return _report(
        ctx,
        SOFT_BOUNCE,
        recipients=_dedupe(recipients),
        parser=parser,
        original_envelope_id=fields.envelope_id,
    )


# --- non-standard bounces -------------------------------------------------------------------


def _from_flufl(
    ctx: _Context, data: bytes, text: str, excluded: set[str], warning: bool
) -> FeedbackReport | None:
    msg = ctx.msg if len(data) <= FLUFL_MAX_BYTES else parse_bytes(data[:FLUFL_MAX_BYTES])
    result = run_flufl(msg)
    if result is None:
        return None
    usable = [
        a
        for a in (*result.permanent, *result.temporary)
        if is_plausible_recipient(a) and normalise_address(a).lower() not in excluded
    ]
    if not usable:
        return None
    return _from_addresses(ctx, usable, result.temporary, text, warning, parser=f"flufl:{result.detector}")


def _from_addresses(
    ctx: _Context, addresses: list[str], temporary: tuple[str, ...], text: str, warning: bool, *, parser: str
) -> FeedbackReport:
    recipients: list[FeedbackRecipient] = []
    for address in addresses:
        normalised = normalise_address(address)
        if not normalised:
            continue
        snippet = snippet_for(text, address, addresses)
        status = normalise_status(snippet)
        if warning or address in temporary:
            kind, reason = SOFT, classify_status(status or "4.0.0", snippet or text)[1]
            if reason in _GENERIC_REASONS:
                reason = "expired"
        elif len(addresses) == 1:
            # The lines about the recipient first; if they do not name a cause, the whole
            # notification (it is about this one recipient).
            result = classify_failure(status, snippet)
            if not result.decisive:
                result = classify_failure(status or normalise_status(text), text)
            kind, reason = result.kind, result.reason
        else:
            # Several recipients: only the lines about this one count (another one's "user
            # unknown" must not suppress it).
            kind, reason = classify_status(status, snippet)
        recipients.append(
            FeedbackRecipient(normalised, kind, status, reason, " ".join(snippet.split())[:500])
        )
    return _report(ctx, SOFT_BOUNCE, recipients=_dedupe(recipients), parser=parser)
