"""Run flufl.bounce's detectors (Mailman's bounce recognisers) safely and within a time bound.

flufl.bounce's own ``all_failures()`` runs every detector in turn and re-raises the first
exception (e.g. ``AttributeError`` on a raw 8-bit ``From`` header). We drive the detector
classes ourselves so that one broken detector is skipped instead of losing the message, and
we leave out three detectors:

* ``LLNL`` reports the first ``, user@host,`` found on *any* line of *any* message, which is a
  false-suppression hazard on ordinary mail, and its pattern backtracks quadratically on long
  lines of commas;
* ``Yale`` only recognises yale.edu and guesses addresses in two domains;
* ``Netscape`` (Netscape Messaging Server 3.x) backtracks cubically on a line of ``<``
  (``.*<([^>]*)>``): one line of a thousand takes seconds, and a base64 part decodes to lines
  of any length. The text heuristics read the same ``<address>`` lines.

Several detectors (GroupWise, Postfix) search each line of a part's *decoded* text with
``<([^>]*)>``, which is quadratic in the line's length. The raw lines are bounded
(:func:`mailrelayd.feedback.mime.prepare_raw`), but base64 or quoted-printable decodes to lines
of any length: such parts are handed over re-encoded with their lines split the same way.

flufl.bounce cannot tell hard from soft failures (every non-delayed DSN recipient and every
heuristic match is "permanent"), so only the *addresses* are taken from it; the caller
classifies each one from the diagnostic text.
"""

from __future__ import annotations

import base64
import copy
import logging
import quopri
from contextlib import suppress
from dataclasses import dataclass
from email.message import Message
from typing import Any

from mailrelayd.feedback.mime import MAX_INPUT_BYTES, MAX_LINE, part_bytes, split_long_lines

_log = logging.getLogger(__name__)


def _load_detectors() -> tuple[tuple[str, Any], ...]:
    """The detector classes, in flufl.bounce's order (most specific first)."""
    try:
        from flufl.bounce._detectors import (
            aol,
            caiwireless,
            dsn,
            exchange,
            exim,
            groupwise,
            microsoft,
            postfix,
            qmail,
            simplematch,
            simplewarning,
            sina,
            smtp32,
            yahoo,
        )
    except ImportError:  # pragma: no cover - layout of a future flufl.bounce release
        return ()
    return (
        ("dsn", dsn.DSN),
        ("exim", exim.Exim),
        ("sina", sina.Sina),
        ("yahoo", yahoo.Yahoo),
        ("smtp32", smtp32.SMTP32),
        ("postfix", postfix.Postfix),
        ("qmail", qmail.Qmail),
        ("groupwise", groupwise.GroupWise),
        ("microsoft", microsoft.Microsoft),
        ("caiwireless", caiwireless.Caiwireless),
        ("exchange", exchange.Exchange),
        ("aol", aol.AOL),
        ("simplematch", simplematch.SimpleMatch),
        ("simplewarning", simplewarning.SimpleWarning),
    )


_DETECTORS = _load_detectors()


@dataclass(frozen=True)
class FluflResult:
    """Addresses found by the first flufl.bounce detector that found any."""

    detector: str
    temporary: tuple[str, ...]
    permanent: tuple[str, ...]


def _decode(addresses: frozenset[bytes] | set[bytes]) -> tuple[str, ...]:
    out: list[str] = []
    for raw in sorted(addresses):
        with suppress(UnicodeDecodeError, AttributeError):
            text = raw.decode("ascii").strip().strip("<>")
            if text and text not in out:
                out.append(text)
    return tuple(out)


def run_flufl(msg: Message) -> FluflResult | None:
    """Run the detectors on ``msg`` (already bounded by the caller); ``None`` when none matched."""
    msg = _with_short_lines(msg)
    if not _DETECTORS:
        return _run_public_api(msg)
    for name, detector_class in _DETECTORS:
        try:
            temporary, permanent = detector_class().process(msg)
        except Exception:  # a detector tripping over hostile input must not lose the message
            _log.debug("flufl.bounce detector %s failed", name, exc_info=True)
            continue
        if temporary or permanent:
            return FluflResult(name, _decode(temporary), _decode(permanent))
    return None


def _long_decoded_lines(part: Message) -> bytes | None:
    """The decoded payload of a transfer-encoded leaf that has a line longer than MAX_LINE."""
    if part.is_multipart() or str(part.get("content-transfer-encoding", "")).strip().lower() in (
            "", "7bit", "8bit", "binary"):
        return None
    data = part_bytes(part, MAX_INPUT_BYTES)
    return data if max(map(len, data.split(b"\n"))) > MAX_LINE else None


def _with_short_lines(msg: Message) -> Message:
    """``msg``, or a copy of it in which the parts with over-long decoded lines are re-encoded
    with those lines split (see the module docstring). A copy: the caller reads ``msg`` again."""
    if all(_long_decoded_lines(part) is None for part in msg.walk()):
        return msg
    msg = copy.deepcopy(msg)
    for part in msg.walk():
        data = _long_decoded_lines(part)
        if data is None:
            continue
        data = split_long_lines(data)
        if str(part.get("content-transfer-encoding", "")).strip().lower() == "quoted-printable":
            part.set_payload(quopri.encodestring(data).decode("ascii"))
        else:  # base64, and uuencode turned into base64
            part.set_payload(base64.encodebytes(data).decode("ascii"))
            part.replace_header("content-transfer-encoding", "base64")
    return msg


def _run_public_api(msg: Message) -> FluflResult | None:  # pragma: no cover - fallback only
    from flufl.bounce import all_failures

    try:
        temporary, permanent = all_failures(msg)
    except Exception:
        return None
    if not temporary and not permanent:
        return None
    return FluflResult("all_failures", _decode(temporary), _decode(permanent))
