"""Bounded, never-raising access to a raw message with the standard ``email`` package.

Everything here treats the input as hostile. The ``email`` parser itself is not safe on
arbitrary input: a few hundred nested multiparts end in ``RecursionError`` and hundreds of
thousands of parts take seconds. So the raw bytes are cut down *before* parsing
(:func:`prepare_raw`), and the parsed tree is only ever visited through :func:`walk`, which
has its own depth and part-count limits.

Policy: ``email.policy.compat32``. Measured on the feedback corpus and on hostile input it is
about three times faster than ``email.policy.default`` and never raises lazily on malformed
headers (the default policy parses header values on access, which can raise on broken
input).
"""

from __future__ import annotations

import codecs
import email
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.header import Header, decode_header, make_header
from email.message import Message
from email.policy import compat32

# Limits. Everything a feedback parser needs (the notification text, the delivery-status or
# feedback-report part, the headers of the returned message) sits in the first few KB of a
# report; the returned message body, which can be anything up to the size limit, is not needed.
MAX_INPUT_BYTES = 256 * 1024
# RFC 5322 section 2.1.1 caps a line at 998 characters; longer lines are only split, so that
# no regular expression ever runs over an unbounded line.
MAX_LINE = 998
# A report is a multipart/report with a nested message at most a couple of levels deep. The
# cap on boundary-like lines (``--...``) bounds the number of parts the parser will create.
MAX_DEPTH = 10
MAX_PARTS = 64
MAX_BOUNDARY_LINES = 100
MAX_CONTENT_TYPES = 64
# compat32 makes one message per blank-line-separated block of a message/delivery-status part,
# so blank lines bound the number of parts too. The largest real report seen has 140.
MAX_BLANK_LINES = 1000
# One header field with its folded continuation lines. compat32's parameter parsing (the
# boundary, the charset) is quadratic in a field's length, and every regular expression run
# over a header value is linear in it; real fields stay under 4 KB.
MAX_FIELD = 8 * 1024
# Decoded text taken from one part.
MAX_TEXT = 32 * 1024

_LONG_LINE = re.compile(rb"[^\n]{%d}" % MAX_LINE)
_BOUNDARY_LINE = re.compile(rb"^--", re.MULTILINE)
_CONTENT_TYPE_LINE = re.compile(rb"^content-type:", re.MULTILINE | re.IGNORECASE)
_BLANK_LINE = re.compile(rb"\n\n")
# A header-like line (a name as compat32's parser accepts it) with its continuation lines.
_FOLDED_FIELD = re.compile(rb"^[!-9;-~]{1,200}:[^\n]*(?:\n[ \t][^\n]*)*", re.MULTILINE)
_CHARSET_ALIASES = {
    "utf8": "utf-8",
    "unicode-1-1-utf-7": "utf-7",
    "x-unknown": "latin-1",
    "unknown-8bit": "latin-1",
    "iso-8859-8-i": "iso-8859-8",
    "ks_c_5601-1987": "cp949",
    "x-sjis": "shift_jis",
    "shift-jis": "shift_jis",
    "windows-874": "cp874",
    "ansi_x3.4-1968": "ascii",
}


def prepare_raw(raw: bytes) -> bytes:
    """Return a bounded, newline-normalised copy of ``raw`` that is safe to hand to the parser.

    * keeps at most :data:`MAX_INPUT_BYTES`;
    * turns CRLF and bare CR into LF (SMTP delivers CRLF; some stored samples use bare CR);
    * splits lines longer than :data:`MAX_LINE`;
    * cuts a header field longer than :data:`MAX_FIELD` (with its folded lines) to whole lines;
    * stops before the :data:`MAX_BOUNDARY_LINES`-th line starting with ``--``, the
      :data:`MAX_CONTENT_TYPES`-th ``Content-Type`` header and the :data:`MAX_BLANK_LINES`-th
      blank line, so that the parser never builds more than a few thousand parts nor nests
      deeper than about a hundred levels (it recurses per level).
    """
    data = raw[:MAX_INPUT_BYTES]
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    # Cheap pre-checks (C-speed split/count) before the regular expressions, which cost about
    # ten times more per byte: most reports have neither long lines nor many parts.
    data = split_long_lines(data)
    if len(data) > MAX_FIELD:
        data = _FOLDED_FIELD.sub(_cut_field, data)
    lowered = data.lower()
    for pattern, limit, needle in ((_BOUNDARY_LINE, MAX_BOUNDARY_LINES, b"\n--"),
                                   (_CONTENT_TYPE_LINE, MAX_CONTENT_TYPES, b"content-type:"),
                                   (_BLANK_LINE, MAX_BLANK_LINES, b"\n\n")):
        if lowered.count(needle) + 1 < limit:
            continue
        for count, match in enumerate(pattern.finditer(data), start=1):
            if count >= limit:
                data = data[: match.start()]
                lowered = data.lower()
                break
    return data


