"""Which feedback to believe: the trust model (docs/feedback.md).

Anyone on the Internet can send a message that looks like a bounce or a complaint to our bounce
domain. A false suppression silently stops someone's mail, so evidence is weighed in this order:

1. **A valid VERP token** (the message arrived at ``bounces+<token>@<bounce domain>`` and the
   HMAC verifies): it names our queue entry and the recipient we sent it to. It wins over what
   the body says: the report's verdict about that recipient applies to it, and a body that does
   not parse is still a bounce for that recipient, classified from whatever status can be found.
2. **No valid token**: act only on addresses we actually sent to within ``feedback.sent_window``
   (the spool's delivery history), and for complaints (ARF, JMRP, SES) only when the report comes
   from a source listed in ``feedback.trusted_reporters`` (a verified DKIM signature of a listed
   domain, or a sending host in a listed network). With ``feedback.require_verp`` bounces without
   a token are never acted on.
3. Everything else is recorded in the log, counted as ``kind="untrusted"`` and kept, never acted on.

:func:`decide` is pure; :func:`reporter_is_trusted` checks the sender of a report (DKIM with
dkimpy, against a key looked up by the caller).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from mailrelayd.feedback.addresses import find_addresses
from mailrelayd.feedback.classify import NOT_ABOUT_RECIPIENT, SOFT
from mailrelayd.feedback.report import (
    COMPLAINT,
    DELAYED,
    RECIPIENT_KINDS,
    SEVERITY,
    SOFT_BOUNCE,
    UNPARSABLE,
    UNSUBSCRIBE_PARSER,
    FeedbackRecipient,
    FeedbackReport,
)

UNTRUSTED = "untrusted"


@dataclass(frozen=True, slots=True)
class VerpMatch:
    """What a verified VERP token names: the address we sent to, its sending domain, our queue id."""

    address: str
    sender_domain: str
    queue_id: str


@dataclass(frozen=True, slots=True)
class Action:
    """One suppression-store record to make (hard/soft bounce or complaint)."""

    address: str
    kind: str
    reason: str
    status: str
    source: str


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one report.

    ``actions``: records for the suppression store. ``sender_events``: reputation / policy
    failures (about our sending, counted per sending domain and destination, never against the
    recipient). ``untrusted``: addresses the report named but that we do not act on. ``basis``:
    ``verp``, ``sent`` (no token, but we sent to them) or ``none``.
    """

    actions: tuple[Action, ...] = ()
    sender_events: tuple[FeedbackRecipient, ...] = ()
    untrusted: tuple[str, ...] = ()
    basis: str = "none"

    @property
    def kind_label(self) -> str:
        """``untrusted`` when the report named someone we do not act on and nothing was acted on."""
        return UNTRUSTED if self.untrusted and not self.actions and not self.sender_events else ""


def decide(
    report: FeedbackReport,
    *,
    verp: VerpMatch | None,
    sent: Mapping[str, str],
    reporter_trusted: bool,
    require_verp: bool,
) -> Decision:
    """Apply the trust model (module docstring) to one parsed report. Pure.

    ``sent`` maps the report's addresses (lowercased) that we sent to within the window to the
    address as we sent to it, which is the one acted on (a report may change its case);
    ``reporter_trusted`` whether the report comes from a listed reporting source.
    """
    source = "arf" if report.kind == COMPLAINT else "dsn"
    if verp is not None:
        return _decide_verp(report, verp, source)
    actions: list[Action] = []
    events: list[FeedbackRecipient] = []
    untrusted: list[str] = []
    acted: set[str] = set()
    for r in report.recipients:
        if not r.address or r.kind == DELAYED:
            continue
        ours = sent.get(r.address.lower())
        known = ours is not None
        if r.kind == COMPLAINT:
            ok = known and reporter_trusted
        elif r.kind in NOT_ABOUT_RECIPIENT:
            ok = known
        else:
            ok = known and not require_verp
        if not ok or ours is None:
            untrusted.append(r.address)
        elif ours in acted:
            continue  # the same mailbox named twice (in two cases): one verdict
        elif r.kind in NOT_ABOUT_RECIPIENT:
            acted.add(ours)
            events.append(replace(r, address=ours))
        elif r.kind in RECIPIENT_KINDS:
            acted.add(ours)
            actions.append(Action(ours, r.kind, r.reason, r.status, source))
    return Decision(tuple(actions), tuple(events), tuple(untrusted), "sent" if actions or events else "none")


