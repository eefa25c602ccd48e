"""Feedback handling: bounces (DSNs and non-standard bounces), complaints (ARF, JMRP, SES), VERP.

Modules, one job each, in the order a message goes through them:

* :mod:`~mailrelayd.feedback.parse`: :func:`parse_feedback`, raw message → :class:`FeedbackReport`:
  :mod:`~mailrelayd.feedback.tree` walks the MIME tree once, then the named recognizers of
  :mod:`~mailrelayd.feedback.recognizers` (ARF, JMRP, MDN, RFC 3464/6533 DSN, SES, the bounce
  formats of older and proprietary mail systems, text heuristics) return evidence;
* :mod:`~mailrelayd.feedback.classify`: :func:`classify_status`, the rules for one failure
  (hard, soft, reputation, policy; also used for the synchronous replies of our own deliveries);
* :mod:`~mailrelayd.feedback.trust`: what to act on (VERP token first, then recipients we sent to,
  complaints only from listed reporters);
* :mod:`~mailrelayd.feedback.store`: the suppression list (:class:`SqliteSuppressionStore`);
* :mod:`~mailrelayd.feedback.breaker`: the per-sending-domain circuit breaker;
* :mod:`~mailrelayd.feedback.verp`: VERP return paths (``bounces+<token>@<bounce domain>``);
* helpers: ``mime`` (bounded parsing), ``fields``/``dsn``/``arf`` (RFC 3464 / RFC 5965 fields),
  ``textbounce`` (plain-text heuristics), ``legacy`` (Exim's X-Failed-Recipients, qmail, old
  Postfix, Exchange, GroupWise and other pre-RFC 3464 formats),
  ``addresses`` (UTF-8 aware, RFC 6531/6533), ``report`` (the result types).
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