def split_long_lines(data: bytes) -> bytes:
    """``data`` with lines longer than :data:`MAX_LINE` split (a cheap check first)."""
    if len(data) > MAX_LINE and max(map(len, data.split(b"\n"))) >= MAX_LINE:
        data = _LONG_LINE.sub(lambda m: m.group(0) + b"\n", data)
    return data


def _cut_field(match: re.Match[bytes]) -> bytes:
    field = match.group(0)
    if len(field) <= MAX_FIELD:
        return field
    # Whole lines only: the first line is at most MAX_LINE long, so one always fits.
    return field[: field.rfind(b"\n", 0, MAX_FIELD)]


def parse_bytes(data: bytes) -> Message:
    """Parse already prepared bytes with the compat32 policy."""
    return email.message_from_bytes(data, policy=compat32)


def walk(
    msg: Message, *, max_depth: int = MAX_DEPTH, max_parts: int = MAX_PARTS
) -> Iterator[tuple[int, Message]]:
    """Yield ``(depth, part)`` in document order, iteratively, within the depth and part limits.

    Unlike :meth:`Message.walk` this never recurses, so a hostile nesting depth cannot raise
    ``RecursionError``. A ``message/rfc822`` part is yielded, then the message inside it.
    """
    stack: list[tuple[int, Message]] = [(0, msg)]
    seen = 0
    while stack and seen < max_parts:
        depth, part = stack.pop()
        seen += 1
        yield depth, part
        if depth >= max_depth:
            continue
        ctype = content_type(part)
        if ctype.startswith("message/") and ctype not in ("message/rfc822", "message/global"):
            # message/delivery-status & co. are parsed by compat32 into header blocks; they are
            # read as a whole (fields.block_text), not as parts.
            continue
        stack.extend((depth + 1, child) for child in reversed(children(part)))


def children(part: Message) -> list[Message]:
    """The parts of a multipart, or the message inside a ``message/rfc822`` part; ``[]`` for a leaf.

    A leaf is not asked for its payload: compat32's ``get_payload()`` decodes a leaf's 8-bit bytes
    with its declared charset, and where an unknown charset falls back to ASCII, a hostile one
    raises (``ValueError`` for ``charset="\\x00"``, ``TypeError`` for an RFC 2231 ``charset*=``).
    """
    if not part.is_multipart():
        return []
    return [p for p in part.get_payload() if isinstance(p, Message)]


def leaf_payload(part: Message) -> str:
    """``get_payload()`` of a leaf (``""`` for a multipart), never raising: a leaf whose declared
    charset makes compat32 raise (see :func:`children`) gives ``""``."""
    if part.is_multipart():
        return ""
    try:
        payload = part.get_payload()
    except (ValueError, TypeError, LookupError):  # what a hostile charset makes compat32 raise
        return ""
    return payload if isinstance(payload, str) else ""


def content_type(part: Message) -> str:
    """Lowercased ``type/subtype`` of a part, ``text/plain`` when absent or broken."""
    try:
        return part.get_content_type()
    except Exception:
        return "text/plain"


def header_str(msg: Message, name: str, default: str = "") -> str:
    """Decode a header (RFC 2047 encoded words, raw 8-bit bytes) into ``str``; never raises."""
    try:
        value = msg.get(name)
    except Exception:
        return default
    if value is None:
        return default
    return decode_header_value(value)


