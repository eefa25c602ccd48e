"""Local submission (the ``sendmail`` command and the HTTP API): the checks an SMTP client would
meet between MAIL and DATA, then the same :class:`~mailrelayd.intake.Intake` as SMTP (header
policy, Received, header completion, DKIM, durable spool commit).

The submitting user is known (the ``[sendmail] user``, or the owner of the API key), so the
rules are those of a submission listener: ``allowed_from`` for the envelope sender and the header
From, the user's sending rate, the recipient limit, suppressed recipients refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mailrelayd.config import Config, LimitsConfig
from mailrelayd.errors import MessageRefused, Reply, address_refusal
from mailrelayd.intake import Intake, Origin
from mailrelayd.smtp.address import AddressError, Mailbox, parse_command_path
from mailrelayd.smtp.policy import SENDER_NOT_OWNED, TOO_BIG, Facts, Policy
from mailrelayd.users import User

NO_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long (RFC 5321 §4.5.3.1.6)")
NUL_IN_DATA = Reply(550, "5.6.0", "NUL characters are not allowed in message data")
NULL_SENDER_NOT_OWNED = Reply(550, "5.7.1", "Null sender <> not allowed for this user (its allowed_from needs \"*\")")


class NoRecipients(MessageRefused):
    """Every recipient was refused (bad syntax, suppressed, over the limit): raised with the one
    refusal, or with NO_RECIPIENTS when there were several."""


@dataclass(frozen=True, slots=True)
class Refused:
    recipient: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class Submitted:
    queue_id: str
    refused: tuple[Refused, ...]


def to_crlf(data: bytes) -> bytes:
    """Line ends normalised to CRLF (local programs write LF)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


class LocalSubmitter:
    """One per front end and runtime (rebuilt on reload)."""

    def __init__(self, cfg: Config, policy: Policy, intake: Intake, *, listener: str, protocol: str) -> None:
        self.cfg = cfg
        self.policy = policy
        self.intake = intake
        self.listener = listener
        self.protocol = protocol

    async def submit(self, user: User, mail_from: str, recipients: Sequence[str], data: bytes, *,
                     peer_ip: str = "127.0.0.1", tls: str | None = None,
                     refused: Sequence[Refused] = ()) -> Submitted:
        """Queue the message for the recipients that pass. ``mail_from`` "" is the null sender (MAIL
        FROM:<>). ``refused``: recipients the front end already refused (an address it could not read),
        reported with the others. Raises MessageRefused when the sender, the content or every recipient
        is refused (and SpoolError / DkimSignError as Intake does)."""
        facts = Facts(peer_ip=peer_ip, tls=tls is not None, user=user)
        refusal = content_refusal(data, self.cfg.limits)
        if refusal is not None:
            raise MessageRefused(refusal)
        try:
            sender = plain_mailbox(mail_from)
        except AddressError as e:
            raise MessageRefused(Reply(553, "5.1.7", f"Bad sender address syntax: {e}")) from None
        refusal = self.policy.check_mail(facts, sender, len(data)) or self.policy.check_rate(facts)
        if refusal is not None:
            raise MessageRefused(NULL_SENDER_NOT_OWNED if sender is None and refusal == SENDER_NOT_OWNED
                                 else refusal)
        accepted: list[str] = []
        refusals = list(refused)
        # As SMTP's RCPT does: a mailbox given twice (a@x, a@X) is one recipient, neither counted against
        # limits.max_recipients nor reported again. Compared by the parsed address (domain lowercased).
        seen = {r.recipient for r in refusals}
        for r in recipients:
            try:
                rcpt = recipient_mailbox(r)
            except AddressError as e:
                if r not in seen:
                    seen.add(r)
                    refusals.append(Refused(r, address_refusal(e, sender=False)))
                continue
            address = str(rcpt)
            if address in seen:
                continue
            seen.add(address)
            reply, _local = self.policy.check_rcpt(facts, False, rcpt, len(accepted))
            if reply is not None:
                refusals.append(Refused(r, reply))
            else:
                accepted.append(address)
        if not accepted:
            raise NoRecipients(refusals[0].reply if len(refusals) == 1 else NO_RECIPIENTS)
        origin = Origin(listener=self.listener, peer_ip=peer_ip, helo=None, protocol=self.protocol, tls=tls,
                        user=user)
        qid = await self.intake.accept(origin, str(sender) if sender else "", accepted, data, outbound=True)
        return Submitted(qid, tuple(refusals))


def content_refusal(data: bytes, limits: LimitsConfig) -> Reply | None:
    """What SMTP would refuse in a message's bytes whoever sends it: size, NUL, line length."""
    if len(data) > limits.max_message_size:
        return TOO_BIG
    if b"\0" in data:
        return NUL_IN_DATA
    if any(len(line) > limits.max_line_length - 2 for line in data.split(b"\r\n")):
        return LINE_TOO_LONG
    return None


def plain_mailbox(addr: str) -> Mailbox | None:
    """One address without angle brackets, parsed as SMTP would parse it in MAIL FROM / RCPT TO:
    "" is the null reverse-path (None, as ``MAIL FROM:<>``), which a sender may be and a recipient
    not (:func:`recipient_mailbox`)."""
    if addr == "":
        return None
    if any(c in addr for c in "<>\r\n"):
        raise AddressError("not a plain address")
    box, rest = parse_command_path(f"<{addr}>", allow_null=False, utf8=True)
    if box is None or rest.strip():
        raise AddressError("not a plain address")
    return box


def recipient_mailbox(addr: str) -> Mailbox:
    """:func:`plain_mailbox` for RCPT TO, where the null path is not allowed."""
    box = plain_mailbox(addr)
    if box is None:
        raise AddressError("null address not allowed here")
    return box