def _decide_verp(report: FeedbackReport, verp: VerpMatch, source: str) -> Decision:
    target = verp.address
    pick = _verdict_for(report, target)
    if pick is None:
        if report.kind == UNPARSABLE:
            # A report at our VERP address that we cannot read is still a bounce for the recipient
            # the token names; with no status to go by, the mildest verdict (soft, on hold).
            return Decision((Action(target, SOFT_BOUNCE, "onhold", "", "dsn"),), basis="verp")
        return Decision(basis="verp")
    if pick.kind == DELAYED:
        return Decision(basis="verp")
    if pick.kind in NOT_ABOUT_RECIPIENT:
        return Decision(sender_events=(FeedbackRecipient(target, pick.kind, pick.status, pick.reason,
                                                         pick.diagnostic, pick.remote_mta),), basis="verp")
    kind = pick.kind if pick.kind in RECIPIENT_KINDS else SOFT
    src = "arf" if kind == COMPLAINT else source if source != "arf" else "dsn"
    return Decision((Action(target, kind, pick.reason, pick.status, src),), basis="verp")


def _verdict_for(report: FeedbackReport, target: str) -> FeedbackRecipient | None:
    """The report's verdict about the VERP recipient: the matching entry; else, the report being
    about one message of ours, its only entry, or with several the mildest (another address's
    "user unknown" must not suppress ours); else what the unattributed text says."""
    if any(a.lower() == target.lower() for a in report.succeeded):
        # The report says our recipient was delivered, relayed or expanded (a list that reports one
        # dead member): whatever else failed is not about the address the token names.
        return None
    if report.recipients:
        match = next((r for r in report.recipients if r.address.lower() == target.lower()), None)
        if match is not None:
            return match
        if report.kind == COMPLAINT:
            return report.recipients[0]
        return min(report.recipients, key=lambda r: SEVERITY.get(r.kind, 0))
    if report.kind == COMPLAINT:
        return FeedbackRecipient(target, COMPLAINT, reason=report.feedback_type or "abuse")
    return report.unattributed


# --- who sent the report ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReporterPolicy:
    """``feedback.trusted_reporters`` split into DKIM domains and IP networks."""

    domains: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_config(cls, entries: Sequence[str]) -> ReporterPolicy:
        domains: set[str] = set()
        networks = []
        for entry in entries:
            text = entry.strip()
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                domains.add(text.rstrip(".").lower().encode("idna").decode("ascii"))
        return cls(frozenset(domains), tuple(networks))

    def ip_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.networks)

    def domain_listed(self, domain: str) -> bool:
        """``domain`` is listed, or is a subdomain of a listed one (``fbl.mail.example`` under ``example``)."""
        d = domain.rstrip(".").lower()
        return any(d == listed or d.endswith("." + listed) for listed in self.domains)


def policy_for(report: FeedbackReport, policy: ReporterPolicy) -> ReporterPolicy:
    """The reporters whose word counts for ``report``.

    A complaint its complainer sent themselves (a mail client's unsubscribe request, whose
    complainer is the message's own From) has no third party vouching for it: a listed network or
    a listed domain vouches for the reports it writes, not for a From it did not sign. Only a DKIM
    signature (which always covers From) of a listed domain that is the complainer's own domain,
    or a parent of it, counts.
    """
    if report.parser != UNSUBSCRIBE_PARSER:
        return policy
    domains = {r.address.rpartition("@")[2].rstrip(".").lower() for r in report.recipients if r.address}
    if len(domains) != 1:
        return ReporterPolicy()
    domain = domains.pop()
    return ReporterPolicy(frozenset(d for d in policy.domains if domain == d or domain.endswith("." + d)))


# Our own Received header (smtp/headers.received_header): "from <helo> ([<ip>])" ... "by <us> (mailrelayd)".
_OUR_RECEIVED = re.compile(rb"^Received: from \S+ \(\[([0-9A-Fa-f:.]+)\]\)\r?\n\s+by (\S+) \(mailrelayd\)",
                           re.MULTILINE)
