"""One walk over an inbound message: everything the recognizers look at, computed once.

:func:`build_tree` parses the (bounded) raw bytes and walks the MIME tree exactly once, keeping

* the leaves in document order with their types, flagged when they belong to an attached
  original message (text written by the original sender, never mined for recipients);
* the first part of each report type (``message/delivery-status``, ``message/global-delivery-status``
  (RFC 6533), ``message/feedback-report`` (RFC 5965), ``message/disposition-notification``);
* the ``report-type`` of the outermost ``multipart/report``;
* the original message (or its headers: ``message/rfc822``, ``message/global`` (RFC 6532),
  ``text/rfc822-headers``, ``message/global-headers`` (RFC 6533)) and its From, Message-ID and
  Return-Path.

Decoded text (the notification, each report part) is computed on first use and cached, so no
recognizer decodes or walks anything twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import Message
from email.parser import HeaderParser
from email.policy import compat32

from mailrelayd.feedback.addresses import find_addresses, normalise_address
from mailrelayd.feedback.fields import block_text
from mailrelayd.feedback.mime import Leaf, content_type, header_str, parse_bytes, part_text, prepare_raw, walk
from mailrelayd.feedback.textbounce import split_notification

DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
ARF_TYPE = "message/feedback-report"
MDN_TYPES = ("message/disposition-notification", "message/global-disposition-notification")
REPORT_TYPES = (*DSN_TYPES, ARF_TYPE, *MDN_TYPES)
# Parts that hold the original message's header section as text.
HEADER_TYPES = ("text/rfc822-headers", "text/rfc822-header", "message/rfc822-headers", "text/rfc822")
# Parts the parser turns into a nested Message: an attached original (or its headers).
MESSAGE_TYPES = ("message/rfc822", "message/global", "message/partial", "message/global-headers")
# Report parts are looked for this deep at most (a report forwarded inside a report is still found).
MAX_REPORT_DEPTH = 6


@dataclass
class MessageTree:
    """The result of the one walk (see the module docstring)."""

    data: bytes
    msg: Message
    leaves: list[Leaf]
    report_type: str = ""
    report_parts: dict[str, Message] = field(default_factory=dict)
    # Report types whose first part lies inside an attached message (a report forwarded as an attachment).
    nested_reports: set[str] = field(default_factory=set)
    # Every part (depth, part) down to depth 4, whose headers may matter (JMRP's X-HmXmrOriginalRecipient).
    nodes: list[tuple[int, Message]] = field(default_factory=list)
    original: Message | None = None
    original_from: str = ""
    original_message_id: str = ""
    original_return_path: str = ""
    _notification: tuple[str, str] | None = None
    _blocks: dict[str, str] = field(default_factory=dict)

    def report_part(self, *types: str) -> Message | None:
        """The first part of one of ``types`` (in the order given)."""
        for ctype in types:
            part = self.report_parts.get(ctype)
            if part is not None:
                return part
        return None

    def report_text(self, *types: str) -> str:
        """Decoded field text of the first report part of ``types`` (``""`` if none)."""
        for ctype in types:
            part = self.report_parts.get(ctype)
            if part is None:
                continue
            if ctype not in self._blocks:
                self._blocks[ctype] = block_text(part)
            return self._blocks[ctype]
        return ""

    def text(self) -> str:
        """The reporting system's own text (up to a returned-message marker)."""
        if self._notification is None:
            self._notification = split_notification(self.leaves)
        return self._notification[0]

    def returned_text(self) -> str:
        """Text after the returned-message marker (a returned message quoted inline)."""
        self.text()
        return self._notification[1] if self._notification else ""


def build_tree(raw: bytes) -> MessageTree:
    """Parse ``raw`` (bounded, see :func:`mailrelayd.feedback.mime.prepare_raw`) and walk it once."""
    data = prepare_raw(bytes(raw))
    msg = parse_bytes(data)
    out: list[Leaf] = []
    tree = MessageTree(data, msg, out)
    original_depth: int | None = None
    for depth, part in walk(msg):
        if original_depth is not None and depth <= original_depth:
            original_depth = None
        ctype = content_type(part)
        if ctype == "multipart/report" and depth <= 2 and not tree.report_type:
            value = part.get_param("report-type") or ""
            tree.report_type = value.lower() if isinstance(value, str) else ""
        if ctype in REPORT_TYPES and depth <= MAX_REPORT_DEPTH and ctype not in tree.report_parts:
            tree.report_parts[ctype] = part
            if original_depth is not None:
                tree.nested_reports.add(ctype)
        if depth <= 4:
            tree.nodes.append((depth, part))
        if depth > 0 and tree.original is None:
            tree.original = _original_of(part, ctype)
        if ctype in MESSAGE_TYPES or (
            depth > 0 and ctype.startswith("message/") and part.is_multipart() and ctype not in REPORT_TYPES
        ):
            if original_depth is None:
                original_depth = depth
            continue
        if part.is_multipart():
            continue
        if ctype.startswith("multipart/"):
            # Declared multipart but no parts found (missing or mismatched boundary): compat32
            # keeps the whole body as one string. Read it as text.
            ctype = "text/plain"
        out.append(Leaf(depth, ctype, part, original_depth is not None))
    if tree.original is not None:
        tree.original_from = first_address(header_str(tree.original, "from"))
        tree.original_message_id = header_str(tree.original, "message-id").strip()
        tree.original_return_path = first_address(header_str(tree.original, "return-path"))
    return tree


def _original_of(part: Message, ctype: str) -> Message | None:
    if ctype in MESSAGE_TYPES:
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            return payload[0]
    elif ctype in HEADER_TYPES:
        try:
            return HeaderParser(policy=compat32).parsestr(part_text(part))
        except Exception:
            return None
    return None


def first_address(value: str) -> str:
    """The first address in a header value, normalised (``""`` if none)."""
    found = find_addresses(value)
    return normalise_address(found[0]) if found else ""
