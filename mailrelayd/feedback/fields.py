"""Field-block parsing shared by RFC 3464 delivery-status and RFC 5965 feedback-report parts.

Both formats are blocks of ``Name: value`` lines (RFC 5322 header syntax, with folding),
separated by blank lines. Real reports break the rules: status groups without a blank line
between them, base64-encoded parts, stray text. :func:`parse_groups` is lenient about all of
those and never raises.
"""

from __future__ import annotations

import base64
import binascii
import re
from email.message import Message

from mailrelayd.feedback.mime import children, decode_header_value, leaf_payload, part_text

Field = tuple[str, str]
Group = list[Field]

_FIELD = re.compile(r"([A-Za-z][A-Za-z0-9-]{0,60})[ \t]*:[ \t]*(.*)")
# A field that starts a new per-recipient group even without a blank line before it
# (RFC 3464 section 2.3: each group begins with Original-Recipient or Final-Recipient).
_GROUP_STARTERS = frozenset({"final-recipient", "original-recipient"})
MAX_GROUPS = 200
MAX_FIELD_CHARS = 4000


def parse_groups(text: str, *, split_on_repeat: bool = True) -> list[Group]:
    """Split ``text`` into groups of ``(lowercased name, value)`` fields.

    A blank line ends a group. With ``split_on_repeat`` a field name that already occurs in
    the current group also starts a new one, which recovers status groups written without the
    blank line RFC 3464 requires (``Final-Recipient`` ... ``Status`` ``Final-Recipient`` ...).
    """
    groups: list[Group] = []
    current: Group = []
    names: set[str] = set()

    def close() -> None:
        nonlocal current, names
        if current:
            groups.append(current)
        current, names = [], set()

    for line in text.split("\n"):
        if len(groups) >= MAX_GROUPS:
            break
        if not line.strip():
            close()
            continue
        if line[0] in " \t":
            if current:
                name, value = current[-1]
                if len(value) < MAX_FIELD_CHARS:
                    current[-1] = (name, value + " " + line.strip())
            continue
        match = _FIELD.match(line)
        if match is None:
            continue
        name = match.group(1).lower()
        if split_on_repeat and name in names:
            close()
        elif (
            split_on_repeat
            and name in _GROUP_STARTERS
            and "final-recipient" in names
            and (names & {"action", "status"})
        ):
            # An Original-Recipient after a complete group opens the next one. Before Action/
            # Status it belongs to the current group (Final- and Original-Recipient come in
            # either order), and Action/Status may even precede Final-Recipient (Facebook).
            close()
        current.append((name, match.group(2).strip()))
        names.add(name)
    close()
    return groups


def block_text(part: Message) -> str:
    """Text of a ``message/delivery-status``-like part, however compat32 parsed it.

    compat32 parses ``message/delivery-status`` into a list of header blocks, but leaves a
    base64 or quoted-printable encoded one (seen in the wild) as an encoded string.
    """
    if part.is_multipart():
        blocks = []
        for block in children(part):
            lines = [f"{name}: {decode_header_value(value)}" for name, value in block.items()]
            # compat32 puts text that is not a header (a group written without the blank
            # line, after a broken line) into the block's payload.
            body = leaf_payload(block)
            if body.strip():
                lines.append(_body_text(block, body))
            blocks.append("\n".join(lines))
        text = "\n\n".join(blocks)
    else:
        text = part_text(part)
    if "final-recipient" not in text.lower():
        # Seen in the wild: the per-recipient groups base64-encoded *inside* the part body,
        # after a stray "Content-Transfer-Encoding: base64" among the per-message fields.
        decoded = _decode_base64_runs(text)
        if decoded:
            text = text + "\n\n" + decoded
    return text


def _body_text(block: Message, body: str) -> str:
    """The text after a block's fields. 8-bit bytes there are UTF-8 (RFC 6533 global parts);
    compat32's ``get_payload()`` would decode them as ASCII with replacement characters."""
    if body.isascii():
        return body
    try:
        raw = block.get_payload(decode=True)
    except Exception:
        raw = None
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else body


_BASE64_RUN = re.compile(r"(?:^[A-Za-z0-9+/]{16,76}={0,2}[ \t]*\n?){2,}", re.MULTILINE)


def _decode_base64_runs(text: str) -> str:
    out: list[str] = []
    for match in _BASE64_RUN.finditer(text[: MAX_FIELD_CHARS * 4]):
        try:
            data = base64.b64decode("".join(match.group(0).split()), validate=True)
        except (binascii.Error, ValueError):
            continue
        out.append(data.decode("utf-8", "replace"))
    return "\n\n".join(out)


def first(group: Group, name: str) -> str:
    """Value of the first field ``name`` in ``group``, or ``""``."""
    for field_name, value in group:
        if field_name == name:
            return value
    return ""


def all_values(groups: list[Group], name: str) -> list[str]:
    """Every value of field ``name`` across ``groups``."""
    return [value for group in groups for field_name, value in group if field_name == name]
