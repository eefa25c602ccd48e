"""Heuristics for what the standards do not cover: plain-text bounces and auto-replies.

Everything here works on the *notification text*: the human-readable text the reporting
system wrote, up to where the returned message starts. Text from the returned message is
never mined for recipients (it was written by the original sender).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from email.message import Message

from mailrelayd.feedback.addresses import (
    ADDRESS_RE,
    UTF8_ADDRESS,
    find_addresses,
    is_plausible_recipient,
    normalise_address,
)
from mailrelayd.feedback.mime import Leaf, header_all, header_str, part_text

MAX_NOTIFICATION = 24 * 1024

def _any(*alternatives: str, flags: int = re.IGNORECASE) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{alt})" for alt in alternatives), flags)


# Where a plain-text bounce starts quoting the returned message: "------ This is a copy of
# the message", "--- Below this line is a copy of the message", "----- Unsent message
# follows -----", the first header of the returned message...
_RETURNED_MARKER = re.compile(
    r"^[ \t>|*]*(?:"
    r"-{2,}[ =]*(?:this is a copy of|below this line|(?:the )?original message|unsent message|"
    r"returned message|forwarded message|(?:the )?header of the original|message headers? follows?|"
    r"headers of|start of returned|returned mail follows|original mail|a copy of the message|"
    r"message text follows|the following is a copy)"
    r"|(?:the )?original message follows|below is a copy of|"
    r"a copy of the original message (?:follows|is attached)|content-type: message/rfc822|"
    r"included is a copy of the message|message headers follow|received: ?from \S|return-path: ?<"
    r")",
    re.IGNORECASE | re.MULTILINE,
)
# A tag ends at the next "<" too: on a run of "<" the old "<[^>]{0,2000}>" scanned 2,000
# characters from each one (1.6 s for 256 KB).
_TAG = re.compile(r"<[^<>]{0,2000}>")
_SCRIPT_START = re.compile(r"<(?:script|style)\b", re.IGNORECASE)
_SCRIPT_END = re.compile(r"</(?:script|style)\s*>", re.IGNORECASE)

_BOUNCE_SENDER = _any(
    r"mailer[-_. ]?daemon", r"postmaster", r"post_master", r"mail delivery", r"mail ?administrator",
    r"delivery (subsystem|system|service)", r"\bmdaemon\b", r"mail\.delivery\.system",
)
_BOUNCE_SUBJECT = _any(
    r"undeliver", r"delivery (status|failure|failed|notification|problem|report|error)", r"returned mail",
    r"failure notice", r"mail delivery", r"could not be delivered", r"non.?delivery", r"delivery has failed",
    r"mail system error", r"message delayed", r"delayed mail", r"warning: message", r"not delivered",
    r"returned to sender", r"rejected", r"mail failure", r"\bbounce\b", r"nondeliverable",
    r"error sending", r"there was an error", r"message (could not|couldn't|was not)", r"failed delivery",
    r"status notification", r"unzustellbar", r"non remis",
)
# Statements that a delivery failed, and failure causes: two independent kinds of evidence.
_BOUNCE_STATEMENT = _any(
    r"could(n't| not) be delivered", r"was not delivered", r"not be delivered", r"not delivered to",
    r"permanent(ly)? (error|fatal|failure)", r"delivery (to the following|has failed|failed)",
    r"undeliverable",
    r"unable to deliver", r"following (address|recipient)", r"mail delivery (failed|software)",
    r"returned mail",
    r"delivery status notification", r"failed recipient", r"could(n't| not) deliver",
    r"(wasn't|were not) able to deliver", r"message you sent", r"non-?delivery", r"error delivering",
    r"delivery problem", r"transcript of session",
)
_BOUNCE_CAUSE = _any(
    r"user unknown", r"unknown user", r"no such (user|mailbox|domain|address)", r"mail ?box (is )?full",
    r"over ?quota", r"host unknown", r"does not exist", r"not found",
    r"invalid (recipient|user|address|mailbox)",
    r"\b(550|551|552|553|554)\b", r"\b5\.\d\.\d{1,3}\b", r"timed out", r"not a member",
)
_WARNING = _any(
    r"warning only", r"this is a warning", r"(has )?not yet been delivered",
    r"delivery (has been |is )?delayed",
    r"still being retried", r"will (continue to )?(retry|try)", r"will be retried",
    r"delivery attempts will continue", r"message delayed", r"delayed mail", r"warning: message",
    r"\(delay\)",
    r"no action is required", r"you do not need to re-?send", r"temporary (failure|problem) report",
    r"has been postponed", r"may be delayed",
)
_AUTO_SUBJECT = _any(
    r"out of (the )?office", r"auto(matic|mated)?[ -]?(reply|response|antwort|respon)", r"autoreply",
    r"autoresponder", r"vacation", r"away from (the|my) office", r"\baway\b", r"abwesenheit", r"absence",
    r"r[ée]ponse automatique", r"respuesta autom", r"on leave", r"holiday", r"i am out", r"i'm out",
    r"currently out",
)

_ADDR = ADDRESS_RE.pattern
# Lines that name a failed recipient in common plain-text formats. The first group of
# patterns is positional (the address is the subject of its line); the keyword pattern is
# looser and never accepts a mail-system mailbox.
_RECIPIENT_LINES = (
    # address alone on its line, maybe in <> and with a trailing colon (Gmail, Exim, Sendmail)
    re.compile(r"^[ \t*>-]{0,20}<?(" + _ADDR + r")>?[ \t]*:?[ \t]*$", re.MULTILINE),
    # "<user@example.com>: reason" (qmail, Postfix) and "user@example.com: reason" (OpenSMTPD)
    re.compile(r"^[ \t]{0,20}<?(" + _ADDR + r")>?[ \t]*:[ \t]+\S", re.MULTILINE),
    # "<user@example.com> reason", Sendmail's "550 <user@example.com>... User unknown"
    re.compile(r"^[ \t]{0,20}(?:[245]\d\d[ -])?<(" + _ADDR + r")>(?:[ \t]|\.\.\.)", re.MULTILINE),
    # Exchange's "'user@example.com' on 3/9/2025 10:00 AM" (the leading quote is stripped later)
    re.compile(r"^[ \t]{0,20}(" + _ADDR + r")'?[ \t]+on[ \t]+\d", re.MULTILINE),
    # RFC 6531 recipients in angle brackets: "<josé@exämple.net>: host ... said: 550 5.1.1 ..."
    re.compile(r"^[ \t]{0,20}<(" + UTF8_ADDRESS + r")>[ \t]*:", re.MULTILINE),
)
_RECIPIENT_KEYWORD = re.compile(
    r"(?:rcpt to|recipients?(?: address(?:es)?)?|original-recipient|final-recipient|failed recipient|"
    r"intended recipient|delivery to|deliver(?:y)? to|delivered to|undeliverable address|addressed to|"
    r"message to|sent to|could not be delivered to|unable to deliver to|unknown user|user|address|"
    r"destinataire|to)"
    r"[ \t]{0,5}(?:address)?[ \t]{0,5}[:=]?[ \t]{0,5}(?:rfc822;)?[ \t]{0,5}[<\"'(\[]?(" + _ADDR + r")",
    re.IGNORECASE,
)
_SENDMAIL_TRANSCRIPT = re.compile(r"^[ \t]*[245]\d\d[ -].{0,300}\.\.\.[ \t]*\S")
_TO_HEADER = re.compile(r"^to:[ \t]*(.{1,500})$", re.IGNORECASE | re.MULTILINE)


def split_notification(leaves: Iterable[Leaf]) -> tuple[str, str]:
    """(notification, rest): the reporting system's own text, and the returned message quoted after it.

    Text parts outside an attached original are joined (HTML only when there is no plain
    text) and cut where a returned-message marker starts.
    """
    plain: list[str] = []
    htmls: list[str] = []
    size = 0
    for leaf in leaves:
        if leaf.in_original or size >= MAX_NOTIFICATION:
            continue
        if leaf.ctype.startswith("text/") and leaf.ctype != "text/html" and "rfc822" not in leaf.ctype:
            text = part_text(leaf.part, MAX_NOTIFICATION)
            plain.append(text)
            size += len(text)
        elif leaf.ctype == "text/html":
            htmls.append(html_to_text(part_text(leaf.part, MAX_NOTIFICATION)))
    text = "\n".join(plain) if any(p.strip() for p in plain) else "\n".join(htmls)
    text = text[: 2 * MAX_NOTIFICATION]
    marker = _RETURNED_MARKER.search(text)
    if marker is not None and marker.start() > 0:
        return text[: marker.start()][:MAX_NOTIFICATION], text[marker.start() :]
    return text[:MAX_NOTIFICATION], ""


def notification_text(leaves: Iterable[Leaf]) -> str:
    """The reporting system's own text (see :func:`split_notification`)."""
    return split_notification(leaves)[0]


