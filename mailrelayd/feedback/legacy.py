"""Bounce formats of older and proprietary mail systems: one small recogniser per family.

Before RFC 3464, and in systems that never adopted it, every mail system wrote its own
notification. :func:`find_legacy` runs one recogniser per family of such formats, in a fixed
order (the most specific first); the first family that finds an address decides:

===================  ===============================================  =================================
family               recognised by                                    addresses
===================  ===============================================  =================================
``exim``             an ``X-Failed-Recipients`` header                that header
``sina``             ``From: mailer-daemon@sina.com``, multipart      ``<addr>`` lines of the first part
``yahoo``            ``From: mailer-daemon@yahoo...``, "Message from  ``<addr>:`` lines after it, up to
                     yahoo.<tld>" or "Sorry, we were unable to        the copy of the message
                     deliver your message to the following address"
``smtp32``           ``X-Mailer: <SMTP32 v...>`` (IMail)              "user mailbox ...: addr",
                                                                      "undeliverable to addr", ...
``postfix``          old Postfix (and Keftamail, SMTP_Gateway): a     ``<addr>:`` lines after "The
                     multipart whose text/plain part is described     Postfix program" / "failure
                     as ``notification``                              reason:"
``qmail``            QSBMF (qmail-send bounce message format) intros  ``<addr>:`` starting a line of
                                                                      the recipient paragraphs
``groupwise``        multipart/mixed with ``X-Mailer`` Novell         ``<addr>``, or a line (or its
                     GroupWise, NTMail or Internet Mail Service       first word) that is an address;
                                                                      indented ones if no other
``microsoft``        multipart/mixed whose first part says            lines that are an address
                     "transcript of session follows" (SMTPSVC)
``caiwireless``      multipart/mixed, "the following recipients did   ``<addr>`` on the next line
                     not receive this message:"
``exchange``         "did not reach the following recipient"          "SMTP=addr; on", "addr on",
                                                                      up to "MSEXCH:"
``aol``              text/plain from ``@aol.com``, "mail to the       the screen names (or addresses)
                     following recipients could not be delivered"     listed below
``phrases``          a table of (start phrase, end phrase, address    per entry
                     shape) of a few dozen MTAs and providers
``warning-phrases``  the same for delay warnings                      per entry (temporary)
===================  ===============================================  =================================

The formats (the phrases, headers and line shapes) were catalogued by flufl.bounce, the bounce
detection library of GNU Mailman (Apache License 2.0); this module is our own code. Left out on
purpose: RFC 3464 DSNs (:func:`mailrelayd.feedback.recognizers.recognize_dsn` reads them), and
three formats whose recognition is a hazard: LLNL's (the first ``, user@host,`` on any line of
any message: a false-suppression risk on ordinary mail), Yale's (guesses addresses in two
domains) and Netscape Messaging Server 3.x's (its catalogued pattern backtracks cubically on a
line of ``<``; the text heuristics read the same ``<address>`` lines).

Hostile input: the message handed in is already bounded (:func:`mailrelayd.feedback.mime.prepare_raw`
caps the input and splits raw lines at :data:`~mailrelayd.feedback.mime.MAX_LINE`); the
transfer-decoded payloads some families read (base64 and quoted-printable decode to lines of any
length) are capped at :data:`~mailrelayd.feedback.mime.MAX_INPUT_BYTES` and split the same way.
Every regular expression runs in linear time: each is anchored at a line start, or starts at a
literal or at the first character of a run (a lookbehind); a quantifier that could rescan the
line from many starts is bounded (``[^<>]{1,320}``: on a run of ``<`` each one scans up to the
next only); no two adjacent unbounded quantifiers can take the same characters; some searches are
plain string searches. No header is given to :func:`email.utils.parseaddr` (it recurses once per
``(``: a ``RecursionError``).

Not every family can tell a permanent failure from a temporary one, and none says why an
address failed: the caller classifies each address from the text about it. Only ASCII addresses
are taken (these formats predate SMTPUTF8; compat32 turns undecodable bytes into U+FFFD).
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from email.message import Message

from mailrelayd.feedback.addresses import find_addresses
from mailrelayd.feedback.mime import (
    MAX_INPUT_BYTES,
    children,
    content_type,
    header_all,
    header_str,
    leaf_payload,
    part_bytes,
    split_long_lines,
)

_log = logging.getLogger(__name__)

MAX_ADDRESSES = 100
# Parts visited per message: every block of a message/delivery-status part is a part to compat32
# (prepare_raw stops at 1,000 blank lines, so a bounded message has fewer).
MAX_WALK = 2048
# What compat32 raises on hostile input where a family reads a payload (a charset that makes
# get_payload() raise ValueError, TypeError or LookupError; see mailrelayd.feedback.mime.children).
_MESSAGE_ERRORS = (ValueError, TypeError, LookupError)

# An address in angle brackets: the content may not hold another "<", so that on a run of "<"
# each one is scanned up to the next only. 320 = 64 (local part) + 1 + 255 (domain).
_ANGLED = r"<([^<>]{1,320})>"
# The same at the start of a line, where "<<addr>" was read as "addr" too (only the first "<" of
# a run starts a match).
_ANGLED_START = r"(?<!<)<+([^<>]{1,320})>"
# local@domain as these formats write it (RFC 5321 section 4.5.3.1 sizes).
_LOCAL = r"[^\s@]{1,64}"
_DOMAIN = r"[^\s@]{1,255}"
# Starts of an unanchored address: at the start of a run of non-space, non-@ characters, so that
# the run is scanned once (a leftmost match always starts there).
_RUN_START = r"(?<![^\s@])"
_WS = " \t\n\r\x0b\x0c"  # what bytes.strip() strips: decoded payloads are compared as bytes were


@dataclass(frozen=True)
class LegacyResult:
    """The addresses found by the first family that found any."""

    family: str
    permanent: tuple[str, ...]
    temporary: tuple[str, ...]
    # The family read an address field (Exim's X-Failed-Recipients), not lines of text: see
    # mailrelayd.feedback.addresses.is_plausible_recipient(from_field=...).
    from_field: bool = False


class _Mail:
    """One message and its body lines, computed once for all the families."""

    def __init__(self, msg: Message) -> None:
        self.msg = msg
        self._lines: list[str] | None = None
        self._text: str | None = None
        self._starts: list[int] | None = None

    def lines(self) -> list[str]:
        """Lines (each ending in ``\\n``) of every leaf's payload, as transferred (not decoded),
        in document order, the returned message included."""
        if self._lines is None:
            self._lines = [line for part in _walk(self.msg) for line in _payload_lines(part)]
        return self._lines

    def find_line(self, pattern: re.Pattern[str]) -> int:
        """Index of the first line ``pattern`` (compiled with re.MULTILINE) matches, or -1."""
        if self._text is None or self._starts is None:
            starts, pos = [], 0
            for line in self.lines():
                starts.append(pos)
                pos += len(line)
            self._text, self._starts = "".join(self.lines()), starts
        match = pattern.search(self._text)
        return -1 if match is None else bisect_right(self._starts, match.start()) - 1


def _walk(msg: Message) -> Iterator[Message]:
    """Every part in document order, iteratively (no recursion), at most :data:`MAX_WALK`."""
    stack = [msg]
    seen = 0
    while stack and seen < MAX_WALK:
        part = stack.pop()
        seen += 1
        yield part
        stack.extend(reversed(children(part)))


def _payload_lines(part: Message) -> list[str]:
    if part.is_multipart():
        return []
    chunks = leaf_payload(part).split("\n")
    lines = [chunk + "\n" for chunk in chunks[:-1]]
    if chunks[-1]:
        lines.append(chunks[-1] + "\n")
    return lines


def _decoded_lines(part: Message) -> list[str]:
    """A leaf's transfer-decoded payload, its long lines split, as lines without line ends. Bytes
    map one to one to characters (latin-1); patterns on them are ASCII-only, like bytes patterns."""
    data = split_long_lines(part_bytes(part, MAX_INPUT_BYTES))
    return data.decode("latin-1").replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _sender(msg: Message) -> str:
    """The From address, lowercased: the last ``<...>`` of the header, else its first address."""
    value = header_str(msg, "from").lower()
    angled = [m.group(1) for m in _HEADER_ANGLED.finditer(value)]
    if angled:
        return angled[-1].strip()
    found = find_addresses(value)
    return found[0] if found else value.strip()


_HEADER_ANGLED = re.compile(_ANGLED)


# --- the families ------------------------------------------------------------------------------
# Each takes the message and yields what it reads as failed addresses (cleaned up by the caller).


def _exim(mail: _Mail) -> Iterable[str]:
    """Exim: ``X-Failed-Recipients: addr, addr``."""
    for value in header_all(mail.msg, "x-failed-recipients"):
        yield from _address_list(value)


def _address_list(value: str) -> Iterator[str]:
    """The addresses of a header's address list: per comma-separated item what follows its last
    ``<`` (up to ``>``), else its first word (``a@example.com (comment)``)."""
    for item in value.split(","):
        if "<" in item:
            yield item.rpartition("<")[2].partition(">")[0]
        elif words := item.split():
            yield words[0]


_SINA_LINE = re.compile(_ANGLED_START)


def _sina(mail: _Mail) -> Iterable[str]:
    """sina.com: ``<addr>`` starting a line of the first part."""
    msg = mail.msg
    if header_str(msg, "from").lower() != "mailer-daemon@sina.com" or not msg.is_multipart():
        return
    parts = children(msg)
    if not parts:
        return
    for part in _walk(parts[0]):
        for line in _payload_lines(part):
            if m := _SINA_LINE.match(line):
                yield m.group(1)


_YAHOO_INTRO = (
    re.compile(r"message\s+from\s+yahoo\.\S", re.IGNORECASE),
    re.compile(r"sorry, we were unable to deliver your message to the following address(?:\(es\))?\.",
               re.IGNORECASE),
)
_YAHOO_LINE = re.compile(_ANGLED_START + ":")
_YAHOO_END = ("--- Original message follows", "--- Below this line is a copy of the message",
              "---------- Forwarded message ----------")


def _yahoo(mail: _Mail) -> Iterable[str]:
    """Yahoo!: ``<addr>:`` lines after its intro, up to the copy of the message."""
    if not _sender(mail.msg).startswith("mailer-daemon@yahoo"):
        return
    seen_intro = False
    for raw in mail.lines():
        line = raw.strip()
        if not seen_intro:
            seen_intro = any(p.match(line) for p in _YAHOO_INTRO)
        elif m := _YAHOO_LINE.match(line):
            yield m.group(1)
        elif line.startswith(_YAHOO_END):
            return


# "User mailbox exceeds allowed size: addr", "Delivery failed: addr", "Unknown user: addr",
# "Undeliverable to addr", "Delivery userid ...: addr". The label is found first, then the colon
# after it with a string search: a "[^:]*:" after each of many labels would rescan the line.
_SMTP32_LABEL = re.compile(r"user mailbox|delivery failed|unknown user|delivery userid", re.IGNORECASE)
_SMTP32_UNDELIVERABLE = re.compile(r"undeliverable +to", re.IGNORECASE)


def _smtp32(mail: _Mail) -> Iterable[str]:
    """SMTP32 / IMail (``X-Mailer: <SMTP32 v...>``): the word after a label, up to the original."""
    if not header_str(mail.msg, "x-mailer").startswith("<SMTP32 v"):
        return
    for line in mail.lines():
        if "original message follows" in line.lower():
            return
        if (end := _smtp32_label_end(line)) >= 0 and (words := line[end:].split(None, 1)):
            yield words[0]


def _smtp32_label_end(line: str) -> int:
    """Where the address after the line's first label starts (-1: no label). The first occurrence
    of a label decides: if no colon follows it, none follows a later one either."""
    candidates = []
    if (label := _SMTP32_LABEL.search(line)) and (colon := line.find(":", label.end())) >= 0:
        candidates.append((label.start(), colon + 1))
    if undeliverable := _SMTP32_UNDELIVERABLE.search(line):
        candidates.append((undeliverable.start(), undeliverable.end()))
    return min(candidates)[1] if candidates else -1


# "the\s*(bns)?\s*postfix" with the two adjacent "\s*" merged (they backtrack against each other);
# the leading blanks are taken from the first one of a run only.
_POSTFIX_INTRO = re.compile(r"(?<![ \t])[ \t]*the\s*(?:bns\s*)?(?:postfix|keftamail|smtp_gateway)",
                            re.IGNORECASE | re.ASCII)
_POSTFIX_REASON = re.compile(r"failure reason:$", re.IGNORECASE)
_POSTFIX_LINE = re.compile(_ANGLED + ":")


def _postfix(mail: _Mail) -> Iterable[str]:
    """Old Postfix: the text/plain part described as "notification", ``<addr>:`` after its intro."""
    if content_type(mail.msg) not in ("multipart/mixed", "multipart/report"):
        return
    for part in _walk(mail.msg):
        if part.is_multipart() or content_type(part) != "text/plain" \
                or header_str(part, "content-description").lower() != "notification":
            continue
        seen_intro = False
        for raw in _decoded_lines(part):
            line = raw.rstrip(_WS)
            if not seen_intro:
                seen_intro = bool(_POSTFIX_INTRO.match(line) or _POSTFIX_REASON.match(line))
            elif line and (m := _POSTFIX_LINE.search(line)):
                yield m.group(1)
        return


# QSBMF (http://cr.yp.to/proto/qsbmf.txt) and the intros of qmail's imitators.
_QMAIL_INTROS = (
    "We're sorry. There's a problem",
    "Check your send e-mail address.",
    "Hi. The MTA program at",
    "Hi. This is the",
    "This is the mail delivery agent at",
    "Unfortunately, your mail was not delivered",
    "Your mail message to the following",
)
_QMAIL_LINE = re.compile(_ANGLED_START + ":")


def _qmail(mail: _Mail) -> Iterable[str]:
    """qmail: after the intro paragraph, ``<addr>:`` starting a line, up to the ``-`` break."""
    state = 0  # 0: looking for the intro, 1: in the intro paragraph, 2: in the recipient paragraphs
    for raw in mail.lines():
        line = raw.strip()
        if state == 0:
            if line.startswith(_QMAIL_INTROS):
                state = 1
        elif state == 1:
            if not line:
                state = 2
        elif line.startswith("-"):
            return
        elif m := _QMAIL_LINE.match(line):
            yield m.group(1)


# An address and nothing else (Mailman's VALID): no "@" or ">" in the local part, a plain domain.
_BARE = re.compile(r"[\x21-\x3d\x3f\x41-\x7e]{1,64}@[a-z0-9._]{1,255}", re.IGNORECASE | re.ASCII)
_GROUPWISE_LINE = re.compile(_ANGLED)


def _groupwise(mail: _Mail) -> Iterable[str]:
    """Novell GroupWise, NTMail, Internet Mail Service: in the first text/plain part, ``<addr>``,
    or a line that is an address (or starts with one).

    Lines indented by blanks (spaces or tabs alike) are read only when no line names an address
    otherwise: the GroupWise Internet Agent indents its list ("\\trecipient@example.net (user not
    found)"), while under a list at the line start an indented line is a comment on it.
    """
    msg = mail.msg
    if content_type(msg) != "multipart/mixed" \
            or header_str(msg, "x-mailer")[:3].lower() not in ("nov", "ntm", "int"):
        return
    text_plain = next((p for p in _walk(msg) if content_type(p) == "text/plain"), None)
    if text_plain is None:
        return
    found: list[str] = []
    indented: list[str] = []
    for raw in _decoded_lines(text_plain):
        line = raw.rstrip(_WS)
        if m := _GROUPWISE_LINE.search(line):
            found.append(m.group(1))
        elif "@" in line:
            stripped = line.lstrip(_WS)
            candidate = stripped.split(None, 1)[0]
            if _BARE.fullmatch(candidate):
                (indented if stripped != line else found).append(candidate)
    yield from found or indented


def _microsoft(mail: _Mail) -> Iterable[str]:
    """Microsoft SMTPSVC: lines that are an address, after "transcript of session follows" in the
    first part of a multipart/mixed."""
    msg = mail.msg
    if content_type(msg) != "multipart/mixed" or not (parts := children(msg)) or parts[0].is_multipart():
        return
    seen_intro = False
    for raw in _decoded_lines(parts[0]):
        if not seen_intro:
            seen_intro = "transcript of session follows" in raw.lower()
        elif _BARE.fullmatch(line := raw.strip(_WS)):
            yield line


_CAIWIRELESS_INTRO = re.compile(r"the following recipients did not receive this message:", re.IGNORECASE)
_CAIWIRELESS_LINE = re.compile(_ANGLED_START)


def _caiwireless(mail: _Mail) -> Iterable[str]:
    """caiwireless.net: the ``<addr>`` on the first non-empty line after its intro."""
    if content_type(mail.msg) != "multipart/mixed":
        return
    seen_intro = False
    for raw in mail.lines():
        line = raw.strip()
        if not seen_intro:
            seen_intro = bool(_CAIWIRELESS_INTRO.match(line))
        elif line:
            if m := _CAIWIRELESS_LINE.match(line):
                yield m.group(1)
            return


_EXCHANGE_SMTP = re.compile(r"SMTP=([^;]{1,320}); on ")
_EXCHANGE_ON = re.compile(_RUN_START + f"({_LOCAL}@{_DOMAIN}) on ")


def _exchange(mail: _Mail) -> Iterable[str]:
    """Microsoft Exchange: "SMTP=addr; on ..." or "addr on ..." after "did not reach the following
    recipient", up to "MSEXCH:"."""
    lines = mail.lines()
    start = next((i for i, line in enumerate(lines) if "did not reach the following recipient" in line), -1)
    if start < 0:
        return
    for line in lines[start + 1 :]:
        if "MSEXCH:" in line:
            return
        if m := _EXCHANGE_SMTP.search(line) or _EXCHANGE_ON.search(line):
            yield m.group(1)


