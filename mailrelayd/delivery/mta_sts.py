"""MTA-STS (RFC 8461): discover, fetch, cache and apply a recipient domain's outbound TLS policy.

Parsing and matching are pure functions. :class:`MtaSts` holds the cache: ``current()`` is a dict
lookup that never waits (a stale entry is refreshed in the background), ``lookup()`` is awaited only
on first contact with a domain, when nothing is cached. Every DNS lookup, the policy host's address
included, goes through the configured resolver; the HTTPS fetch connects to that address with the
policy host's name for SNI, Host and certificate validation.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.resolver
from aiohttp.abc import AbstractResolver, ResolveResult

from mailrelayd.delivery.mx import host_name
from mailrelayd.log import get_logger

log = get_logger()

Mode = Literal["enforce", "testing", "none"]

MAX_POLICY_BYTES = 64 * 1024
"""RFC 8461 §3.3 suggests senders limit the policy body; 64 KiB is what the RFC's examples allow."""
MAX_AGE_LIMIT = 31_557_600
"""§3.2: max_age is at most 31557600 seconds (one year)."""
RECHECK_INTERVAL = 300.0
"""How often a cached policy's TXT id is re-checked in the background (§5.1 "SHOULD check")."""
NEGATIVE_TTL = 3600.0
"""How long "this domain publishes no policy" is believed before it is looked up again (in the background)."""
FETCH_TIMEOUT = 30.0

_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_MAX_AGE_RE = re.compile(r"[0-9]{1,10}")
"""§3.2: sts-policy-max-age-value = 1*10(DIGIT), ASCII digits: str.isdigit() and int() also take
"²" (which int() then refuses with a bare ValueError) and Arabic-Indic digits."""
_WSP = " \t"
"""§3.2's ABNF allows only WSP (space, tab) around a value; str.strip() would also take vertical tab,
form feed, NEL and Unicode spaces, so that "mode: enforce\x0b" counted as enforce."""


class PolicyError(ValueError):
    """A TXT record or policy file that does not follow RFC 8461 (the reason says which rule)."""


class FetchError(Exception):
    """The policy could not be fetched (DNS, TCP, TLS, HTTP status, media type, size)."""

    def __init__(self, text: str, result_type: str = "sts-policy-fetch-error") -> None:
        super().__init__(text)
        self.result_type = result_type  # RFC 8460 §4.3.2.2


@dataclass(frozen=True, slots=True)
class StsPolicy:
    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    text: str = ""
    """The policy as served, for TLS-RPT's policy-string (RFC 8460 §4.4)."""

    def lines(self) -> list[str]:
        return [ln.strip() for ln in self.text.splitlines() if ln.strip()]


@dataclass(slots=True)
class CacheEntry:
    domain: str
    policy: StsPolicy | None
    """None: the domain publishes no policy (negative entry)."""
    policy_id: str
    expires: float
    """Wall-clock time the policy stops applying (fetch time + max_age; §5.1)."""
    checked: float
    """Wall-clock time the TXT record was last looked at."""


# --- pure parsing ------------------------------------------------------------------------
def parse_txt(strings: Iterable[str]) -> str | None:
    """The policy id from the ``_mta-sts`` TXT record texts, or None when there is no valid record.

    §3.1: records not starting with ``v=STSv1`` are ignored; more than one STSv1 record means none.
    """
    found = [s for s in strings if re.match(r"^v=STSv1\s*(;|$)", s)]
    if len(found) != 1:
        return None
    fields: dict[str, str] = {}
    for part in found[0].split(";"):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep or not _KEY_RE.match(k.strip()):
            return None
        fields.setdefault(k.strip(), v.strip())
    pid = fields.get("id", "")
    return pid if _ID_RE.match(pid) else None


