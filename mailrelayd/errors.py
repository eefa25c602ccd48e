"""Specific exception types and the one place that maps them to SMTP replies (RFC 5321 §4.2,
enhanced status codes RFC 3463)."""

from __future__ import annotations

from dataclasses import dataclass


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
    return INTERNAL