def _aol(mail: _Mail) -> Iterable[str]:
    """AOL: the screen names (or addresses) listed after "mail to the following recipients could
    not be delivered", up to a line with a space."""
    msg = mail.msg
    if content_type(msg) != "text/plain" or not _sender(msg).endswith("@aol.com"):
        return
    listed = False
    for raw in _decoded_lines(msg):
        if "mail to the following recipients could not be delivered" in raw:
            listed = True
            continue
        name = raw.strip(_WS)
        if not listed or not name:
            continue
        if any(ch in name for ch in _WS):
            return
        yield name if "@" in name else name + "@aol.com"


# --- start phrase / end phrase / address shape tables -----------------------------------------


@dataclass(frozen=True)
class _Delimited:
    """Addresses from the line where ``start`` matches on, until a line where ``end`` matches."""

    start: re.Pattern[str]
    end: re.Pattern[str]
    address: re.Pattern[str]


def _d(start: str, end: str, address: str) -> _Delimited:
    # The start is searched for in the joined lines (re.MULTILINE: "^" and "$" at line ends); it
    # never spans lines. End and address are matched against each line (with its "\n").
    return _Delimited(re.compile(start, re.IGNORECASE | re.MULTILINE), re.compile(end, re.IGNORECASE),
                      re.compile(address, re.IGNORECASE))