def parse_policy(text: str) -> StsPolicy:
    """Parse a policy body (§3.2); raises PolicyError naming the rule broken."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for raw in re.split(r"\r?\n", text):  # sts-policy-term = LF / CRLF
        line = raw.strip(_WSP)
        if not line:
            continue
        k, sep, v = line.partition(":")
        if not sep:
            raise PolicyError(f"policy line without ':': {line[:60]!r}")
        k, v = k.strip(_WSP), v.strip(_WSP)
        if k == "mx":
            # §3.2: sts-policy-mx-value = ["*."] Domain. A pattern that can match no host name ("",
            # "*.", "*.*.x", a U-label) would make an enforce policy refuse every MX: invalid instead.
            pattern = mx_pattern(v)
            if pattern is None:
                raise PolicyError(f"policy mx must be a host name or *.domain, not {v[:60]!r}")
            mx.append(pattern)
        else:
            fields.setdefault(k, v)  # §3.2: unknown fields are ignored; the first of a kind counts
    if fields.get("version") != "STSv1":
        raise PolicyError("policy has no \"version: STSv1\"")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"policy mode must be enforce, testing or none, not {mode!r}")
    age = fields.get("max_age", "")
    if not _MAX_AGE_RE.fullmatch(age):
        raise PolicyError(f"policy max_age must be a number of seconds, not {age!r}")
    if mode != "none" and not mx:
        raise PolicyError(f"policy in mode {mode} lists no mx")
    return StsPolicy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT), text)  # type: ignore[arg-type]


def _cached_policy(mode: Any, mx: Any, max_age: int, text: Any) -> StsPolicy:
    """A policy from the cache file, held to today's rules: one saved by an older version that
    accepted it (an mx that matches no host, under enforce) must not refuse every MX until it
    expires, up to a year later. Raises PolicyError (or TypeError for a damaged entry)."""
    if text:
        return parse_policy(text)
    if mode not in ("enforce", "testing", "none") or not isinstance(mx, list) \
            or any(not isinstance(m, str) or mx_pattern(m) != m for m in mx):
        raise PolicyError("cached policy no longer valid")
    return StsPolicy(mode, tuple(mx), max_age, "")


def mx_pattern(text: str) -> str | None:
    """An mx value (§3.2 ``["*."] Domain``) lowercase and without the final dot; None if it is not one."""
    wildcard = text.startswith("*.")
    name = host_name(text[2:] if wildcard else text)
    return None if name is None else f"*.{name}" if wildcard else name


def mx_matches(pattern: str, host: str) -> bool:
    """§4.1: exact match, or ``*.example.com`` matching exactly one leftmost label.

    Both sides are normalised by the same rules; a host that is not a host name matches nothing (a
    label holding an escaped dot, ``a\\.b.example``, is one label, not two).
    """
    p, h = mx_pattern(pattern), host_name(host)
    if p is None or h is None:
        return False
    if p.startswith("*."):
        return h.partition(".")[2] == p[2:]
    return p == h


def host_allowed(policy: StsPolicy, host: str) -> bool:
    return any(mx_matches(p, host) for p in policy.mx)


def policy_url(domain: str) -> str:
    return f"https://mta-sts.{domain}/.well-known/mta-sts.txt"  # §3.3


# --- fetching ------------------------------------------------------------------------------
class DnsPythonResolver(AbstractResolver):
    """aiohttp's name resolution through our dnspython resolver (the configured ``[dns] nameservers``)."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self._resolver = resolver

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        out: list[ResolveResult] = []
        for rtype, fam in (("AAAA", socket.AF_INET6), ("A", socket.AF_INET)):
            if family not in (socket.AF_UNSPEC, fam):
                continue
            try:
                answer = await self._resolver.resolve(host.rstrip(".") + ".", rtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as e:
                raise OSError(f"DNS lookup of {host} {rtype} failed: {type(e).__name__}") from None
            out.extend(ResolveResult(hostname=host, host=r.address, port=port, family=fam, proto=0,
                                     flags=socket.AI_NUMERICHOST) for r in answer)
        if not out:
            raise OSError(f"{host} has no address")
        return out

    async def close(self) -> None:
        return None


async def _read_body(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body, or the first MAX_POLICY_BYTES + 1 bytes of a larger one. ``read(n)`` returns
    what has arrived so far (one TLS record, one chunk), so a single call would cut a policy sent in
    pieces short: reading goes on until the end of the body or the limit."""
    body = bytearray()
    while len(body) <= MAX_POLICY_BYTES:
        chunk = await resp.content.read(MAX_POLICY_BYTES + 1 - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


async def fetch_policy(domain: str, resolver: dns.asyncresolver.Resolver, ctx: ssl.SSLContext,
                       timeout: float = FETCH_TIMEOUT) -> StsPolicy:
    """GET the policy over HTTPS (§3.3): valid certificate for mta-sts.<domain>, 200, text/plain,
    no redirects, bounded size. Raises FetchError."""
    conn = aiohttp.TCPConnector(resolver=DnsPythonResolver(resolver), ssl=ctx, use_dns_cache=False)
    try:
        async with aiohttp.ClientSession(connector=conn, trust_env=False,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as http, \
                http.get(policy_url(domain), allow_redirects=False) as resp:
            if resp.status != 200:
                raise FetchError(f"policy fetch from {policy_url(domain)}: HTTP {resp.status}")
            if resp.content_type != "text/plain":
                raise FetchError(f"policy served as {resp.content_type}, not text/plain", "sts-policy-invalid")
            body = await _read_body(resp)
    except aiohttp.ClientConnectorCertificateError as e:
        raise FetchError(f"policy host mta-sts.{domain}: invalid certificate: {e.certificate_error}",
                         "sts-webpki-invalid") from None
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        raise FetchError(f"policy fetch from {policy_url(domain)} failed: {type(e).__name__}: {e}") from None
    if len(body) > MAX_POLICY_BYTES:
        raise FetchError(f"policy larger than {MAX_POLICY_BYTES} bytes", "sts-policy-invalid")
    try:
        return parse_policy(body.decode("utf-8"))
    except (UnicodeDecodeError, PolicyError) as e:
        raise FetchError(f"invalid policy at {policy_url(domain)}: {e}", "sts-policy-invalid") from None


# --- the cache -----------------------------------------------------------------------------
Fetcher = Callable[[str], Awaitable[StsPolicy]]
TxtLookup = Callable[[str], Awaitable[str | None]]


class MtaSts:
    """Policy cache for recipient domains, persisted to ``<state_dir>/mta-sts.json``.

    ``fetch_errors`` remembers the last fetch failure per domain, for TLS-RPT's
    sts-policy-fetch-error results (RFC 8460 §4.3.2.2).
    """

    def __init__(self, path: Path | None, txt_lookup: TxtLookup, fetcher: Fetcher,
                 on_fetch_error: Callable[[str, FetchError], None] | None = None) -> None:
        self.path = path
        self._on_fetch_error = on_fetch_error
        self._txt = txt_lookup
        self._fetch = fetcher
        self._cache: dict[str, CacheEntry] = {}
        self._inflight: dict[str, asyncio.Future[CacheEntry]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dirty = False
        self.fetch_errors: dict[str, FetchError] = {}

    # O(1), never waits: the hot path of every delivery.
    def current(self, domain: str, now: float | None = None) -> CacheEntry | None:
        """The cached entry (None if never looked up); starts a background refresh when due."""
        now = time.time() if now is None else now
        e = self._cache.get(domain)
        if e is None:
            return None
        if e.policy is not None and now >= e.expires:
            # §5.1: an expired policy no longer applies; look again in the background.
            self._refresh(domain)
            return None
        due = RECHECK_INTERVAL if e.policy is not None else NEGATIVE_TTL
        if now - e.checked >= due:
            self._refresh(domain)
        return e

    async def lookup(self, domain: str) -> CacheEntry:
        """First contact: wait for the discovery (coalesced per domain)."""
        fut = self._inflight.get(domain)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._inflight[domain] = fut
            task = asyncio.get_running_loop().create_task(self._discover(domain, fut))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(fut)

    def _refresh(self, domain: str) -> None:
        if domain in self._inflight:
            return
        fut: asyncio.Future[CacheEntry] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.exception())  # nobody awaits a background refresh
        self._inflight[domain] = fut
        task = asyncio.get_running_loop().create_task(self._discover(domain, fut))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _discover(self, domain: str, fut: asyncio.Future[CacheEntry]) -> None:
        try:
            entry = await self._discover_entry(domain)
            fut.set_result(entry)
        except Exception as e:  # a bug here must not leave waiters hanging
            log.exception("mta_sts.discover_error", domain=domain, error=str(e))
            fut.set_result(CacheEntry(domain, None, "", 0.0, time.time()))
        finally:
            self._inflight.pop(domain, None)
            if not fut.done():  # cancelled (close()): waiters must not wait for ever, nor get "no policy"
                fut.cancel()

    async def _discover_entry(self, domain: str) -> CacheEntry:
        now = time.time()
        old = self._cache.get(domain)
        valid_old = old if old is not None and old.policy is not None and now < old.expires else None
        try:
            pid = await self._txt(domain)
        except Exception as e:
            # DNS trouble: keep what we have (§5.1: a cached policy stays valid until max_age).
            log.info("mta_sts.txt_failed", domain=domain, error=str(e))
            if valid_old is not None:
                return valid_old
            entry = CacheEntry(domain, None, "", 0.0, now - NEGATIVE_TTL + 60)  # retry in a minute
            self._cache[domain] = entry
            return entry
        if pid is None:
            if valid_old is not None:
                # §5.1: the TXT record going away does not end a cached policy before max_age.
                valid_old.checked = now
                return valid_old
            entry = CacheEntry(domain, None, "", 0.0, now)
            self._store(entry)
            return entry
        if valid_old is not None and valid_old.policy_id == pid:
            valid_old.checked = now
            return valid_old
        try:
            policy = await self._fetch(domain)
        except FetchError as e:
            self.fetch_errors[domain] = e
            if self._on_fetch_error is not None:
                self._on_fetch_error(domain, e)
            log.warning("mta_sts.fetch_failed", domain=domain, error=str(e))
            if valid_old is not None:
                valid_old.checked = now
                return valid_old
            entry = CacheEntry(domain, None, "", 0.0, now - NEGATIVE_TTL + 300)  # §5.1: retry soon
            self._cache[domain] = entry
            return entry
        self.fetch_errors.pop(domain, None)
        entry = CacheEntry(domain, policy, pid, now + policy.max_age, now)
        self._store(entry)
        log.info("mta_sts.policy", domain=domain, id=pid, mode=policy.mode, mx=list(policy.mx),
                 max_age=policy.max_age)
        return entry

    def _store(self, entry: CacheEntry) -> None:
        self._cache[entry.domain] = entry
        self._dirty = True

    def prune(self, now: float | None = None) -> int:
        """Forget stale negative entries and expired policies (bounds memory to recently seen domains)."""
        now = time.time() if now is None else now
        stale = [d for d, e in self._cache.items()
                 if (e.policy is None and now - e.checked > 2 * NEGATIVE_TTL)
                 or (e.policy is not None and now >= e.expires)]
        for d in stale:
            del self._cache[d]
        for d in [d for d in self.fetch_errors if d not in self._cache]:
            del self.fetch_errors[d]  # else one entry per failing domain, for ever
        return len(stale)

    # --- persistence (called from threads by the owner) ---------------------------------
    def load(self) -> None:
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("mta_sts.cache_unreadable", path=str(self.path), error=str(e))
            return
        now = time.time()
        for d in data.get("policies", []):
            try:
                p = d["policy"]
                policy = _cached_policy(p["mode"], p["mx"], int(p["max_age"]), p.get("text", ""))
                e = CacheEntry(d["domain"], policy, d["policy_id"], float(d["expires"]), float(d["checked"]))
            except (KeyError, TypeError, ValueError):  # PolicyError included: fetched again when due
                continue
            if e.expires > now:
                self._cache[e.domain] = e

    def snapshot(self) -> dict[str, Any] | None:
        """What to save, or None when nothing changed (taken on the loop, written in a thread)."""
        if not self._dirty:
            return None
        self._dirty = False
        return {"policies": [{"domain": e.domain, "policy": asdict(e.policy), "policy_id": e.policy_id,
                              "expires": e.expires, "checked": e.checked}
                             for e in self._cache.values() if e.policy is not None]}

    def save(self, snap: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(snap, f)
        os.replace(tmp, self.path)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