_DKIM_TAG = re.compile(rb"(?:^|;)\s*([a-z]+)\s*=\s*([^;]*)")


def peer_ip_of(raw: bytes, hostname: str) -> str:
    """The connecting IP recorded in the topmost Received header, if it is ours (we prepend it, so
    nothing a sender writes can sit above it)."""
    head = raw[:4096]
    match = _OUR_RECEIVED.match(head)
    if match is None or match.group(2).decode("ascii", "replace").lower() != hostname.lower():
        return ""
    return match.group(1).decode("ascii")


def dkim_candidates(raw: bytes, policy: ReporterPolicy) -> list[tuple[str, str]]:
    """(domain, selector) of DKIM-Signature headers whose ``d=`` is a listed reporter domain and
    aligned with the report's From (the same domain, or one a subdomain of the other, as DMARC's
    relaxed alignment without the public suffix list). A provider signs all the mail it sends with
    its own domain too (Amazon SES signs every customer's mail d=amazonses.com), so a signature
    alone vouches for nothing but that the provider carried the message: only a report the
    provider wrote in its own name is its word."""
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    try:
        headers = BytesHeaderParser(policy=compat32).parsebytes(raw[:65536])
    except Exception:
        return []
    senders = find_addresses(str(headers.get("from", "")))
    author = senders[0].rpartition("@")[2].rstrip(".").lower() if len(senders) == 1 else ""
    if not author:
        return []
    out: list[tuple[str, str]] = []
    for value in headers.get_all("dkim-signature") or []:
        tags = {m.group(1).lower(): b"".join(m.group(2).split()) for m in
                _DKIM_TAG.finditer(str(value).encode("ascii", "replace"))}
        domain = tags.get(b"d", b"").decode("ascii", "replace").lower()
        selector = tags.get(b"s", b"").decode("ascii", "replace")
        aligned = author == domain or author.endswith("." + domain) or domain.endswith("." + author)
        if domain and selector and aligned and policy.domain_listed(domain):
            out.append((domain, selector))
    return out


def dkim_verifies(raw: bytes, keys: dict[str, bytes]) -> bool:
    """True if a DKIM signature of ``raw`` verifies with dkimpy against the pre-fetched TXT
    records ``keys`` (``"<selector>._domainkey.<domain>."`` → record); blocking CPU work, run it
    in a thread. The lookup is done by the caller (asynchronously) so that dkimpy never blocks
    on DNS."""
    import dkim

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        key = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        return keys.get(key.lower().rstrip(".") + ".")

    wire = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    signatures = len(re.findall(rb"^dkim-signature:", wire[:65536], re.IGNORECASE | re.MULTILINE))
    try:
        verifier = dkim.DKIM(wire)
    except Exception:
        return False
    for idx in range(min(signatures, 16)):
        try:
            if verifier.verify(idx=idx, dnsfunc=dnsfunc):
                return True
        except Exception:  # dkim.ValidationError, a malformed signature or key: not verified
            continue
    return False


TxtLookup = Callable[[str], Awaitable[bytes | None]]


async def reporter_is_trusted(raw: bytes, *, peer_ip: str, policy: ReporterPolicy, txt: TxtLookup,
                              run_blocking: Callable[..., Awaitable[bool]]) -> tuple[bool, str]:
    """(trusted?, why): the sending host is in a listed network, or a DKIM signature of a listed
    domain verifies. ``txt`` looks up a TXT record; ``run_blocking`` runs dkimpy off the loop."""
    if peer_ip and policy.ip_trusted(peer_ip):
        return True, f"ip {peer_ip}"
    candidates = dkim_candidates(raw, policy)
    if not candidates:
        return False, "no listed network or DKIM domain"
    keys: dict[str, bytes] = {}
    for domain, selector in candidates[:4]:
        name = f"{selector}._domainkey.{domain}.".lower()
        record = await txt(name)
        if record:
            keys[name] = record
    if keys and await run_blocking(dkim_verifies, raw, keys):
        return True, "dkim " + ",".join(sorted({d for d, _s in candidates}))
    return False, "DKIM signature of a listed domain does not verify"
