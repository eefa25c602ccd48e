"""Lines longer than RFC 5322 §2.1.1 allows (998 octets before the CRLF), in mail that local programs
hand to ``sendmail``: cron output, log dumps, a generated one-line HTML body.

SMTP refuses such a line (``500 5.5.2``), so Postfix's sendmail never does: its cleanup breaks lines
longer than ``line_length_limit`` (2048) by inserting a line break. We keep the RFC's limit, so that
what we queue is what every receiver accepts, and change the message as little as its structure allows:

- a header field line is folded at its last space or tab before the limit (RFC 5322 §2.2.3: unfolding
  gives the same value back); a run of more than the limit without a blank is broken with a CRLF and a
  space (one space added to the value: there is no lossless way);
- a single-part body (no Content-Type, or a non-multipart one) in 7bit, 8bit or binary is encoded
  quoted-printable (RFC 2045 §6.7), which is lossless: the receiver's decoded text is the original;
- any other body (multipart: a part cannot be re-encoded without rewriting the MIME tree; or a body
  already in base64 or quoted-printable) has its long lines broken at the limit, as Postfix does.

Pure functions on CRLF messages (what :func:`mailrelayd.sendmail.read_message` returns).
"""

from __future__ import annotations

import binascii
import re

MAX_LINE = 998
"""RFC 5322 §2.1.1: at most 998 characters on a line, not counting the CRLF."""

_HEADER_NAME = re.compile(rb"^([!-9;-~]+):")
_FIELD = re.compile(rb"^([!-9;-~]+):[ \t]*(.*?)[ \t]*$", re.DOTALL)


def fit_long_lines(data: bytes, limit: int = MAX_LINE) -> bytes:
    """``data`` (CRLF lines) with no line longer than ``limit`` octets, changed as described above;
    unchanged (the same object) when no line is too long."""
    if all(len(line) <= limit for line in data.split(b"\r\n")):
        return data
    end = data.find(b"\r\n\r\n")
    if end < 0 or not _HEADER_NAME.match(data):
        return _break_lines(data, limit)  # no header section we can tell apart: all body
    head, body = data[: end + 2], data[end + 4:]
    lines = head[:-2].split(b"\r\n")
    head = b"".join(out + b"\r\n" for line in lines for out in _fold(line, limit))
    if all(len(line) <= limit for line in body.split(b"\r\n")):
        return head + b"\r\n" + body
    if _can_encode_qp(lines):
        return _without_cte(head) + b"Content-Transfer-Encoding: quoted-printable\r\n" + \
            (b"" if _has_field(lines, b"mime-version") else b"MIME-Version: 1.0\r\n") + b"\r\n" + _qp(body)
    return head + b"\r\n" + _break_lines(body, limit)


def _fold(line: bytes, limit: int) -> list[bytes]:
    """One header line as lines of at most ``limit`` octets, folded before a blank where there is one."""
    out = []
    while len(line) > limit:
        cut = max(line.rfind(b" ", 1, limit), line.rfind(b"\t", 1, limit))
        # Not at a blank that only follows the field name (that would leave "Name:" alone on a line).
        if cut <= line.find(b":") + 1:
            out.append(line[:limit])
            line = b" " + line[limit:]
        else:
            out.append(line[:cut])
            line = line[cut:]  # the blank starts the continuation line
    out.append(line)
    return out


def _fields(lines: list[bytes]) -> dict[bytes, bytes]:
    """Lower-cased field name -> value (unfolded) of the first field of each name."""
    out: dict[bytes, bytes] = {}
    name = b""
    for line in lines:
        if line[:1] in (b" ", b"\t") and name:
            out[name] += b" " + line.strip()
            continue
        m = _FIELD.match(line)
        name = m.group(1).lower() if m else b""
        if m and name not in out:
            out[name] = m.group(2)
    return out


def _has_field(lines: list[bytes], name: bytes) -> bool:
    return name in _fields(lines)


def _can_encode_qp(lines: list[bytes]) -> bool:
    fields = _fields(lines)
    ctype = fields.get(b"content-type", b"text/plain").strip().lower()
    cte = fields.get(b"content-transfer-encoding", b"7bit").strip().lower()
    return not ctype.startswith((b"multipart/", b"message/")) and cte in (b"7bit", b"8bit", b"binary", b"")


def _without_cte(head: bytes) -> bytes:
    """The header section without its Content-Transfer-Encoding field(s) (and their continuation lines)."""
    out: list[bytes] = []
    skipping = False
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.lower().startswith(b"content-transfer-encoding:")
        if not skipping:
            out.append(line + b"\r\n")
    return b"".join(out)


def _qp(body: bytes) -> bytes:
    """The body quoted-printable, line by line, so that its line breaks stay hard line breaks."""
    lines = body.split(b"\r\n")
    # b2a_qp ends soft-broken lines with "=\n": the line itself holds no "\n", so every one is a soft break.
    return b"\r\n".join(binascii.b2a_qp(line).replace(b"\n", b"\r\n") for line in lines)


def _break_lines(text: bytes, limit: int) -> bytes:
    return b"\r\n".join(b"\r\n".join(line[i:i + limit] for i in range(0, len(line), limit)) if len(line) > limit
                        else line for line in text.split(b"\r\n"))
