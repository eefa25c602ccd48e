"""Message intake: what happens to a complete message, whichever front end handed it over.

SMTP (:mod:`mailrelayd.smtp`), a local ``sendmail`` command and the HTTP API all end here: header
policy on the content, the ``Received:`` trace field (RFC 5321 §4.4), header completion for
outbound mail (RFC 6409 §8), DKIM signing, the durable spool commit, then metrics, the
``message.accepted`` log line and the hand-over to the scheduler.

The commit is the line between "not ours" and "ours": before it, a cancelled caller loses nothing
(the client gets no 250 and retries); after it, the message exists in the spool and must be
delivered. So the commit and the bookkeeping after it run in their own task, shielded from the
caller's cancellation: a client that resets the connection while we fsync cannot strand a
committed message outside the scheduler (issue 11).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mailrelayd import metrics
from mailrelayd.config import Config
from mailrelayd.errors import MessageRefused, Reply
from mailrelayd.log import get_logger
from mailrelayd.smtp import headers as hdr
from mailrelayd.smtp.dataread import BARE_CR_LF
from mailrelayd.smtp.headers import HeaderScan
from mailrelayd.smtp.policy import NO_FROM, Facts
from mailrelayd.spool.store import FEEDBACK, OUTBOUND, NewMessage, Spool
from mailrelayd.users import User

log = get_logger()

HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header size exceeds limit")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops")  # RFC 3463 §3.5: routing loop detected

Signer = Callable[[bytes, str], Awaitable[bytes]]
"""Given the message and its header From domain, returns DKIM-Signature fields to prepend (or b"")."""

HeaderCheck = Callable[[Facts, HeaderScan, bool], "Reply | None"]
"""The end-of-data header policy (:meth:`mailrelayd.smtp.policy.Policy.check_headers`)."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Who handed us the message."""

    listener: str  # listener name, or "sendmail" / "http"
    peer_ip: str
    helo: str | None
    protocol: str  # the Received "with" keyword (RFC 3848: ESMTPSA, ESMTPS, ESMTP, SMTP; LOCAL, HTTP)
    tls: str | None  # TLS description for Received, or None
    user: User | None  # the authenticated / attributed user
    session: str | None = None  # the front end's session id, for correlating log lines


