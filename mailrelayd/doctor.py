"""``mailrelayd doctor``: check a sending domain's DNS and the relay's own set-up.

Checks, each a :class:`CheckResult` with a status ``ok``, ``warn``, ``fail`` or ``error``:

``mx``
    MX records exist and their hosts have addresses, or (no MX) the domain has A/AAAA records
    (the implicit MX, RFC 5321 §5.1). A null MX (RFC 7505) is a ``warn``: the domain sends, but
    bounces and replies to it cannot come back. NXDOMAIN or no MX and no address is a ``fail``.
``spf``
    Exactly one ``v=spf1`` TXT record (RFC 7208 §4.5). With ``--ip``, the record is evaluated for
    that address (a subset of RFC 7208 §4-§7: ip4, ip6, a, mx, include, exists, ptr (never
    matches), redirect, qualifiers, macros, the 10-lookup and 2-void-lookup limits); anything
    but ``pass`` is a ``fail``. ``+all`` (or a bare ``all``) is a ``warn``.
``dkim``
    One result per configured ``[[dkim]]`` key of the domain (or only ``--selector``): the TXT
    record at ``<selector>._domainkey.<domain>`` publishes that key
    (:func:`mailrelayd.dkim.check_published`). No key configured for the domain is a ``warn``
    (mail leaves unsigned); a ``--selector`` with no configured key is a ``fail``.
``dmarc``
    One ``v=DMARC1`` TXT record at ``_dmarc.<domain>`` (falling back to the parent domain's, as a
    receiver would for a subdomain), with a valid policy: ``p=none`` is a ``warn``, ``quarantine``
    and ``reject`` are ``ok``; missing is a ``fail``.
``tls``
    The certificate is readable, matches the key, is valid now and does not expire within
    :data:`CERT_WARN_DAYS` days (``warn``; expired or not yet valid is a ``fail``); a certificate
    that does not name ``server.hostname`` is a ``warn``.
``spool``
    ``server.spool_dir`` is writable (a temporary file is created, synced and removed) and has at
    least ``server.min_free_space`` free.
``hostname``
    ``server.hostname`` (the EHLO name) has A/AAAA records; with ``--ip``, a ``warn`` if none of
    them is that address.
``mta-sts``
    Your own inbound MTA-STS (RFC 8461): ``_mta-sts.<domain>`` TXT with a valid id, the policy served
    at ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (fetched through ``[dns]`` and checked
    against ``delivery.ca_file``), every MX host listed. None published is a ``warn`` that prints what
    to publish; mode ``testing``/``none`` is a ``warn``; an unusable policy or an unlisted MX a ``fail``.
``tls-rpt``
    Your own ``_smtp._tls.<domain>`` TXT (RFC 8460) with a ``mailto:``/``https:`` rua; none is a
    ``warn`` with the record to publish.

``error`` means the check could not be made: a DNS timeout, SERVFAIL or refused answer, or an
unreadable config (reported as a ``config`` check).

Exit status (:func:`exit_code`): 1 if any check is ``fail``; otherwise 2 if any is ``error``;
otherwise 0. Warnings are printed but do not change the exit status (a certificate expiring in
10 days exits 0 with a ``WARN tls`` line); scripts that care read ``--format json``.

Text output is one line per check (``OK   mx        10 mx1.example.com``), continuation lines
indented; JSON is ``{"domain": ..., "checks": [{"name", "status", "detail"}], "exit": n}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from mailrelayd.config import Config, ConfigError, DnsConfig, load_config

# Imported here, not inside the checks: importing aiohttp on the event loop would stall the
# concurrent DNS lookups past short timeouts.
from mailrelayd.delivery import mta_sts
from mailrelayd.delivery.outbound_tls import client_context
from mailrelayd.delivery.tlsrpt import parse_rua

__all__ = [
    "CERT_WARN_DAYS",
    "CheckResult",
    "Status",
    "diagnose",
    "exit_code",
    "format_json",
    "format_text",
    "run_doctor",
]

Status = Literal["ok", "warn", "fail", "error"]

#: A certificate expiring sooner than this is a warning.
CERT_WARN_DAYS = 21

#: RFC 7208 §4.6.4: at most 10 terms that cause DNS lookups, and at most 2 void lookups.
SPF_LOOKUP_LIMIT = 10
SPF_VOID_LIMIT = 2

_LABELS = {"ok": "OK", "warn": "WARN", "fail": "FAIL", "error": "ERROR"}


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str


def exit_code(results: Sequence[CheckResult]) -> int:
    """1 if anything failed, else 2 if anything could not be checked, else 0 (warnings pass)."""
    statuses = {r.status for r in results}
    if "fail" in statuses:
        return 1
    if "error" in statuses:
        return 2
    return 0


# --- DNS helpers ------------------------------------------------------------------------
class _DnsUnavailable(Exception):
    """No usable answer: timeout, SERVFAIL, REFUSED, unreachable nameservers."""


def _make_resolver(cfg: DnsConfig) -> dns.asyncresolver.Resolver:
    """The delivery code's resolver for ``[dns]`` when available, else an equivalent one."""
    try:
        from mailrelayd.delivery.mx import make_resolver
    except ImportError:  # pragma: no cover - only while delivery/mx.py is being written
        pass
    else:
        return make_resolver(cfg)
    if cfg.nameservers:  # pragma: no cover
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in cfg.nameservers]
    else:  # pragma: no cover
        r = dns.asyncresolver.Resolver()
    r.lifetime = cfg.timeout  # pragma: no cover
    r.timeout = min(cfg.timeout, 5.0)  # pragma: no cover
    r.cache = dns.resolver.LRUCache(1000)  # pragma: no cover
    return r  # pragma: no cover