_ADDR = f"{_LOCAL}@{_DOMAIN}"
# A run of non-space characters that is an address (the bounds may not cut a longer run short).
_RUN_ADDRESS = r"(?<!\S)(" + _ADDR + r")(?!\S)"
# The rest of the line after optional blanks: "[^\S\n]*" and "\S" cannot take the same character.
_REST = r"[^\S\n]*((?:\S[^\n]*)?)"

# Bounces. Where each shape was seen is noted as catalogued.
_BOUNCE_TABLE = (
    _d(r"here is your list of failed recipients", r"here is your returned mail", _ANGLED),  # sdm.de
    _d(r"the following addresses had", r"transcript of session follows",  # sz-sb.de, corridor.com, nfg.nl
       r"^ *(?:\(expanded from: )?<?(" + _LOCAL + r"@[^\s@>]{1,255}?)>?\)?\s*$"),
    _d(r"this message was created automatically by mail delivery software", r"original message follows",
       r"rcpt to:\s*" + _ANGLED),  # demon.co.uk
    _d(r"message from interscan e-mail viruswall nt", r"end of message", r"rcpt to:\s*" + _ANGLED),
    _d(r"failed addresses follow:", r"message text follows:", _RUN_ADDRESS),  # Smail
    _d(r"this is the machine generated message from mail service.",
       r"--- below the next line is a copy of the message.", _ANGLED),  # newmail.ru
    _d(r"the following addresses did not receive a copy of your message:", r"--- session transcript ---",
       ">" + _REST),  # MDaemon
    _d(r"intended recipient:", r"--------returned mail follows--------", r"intended recipient:" + _REST),  # usa.net
    _d(r"undeliverable address:", r"original message attached", r"undeliverable address:" + _REST),  # hotpop
    _d(r"this message was created automatically by mail delivery", r"^---- start of returned message ----",
       r"addressed to '([^']{1,320})'"),  # demon.co.uk
    _d(r"user's mailbox is full:", r"unable to deliver mail.", r"user's mailbox is full:\s*" + _ANGLED),  # Prodigy
    _d(r"the email below could not be delivered to the following user:", r"old message:", _ANGLED),  # SMTPSVC
    _d(r"unable to deliver message to the following address\(es\)\.", r"--- original message follows\.",
       _ANGLED + ":"),  # Yahoo! for other domains
    _d(r"delivery to the following recipient failed", r"----- original message -----",
       r"^\s*(" + _ADDR + r")\s*$"),  # googlemail.com
    _d(r"a message that you sent could not be delivered", r"^---", _ANGLED),  # kundenserver.de
    _d(r"a message that you sent could not be delivered", r"^---",
       r"^(" + _LOCAL + r"@[^\s@:]{1,255}):"),  # kundenserver.de
    # thehartford.com / songbird: nothing marks the end, so the first line of 3+ characters that
    # does not start with a D and has no "@" does.
    _d(r"del(?:i|e)very to the following recipients (?:failed|was aborted)", r"^[^D][^@]{2,}$",
       r"^[\s*]*([^\s@*][^\s@]{0,63}@" + _DOMAIN + r")\s*$"),
    _d(r"^your message[^\S\n]*$", r"^because:", r"^\s*(" + _ADDR + r")\s*$"),  # thehartford.com
    _d(r"^unable to deliver message to", r"\*\s+end of message\s+\*", _ANGLED),  # kviv.be (InterScan NT)
    _d(r"^sorry, unable to deliver your message to", r"^a copy of the original message",
       _RUN_START + r"(" + _ADDR + r")\s"),  # earthlink.net
    _d(r"^a message could not be delivered to:", r"^subject:", r"^\s*(" + _ADDR + r")\s*$"),  # ademe.fr
    _d(r"^invalid final delivery userid:", r"^original message follows.",
       _RUN_START + r"(" + _ADDR + r")\s*$"),  # andrew.ac.jp
    _d(r"------ failed recipients ------", r"-------- returned mail --------", _ANGLED),  # E500_SMTP_Mail_Service
    _d(r"a message that you sent could not be delivered", r"^---",
       _RUN_START + r"(" + _LOCAL + r"@[^\s@)]{1,255})(?![^\s@)])"),  # cynergycom.net
    _d(r"^--> error description:[^\S\n]*$", r"^error-end:",
       r"^error-for:\s+(" + _ADDR + r")(?![^\s@])"),  # LSMTP for Windows
    _d(r"your message could not be delivered", r"^-", _ANGLED + ":"),  # qmail, tri-language intro
    _d(r"your message could not be delivered to", r"^\s*$",
       _RUN_START + r"(" + _ADDR + r")(?![^\s@])"),  # socgen.com
    _d(r"your message has encountered delivery problems", r"your message reads",
       r"addressed to\s*(" + _LOCAL + r"@[^\s@)]{1,255})(?![^\s@)])"),  # dadoservice.it
    _d(r"did not reach the following recipient", r"^\s*$", r"\s(" + _ADDR + r")(?![^\s@])"),  # gomaps.com
    _d(r"this is the deliver program at", r"^-", r"^(" + _LOCAL + r"@[^\s@<>]{1,255})(?![^\s@<>])"),  # EYOU
    _d(r"this is the email server at", r"^-", r"\s(" + _ADDR + r")[\s,]"),  # qmail at ieo.it
    _d(r"- no such user here", r"there is no user", r"^(" + _ADDR + r")\s"),  # MDaemon.PRO
    _d(r"the following address failed:", r"included is a copy of the message header", _ANGLED),  # mxlogic.net
    _d(r"the following recipient\(s\) could not be reached", r"error type",
       r"^(" + _LOCAL + r"@[^\s@<>]{1,255})(?![^\s@<>])"),  # fastdnsservers.com
    _d(r"could not deliver message to the following recipient", r"-- the header",
       r"failed recipient: (" + _LOCAL + r"@[^\s@<>]{1,255})(?![^\s@<>])"),
    _d(r"message not delivered to the following addresses", r"error detail",
       _RUN_START + r"(" + _LOCAL + r"@[^\s@)]{1,255})(?![^\s@)])"),  # uci.edu
    _d(r"^your message", r"^reporting",  # Dovecot LDA over quota (a bogus MDN)
       r"your message to <?([^\s<@]{1,64}@[^\s@>]{1,255})>? was automatically rejected"),
    _d(r"a message that you sent was rejected", r"this is a copy of your message",
       r"\s(" + _ADDR + r")(?![^\s@])"),  # mail.ru
    _d(r"message could not be delivered to some recipients.", r"message headers follow",
       r"recipient: \[smtp:(" + _ADDR + r")\]"),  # MailEnable
    _d(r"wasn't able to deliver the following message", r"---below this line is a copy of the message.",
       r"to: (" + _ADDR + r")(?![^\s@])"),  # Yahoo!
    _d(r"this is a delivery failure notification message", r"the problem appears to be",
       r"-- (" + _ADDR + r")(?![^\s@])"),
    _d(r"delivery has failed", r"original message details:", r"\[(" + _ADDR + r")\]"),  # earthling.net
)

