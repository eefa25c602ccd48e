"""Traffic shaping: the destination (a recipient domain, or a group of domains sharing an MX
provider) with its concurrency, rate, suspension and hold state.

Pure bookkeeping, no I/O and no clock of its own (times are passed in), so the delivery loop's
decisions are unit-tested with a fake clock. Every decision is O(1) per transaction:

- concurrency: ``max_connections`` transactions at once; a message that finds the destination
  full waits in its FIFO and is woken when a transaction ends;
- rate: ``max_rate`` as a virtual schedule (GCRA, RFC-less but as in ATM/KumoMTA throttles): each
  message that cannot go now is given the next free slot and comes back exactly then, so a backlog
  of N messages costs N wake-ups, not N per slot;
- suspension: after a throttling reply (see :func:`is_throttling`) nothing is sent to the
  destination for ``throttle_backoff``; its queued mail is deferred to the end of it.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from mailrelayd.config import Config, ShapingConfig, parse_rate

_THROTTLE_WORDS = re.compile(r"\brate(?:s|d)?\b|\bratelimit|too many|try again later", re.IGNORECASE)


def is_throttling(code: int, enhanced: str, text: str) -> bool:
    """A reply that means "you are sending too fast" rather than "this recipient, later":
    421 (service closing, RFC 5321 §3.8), 450/451 with a 4.7.x security/policy status (RFC 3463),
    or any 4.7.x that speaks of rate, too many or try again later."""
    if code == 421:
        return True
    if not enhanced.startswith("4.7."):
        return False
    return code in (450, 451) or bool(_THROTTLE_WORDS.search(text))


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int
    max_messages_per_connection: int
    rate_interval: float
    """Seconds between messages (period / count); 0 = no rate limit."""
    throttle_backoff: float
    max_recipients_per_transaction: int = 50


@dataclass(eq=False)
class Destination:
    name: str
    limits: Limits
    active: int = 0
    waiting: deque[str] = field(default_factory=deque)
    waiting_set: set[str] = field(default_factory=set)  # O(1) membership for ``waiting``
    next_slot: float = 0.0
    """GCRA theoretical arrival time: the earliest the next unreserved message may go."""
    last_start: float = float("-inf")
    """When the last rate-limited transaction started."""
    tickets: dict[str, float] = field(default_factory=dict)
    """Queue id -> reserved send time, for messages told to come back later for the rate."""
    suspended_until: float = 0.0
    suspend_reply: str = ""
    sent: int = 0

    def suspended(self, now: float) -> bool:
        return self.suspended_until > now

    def wait(self, qid: str) -> None:
        """Queue ``qid`` for the next free connection slot (once)."""
        if qid not in self.waiting_set:
            self.waiting_set.add(qid)
            self.waiting.append(qid)

    def next_waiter(self) -> str | None:
        while self.waiting:
            q = self.waiting.popleft()
            self.waiting_set.discard(q)
            return q
        return None

    def rate_slot(self, qid: str, now: float) -> float | None:
        """None: go now (a slot is taken). Otherwise the reserved time to come back at.

        Two rules: reservations keep a backlog in order (each message gets the next free slot),
        and no two transactions start closer than the interval, so reservations that fall due
        together after a stall (a busy event loop) go one interval apart, not in a burst."""
        interval = self.limits.rate_interval
        if interval <= 0:
            return None
        eps = 1e-6
        earliest = self.last_start + interval
        ticket = self.tickets.pop(qid, None)
        if ticket is not None:
            if ticket <= now + eps and earliest <= now + eps:
                self.last_start = now
                return None
            when = max(ticket, earliest)
            self.tickets[qid] = when
            return when
        if self.next_slot <= now + eps and earliest <= now + eps:
            self.next_slot = now + interval
            self.last_start = now
            return None
        when = max(self.next_slot, earliest)
        self.next_slot = when + interval
        self.tickets[qid] = when
        return when

    def idle(self, now: float) -> bool:
        return (self.active == 0 and not self.waiting and not self.tickets and self.next_slot <= now
                and self.suspended_until <= now)


class Destinations:
    """Maps recipient domains to destinations according to ``[[shaping]]`` and the defaults."""

    MX_CACHE = 100_000
    MX_TTL = 300.0

    def __init__(self, cfg: Config) -> None:
        self._dests: dict[str, Destination] = {}
        self._mx_cache: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self.reconfigure(cfg)

    def reconfigure(self, cfg: Config) -> None:
        d = cfg.delivery
        backoff = d.throttle_backoff if d.throttle_backoff is not None else d.retry_initial
        self.default = Limits(d.domain_concurrency, d.max_messages_per_connection, 0.0, backoff,
                              d.max_recipients_per_transaction)
        self.by_domain: dict[str, Limits] = {}
        self.suffixes: list[tuple[str, Limits]] = []
        for sh in cfg.shaping:
            m = sh.match.strip().lower().rstrip(".")
            lim = self._limits(sh, backoff)
            if m.startswith("."):
                self.suffixes.append((m, lim))
            else:
                self.by_domain[m] = lim
        self.suffixes.sort(key=lambda x: -len(x[0]))  # most specific suffix first
        self.configured = frozenset([*self.by_domain, *(s for s, _ in self.suffixes)])
        for dest in self._dests.values():
            new = self.limits_for(dest.name)
            if new.rate_interval != dest.limits.rate_interval:
                dest.next_slot = 0.0  # a new rate starts a new schedule (reservations are kept)
                dest.last_start = float("-inf")
            dest.limits = new
        self._mx_cache.clear()

    def _limits(self, sh: ShapingConfig, backoff: float) -> Limits:
        interval = 0.0
        if sh.max_rate:
            count, period = parse_rate(sh.max_rate)
            interval = period / count
        return Limits(sh.max_connections or self.default.max_connections,
                      sh.max_messages_per_connection or self.default.max_messages_per_connection,
                      interval, sh.throttle_backoff if sh.throttle_backoff is not None else backoff,
                      sh.max_recipients_per_transaction or self.default.max_recipients_per_transaction)

    def limits_for(self, name: str) -> Limits:
        if name in self.by_domain:
            return self.by_domain[name]
        for suffix, lim in self.suffixes:
            if name == suffix:
                return lim
        return self.default

    @property
    def needs_mx(self) -> bool:
        """Whether grouping needs the recipient domain's MX host names."""
        return bool(self.suffixes)

    def cached_name(self, domain: str, now: float) -> str | None:
        """The destination name for ``domain`` if it needs no MX lookup (or one is cached)."""
        if domain in self.by_domain or not self.suffixes:
            return domain
        hit = self._mx_cache.get(domain)
        if hit is not None and hit[0] > now:
            return hit[1]
        return None

    def name_from_mx(self, domain: str, mx_hosts: list[str], now: float) -> str:
        """Group by MX suffix: the first configured suffix any MX host ends with, else the domain."""
        name = domain
        for suffix, _ in self.suffixes:
            if any(h.lower().rstrip(".").endswith(suffix) for h in mx_hosts):
                name = suffix
                break
        self._mx_cache[domain] = (now + self.MX_TTL, name)
        self._mx_cache.move_to_end(domain)
        while len(self._mx_cache) > self.MX_CACHE:
            self._mx_cache.popitem(last=False)
        return name

    def get(self, name: str) -> Destination:
        dest = self._dests.get(name)
        if dest is None:
            dest = self._dests[name] = Destination(name, self.limits_for(name))
        return dest

    def peek(self, name: str) -> Destination | None:
        return self._dests.get(name)

    def all(self) -> list[Destination]:
        return list(self._dests.values())

    def prune(self, now: float) -> None:
        """Forget idle unconfigured destinations (memory stays bounded by what is busy) and rate
        reservations nobody came back for (a message deleted or held meanwhile)."""
        for dest in self._dests.values():
            if dest.tickets:
                for q in [q for q, t in dest.tickets.items() if t < now - 300]:
                    del dest.tickets[q]
        for name in [n for n, d in self._dests.items() if d.idle(now) and n not in self.configured]:
            del self._dests[name]
