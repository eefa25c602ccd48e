"""Free-text reasons an operator gives (``suppress add --reason``, ``queue hold --reason``, the
reason column of a suppression CSV import): stored, then printed in one-line-per-entry listings."""

from __future__ import annotations

import re

# C0 (tab included: the listings are tab-separated), DEL, C1, and the Unicode line and paragraph
# separators: any of them would split or garble the line an entry is printed on.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def reason_text(value: str) -> str:
    """``value`` without surrounding blanks. Raises ValueError when it holds a control character."""
    m = _CONTROL.search(value)
    if m is not None:
        raise ValueError(f"the reason must be one line of text, without control characters "
                         f"(found {m.group()!r} at position {m.start()})")
    return value.strip()