# Delay warnings: the addresses are temporary failures.
_WARNING_TABLE = (
    _d(r"the address to which the message has not yet been delivered is", r"no action is required on your part",
       _RUN_ADDRESS),  # pop3.pta.lia.net
    _d(r"your message to:", r"this is just a warning, you do not need to take any action", _RUN_ADDRESS),
    _d(r"your message with subject:", r"delivery attempts will continue to be made", _RUN_ADDRESS),  # Symantec
    _d(r"delivery to the following recipient has been delayed", r"message will be retried", _RUN_ADDRESS),  # Gmail
    _d(r"this is an advisory-only email", r"has been postponed", r'"([^"]{1,320})"'),  # Exchange
    _d(r"not yet been delivered", r"no action is required on your part",
       r"(?<!\S)<?(" + _LOCAL + r"@[^>\s@]{1,255})(?![^>\s])"),  # kundenserver.de
)

_QP_ESCAPE = re.compile(r"=([0-9A-Fa-f]{2})")


def _table(mail: _Mail, table: tuple[_Delimited, ...]) -> list[str]:
    """The addresses of the first entry that yields any usable one (entries in table order)."""
    lines = mail.lines()
    for entry in table:
        start = mail.find_line(entry.start)
        if start < 0:
            continue
        found: list[str] = []
        for line in lines[start:]:
            if m := entry.address.search(line):
                # Some come back with quoted-printable escapes (=20 for a space).
                address = _QP_ESCAPE.sub(lambda e: chr(int(e.group(1), 16)), m.group(1) or "").strip()
                if _BARE.fullmatch(address):
                    found.append(address)
            elif entry.end.search(line):
                break
            if len(found) >= MAX_ADDRESSES:
                break
        if found:
            return found
    return []