def html_to_text(text: str) -> str:
    """Crude HTML → text (tags dropped, entities decoded); enough to find addresses and phrases."""
    text = re.sub(r"<br\s*/?>|</p>|</div>|</tr>|</li>", "\n", text, flags=re.IGNORECASE)
    return html.unescape(_TAG.sub(" ", _drop_scripts(text)))


def _drop_scripts(text: str) -> str:
    """Remove ``<script>``/``<style>`` elements. A loop rather than one lazy regular expression,
    which rescans up to the closing tag from every opening one (quadratic on ``<script>`` runs)."""
    out: list[str] = []
    pos = 0
    while (start := _SCRIPT_START.search(text, pos)) is not None:
        end = _SCRIPT_END.search(text, start.end())
        if end is None:
            break  # unclosed: left to the tag pattern, like any other tag
        out.append(text[pos : start.start()])
        pos = end.end()
    out.append(text[pos:])
    return " ".join(out)


def looks_like_bounce(msg: Message, text: str) -> bool:
    """Cheap gate: does this message present itself as a delivery failure report at all?

    Evidence is scored: a mail-system sender or an ``X-Failed-Recipients`` header counts 2;
    a bounce-like subject, a failure statement in the text and a failure cause in the text
    count 1 each. Two points are needed, so ordinary mail that merely mentions "could not be
    delivered" is not mined for addresses.
    """
    points = 0
    if msg.get("x-failed-recipients") is not None or _BOUNCE_SENDER.search(header_str(msg, "from")):
        points += 2
    if _BOUNCE_SUBJECT.search(header_str(msg, "subject")):
        points += 1
    head = text[:8000]
    if _BOUNCE_STATEMENT.search(head):
        points += 1
    if _BOUNCE_CAUSE.search(head):
        points += 1
    return points >= 2


