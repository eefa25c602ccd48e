"""Where to deliver a domain's mail: MX lookup with dnspython (RFC 5321 §5.1, RFC 7505).

The resolver's own cache (``dns.resolver.LRUCache``) honours record TTLs, so repeated lookups for busy
domains cost nothing and a changed MX takes effect when its TTL runs out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mailrelayd import metrics
from mailrelayd.config import DnsConfig

CACHE_SIZE = 50_000
MAX_MX_HOSTS = 20
"""MX hosts kept per domain (and so address lookups per resolve): the transport tries at most a few
addresses anyway, and a hostile domain publishing hundreds of MX records must not cost hundreds of
concurrent lookups (and sockets) per delivery."""
MAX_HOST_NAME = 253
_HOST_LABEL = re.compile(r"[a-z0-9_-]{1,63}")

IpFamily = str
"""One of "any", "ipv4", "ipv6", "prefer-ipv4", "prefer-ipv6" (``[delivery] ip_family``)."""


class DnsError(Exception):
    """A DNS answer that stops delivery; ``enhanced`` is the RFC 3463 status it maps to."""

    enhanced = "4.4.3"

    def __init__(self, text: str, enhanced: str | None = None) -> None:
        super().__init__(text)
        if enhanced:
            self.enhanced = enhanced


class DnsTemporaryError(DnsError):
    """SERVFAIL, timeout, no reachable nameserver: defer and retry later."""

    enhanced = "4.4.3"


class DnsPermanentError(DnsError):
    """The domain cannot receive mail: NXDOMAIN (5.1.2) or a null MX (5.1.10)."""

    enhanced = "5.1.2"


@dataclass(frozen=True, slots=True)
class MxHost:
    """One host to try, in order: its name (for Remote-MTA and TLS SNI) and its addresses."""

    name: str
    addresses: tuple[str, ...]
    preference: int
    port: int


def make_resolver(cfg: DnsConfig) -> dns.asyncresolver.Resolver:
    """An async resolver for ``[dns]``: its nameservers (host:port) if set, else the system's."""
    if cfg.nameservers:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in cfg.nameservers]
    else:
        r = dns.asyncresolver.Resolver()
    r.lifetime = cfg.timeout
    r.timeout = min(cfg.timeout, 5.0)  # per-server try; lifetime bounds the whole lookup
    r.cache = dns.resolver.LRUCache(CACHE_SIZE)
    return r