def _phrases(mail: _Mail) -> Iterable[str]:
    return _table(mail, _BOUNCE_TABLE)


def _warning_phrases(mail: _Mail) -> Iterable[str]:
    return _table(mail, _WARNING_TABLE)


# --- running them ------------------------------------------------------------------------------

# (name, recogniser, temporary): the most specific first.
FAMILIES: tuple[tuple[str, Callable[[_Mail], Iterable[str]], bool], ...] = (
    ("exim", _exim, False),
    ("sina", _sina, False),
    ("yahoo", _yahoo, False),
    ("smtp32", _smtp32, False),
    ("postfix", _postfix, False),
    ("qmail", _qmail, False),
    ("groupwise", _groupwise, False),
    ("microsoft", _microsoft, False),
    ("caiwireless", _caiwireless, False),
    ("exchange", _exchange, False),
    ("aol", _aol, False),
    ("phrases", _phrases, False),
    ("warning-phrases", _warning_phrases, True),
)


# Families that read an address field rather than lines of text.
_FIELD_FAMILIES = frozenset({"exim"})


def find_legacy(msg: Message) -> LegacyResult | None:
    """Run the families on ``msg`` (bounded by the caller); ``None`` when none found an address.

    A family that trips over the message (what compat32 raises on hostile charsets) is skipped,
    so the message still reaches the others.
    """
    mail = _Mail(msg)
    for name, recognise, temporary in FAMILIES:
        try:
            addresses = _clean(recognise(mail))
        except _MESSAGE_ERRORS:
            _log.debug("legacy format %s skipped: it failed on this message", name, exc_info=True)
            continue
        if addresses:
            return LegacyResult(name, () if temporary else addresses, addresses if temporary else (),
                                name in _FIELD_FAMILIES)
    return None


def _clean(found: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for raw in found:
        address = raw.strip().strip("<>").strip()
        if address and address.isascii() and address not in out:
            out.append(address)
            if len(out) >= MAX_ADDRESSES:
                break
    return tuple(out)


__all__ = ["FAMILIES", "LegacyResult", "find_legacy"]
