"""Turn one inbound message into a feedback classification: parse once, then recognise.

Entry point: :func:`parse_feedback`.

1. :func:`mailrelayd.feedback.tree.build_tree` parses the bounded raw bytes and walks the MIME
   tree once into one structure (leaves with types and lazily decoded text, the report parts,
   the original message's headers).
2. The flat, ordered list :data:`mailrelayd.feedback.recognizers.RECOGNIZERS` runs over it:
   ARF, JMRP, MDN, the gate for bounces a person forwarded, RFC 3464/6533 DSN, Amazon SES
   notifications, the auto-reply / not-a-bounce gate, DSN fields in text, the bounce formats of
   older and proprietary mail systems (:mod:`mailrelayd.feedback.legacy`), text heuristics.
   Each returns evidence (recipients with kinds) or nothing; the first evidence in that order
   decides, because the order is the evidence's weight (a machine-readable report outranks
   anything read from prose).

What is *done* with a report (VERP token first, then the trust rules) is decided by
:mod:`mailrelayd.feedback.trust`.
"""

from __future__ import annotations

from mailrelayd.feedback.recognizers import DEFAULT_OPTIONS, RECOGNIZERS, ParseOptions, Scan, nothing_found
from mailrelayd.feedback.report import (
    COMPLAINT,
    DELAYED,
    HARD_BOUNCE,
    NOT_FEEDBACK,
    SOFT_BOUNCE,
    SUPPRESSING_KINDS,
    UNPARSABLE,
    FeedbackRecipient,
    FeedbackReport,
)
from mailrelayd.feedback.tree import build_tree

__all__ = [
    "COMPLAINT",
    "DEFAULT_OPTIONS",
    "DELAYED",
    "HARD_BOUNCE",
    "NOT_FEEDBACK",
    "SOFT_BOUNCE",
    "SUPPRESSING_KINDS",
    "UNPARSABLE",
    "FeedbackRecipient",
    "FeedbackReport",
    "ParseOptions",
    "parse_feedback",
]


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
    tree = build_tree(bytes(raw))
    if not tree.msg.keys():
        return FeedbackReport(UNPARSABLE, detail="no header section")
    enabled = {"standard": options.standard, "gate": True, "legacy": options.legacy, "heuristics": options.heuristics}
    scan = Scan(tree, options)
    for _name, group, recognizer in RECOGNIZERS:
        if not enabled[group]:
            continue
        found = recognizer(scan)
        if found is not None:
            return found
    return nothing_found(tree, "bounce-like message without a recipient")
