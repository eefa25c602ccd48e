"""Run flufl.bounce's detectors (Mailman's bounce recognisers) safely and within a time bound.

flufl.bounce's own ``all_failures()`` runs every detector in turn and re-raises the first
exception (e.g. ``AttributeError`` on a raw 8-bit ``From`` header). We drive the detector
classes ourselves so that one broken detector is skipped instead of losing the message, and
we leave out two detectors:

* ``LLNL`` reports the first ``, user@host,`` found on *any* line of *any* message, which is a
  false-suppression hazard on ordinary mail, and its pattern backtracks quadratically on long
  lines of commas;
* ``Yale`` only recognises yale.edu and guesses addresses in two domains.

flufl.bounce cannot tell hard from soft failures (every non-delayed DSN recipient and every
heuristic match is "permanent"), so only the *addresses* are taken from it; the caller
classifies each one from the diagnostic text.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from dataclasses import dataclass
from email.message import Message
from typing import Any

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
            netscape,
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
        ("netscape", netscape.Netscape),
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


def _run_public_api(msg: Message) -> FluflResult | None:  # pragma: no cover - fallback only
    from flufl.bounce import all_failures

    try:
        temporary, permanent = all_failures(msg)
    except Exception:
        return None
    if not temporary and not permanent:
        return None
    return FluflResult("all_failures", _decode(temporary), _decode(permanent))
