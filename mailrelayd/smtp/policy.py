"""Who may send what to whom: the decisions taken at MAIL, RCPT and end of DATA.

Pure functions of the session facts and the config; no I/O. The rules (Postfix's
``smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination``
plus per-user sender ownership, like ``reject_sender_login_mismatch``):

- submission listeners: AUTH is required before MAIL; an authenticated user may send as the
  senders their ``allowed_from`` patterns allow, in the envelope and in the header From/Sender;
- relay listeners: mail for our own domains (``relay.local_domains`` and the feedback bounce
  domain) is accepted from anyone and goes to the feedback pipeline; mail for any other domain
  only from ``relay.trusted_networks`` or an authenticated user (when the listener offers AUTH).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from mailrelayd import metrics
from mailrelayd.config import Config, ListenerConfig, Network, normalize_domain
from mailrelayd.errors import Reply
from mailrelayd.log import get_logger
from mailrelayd.ratelimit import Rate, RateLimiter, parse_rate
from mailrelayd.smtp.address import AddressError, Mailbox
from mailrelayd.smtp.headers import HeaderScan
from mailrelayd.users import User

AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
RELAY_DENIED = Reply(554, "5.7.1", "Relaying denied")
SENDER_NOT_OWNED = Reply(550, "5.7.1", "Sender address not allowed for this user")
HEADER_FROM_NOT_OWNED = Reply(550, "5.7.1", "From header address not allowed for this user")
SUPPRESSED = Reply(550, "5.7.1", "Recipient suppressed (previous hard bounce or complaint)")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
LITERAL_RCPT = Reply(550, "5.1.2", "Address literals are not accepted as recipients")
MULTIPLE_FROM = Reply(550, "5.7.1", "More than one From header field, or several authors without a Sender")
NO_FROM = Reply(550, "5.6.0", "Message has no From header field (RFC 5322 §3.6.2)")
INVALID_FROM = Reply(550, "5.7.1", "From header field must hold valid mailboxes only (no group, no malformed address)")
INVALID_SENDER = Reply(550, "5.7.1", "Sender header field must hold exactly one valid mailbox")

log = get_logger()


def rate_limited(rate: Rate) -> Reply:
    # RFC 3463 X.7.1 "delivery not authorized"; 4xx: the client keeps the message and retries.
    return Reply(451, "4.7.1", f"Sending rate limit exceeded for this user ({rate}), try again later")


@dataclass(frozen=True, slots=True)
class Facts:
    """What the policy knows about the client."""

    peer_ip: str
    tls: bool
    user: User | None


class Policy:
    """Decisions for one listener under one config (rebuilt on reload)."""

    def __init__(self, cfg: Config, listener: ListenerConfig, is_suppressed: Callable[[str], bool],
                 limiter: RateLimiter | None = None) -> None:
        self.cfg = cfg
        self._limiter = limiter
        self._default_rate = parse_rate(cfg.auth.default_rate)
        self._rates: dict[str, Rate | None] = {}
        self.listener = listener
        self.submission = listener.mode == "submission"
        self.auth_offered = self.submission or listener.auth
        self.local_domains = cfg.local_domains  # the same object the scheduler consults
        # RFC 5321 §4.5.1: the bare "<Postmaster>" must be accepted. It names the postmaster of a domain we
        # handle locally (the bounce domain first), so it goes to the feedback pipeline like any other
        # local mail: reports sent there are processed, anything else is kept for a person in
        # <state_dir>/postmaster/. With no local domain at all, it is postmaster@server.hostname.
        first_local = next(iter(cfg.relay.local_domains), None)
        self.postmaster_domain: str = cfg.feedback.bounce_domain or first_local or normalize_domain(cfg.server.hostname)
        self._trusted: tuple[Network, ...] = tuple(cfg.relay.trusted_networks)
        self._trusted_seen: dict[str, bool] = {}  # per connection otherwise: parsing the address costs
        self._is_suppressed = is_suppressed

    def is_trusted(self, ip: str) -> bool:
        if not self._trusted:
            return False
        seen = self._trusted_seen.get(ip)
        if seen is None:
            if len(self._trusted_seen) >= 4096:
                self._trusted_seen.clear()
            seen = self._trusted_seen[ip] = self._is_trusted(ip)
        return seen

    def _is_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._trusted)

    def is_local(self, domain: str) -> bool:
        return domain in self.local_domains

    def may_relay(self, facts: Facts, trusted: bool) -> bool:
        return facts.user is not None or (not self.submission and trusted)

    # --- MAIL ---------------------------------------------------------------------------
    def check_mail(self, facts: Facts, sender: Mailbox | None, size: int | None) -> Reply | None:
        if self.submission and facts.user is None:
            return AUTH_REQUIRED
        if size is not None and size > self.cfg.limits.max_message_size:
            return TOO_BIG
        if facts.user is not None and not facts.user.may_send_as(str(sender) if sender else ""):
            # An authenticated user may use the null sender only if allowed ("*"), like Postfix's
            # reject_sender_login_mismatch: bounces come from the MTA, not from applications.
            return SENDER_NOT_OWNED
        return None

    def rate_for(self, user: User) -> Rate | None:
        """The user's own rate (users file), else ``auth.default_rate``; None: unlimited."""
        if user.rate is None:
            return self._default_rate
        if user.rate not in self._rates:  # validated when the users file was loaded
            self._rates[user.rate] = parse_rate(user.rate)
        return self._rates[user.rate]

    def check_rate(self, facts: Facts) -> Reply | None:
        """Per-user sending limit, counted at MAIL (like Postfix's anvil message rate): one
        accepted MAIL takes one from the user's budget. Call after :meth:`check_mail` passed."""
        user = facts.user
        if user is None or self._limiter is None:
            return None
        rate = self.rate_for(user)
        if rate is None:
            return None
        verdict = self._limiter.take(user.name, rate)
        if verdict.allowed:
            return None
        metrics.USER_RATE_LIMITED.labels(user.name).inc()
        if verdict.first_refusal:  # once per window, not once per message
            log.warning("user.rate_limited", user=user.name, rate=str(rate), retry_after=round(verdict.retry_after),
                        peer=facts.peer_ip)
        return rate_limited(rate)

    # --- RCPT ---------------------------------------------------------------------------
    def check_rcpt(self, facts: Facts, trusted: bool, rcpt: Mailbox, count: int) -> tuple[Reply | None, bool]:
        """(refusal or None, is_local) for one recipient; ``count`` is how many are already accepted."""
        if count >= self.cfg.limits.max_recipients:
            return TOO_MANY_RCPTS, False
        if rcpt.is_literal:
            return LITERAL_RCPT, False
        if not self.submission and self.is_local(rcpt.domain):
            return None, True
        if not self.may_relay(facts, trusted):
            return RELAY_DENIED, False
        if self._is_suppressed(str(rcpt)):
            return SUPPRESSED, False
        return None, False

    # --- end of DATA --------------------------------------------------------------------
    def check_headers(self, facts: Facts, scan: HeaderScan, outbound: bool) -> Reply | None:
        """Header From/Sender rules for outbound mail: exactly one From field (RFC 5322 §3.6;
        a second From is the classic DKIM replay trick) and, for authenticated users, every
        author and sender address must be theirs (no spoofing across users)."""
        if not outbound:
            return None
        if len(scan.from_values) > 1:
            return MULTIPLE_FROM
        try:
            from_addrs = [str(m) for m in scan.from_mailboxes()]
        except AddressError:
            return INVALID_FROM
        if len(scan.sender_values) > 1:  # counted before parsing: 10,000 Sender fields are not worth reading
            return INVALID_SENDER
        try:
            sender_addrs = [str(m) for m in scan.sender_mailboxes()]
        except AddressError:
            return INVALID_SENDER
        if len(sender_addrs) > 1:
            return INVALID_SENDER
        if len(from_addrs) > 1 and not sender_addrs:
            return MULTIPLE_FROM
        if facts.user is None:
            return None
        for a in (*from_addrs, *sender_addrs):
            if not facts.user.may_send_as(a):
                return HEADER_FROM_NOT_OWNED
        return None