def host_name(text: str) -> str | None:
    """``text`` as a host name, lowercase and without the final dot; None when it is not one.

    Labels of 1-63 ASCII letters, digits, "-" (RFC 1123 §2.1) and, leniently, "_" (as Postfix).
    ASCII is checked before lowering: ``str.lower()`` maps some non-ASCII letters onto ASCII ones
    (KELVIN SIGN to "k") while DNS names compare case-insensitively in ASCII only (RFC 4343 §3).
    A name whose label needs an escape in presentation format (``a\\.b``, ``\\000``) is not a host name.
    """
    if not text.isascii():
        return None
    name = text.lower().removesuffix(".")
    if len(name) > MAX_HOST_NAME or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return name


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class MxResolver:
    """Resolves a recipient domain (or a route's host) to an ordered list of hosts to try."""

    def __init__(self, cfg: DnsConfig) -> None:
        self._cfg = cfg
        self.resolver = make_resolver(cfg)

    def reconfigure(self, cfg: DnsConfig) -> None:
        if cfg != self._cfg:
            self._cfg = cfg
            self.resolver = make_resolver(cfg)

    async def resolve(self, domain: str, port: int, family: IpFamily = "any") -> list[MxHost]:
        """Hosts for ``domain`` by MX preference, shuffled among equal preferences (RFC 5321 §5.1).

        Raises DnsPermanentError for NXDOMAIN or a null MX, DnsTemporaryError when the answer could
        not be had, or when no MX host has an address (the domain's DNS may be mid-change).
        """
        domain = domain.rstrip(".").lower()
        try:
            answer = await self.resolver.resolve(domain + ".", "MX", search=False)
            mxs = [(r.preference, r.exchange) for r in answer]
        except dns.resolver.NXDOMAIN:
            metrics.DNS_FAILURES.labels("MX", "nxdomain").inc()
            raise DnsPermanentError(f"Host or domain name not found: {domain}: NXDOMAIN", "5.1.2") from None
        except dns.resolver.NoAnswer:
            mxs = []  # RFC 5321 §5.1: no MX, the domain itself is the implicit MX
        except dns.exception.DNSException as e:
            raise self._temporary("MX", domain, e) from None

        if not mxs:
            addrs = order_addresses(await self._addresses(domain, permanent_if_none=True, family=family), family)
            if not addrs:
                raise DnsTemporaryError(f"No {family} address for {domain} (delivery.ip_family)", "4.4.3")
            return [MxHost(domain, addrs, 0, port)]
        # RFC 7505 §3: a single "0 ." MX means the domain accepts no mail. Next to real MX records
        # (which §3 forbids) it is ignored and they are used, the same way on every lookup.
        real = [(p, x) for p, x in mxs if x != dns.name.root]
        if not real:
            raise DnsPermanentError(f"Domain {domain} does not accept mail (null MX)", "5.1.10")
        by_pref: dict[int, list[str]] = {}
        seen: set[str] = set()
        invalid: list[str] = []
        for p, x in sorted(real, key=lambda r: r[0]):
            name = host_name(x.to_text(omit_final_dot=True))
            if name is None or _is_ip(name):
                # RFC 1035 §3.3.9, RFC 5321 §5.1: an MX names a host. An IP address written as a name
                # is not looked up as one (Postfix and Exim refuse it too), nor is a name with escapes.
                invalid.append(x.to_text(omit_final_dot=True)[:100])
            elif name not in seen:  # a host listed again at a worse preference is tried once
                seen.add(name)
                by_pref.setdefault(p, []).append(name)
        if not by_pref:
            raise DnsTemporaryError(f"No MX record of {domain} names a host ({invalid[0]})", "4.4.3")
        ordered: list[tuple[int, str]] = []
        for p in sorted(by_pref):
            names = by_pref[p]
            random.shuffle(names)
            ordered.extend((p, n) for n in names)
        del ordered[MAX_MX_HOSTS:]

        results = await asyncio.gather(*(self._addresses(n, family=family) for _, n in ordered),
                                       return_exceptions=True)
        hosts = [MxHost(n, order_addresses(r, family), p, port) for (p, n), r in zip(ordered, results, strict=True)
                 if isinstance(r, tuple) and order_addresses(r, family)]
        if not hosts:
            which = "address" if family == "any" else f"{family} address (delivery.ip_family)"
            raise DnsTemporaryError(f"No {which} for any MX host of {domain} "
                                    f"({', '.join(n for _, n in ordered)})", "4.4.3")
        if family.startswith("prefer-"):
            # Across hosts too: every preferred-family address before any other (Postfix
            # smtp_address_preference orders within each MX preference; a stricter order suits
            # receivers that treat IPv6 senders differently).
            return _prefer_across(hosts, family)
        return hosts

    async def resolve_host(self, host: str, port: int, family: IpFamily = "any") -> list[MxHost]:
        """A route's fixed host (name or IP literal); unresolvable is temporary (operator's config)."""
        if _is_ip(host):
            return [MxHost(host, (host,), 0, port)]
        try:
            addrs = order_addresses(await self._addresses(host, family=family), family)
        except DnsPermanentError as e:
            raise DnsTemporaryError(str(e), "4.4.3") from None
        if not addrs:
            raise DnsTemporaryError(f"No address for route host {host}", "4.4.3")
        return [MxHost(host, addrs, 0, port)]

    async def _addresses(self, name: str, *, permanent_if_none: bool = False, family: IpFamily = "any"
                         ) -> tuple[str, ...]:
        """AAAA then A addresses of ``name``; only the family asked for when restricted."""
        if _is_ip(name):
            return (name,)
        types = ("A",) if family == "ipv4" else ("AAAA",) if family == "ipv6" else ("AAAA", "A")
        res = await asyncio.gather(*(self._lookup(name, t) for t in types), return_exceptions=True)
        addrs: list[str] = []
        errors: list[BaseException] = []
        for r in res:
            if isinstance(r, BaseException):
                errors.append(r)
            else:
                addrs.extend(r)
        if addrs:
            return tuple(addrs)
        if errors and all(isinstance(e, DnsPermanentError) for e in errors):
            raise errors[0]
        for e in errors:
            if isinstance(e, DnsTemporaryError):
                raise e
        if permanent_if_none:  # the name exists but has no MX, A or AAAA
            raise DnsPermanentError(f"Host or domain name not found: {name}: no MX, A or AAAA record", "5.1.2")
        return ()

    async def _lookup(self, name: str, rtype: str) -> list[str]:
        try:
            answer = await self.resolver.resolve(name + ".", rtype, search=False)
        except dns.resolver.NXDOMAIN:
            metrics.DNS_FAILURES.labels(rtype, "nxdomain").inc()
            raise DnsPermanentError(f"Host or domain name not found: {name}: NXDOMAIN", "5.1.2") from None
        except dns.resolver.NoAnswer:
            return []
        except dns.exception.DNSException as e:
            raise self._temporary(rtype, name, e) from None
        return [r.address for r in answer]

    @staticmethod
    def _temporary(rtype: str, name: str, e: dns.exception.DNSException) -> DnsTemporaryError:
        if isinstance(e, dns.exception.Timeout):
            reason, text = "timeout", "timed out"
        elif isinstance(e, dns.resolver.NoNameservers):
            reason, text = "servfail", "SERVFAIL or no nameserver answered"
        else:
            reason, text = "error", type(e).__name__
        metrics.DNS_FAILURES.labels(rtype, reason).inc()
        return DnsTemporaryError(f"DNS lookup of {name} {rtype} failed: {text}", "4.4.3")


def order_addresses(addrs: tuple[str, ...], family: IpFamily) -> tuple[str, ...]:
    """Filter and order one host's addresses for ``[delivery] ip_family``: "ipv4"/"ipv6" keep one
    family, "prefer-*" put that family first, "any" keeps the resolver's order (AAAA first)."""
    if family == "any":
        return addrs
    v6 = tuple(a for a in addrs if ":" in a)
    v4 = tuple(a for a in addrs if ":" not in a)
    return {"ipv4": v4, "ipv6": v6, "prefer-ipv4": v4 + v6, "prefer-ipv6": v6 + v4}.get(family, addrs)


def _prefer_across(hosts: list[MxHost], family: IpFamily) -> list[MxHost]:
    """Every host's preferred-family addresses (in MX order), then the others: a backup MX over
    IPv4 is tried before the primary over IPv6 with prefer-ipv4."""
    want6 = family == "prefer-ipv6"
    first = [MxHost(h.name, tuple(a for a in h.addresses if (":" in a) == want6), h.preference, h.port)
             for h in hosts]
    second = [MxHost(h.name, tuple(a for a in h.addresses if (":" in a) != want6), h.preference, h.port)
              for h in hosts]
    return [h for h in first + second if h.addresses]
