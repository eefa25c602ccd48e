"""Heuristics for what the standards do not cover: plain-text bounces and auto-replies.

Everything here works on the *notification text*: the human-readable text the reporting
system wrote, up to where the returned message starts. Text from the returned message is
never mined for recipients (it was written by the original sender).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterable
from email.message import Message
from email.parser import HeaderParser
from email.policy import compat32

from mailrelayd.feedback.addresses import (
    ADDRESS_RE,
    UTF8_ADDRESS,
    find_addresses,
    is_plausible_recipient,
    normalise_address,
)
from mailrelayd.feedback.dsn import looks_like_delivery_status
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
    # The system mailbox every Exchange 2013+ organisation sends its NDRs from (same name everywhere).
    r"microsoftexchange329e71ec88ae4615bbc36ab6ce41109e@",
)
_BOUNCE_SUBJECT = _any(
    r"undeliver", r"delivery (status|failure|failed|notification|problem|report|error)", r"returned mail",
    r"failure notice", r"mail delivery", r"could not be delivered", r"non.?delivery", r"delivery has failed",
    r"mail system error", r"message delayed", r"delayed mail", r"warning: message", r"not delivered",
    r"returned to sender", r"rejected", r"mail failure", r"\bbounce\b", r"nondeliverable",
    r"error sending", r"there was an error", r"message (could not|couldn't|was not)", r"failed delivery",
    r"status notification",
    # Exchange / Microsoft 365 NDR subjects in other languages ("Undeliverable:" translated).
    r"unzustellbar", r"non remis", r"no se puede entregar", r"non recapitabile", r"onbestelbaar",
    r"n[ãa]o [ée] poss[íi]vel entregar",
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
    # Exchange's section for administrators quotes the remote server in English whatever the
    # language of the rest ("Remote Server returned '550 5.1.1 ...'").
    r"remote server returned", r"diagnostic information for administrators",
    # The same lead sentences and headings of localized Exchange / Microsoft 365 NDRs.
    r"zustellung an folgende empf[äa]nger", r"nicht (an .{1,100} )?(zugestellt|[üu]bermittelt) werden",
    r"diagnoseinformationen f[üu]r administratoren",
    r"la remise s'est sold[ée]e par un [ée]chec", r"n'a pas pu [êe]tre remis",
    r"informations de diagnostic pour les administrateurs",
    r"no se pudo entregar", r"no se ha podido entregar",
    r"informaci[óo]n de diagn[óo]stico para administradores",
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
    # Out-of-office subjects of mail clients in other languages (Exchange/Outlook, Gmail, Zimbra).
    r"automatische antwort", r"abwesend", r"au(ss|ß)er haus", r"absente? du bureau",
    r"fuera de (la )?oficina", r"risposta automatica", r"fuori (ufficio|sede)", r"automatisch antwoord",
    r"afwezig", r"resposta autom[áa]tica", r"fora do escrit[óo]rio",
)

# A challenge-response system (Boxbe, TMDA, BoxTrapper, Spamarrest...) holding a message until its
# sender proves to be a person: the recipient exists and may still get the message. Only the explicit
# wording of such a request: the sender is not (pre-)approved yet, approval or confirmation of the
# sender is requested, a challenge was sent.
_CHALLENGE = _any(
    r"\bsender (address )?(is )?not (yet )?pre-?approved", r"\bnot (yet )?pre-?approved sender",
    r"\b(approval|confirmation) of (the |your )?sender('s)?( address)? (is )?(required|requested|needed|pending)",
    r"\bsender (approval|confirmation) (is )?(required|requested|needed|pending)",
    r"\bchallenge[- /]response\b", r"\bchallenge (e-?mail|message|request) (has been |was )?sent\b",
)

_ADDR = ADDRESS_RE.pattern
# Lines that name a failed recipient in common plain-text formats. These patterns are positional
# (the address is the subject of its line or sentence); the keyword pattern is looser and never
# accepts a mail-system mailbox. The first group: a line that lists a recipient.
_LISTED_RECIPIENT_LINES = (
    # address alone on its line, maybe in <> or quotes and with a trailing colon (Gmail, Exim, Sendmail)
    re.compile(r"^[ \t*>-]{0,20}[<\"]?(" + _ADDR + r")[>\"]?[ \t]*:?[ \t]*$", re.MULTILINE),
    # "<user@example.com>: reason" (qmail, Postfix) and "user@example.com: reason" (OpenSMTPD)
    re.compile(r"^[ \t]{0,20}<?(" + _ADDR + r")>?[ \t]*:[ \t]+\S", re.MULTILINE),
    # "<user@example.com> reason", Sendmail's "550 <user@example.com>... User unknown"
    re.compile(r"^[ \t]{0,20}(?:[245]\d\d[ -])?<(" + _ADDR + r")>(?:[ \t]|\.\.\.)", re.MULTILINE),
    # Exchange's "'user@example.com' on 3/9/2025 10:00 AM" (the leading quote is stripped later)
    re.compile(r"^[ \t]{0,20}(" + _ADDR + r")'?[ \t]+on[ \t]+\d", re.MULTILINE),
    # RFC 6531 recipients in angle brackets: "<josé@exämple.net>: host ... said: 550 5.1.1 ..."
    re.compile(r"^[ \t]{0,20}<(" + UTF8_ADDRESS + r")>[ \t]*:", re.MULTILINE),
    # Momentum/Ecelerity's ">>> user@example.com (Undelivered): 550 ..." (a state in parentheses)
    re.compile(r"^[ \t]{0,20}(?:>>>[ \t]{0,5})?<?(" + _ADDR + r")>?[ \t]{1,5}\([A-Za-z][A-Za-z ]{0,40}\)[ \t]*:",
               re.MULTILINE),
)
_RECIPIENT_LINES = (
    *_LISTED_RECIPIENT_LINES,
    # "reason: address" at the end of its line (Ipswitch IMail / SMTP32's "User mailbox exceeds
    # allowed size: a@example.org", "Unknown user: ..."), only after words of failure.
    re.compile(r"^[ \t]{0,20}[A-Za-z][^\n:@<>]{0,80}?\b(?:unknown|exceeds?|full|invalid|undeliverable|failed|"
               r"not found|does not exist|disabled|rejected|refused)\b[^\n:@<>]{0,40}:[ \t]*<?(" + _ADDR +
               r")>?[ \t]*\.?[ \t]*$", re.MULTILINE | re.IGNORECASE),
    # A lead sentence naming the one recipient it failed for: DragonFly Mail Agent's "There was an
    # error delivering your mail to <a@example.org>.", "An error occurred while delivering this
    # message to a@example.org", "Problem delivering mail to <a@example.org>".
    re.compile(r"\b(?:error|failure|problem)(?:[ \t]{1,5}occurred)?(?:[ \t]{1,5}while)?[ \t]{1,5}delivering"
               r"(?:[ \t]{1,5}(?:your|the|this))?[ \t]{1,5}(?:mail|message|e-?mail)[ \t]{1,5}to[ \t]{1,5}<?("
               + _ADDR + r")", re.IGNORECASE),
)
_RECIPIENT_KEYWORD = re.compile(
    r"(?:rcpt to|recipients?(?: address(?:es)?)?|original-recipient|final-recipient|failed recipient|"
    r"intended recipient|delivery to|deliver(?:y)? to|delivered to|undeliverable address|addressed to|"
    r"message to|sent to|could not be delivered to|unable to deliver to|unknown user|user|address|"
    r"destinataire|to)"
    r"[ \t]{0,5}(?:address)?[ \t]{0,5}[:=]?[ \t]{0,5}(?:rfc822;)?[ \t]{0,5}[<\"'(\[]?(" + _ADDR + r")",
    re.IGNORECASE,
)
# Where a notification asks the reader to write to someone ("For further assistance, please send
# mail to help@example.org", "Contact: postmaster@..."), the address is a contact, not a recipient.
# Only imperative wording counts ("unable to contact x@..." is no request), within the address's
# sentence, at most one line break back.
_CONTACT_BEFORE = re.compile(
    r"(?:\b(?:please|kindly|you (?:can|may|might|should|could)(?: also)?)[ \t]+"
    r"(?:send|write|mail|e-?mail|forward|contact|reply|direct|report|notify|reach|ask)\b"
    r"|(?:^|[!?:]|\.[ \t])[ \t]*contact\b|\bcontact[ \t]*:)"
    r"(?:[^\n.!?;]|\.(?!\s)|\n(?![ \t]*\n)){0,80}\Z",
    re.IGNORECASE | re.MULTILINE,
)
_SENDMAIL_TRANSCRIPT = re.compile(r"^[ \t]*[245]\d\d[ -].{0,300}\.\.\.[ \t]*\S")
# An SMTP session transcript quoted by a bounce: the client's RCPT command for one recipient
# (Sendmail and Courier ">>> RCPT To:<a>", MDaemon "--> RCPT To:<a>" after a log timestamp), and the
# server's reply lines right after it ("<<< 550 5.1.1 ...", "<-- 550 5.1.1 ...").
# Every quantifier is bounded: searched on a run of blanks or dashes, each start scans a few
# characters only.
_RCPT_COMMAND = re.compile(r"(?:>>>|-->)[ \t]{0,10}rcpt to:[ \t]{0,10}<?([^\s<>]{1,320})", re.IGNORECASE)
_SERVER_REPLY = re.compile(r"(?:<<<|<--)[ \t]{0,10}([2-5])\d\d(?:[ -]|$)")
# A person forwarding mail: the forward prefixes mail clients put before the subject (Fwd/Fw;
# German WG, French TR, Spanish RV, Italian I, Portuguese ENC, Dutch Doorst, Swedish VB, Danish and
# Norwegian VS, Polish PD; matched at the start of the decoded, blank-trimmed subject), and the
# marker a forward starts with when nothing is written above it.
_FORWARD_SUBJECT = re.compile(r"(?:fwd?|wg|tr|rv|i|enc|doorst|vb|vs|pd)[ \t]{0,10}:", re.IGNORECASE)
_FORWARD_START = re.compile(r"\s{0,40}(?:-{2,80}[ \t]{0,10}forwarded message|begin forwarded message:)",
                            re.IGNORECASE)
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
    if marker is None or marker.start() == 0:
        return text[:MAX_NOTIFICATION], ""
    # A report quoted inline by another notification (a provider's wrapper that pastes the MTA's
    # report under its own text): the quoted report's header section is no returned message while
    # the report's own body (DSN fields, its recipient lines) follows it. It is left out, and the
    # quoted report's body read as notification text, up to the next marker.
    kept: list[str] = []
    pos = 0
    for _ in range(_MAX_QUOTED_REPORTS):
        body_start = _quoted_report_body(text, marker)
        if body_start < 0:
            break
        kept.append(text[pos : _mbox_from_start(text, marker.start())])
        pos = body_start
        marker = _RETURNED_MARKER.search(text, body_start)
        if marker is None:
            break
    if marker is None:
        return ("".join(kept) + text[pos:])[:MAX_NOTIFICATION], ""
    return ("".join(kept) + text[pos : marker.start()])[:MAX_NOTIFICATION], text[marker.start() :]


# Returned-message markers that are a header field: the first line of a message's header section.
_HEADER_MARKER = re.compile(r"[ \t>|*]*(?:received: ?from \S|return-path: ?<)", re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n[ \t]*\r?\n")
_MBOX_FROM = re.compile(r"From \S{1,320} [^\n]{0,200}\n\Z")
_MAX_QUOTED_REPORTS = 4
_MAX_QUOTED_HEADERS = 16 * 1024
_MAX_QUOTED_BODY = 16 * 1024


def _quoted_report_body(text: str, marker: re.Match[str]) -> int:
    """Where the body of a report quoted inline starts, when ``marker`` is the first header of one;
    -1 when ``marker`` starts a returned message (or anything else).

    A quoted report: a header section written by a mail system (a mail-system From, an
    ``X-Failed-Recipients`` field or a ``multipart/report`` type), then, before the next marker, a
    body that carries the report itself: DSN fields (``Final-Recipient:`` with ``Action:`` or
    ``Status:``), or a failure statement with a recipient listed on its own line. A returned
    message (our own mail) has neither.
    """
    if not _HEADER_MARKER.match(marker.group(0)):
        return -1
    end = _BLANK_LINE.search(text, marker.start(), marker.start() + _MAX_QUOTED_HEADERS)
    if end is None:
        return -1
    try:
        headers = HeaderParser(policy=compat32).parsestr(text[marker.start() : end.start()].lstrip(" \t>|*"),
                                                         headersonly=True)
    except Exception:
        return -1
    from_system = headers.get("x-failed-recipients") is not None \
        or bool(_BOUNCE_SENDER.search(header_str(headers, "from"))) \
        or header_str(headers, "content-type").lower().lstrip().startswith("multipart/report")
    if not from_system:
        return -1
    body_start = end.end()
    following = _RETURNED_MARKER.search(text, body_start, body_start + _MAX_QUOTED_BODY)
    body = text[body_start : following.start() if following else body_start + _MAX_QUOTED_BODY]
    if looks_like_delivery_status(body):
        return body_start
    if _BOUNCE_STATEMENT.search(body) and any(p.search(body) for p in _LISTED_RECIPIENT_LINES):
        return body_start
    return -1


def _mbox_from_start(text: str, start: int) -> int:
    """``start``, or the start of the line before it when that is an mbox ``From `` separator line
    (``From MAILER-DAEMON  Thu Apr 29 23:34:45 2015``), which belongs to the quoted message."""
    line_start = text.rfind("\n", 0, max(0, start - 1)) + 1
    if start > 0 and _MBOX_FROM.match(text, line_start, start):
        return line_start
    return start


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


def is_challenge_notice(text: str) -> bool:
    """``text`` (a DSN's Diagnostic-Code) is a challenge-response system's request that the sender
    confirm themselves, not a delivery failure ("X-Boxbe-Notice; Sender not pre-approved")."""
    return bool(_CHALLENGE.search(text[:2000]))


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
    subject = header_str(msg, "subject")
    auto = _AUTO_SUBJECT.search(subject)
    if auto is None:
        return False
    # "Undeliverable: Holiday offers" is a bounce quoting the returned message's subject.
    bounce = _BOUNCE_SUBJECT.search(subject)
    return bounce is None or auto.start() < bounce.start()


def forwarded_by_person(msg: Message, text: Callable[[], str]) -> bool:
    """A person forwarded this message (a bounce they got, typically): not sent by a mail system,
    and its subject has a forward prefix or its text (``text()``, asked for last) starts with a
    forwarded-message marker."""
    if from_mail_system(msg):
        return False
    return bool(_FORWARD_SUBJECT.match(header_str(msg, "subject")) or _FORWARD_START.match(text()))


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
    for pos, raw_address, positional in sorted(found):
        address = raw_address.lstrip("'`")  # "'user@example.org' on 3/9/2025" (Exchange)
        key = normalise_address(address).lower()
        if not key or key in excluded or key in keys or _is_contact(text, pos):
            continue
        local = key.rpartition("@")[0]
        usable = is_plausible_recipient(address) or (positional and local in ("postmaster", "root", "nobody"))
        if usable and not local.startswith("mailer-daemon"):
            out.append(address)
            keys.add(key)
    return out


def _is_contact(text: str, pos: int) -> bool:
    """The address at ``pos`` is one the reader is asked to write to (see :data:`_CONTACT_BEFORE`)."""
    return bool(_CONTACT_BEFORE.search(text, max(0, pos - 200), pos))


def named_on_recipient_line(text: str, address: str) -> bool:
    """``text`` names ``address`` the way a bounce lists a failed recipient: alone on its line,
    ``<address>: reason``, Sendmail's ``550 <address>... reason`` (the positional shapes of
    :func:`find_recipients`; a mention in a sentence does not count)."""
    key = normalise_address(address).lower()
    if not key:
        return False
    return any(normalise_address(m.group(1).lstrip("'`")).lower() == key
               for pattern in _LISTED_RECIPIENT_LINES for m in pattern.finditer(text))


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
    found = _snippets(text, address, others, max_lines=max_lines, limit=1)
    return found[0] if found else ""


def later_snippets(text: str, address: str, others: Iterable[str], *, max_lines: int = 12,
                   limit: int = 8) -> list[str]:
    """The lines about each further mention of ``address`` (after :func:`snippet_for`'s), in order.

    Many notifications name a recipient twice and give the reason only the second time: Exchange
    in its user section, then in the section for administrators with the remote server's reply;
    MDaemon and old Sendmail in their list of recipients, then in the session transcript.
    """
    return _snippets(text, address, others, max_lines=max_lines, limit=limit + 1)[1:]


def _snippets(text: str, address: str, others: Iterable[str], *, max_lines: int, limit: int) -> list[str]:
    lines = text.split("\n")
    lowered = [line.lower() for line in lines]
    needle = address.lower()
    other_needles = [o.lower() for o in others if o.lower() != needle]
    out: list[str] = []
    i = 0
    while i < len(lines) and len(out) < limit:
        if needle not in lowered[i]:
            i += 1
            continue
        snippet, i = _paragraph(lines, lowered, i, needle, other_needles, max_lines)
        out.append(snippet)
    return out


def _paragraph(lines: list[str], lowered: list[str], start: int, needle: str, other_needles: list[str],
               max_lines: int) -> tuple[str, int]:
    """The lines about the mention on line ``start``, and the index of the line after them."""
    if _SENDMAIL_TRANSCRIPT.match(lines[start]):
        return lines[start], start + 1  # "554 <user@example.com>... reason": one line per recipient
    out = [lines[start]]
    seen_content = False
    end = min(len(lines), start + 1 + max_lines)
    for i in range(start + 1, end):
        line = lowered[i]
        if any(o in line for o in other_needles):
            return "\n".join(out), i
        if needle not in line and _SENDMAIL_TRANSCRIPT.match(line):
            return "\n".join(out), i  # the next Sendmail transcript entry ("421 host (smtp)... Deferred")
        if not line.strip():
            if seen_content:
                return "\n".join(out), i
            continue
        seen_content = True
        out.append(lines[i])
    return "\n".join(out), end


def without_successful_replies(text: str) -> str:
    """``text`` without the server replies of a quoted session transcript that accepted a step
    (``<<< 250 2.1.5 Ok``, ``<-- 354 Go ahead``): they are no failure, and their codes must not be
    read as the status of one."""
    if "<<<" not in text and "<--" not in text:
        return text
    kept = []
    for line in text.split("\n"):
        reply = _SERVER_REPLY.search(line)
        if reply is None or reply.group(1) in ("4", "5"):
            kept.append(line)
    return "\n".join(kept)


def transcript_reply(text: str, address: str, *, max_lines: int = 8) -> str:
    """The remote server's reply to the ``RCPT TO`` for ``address`` in an SMTP session transcript
    quoted by the notification, when it is a failure (4xx/5xx); ``""`` otherwise.

    It is the server's own verdict on that one address, the most specific evidence a transcript
    holds; the rest of a transcript (``EHLO``, the ``250`` replies to ``MAIL FROM``) says nothing
    about the recipient.
    """
    if "rcpt to" not in text.lower():
        return ""
    lines = text.split("\n")
    needle = address.lower()
    for i, line in enumerate(lines):
        command = _RCPT_COMMAND.search(line)
        if command is None or command.group(1).lower() != needle:
            continue
        reply: list[str] = []
        last_class = ""
        for following in lines[i + 1 : i + 1 + max_lines]:
            answer = _SERVER_REPLY.search(following)
            if answer is None:
                break
            reply.append(following[answer.start() :])
            last_class = answer.group(1)
        if last_class in ("4", "5"):
            return "\n".join(reply)
    return ""
