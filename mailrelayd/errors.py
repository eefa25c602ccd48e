"""Specific exception types and the one place that maps them to SMTP replies (RFC 5321 §4.2,
enhanced status codes RFC 3463)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailrelayd.smtp.address import AddressError


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: code, enhanced status code, text."""

    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}" if self.enhanced else f"{self.code} {self.text}"

    @property
    def is_error(self) -> bool:
        return self.code >= 400


class SmtpRefusal(Exception):
    """A policy or protocol decision that refuses a command with a specific reply."""

    reply: Reply

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class MessageRefused(SmtpRefusal):
    """The content of a complete message is refused by policy (header From rules, no From):
    raised by :meth:`mailrelayd.intake.Intake.accept`, answered with its reply."""


class SpoolError(Exception):
    """The spool could not make a message durable (the client must get a 4xx, never a 250)."""


class SpoolFullError(SpoolError):
    """No room on the spool file system (disk full, or below ``server.min_free_space``)."""


class SpoolWriteError(SpoolError):
    """An I/O error while writing the spool."""


class SpoolCorruptError(SpoolError):
    """The spool database is damaged (SQLite ``SQLITE_CORRUPT``/``SQLITE_NOTADB``, or a failed
    ``PRAGMA quick_check``). Nothing more is written to it; the operator restores or salvages it
    (docs/runbooks/MailrelaydSpoolDamaged.md)."""

    def __init__(self, path: str, detail: str) -> None:
        detail = " ".join(detail.split())  # one line, whatever SQLite said
        super().__init__(f"{path}: database is damaged ({detail})")
        self.path = path
        self.detail = detail


class DkimSignError(Exception):
    """Signing failed for a message whose domain has a key."""


# Replies used in more than one place. Codes follow RFC 5321 §4.2.2 / RFC 3463.
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
SPOOL_WRITE = Reply(451, "4.3.0", "Local error in processing, try again later")
SIGN_FAILED = Reply(451, "4.7.0", "Temporary signing failure, try again later")
INTERNAL = Reply(451, "4.3.0", "Local error in processing, try again later")


def reply_for(exc: BaseException) -> Reply:
    """The SMTP reply for an exception raised while handling a command. Unknown exceptions are
    a local error (451 4.3.0): the client retries, nothing is lost, and no traceback leaks."""
    if isinstance(exc, SmtpRefusal):
        return exc.reply
    if isinstance(exc, SpoolFullError):
        return SPOOL_FULL
    if isinstance(exc, SpoolError):
        return SPOOL_WRITE
    if isinstance(exc, DkimSignError):
        return SIGN_FAILED
    if isinstance(exc, EnvelopeEncodingError):
        return ENVELOPE_ENCODING
    return INTERNAL


def address_refusal(exc: AddressError, *, sender: bool) -> Reply:
    """The reply to a MAIL FROM (``sender``) or RCPT TO path that did not parse: 553 (RFC 5321 §4.2.2,
    "mailbox name not allowed") with the code the error type carries (5.1.7 / 5.1.3 syntax, 5.6.7 for
    bytes that are not UTF-8 or need SMTPUTF8, RFC 6531 §3.7.4). Never a 4xx: retrying cannot help."""
    if sender:
        return Reply(553, exc.enhanced_sender, f"Bad sender address syntax: {exc}")
    return Reply(553, exc.enhanced_rcpt, f"Bad recipient address syntax: {exc}")


class EnvelopeEncodingError(ValueError):
    """An envelope address that cannot be stored as text (not valid UTF-8). The session refuses such
    addresses at MAIL/RCPT; the spool checks again so no path can turn them into a spool write error."""


ENVELOPE_ENCODING = Reply(554, "5.6.7", "Envelope address is not valid UTF-8")
