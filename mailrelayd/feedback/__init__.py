"""Feedback handling: bounces (DSNs and non-standard bounces), complaints (ARF, JMRP), VERP.

Modules, one job each:

* :mod:`~mailrelayd.feedback.parse`: :func:`parse_feedback`, raw message → :class:`FeedbackReport`;
* :mod:`~mailrelayd.feedback.classify`: :func:`classify_status`, hard/soft rules for one failure
  (also used for the synchronous replies of our own deliveries);
* :mod:`~mailrelayd.feedback.verp`: VERP return paths (``bounces+<token>@<bounce domain>``);
* :mod:`~mailrelayd.feedback.store`: the suppression list (:class:`SqliteSuppressionStore`);
* helpers: ``mime`` (bounded parsing), ``fields``/``dsn``/``arf`` (RFC 3464 / RFC 5965 fields),
  ``textbounce`` (plain-text heuristics), ``flufl_adapter`` (flufl.bounce detectors),
  ``addresses``.
"""

from mailrelayd.feedback.classify import classify_status
from mailrelayd.feedback.parse import FeedbackRecipient, FeedbackReport, ParseOptions, parse_feedback
from mailrelayd.feedback.store import SqliteSuppressionStore, Suppression, SuppressionStore
from mailrelayd.feedback.verp import VerpToken, make_return_path, parse_return_path

__all__ = [
    "FeedbackRecipient",
    "FeedbackReport",
    "ParseOptions",
    "SqliteSuppressionStore",
    "Suppression",
    "SuppressionStore",
    "VerpToken",
    "classify_status",
    "make_return_path",
    "parse_feedback",
    "parse_return_path",
]