def _fqdn(name: str) -> str:
    return name.rstrip(".") + "."


def _describe(exc: BaseException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "DNS timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no nameserver gave an answer (SERVFAIL or REFUSED)"
    return f"DNS lookup failed ({exc.__class__.__name__}: {exc})"


async def _query(resolver: dns.asyncresolver.Resolver, name: str, rtype: str) -> tuple[bool, list[Any]]:
    """(name exists, records). NXDOMAIN is (False, []), NODATA (True, []); every other failure
    raises :class:`_DnsUnavailable` naming the query and the cause."""
    try:
        answer = await resolver.resolve(_fqdn(name), rtype, search=False)
    except dns.resolver.NXDOMAIN:
        return False, []
    except dns.resolver.NoAnswer:
        return True, []
    except (dns.exception.DNSException, OSError) as e:
        raise _DnsUnavailable(f"{_fqdn(name)} {rtype}: {_describe(e)}") from None
    return True, list(answer)


def _txt_strings(records: Sequence[Any]) -> list[str]:
    return [b"".join(r.strings).decode("utf-8", "replace") for r in records]


async def _addresses(resolver: dns.asyncresolver.Resolver, name: str) -> tuple[bool, list[str]]:
    """A and AAAA of ``name``: (name exists, addresses)."""
    (exists4, a), (exists6, aaaa) = await asyncio.gather(_query(resolver, name, "A"), _query(resolver, name, "AAAA"))
    return exists4 or exists6, [r.address for r in a] + [r.address for r in aaaa]


def _normalize(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    if not domain.isascii():
        with contextlib.suppress(UnicodeError):
            domain = domain.encode("idna").decode("ascii")
    return domain


# --- mx ---------------------------------------------------------------------------------
async def check_mx(resolver: dns.asyncresolver.Resolver, domain: str) -> CheckResult:
    try:
        exists, records = await _query(resolver, domain, "MX")
        if not exists:
            return CheckResult("mx", "fail", f"{domain} does not exist (NXDOMAIN): nothing can be sent from it")
        mxs = sorted((r.preference, r.exchange.to_text(omit_final_dot=True)) for r in records)
        if len(mxs) == 1 and mxs[0][1] in ("", "."):
            return CheckResult("mx", "warn", f"0 . (null MX, RFC 7505): {domain} accepts no mail, so bounces "
                               "and replies to its addresses cannot be delivered")
        if not mxs:
            _, addrs = await _addresses(resolver, domain)
            if addrs:
                return CheckResult("mx", "ok", f"no MX record; implicit MX {domain} ({', '.join(addrs)}), "
                                   "RFC 5321 §5.1")
            return CheckResult("mx", "fail", f"no MX record and no A/AAAA for {domain}: bounces to it cannot "
                               "be delivered")
        looked = await asyncio.gather(*(_addresses(resolver, host) for _, host in mxs))
    except _DnsUnavailable as e:
        return CheckResult("mx", "error", f"cannot check: {e}")
    hosts = ", ".join(f"{pref} {host}" for pref, host in mxs)
    bare = [host for (_, host), (_, addrs) in zip(mxs, looked, strict=True) if not addrs]
    if len(bare) == len(mxs):
        return CheckResult("mx", "fail", f"{hosts}: no MX host has an A/AAAA record")
    if bare:
        return CheckResult("mx", "warn", f"{hosts}: no A/AAAA record for {', '.join(bare)}")
    return CheckResult("mx", "ok", hosts)


# --- spf --------------------------------------------------------------------------------
class _SpfError(Exception):
    """Ends evaluation with ``result`` ("permerror" or "temperror")."""

    def __init__(self, result: str, why: str) -> None:
        super().__init__(why)
        self.result = result


_SPF_VERSION = re.compile(r"^v=spf1(\s|$)", re.IGNORECASE)
_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MACRO = re.compile(r"%\{([slodiphcrtv])(\d*)(r?)([.\-+,/_=]*)\}|%%|%_|%-|%", re.IGNORECASE)
_DUAL_CIDR = re.compile(r"^(.*?)(?:/(\d+))?(?://(\d+))?$")


def _spf_records(texts: Sequence[str]) -> list[str]:
    return [t for t in texts if _SPF_VERSION.match(t)]


class _SpfEvaluator:
    """check_host() (RFC 7208 §4) for one IP, sender ``postmaster@<domain>``."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                 helo: str) -> None:
        self.resolver = resolver
        self.ip = ip
        self.helo = helo
        self.lookups = 0
        self.voids = 0

    # DNS, counted
    def _count(self) -> None:
        self.lookups += 1
        if self.lookups > SPF_LOOKUP_LIMIT:
            raise _SpfError("permerror", f"more than {SPF_LOOKUP_LIMIT} DNS-querying terms (RFC 7208 §4.6.4)")

    async def _lookup(self, name: str, rtype: str) -> list[Any]:
        try:
            _, records = await _query(self.resolver, name, rtype)
        except _DnsUnavailable as e:
            raise _SpfError("temperror", str(e)) from None
        return records

    async def _lookup_counting_void(self, name: str, rtype: str) -> list[Any]:
        records = await self._lookup(name, rtype)
        if not records:
            self.voids += 1
            if self.voids > SPF_VOID_LIMIT:
                raise _SpfError("permerror", f"more than {SPF_VOID_LIMIT} void lookups (RFC 7208 §4.6.4)")
        return records

    async def _ips_of(self, name: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        rtype = "A" if self.ip.version == 4 else "AAAA"
        return [ipaddress.ip_address(r.address) for r in await self._lookup_counting_void(name, rtype)]

    # macros (RFC 7208 §7)
    def _expand(self, spec: str, domain: str) -> str:
        sender_local, sender_domain = "postmaster", domain
        ip_text = str(self.ip) if self.ip.version == 4 else ".".join(self.ip.exploded.replace(":", ""))

        def sub(m: re.Match[str]) -> str:
            whole = m.group(0)
            if whole == "%%":
                return "%"
            if whole == "%_":
                return " "
            if whole == "%-":
                return "%20"
            if whole == "%":
                raise _SpfError("permerror", f"bad macro in {spec!r}")
            letter, digits, reverse, delims = m.group(1), m.group(2), m.group(3), m.group(4)
            values = {"s": f"{sender_local}@{sender_domain}", "l": sender_local, "o": sender_domain,
                      "d": domain, "i": ip_text, "p": "unknown", "v": "in-addr" if self.ip.version == 4 else "ip6",
                      "h": self.helo, "c": str(self.ip), "r": "unknown", "t": str(int(dt.datetime.now().timestamp()))}
            value = values[letter.lower()]
            parts = re.split("[" + re.escape(delims or ".") + "]", value)
            if reverse:
                parts.reverse()
            if digits:
                n = int(digits)
                if n == 0:
                    raise _SpfError("permerror", f"bad macro {whole!r}")
                parts = parts[-n:]
            out = ".".join(parts)
            return urllib.parse.quote(out, safe="") if letter.isupper() else out

        return _MACRO.sub(sub, spec)

    def _target(self, arg: str | None, domain: str) -> str:
        if not arg:
            return domain
        name = self._expand(arg, domain).rstrip(".")
        # RFC 7208 §7.3: shorten from the left to 253 characters.
        while len(name) > 253 and "." in name:
            name = name.split(".", 1)[1]
        return name

    def _cidr(self, arg: str, domain: str) -> tuple[str, int, int]:
        m = _DUAL_CIDR.match(arg)
        assert m is not None
        name, c4, c6 = m.group(1), m.group(2), m.group(3)
        v4 = int(c4) if c4 else 32
        v6 = int(c6) if c6 else 128
        if v4 > 32 or v6 > 128:
            raise _SpfError("permerror", f"bad prefix length in {arg!r}")
        return self._target(name or None, domain), v4, v6

    def _in(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, v4: int, v6: int) -> bool:
        if addr.version != self.ip.version:
            return False
        prefix = v4 if addr.version == 4 else v6
        return self.ip in ipaddress.ip_network(f"{addr}/{prefix}", strict=False)

    async def record(self, domain: str) -> str | None:
        """The single SPF record of ``domain``; None if it has none."""
        records = _spf_records(_txt_strings(await self._lookup(domain, "TXT")))
        if len(records) > 1:
            raise _SpfError("permerror", f"{domain} has {len(records)} SPF records (RFC 7208 §4.5)")
        return records[0] if records else None

    async def check_host(self, domain: str) -> tuple[str, str]:
        """(result, how): result is pass/fail/softfail/neutral/none/permerror/temperror."""
        try:
            return await self._check(domain)
        except _SpfError as e:
            return e.result, str(e)

    async def _check(self, domain: str) -> tuple[str, str]:
        record = await self.record(domain)
        if record is None:
            return "none", f"{domain} has no SPF record"
        terms = record.split()[1:]
        redirect: str | None = None
        for term in terms:
            name, eq, value = term.partition("=")
            if eq and re.match(r"^[A-Za-z][A-Za-z0-9_.-]*$", name):
                if name.lower() == "redirect":
                    if redirect is not None:
                        raise _SpfError("permerror", f"{domain}: two redirect= modifiers")
                    redirect = value
                continue  # exp= and unknown modifiers are ignored (RFC 7208 §6)
            qualifier = "+"
            if term[0] in _QUALIFIERS:
                qualifier, term = term[0], term[1:]
            m = re.match(r"^([A-Za-z0-9]+)(?::(.*)|(/.*))?$", term)
            if m is None:
                raise _SpfError("permerror", f"{domain}: bad term {term!r}")
            mech = m.group(1).lower()
            arg = m.group(2) if m.group(2) is not None else m.group(3)
            if await self._matches(mech, arg, domain):
                how = f"{qualifier if qualifier != '+' else ''}{term} in {domain}"
                return _QUALIFIERS[qualifier], how
        if redirect is not None:
            self._count()
            target = self._target(redirect, domain)
            result, how = await self._check_redirect(target)
            return result, f"redirect={target}: {how}"
        return "neutral", f"no mechanism of {domain} matched (default ?all)"

    async def _check_redirect(self, target: str) -> tuple[str, str]:
        result, how = await self._check(target)
        if result == "none":
            raise _SpfError("permerror", f"redirect target {target} has no SPF record")
        return result, how

    async def _matches(self, mech: str, arg: str | None, domain: str) -> bool:
        if mech == "all":
            return True
        if mech in ("ip4", "ip6"):
            if not arg:
                raise _SpfError("permerror", f"{domain}: {mech} needs an address")
            try:
                net = ipaddress.ip_network(arg, strict=False)
            except ValueError:
                raise _SpfError("permerror", f"{domain}: bad {mech}:{arg}") from None
            if net.version != (4 if mech == "ip4" else 6):
                raise _SpfError("permerror", f"{domain}: {mech}:{arg} is the wrong address family")
            return net.version == self.ip.version and self.ip in net
        if mech == "include":
            if not arg:
                raise _SpfError("permerror", f"{domain}: include needs a domain")
            self._count()
            target = self._target(arg, domain)
            result, how = await self._check(target)
            if result == "pass":
                return True
            if result in ("fail", "softfail", "neutral"):
                return False
            if result == "none":
                raise _SpfError("permerror", f"include:{target} has no SPF record")
            raise _SpfError(result, how)
        if mech == "a":
            self._count()
            target, v4, v6 = self._cidr(arg or "", domain)
            return any(self._in(a, v4, v6) for a in await self._ips_of(target))
        if mech == "mx":
            self._count()
            target, v4, v6 = self._cidr(arg or "", domain)
            mxs = await self._lookup_counting_void(target, "MX")
            if len(mxs) > 10:
                raise _SpfError("permerror", f"{target} has more than 10 MX records (RFC 7208 §4.6.4)")
            for mx in mxs:
                host = mx.exchange.to_text(omit_final_dot=True)
                if host and any(self._in(a, v4, v6) for a in await self._ips_of(host)):
                    return True
            return False
        if mech == "exists":
            if not arg:
                raise _SpfError("permerror", f"{domain}: exists needs a domain")
            self._count()
            return bool(await self._lookup_counting_void(self._target(arg, domain), "A"))
        if mech == "ptr":
            # Deprecated (RFC 7208 §5.5); we count the lookup but never treat it as a match.
            self._count()
            return False
        raise _SpfError("permerror", f"{domain}: unknown mechanism {mech!r}")


def _allows_everything(record: str) -> bool:
    return any(t.lower() in ("all", "+all") for t in record.split()[1:])


async def check_spf(resolver: dns.asyncresolver.Resolver, domain: str,
                    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, helo: str) -> CheckResult:
    try:
        exists, records = await _query(resolver, domain, "TXT")
    except _DnsUnavailable as e:
        return CheckResult("spf", "error", f"cannot check: {e}")
    if not exists:
        return CheckResult("spf", "fail", f"{domain} does not exist (NXDOMAIN)")
    spf = _spf_records(_txt_strings(records))
    if not spf:
        return CheckResult("spf", "fail", f"no v=spf1 TXT record at {domain}")
    if len(spf) > 1:
        return CheckResult("spf", "fail", f"{len(spf)} v=spf1 TXT records at {domain}; publish exactly one "
                           "(RFC 7208 §4.5: permerror): " + " | ".join(spf))
    record = spf[0]
    warn_all = _allows_everything(record)
    if ip is None:
        if warn_all:
            return CheckResult("spf", "warn", f"{record}  (+all authorizes every host on the Internet)")
        return CheckResult("spf", "ok", f"{record}  (pass --ip to check this relay's address)")
    result, how = await _SpfEvaluator(resolver, ip, helo).check_host(domain)
    if result == "temperror":
        return CheckResult("spf", "error", f"cannot evaluate for {ip}: {how}")
    if result != "pass":
        return CheckResult("spf", "fail", f"{ip} is not authorized: {result} ({how}); record: {record}")
    if warn_all:
        return CheckResult("spf", "warn", f"{ip} passes ({how}), but +all authorizes every host: {record}")
    return CheckResult("spf", "ok", f"{ip} passes via {how}: {record}")


# --- dkim -------------------------------------------------------------------------------
async def check_dkim(resolver: dns.asyncresolver.Resolver, cfg: Config, domain: str,
                     selector: str | None) -> list[CheckResult]:
    from mailrelayd.dkim import DkimKeyError, DkimKeySpec, check_published, load_key

    want = selector.strip().lower() if selector else None
    entries = [d for d in cfg.dkim if _normalize(d.domain) == domain
               and (want is None or d.selector.lower() == want)]
    note = ""
    if not entries and want is None and cfg.signing.parent_domains:
        # Mail from a subdomain is signed with the closest parent's key (signing.parent_domains).
        parent = domain
        while not entries and "." in parent:
            parent = parent.split(".", 1)[1]
            entries = [d for d in cfg.dkim if _normalize(d.domain) == parent]
        if entries:
            note = f" (mail from {domain} is signed with d={parent})"
    if not entries:
        if want is not None:
            return [CheckResult("dkim", "fail", f"no [[dkim]] key with selector {want!r} is configured for {domain}")]
        return [CheckResult("dkim", "warn", f"no [[dkim]] key is configured for {domain}: its mail leaves "
                            "unsigned (add one with `mailrelayd dkim keygen`)")]
    results = []
    for entry in entries:
        spec = DkimKeySpec(entry.domain, entry.selector, entry.key_file, entry.algorithm)
        try:
            key = load_key(spec)
        except DkimKeyError as e:
            results.append(CheckResult("dkim", "fail", f"{entry.selector}: {e}"))
            continue
        name = f"{key.selector}._domainkey.{_normalize(key.domain)}"
        try:
            # Classify DNS failures ourselves (check_published folds them into "not ok");
            # the resolver's cache answers check_published's own query.
            await _query(resolver, name, "TXT")
        except _DnsUnavailable as e:
            results.append(CheckResult("dkim", "error", f"cannot check: {e}"))
            continue
        ok, detail = await check_published(key.domain, key.selector, key, resolver)
        results.append(CheckResult("dkim", "ok" if ok else "fail", detail + (note if ok else "")))
    return results


# --- dmarc ------------------------------------------------------------------------------
def _dmarc_tags(record: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in record.split(";"):
        k, eq, v = part.partition("=")
        if eq and k.strip():
            tags.setdefault(k.strip().lower(), v.strip())
    return tags


async def check_dmarc(resolver: dns.asyncresolver.Resolver, domain: str) -> CheckResult:
    candidates = [domain]
    labels = domain.split(".")
    if len(labels) > 2:
        # No public suffix list here: the registrable domain is approximated by the last two labels.
        candidates.append(".".join(labels[-2:]))
    try:
        for where in candidates:
            _, records = await _query(resolver, f"_dmarc.{where}", "TXT")
            dmarc = [t for t in _txt_strings(records) if re.match(r"^v\s*=\s*DMARC1\s*(;|$)", t)]
            if dmarc:
                break
    except _DnsUnavailable as e:
        return CheckResult("dmarc", "error", f"cannot check: {e}")
    if not dmarc:
        return CheckResult("dmarc", "fail", f"no v=DMARC1 TXT record at _dmarc.{domain}; publish e.g. "
                           f'_dmarc.{domain}. IN TXT "v=DMARC1; p=quarantine; rua=mailto:dmarc@{domain}"')
    if len(dmarc) > 1:
        return CheckResult("dmarc", "fail", f"{len(dmarc)} DMARC records at _dmarc.{where}; receivers ignore "
                           "them all (RFC 7489 §6.6.3)")
    record = dmarc[0]
    tags = _dmarc_tags(record)
    inherited = where != domain
    policy = (tags.get("sp") or tags.get("p")) if inherited else tags.get("p")
    source = f"_dmarc.{where}" + (" (organizational domain; sp= applies)" if inherited else "")
    if policy is None:
        return CheckResult("dmarc", "fail", f"{source}: no p= tag: {record}")
    policy = policy.lower()
    if policy not in ("none", "quarantine", "reject"):
        return CheckResult("dmarc", "fail", f"{source}: invalid policy p={policy}: {record}")
    extra = ""
    if tags.get("pct", "100") != "100":
        extra += f", applied to pct={tags['pct']}% of failing mail"
    if "rua" not in tags:
        extra += ", no rua= (no aggregate reports)"
    if policy == "none":
        return CheckResult("dmarc", "warn", f"p=none (monitoring only: failing mail is still delivered){extra}; "
                           f"{source}: {record}")
    return CheckResult("dmarc", "ok", f"p={policy}{extra}; {source}")


# --- the relay's own set-up -------------------------------------------------------------
def _name_matches(hostname: str, pattern: str) -> bool:
    hostname, pattern = hostname.lower().rstrip("."), pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = hostname.partition(".")
        return bool(head) and rest == pattern[2:]
    return hostname == pattern


def check_tls(cfg: Config, now: dt.datetime | None = None) -> CheckResult:
    from cryptography import x509

    from mailrelayd.tlsctx import TlsSetupError, read_cert_info, server_context

    cert_file, key_file = cfg.tls.cert_file, cfg.tls.key_file
    if cert_file is None:
        if any(lst.tls != "none" for lst in cfg.listeners):  # pragma: no cover - the config loader refuses this
            return CheckResult("tls", "fail", "a listener uses TLS but [tls] cert_file is not set")
        return CheckResult("tls", "ok", "no certificate configured (no listener uses TLS)")
    try:
        info = read_cert_info(cert_file)
        not_before = x509.load_pem_x509_certificates(cert_file.read_bytes())[0].not_valid_before_utc
        if key_file is not None:
            server_context(cert_file, key_file)  # the key matches, the chain loads
    except OSError as e:
        return CheckResult("tls", "fail", f"{cert_file}: cannot read: {e.strerror or e}")
    except (TlsSetupError, ValueError) as e:
        return CheckResult("tls", "fail", str(e))
    now = now or dt.datetime.now(dt.UTC)
    not_after = dt.datetime.fromtimestamp(info.not_after, dt.UTC)
    days = (not_after - now).total_seconds() / 86400
    when = not_after.strftime("%Y-%m-%d %H:%M UTC")
    if days <= 0:
        return CheckResult("tls", "fail", f"{cert_file}: expired on {when}")
    if not_before > now:
        return CheckResult("tls", "fail", f"{cert_file}: not valid before {not_before:%Y-%m-%d %H:%M} UTC")
    desc = f"{info.subject}, expires {when} ({int(days)} days)"
    if days < CERT_WARN_DAYS:
        return CheckResult("tls", "warn", f"{cert_file}: expires in {days:.1f} days (less than {CERT_WARN_DAYS}): "
                           f"renew it; {desc}")
    host = cfg.server.hostname
    if info.dns_names and not any(_name_matches(host, n) for n in info.dns_names):
        return CheckResult("tls", "warn", f"{cert_file}: does not name server.hostname {host} "
                           f"(names: {', '.join(info.dns_names)}); {desc}")
    return CheckResult("tls", "ok", desc)


def check_spool(cfg: Config) -> CheckResult:
    spool = cfg.server.spool_dir
    target = spool
    if not spool.exists():
        # The daemon creates it on start: check the closest existing parent instead.
        target = next((p for p in spool.parents if p.exists()), Path("/"))
    if not target.is_dir():
        return CheckResult("spool", "fail", f"{target} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".doctor.", dir=target)
        try:
            os.write(fd, b"mailrelayd doctor\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        return CheckResult("spool", "fail", f"{target} is not writable by uid {os.getuid()}: {e.strerror or e}")
    free = shutil.disk_usage(target).free
    need = cfg.server.min_free_space
    if target == spool:
        from mailrelayd.spool.store import spool_size_on_disk

        where = f"{spool} writable, spool database {spool_size_on_disk(spool) // 2**20} MB"
    else:
        where = f"{spool} not created yet (the daemon creates it); {target} writable"
    if free < need:
        return CheckResult("spool", "fail", f"{where}, but {free // 2**20} MB free is below server.min_free_space "
                           f"({need // 2**20} MB): new mail is refused")
    return CheckResult("spool", "ok", f"{where}, {free // 2**20} MB free")


async def check_hostname(resolver: dns.asyncresolver.Resolver, cfg: Config,
                         ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> CheckResult:
    host = _normalize(cfg.server.hostname)
    try:
        exists, addrs = await _addresses(resolver, host)
    except _DnsUnavailable as e:
        return CheckResult("hostname", "error", f"cannot check: {e}")
    if not addrs:
        why = "does not exist (NXDOMAIN)" if not exists else "has no A/AAAA record"
        return CheckResult("hostname", "fail", f"server.hostname {host} {why}: receivers distrust an EHLO name "
                           "that does not resolve")
    if ip is not None and not any(ipaddress.ip_address(a) == ip for a in addrs):
        return CheckResult("hostname", "warn", f"{host} -> {', '.join(addrs)}, not {ip} (this relay's address)")
    return CheckResult("hostname", "ok", f"{host} -> {', '.join(addrs)}")


# --- running ----------------------------------------------------------------------------
# --- inbound MTA-STS and TLS-RPT (RFC 8461, RFC 8460) --------------------------------------
def _sts_suggestion(domain: str, mx_hosts: Sequence[str]) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
    mx_lines = "\n".join(f"  mx: {h}" for h in mx_hosts) or f"  mx: <each MX host of {domain}>"
    return (f"publish:\n  _mta-sts.{domain}. TXT \"v=STSv1; id={stamp}\"\n"
            f"and serve https://mta-sts.{domain}/.well-known/mta-sts.txt (text/plain, valid certificate):\n"
            f"  version: STSv1\n  mode: testing\n{mx_lines}\n  max_age: 604800\n"
            "(switch to mode: enforce, and change the id, once TLS-RPT reports show no failures)")


async def _mx_hosts(resolver: dns.asyncresolver.Resolver, domain: str) -> list[str]:
    try:
        _, records = await _query(resolver, domain, "MX")
    except _DnsUnavailable:
        return []
    return sorted({r.exchange.to_text(omit_final_dot=True).lower() for r in records if r.exchange.to_text() != "."})


async def check_mta_sts(resolver: dns.asyncresolver.Resolver, cfg: Config, domain: str) -> CheckResult:
    """Our own inbound MTA-STS: a valid TXT id, a fetchable policy, and every MX listed in it."""
    try:
        _, records = await _query(resolver, f"_mta-sts.{domain}", "TXT")
    except _DnsUnavailable as e:
        return CheckResult("mta-sts", "error", str(e))
    texts = _txt_strings(records)
    mx_hosts = await _mx_hosts(resolver, domain)
    if not any(t.startswith("v=STSv1") for t in texts):
        return CheckResult("mta-sts", "warn", f"no MTA-STS policy: senders may deliver to {domain} without "
                           f"authenticated TLS; {_sts_suggestion(domain, mx_hosts)}")
    pid = mta_sts.parse_txt(texts)
    if pid is None:
        return CheckResult("mta-sts", "fail", f"_mta-sts.{domain} TXT is not one valid \"v=STSv1; id=...\" record "
                           f"(id: 1-32 letters and digits): {texts}")
    try:
        policy = await mta_sts.fetch_policy(domain, resolver, client_context(True, cfg.delivery.ca_file), 20.0)
    except mta_sts.FetchError as e:
        return CheckResult("mta-sts", "fail", f"TXT id={pid}, but the policy cannot be used: {e}")
    unlisted = [h for h in mx_hosts if not mta_sts.host_allowed(policy, h)]
    if unlisted and policy.mode != "none":
        return CheckResult("mta-sts", "fail", f"policy (mode {policy.mode}) does not list MX host(s) "
                           f"{', '.join(unlisted)}: senders that enforce it will not deliver there; add mx: lines")
    if policy.mode != "enforce":
        return CheckResult("mta-sts", "warn", f"policy id={pid} mode={policy.mode} (reporting only); set mode: "
                           "enforce once TLS-RPT reports are clean")
    return CheckResult("mta-sts", "ok", f"policy id={pid} mode=enforce mx={', '.join(policy.mx)} "
                       f"max_age={policy.max_age}")


async def check_tls_rpt(resolver: dns.asyncresolver.Resolver, domain: str) -> CheckResult:
    """Our own TLS-RPT record: where senders report TLS failures on the way to us (RFC 8460 §3)."""
    try:
        _, records = await _query(resolver, f"_smtp._tls.{domain}", "TXT")
    except _DnsUnavailable as e:
        return CheckResult("tls-rpt", "error", str(e))
    texts = _txt_strings(records)
    ruas = parse_rua(texts)
    if ruas:
        return CheckResult("tls-rpt", "ok", "reports go to " + ", ".join(ruas))
    if any(t.startswith("v=TLSRPTv1") for t in texts):
        return CheckResult("tls-rpt", "fail", f"_smtp._tls.{domain} TXT has no usable rua (mailto: or https:), "
                           f"or there is more than one record: {texts}")
    return CheckResult("tls-rpt", "warn", f"no TLS-RPT record: you will not hear about TLS failures delivering to "
                       f"{domain}; publish:\n  _smtp._tls.{domain}. TXT \"v=TLSRPTv1; rua=mailto:tlsrpt@{domain}\"")


async def diagnose(cfg: Config, domain: str, *, selector: str | None = None,
                   ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
                   resolver: dns.asyncresolver.Resolver | None = None) -> list[CheckResult]:
    """Run every check (DNS lookups concurrently); results in a fixed order."""
    domain = _normalize(domain)
    resolver = resolver or _make_resolver(cfg.dns)
    helo = _normalize(cfg.server.hostname)
    mx, spf, dkim, dmarc, hostname, sts, rpt = await asyncio.gather(
        check_mx(resolver, domain),
        check_spf(resolver, domain, ip, helo),
        check_dkim(resolver, cfg, domain, selector),
        check_dmarc(resolver, domain),
        check_hostname(resolver, cfg, ip),
        check_mta_sts(resolver, cfg, domain),
        check_tls_rpt(resolver, domain),
    )
    return [mx, spf, *dkim, dmarc, check_tls(cfg), check_spool(cfg), hostname, sts, rpt]


def format_text(domain: str, results: Sequence[CheckResult], code: int) -> str:
    width = max((len(r.name) for r in results), default=0)
    lines = []
    for r in results:
        first, *rest = r.detail.splitlines() or [""]
        lines.append(f"{_LABELS[r.status]:<5} {r.name:<{width}}  {first}")
        lines.extend(" " * (width + 8) + line for line in rest)
    counts = {s: sum(r.status == s for r in results) for s in _LABELS}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines.append(f"-- {domain}: {summary or 'no checks'}; exit {code}")
    return "\n".join(lines)


def format_json(domain: str, results: Sequence[CheckResult], code: int) -> str:
    return json.dumps({"domain": domain, "checks": [asdict(r) for r in results], "exit": code}, indent=2)


def run_doctor(args: argparse.Namespace) -> int:
    """``mailrelayd doctor``: ``args`` has config, domain, selector, ip and format (see cli.py).

    Prints the report to stdout and returns the exit status (see :func:`exit_code`); a config
    that cannot be read or parsed is a ``config`` check with status ``error`` (exit 2).
    """
    from mailrelayd.cli import DEFAULT_CONFIG

    domain = _normalize(args.domain)
    ip = None
    if getattr(args, "ip", None):
        try:
            ip = ipaddress.ip_address(args.ip.strip())
        except ValueError:
            print(f"mailrelayd: --ip {args.ip!r} is not an IPv4 or IPv6 address", file=sys.stderr)
            return 2
    path = Path(getattr(args, "config", None) or os.environ.get("MAILRELAYD_CONFIG") or DEFAULT_CONFIG)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        results = [CheckResult("config", "error", f"cannot check: {e}")]
    else:
        results = asyncio.run(diagnose(cfg, domain, selector=getattr(args, "selector", None), ip=ip))
    code = exit_code(results)
    fmt = format_json if getattr(args, "format", "text") == "json" else format_text
    print(fmt(domain, results, code))
    return code