def header_all(msg: Message, name: str) -> list[str]:
    """All values of a header, decoded like :func:`header_str`."""
    try:
        values = msg.get_all(name) or []
    except Exception:
        return []
    return [decode_header_value(v) for v in values]


def decode_header_value(value: object) -> str:
    """Best-effort decoding of one header value as returned by compat32."""
    if isinstance(value, Header):
        # compat32 hands out a value with 8-bit bytes (a raw UTF-8 Diagnostic-Code) as a Header of
        # "unknown-8bit" chunks, whose str() has lost them; decode_header() gives the bytes back.
        try:
            chunks = decode_header(value)
        except Exception:
            chunks = []
        value = "".join(
            decode_bytes(b, None if cs in (None, "unknown-8bit") else cs) if isinstance(b, bytes) else b
            for b, cs in chunks) or value
    try:
        text = str(value)
    except Exception:
        return ""
    # compat32 keeps undecodable raw bytes as surrogate escapes; make them printable.
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if "=?" in text:
        try:
            text = str(make_header(decode_header(text)))
        except Exception:
            pass
    return " ".join(text.split())


def _codec_for(charset: str | None) -> str:
    name = (charset or "").strip().strip('"').lower()
    name = _CHARSET_ALIASES.get(name, name)
    if not name:
        return "utf-8"
    try:
        return codecs.lookup(name).name
    except (LookupError, ValueError):  # ValueError: a NUL or a lone surrogate in the name
        return "utf-8"


# Japanese mail is declared with one of these and often sent in another (or in UTF-8).
_JAPANESE_CODECS = ("iso2022_jp", "shift_jis", "cp932", "euc_jp")


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode ``data`` with ``charset``; never raises.

    Bytes the declared (or default) charset cannot decode are often in another one: raw UTF-8
    in a part declared ISO-2022-JP or US-ASCII, ISO-2022-JP in an undeclared (or US-ASCII) part,
    EUC-JP declared as ISO-2022-JP. The first of UTF-8, ISO-2022-JP (when its escape sequences are
    there) and, for a Japanese declaration, the other Japanese charsets that decodes the bytes
    cleanly is used; else the declared charset with replacement characters.
    """
    codec = _codec_for(charset)
    escaped = b"\x1b$" in data  # ISO-2022-JP's switch to JIS X 0208: 7-bit, so "valid" ASCII and UTF-8 too
    if escaped and codec in ("utf-8", "ascii"):
        try:
            return data.decode("iso2022_jp")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode(codec)
    except Exception:
        pass
    candidates = ["utf-8"]
    if escaped:
        candidates.append("iso2022_jp")
    if codec in _JAPANESE_CODECS:
        candidates.extend(c for c in _JAPANESE_CODECS if c != codec)
    for candidate in candidates:
        if candidate == codec:
            continue
        try:
            return data.decode(candidate)
        except (UnicodeDecodeError, LookupError):
            continue
    try:
        return data.decode(codec, "replace")
    except Exception:
        return data.decode("utf-8", "replace")


def part_bytes(part: Message, limit: int = MAX_TEXT) -> bytes:
    """Transfer-decoded payload of a leaf part (base64, quoted-printable), at most ``limit`` bytes."""
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        payload = None
    if isinstance(payload, bytes):
        return payload[:limit]
    raw = part.get_payload()
    if isinstance(raw, str):
        return raw[:limit].encode("utf-8", "surrogateescape")
    return b""


def part_text(part: Message, limit: int = MAX_TEXT) -> str:
    """Decoded text of a leaf part (at most ``limit`` bytes of it), LF line endings."""
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    text = decode_bytes(part_bytes(part, limit), charset)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def headers_text(msg: Message) -> str:
    """Render the header block of a (sub)message as ``Name: value`` lines."""
    lines = []
    for name, value in msg.items():
        lines.append(f"{name}: {decode_header_value(value)}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Leaf:
    """One non-multipart part of the report, with its position in the tree."""

    depth: int
    ctype: str
    part: Message
    # True once the walk has passed into a returned (attached) message: text found there was
    # written by the original sender, not by the reporting MTA, and must not be mined for
    # failed recipients.
    in_original: bool