class Intake:
    """Turns a complete message into a durable, scheduled spool entry.

    One per runtime (rebuilt on reload); shared by every front end. Collaborators are passed in
    narrowly: the config, the header policy, the signer, the spool and the scheduler's entry point.
    """

    def __init__(self, cfg: Config, *, check_headers: HeaderCheck, signer: Signer | None, spool: Spool,
                 on_accepted: Callable[[NewMessage], None],
                 committing: set[asyncio.Task[str]] | None = None) -> None:
        self.cfg = cfg
        self.check_headers = check_headers
        self.signer = signer
        self.spool = spool
        self.on_accepted = on_accepted
        # Commits in flight, each in its own task: referenced here so none is garbage-collected
        # while its caller has gone, and so shutdown can wait for them (wait_commits). The owner
        # may share one set between several intakes (one per front end, rebuilt on reload).
        self.committing: set[asyncio.Task[str]] = committing if committing is not None else set()

    async def accept(self, origin: Origin, mail_from: str, recipients: Sequence[str], body: bytes, *,
                     outbound: bool) -> str:
        """Policy, trace and completion headers, DKIM, durable commit. Returns the queue id once the
        message is durable. Raises :class:`MessageRefused` for a policy refusal, SpoolError when the
        spool cannot make it durable, DkimSignError when signing fails."""
        # shield(): if the caller is cancelled (client gone, session torn down), the commit and
        # everything after it still run to the end in their own task.
        return await asyncio.shield(self.submit(origin, mail_from, recipients, body, outbound=outbound))

    def submit(self, origin: Origin, mail_from: str, recipients: Sequence[str], body: bytes, *, outbound: bool,
               on_done: Callable[[str | None, BaseException | None], None] | None = None) -> asyncio.Task[str]:
        """:meth:`accept` for callers that are not coroutines (the SMTP edge, which must not wait an
        event-loop turn to start a commit: the spool commits in groups, and a late arrival waits for
        the next fsync). The header policy runs now and raises :class:`MessageRefused`; signing and the
        commit run in the returned task, which nothing here cancels. ``on_done(queue_id, None)`` or
        ``on_done(None, error)`` is called by that task as its last step; with ``on_done`` the task
        itself never raises."""
        t0 = time.perf_counter()
        try:
            prepared = self._prepare(origin, mail_from, recipients, body, outbound)
        except BaseException:
            metrics.ACCEPT_DURATION.labels(origin.listener).observe(time.perf_counter() - t0)
            raise
        msg, sign = prepared
        try:
            # Unsigned: the spool write is queued now, not when the task first runs (group commit).
            pending = None if sign else self.spool.start_commit(msg)
        except BaseException:
            metrics.ACCEPT_DURATION.labels(origin.listener).observe(time.perf_counter() - t0)
            raise
        task = asyncio.get_running_loop().create_task(self._finish(origin, msg, pending, t0, on_done))
        self.committing.add(task)
        task.add_done_callback(self.committing.discard)
        return task

    def _prepare(self, origin: Origin, mail_from: str, recipients: Sequence[str], body: bytes,
                 outbound: bool) -> tuple[NewMessage, bool]:
        """The message as it will be stored, unsigned; and whether it is to be signed."""
        cfg = self.cfg
        scan = hdr.scan_headers(body, cfg.limits.max_header_size)
        if scan.too_large:
            raise MessageRefused(HEADER_TOO_BIG)
        if scan.bare_line_end:
            # The front ends refuse or normalise these; a header block with one would let a receiver see
            # fields (a From) that our scan and the policy did not.
            raise MessageRefused(BARE_CR_LF)
        if scan.received >= cfg.limits.max_hops:  # with the Received field we add, one hop too many
            raise MessageRefused(TOO_MANY_HOPS)
        facts = Facts(peer_ip=origin.peer_ip, tls=origin.tls is not None, user=origin.user)
        refusal = self.check_headers(facts, scan, outbound)
        if refusal is not None:
            raise MessageRefused(refusal)
        qid = self.spool.new_queue_id()
        now = time.time()
        user = origin.user.name if (origin.user and cfg.auth.received_show_user) else None
        trace = hdr.received_header(helo=origin.helo or "unknown", peer_ip=origin.peer_ip,
                                    hostname=cfg.server.hostname, protocol=origin.protocol, queue_id=qid,
                                    tls=origin.tls, user=user, now=now)
        from_domain = scan.from_domain
        message_id = scan.message_id
        extra = b""
        if outbound:
            # Submission and trusted relay: complete the header like a submission server
            # (RFC 6409 §8): Message-ID and Date when missing, From from the envelope when absent.
            if not scan.from_values:
                if not mail_from:
                    raise MessageRefused(NO_FROM)
                extra += f"From: <{mail_from}>\r\n".encode("utf-8", "surrogateescape")
                from_domain = mail_from.rpartition("@")[2]
            if not scan.has_message_id:
                message_id = hdr.message_id_value(qid, cfg.server.hostname)
                extra += f"Message-ID: {message_id}\r\n".encode()
            if not scan.has_date:
                extra += hdr.date_header(now)
        msg = NewMessage(queue_id=qid, mail_from=mail_from, recipients=tuple(recipients),
                         data=hdr.assemble(trace, body, scan, extra),
                         received_at=now, queue=OUTBOUND if outbound else FEEDBACK, listener=origin.listener,
                         sender_domain=from_domain, message_id=message_id,
                         user=origin.user.name if origin.user else "")
        return msg, outbound and self.signer is not None

    async def _finish(self, origin: Origin, msg: NewMessage, pending: Awaitable[None] | None, t0: float,
                      on_done: Callable[[str | None, BaseException | None], None] | None) -> str:
        try:
            if pending is None:
                assert self.signer is not None
                msg = replace(msg, data=await self.signer(msg.data, msg.sender_domain) + msg.data)
                pending = self.spool.start_commit(msg)
            await pending
        except Exception as e:
            metrics.ACCEPT_DURATION.labels(origin.listener).observe(time.perf_counter() - t0)
            if on_done is None:
                raise
            _notify(on_done, None, e)
            return ""
        # Durable from here on: count, log, hand to the scheduler. Nothing below may keep the message
        # from the scheduler.
        try:
            metrics.MESSAGES_RECEIVED.labels(origin.listener).inc()
            metrics.RECIPIENTS_RECEIVED.labels(origin.listener).inc(len(msg.recipients))
            metrics.MESSAGE_SIZE.labels(origin.listener).observe(len(msg.data))
            metrics.ACCEPT_DURATION.labels(origin.listener).observe(time.perf_counter() - t0)
            bound: Any = log.bind(listener=origin.listener, peer=origin.peer_ip)
            if origin.session is not None:
                bound = bound.bind(session=origin.session)
            bound.info("message.accepted", queue_id=msg.queue_id, mail_from=msg.mail_from,
                       rcpts=len(msg.recipients), size=len(msg.data), queue=msg.queue,
                       user=origin.user.name if origin.user else None, from_domain=msg.sender_domain or None,
                       message_id=msg.message_id or None)
        finally:
            self.on_accepted(msg)
        if on_done is not None:
            _notify(on_done, msg.queue_id, None)
        return msg.queue_id


def _notify(on_done: Callable[[str | None, BaseException | None], None], qid: str | None,
            error: BaseException | None) -> None:
    try:
        on_done(qid, error)
    except Exception:  # the caller's bug must not turn into an unobserved task exception
        log.exception("intake.on_done_failed", queue_id=qid)


async def wait_commits(committing: set[asyncio.Task[str]]) -> None:
    """Wait for the commits in flight (shutdown: before the scheduler stops and the spool closes)."""
    while committing:
        await asyncio.gather(*list(committing), return_exceptions=True)


def accepted_reply(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