def from_mail_system(msg: Message) -> bool:
    """The report comes from a mail system (MAILER-DAEMON, postmaster, "Mail Delivery System")."""
    return msg.get("x-failed-recipients") is not None or bool(_BOUNCE_SENDER.search(header_str(msg, "from")))


def is_warning(msg: Message, text: str) -> bool:
    """A delay notice ("THIS IS A WARNING ONLY", "Delivery Status Notification (Delay)")."""
    return bool(_WARNING.search(header_str(msg, "subject")) or _WARNING.search(text[:6000]))


def is_auto_reply(msg: Message) -> bool:
    """RFC 3834 auto-replies and the vendor headers that predate it (out of office, vacation)."""
    auto_submitted = header_str(msg, "auto-submitted").lower()
    if auto_submitted.startswith("auto-replied"):
        return True
    for name in ("x-autoreply", "x-autorespond", "x-autoresponder", "x-auto-response-suppress-autoreply",
                 "x-vacation", "x-mailautoreply"):
        if header_str(msg, name):
            return True
    if header_str(msg, "precedence").lower() in ("auto_reply", "autoreply"):
        return True
    return bool(_AUTO_SUBJECT.search(header_str(msg, "subject")))


def excluded_addresses(msg: Message, original: Message | None) -> set[str]:
    """Addresses that are never the failed recipient: the report's own From/To and the original's From."""
    out: set[str] = set()
    names = ("from", "to", "reply-to", "sender", "return-path", "delivered-to", "errors-to", "cc")
    for source, fields in ((msg, names), (original, ("from", "sender", "return-path", "reply-to"))):
        if source is None:
            continue
        for name in fields:
            for value in header_all(source, name):
                out.update(normalise_address(a).lower() for a in find_addresses(value))
    out.discard("")
    return out


def find_recipients(text: str, excluded: set[str]) -> list[str]:
    """Failed recipients named in a plain-text bounce, in order of appearance."""
    found: list[tuple[int, str, bool]] = []
    for pattern in _RECIPIENT_LINES:
        found.extend((m.start(1), m.group(1), True) for m in pattern.finditer(text))
    found.extend((m.start(1), m.group(1), False) for m in _RECIPIENT_KEYWORD.finditer(text))
    out: list[str] = []
    keys: set[str] = set()
    for _pos, raw_address, positional in sorted(found):
        address = raw_address.lstrip("'`")  # "'user@example.org' on 3/9/2025" (Exchange)
        key = normalise_address(address).lower()
        if not key or key in excluded or key in keys:
            continue
        local = key.rpartition("@")[0]
        usable = is_plausible_recipient(address) or (positional and local in ("postmaster", "root", "nobody"))
        if usable and not local.startswith("mailer-daemon"):
            out.append(address)
            keys.add(key)
    return out


def returned_recipient(rest: str, excluded: set[str]) -> str:
    """The single ``To:`` address of a returned message quoted as text, or ``""``."""
    match = _TO_HEADER.search(rest[:8000])
    if match is None:
        return ""
    found = [a for a in find_addresses(match.group(1))
             if is_plausible_recipient(a) and normalise_address(a).lower() not in excluded]
    return found[0] if len(found) == 1 else ""


def snippet_for(text: str, address: str, others: Iterable[str], *, max_lines: int = 12) -> str:
    """The lines of ``text`` about ``address``: from its first mention to the next recipient or paragraph end.

    A Sendmail transcript line (``550 <user@example.com>... User unknown``) is taken alone.
    """
    lines = text.split("\n")
    lowered = [line.lower() for line in lines]
    needle = address.lower()
    other_needles = [o.lower() for o in others if o.lower() != needle]
    start = next((i for i, line in enumerate(lowered) if needle in line), -1)
    if start < 0:
        return ""
    out = [lines[start]]
    if _SENDMAIL_TRANSCRIPT.match(lines[start]):
        return lines[start]  # "554 <user@example.com>... reason": one line per recipient
    seen_content = False
    for i in range(start + 1, min(len(lines), start + 1 + max_lines)):
        line = lowered[i]
        if any(o in line for o in other_needles):
            break
        if needle not in line and _SENDMAIL_TRANSCRIPT.match(line):
            break  # the next Sendmail transcript entry ("421 host (smtp)... Deferred")
        if not line.strip():
            if seen_content:
                break
            continue
        seen_content = True
        out.append(lines[i])
    return "\n".join(out)
