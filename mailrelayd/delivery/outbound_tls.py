"""The transport's one collaborator for outbound TLS policy: MTA-STS cache, DANE lookups, TLS-RPT log.

The transport asks three things: which MTA-STS policy applies to a domain (:meth:`domain_policy`,
O(1) once cached), what a host's plan is (:meth:`plan`), and whether a finished handshake satisfies
DANE (:meth:`check_dane`); it reports each outcome with :meth:`record`. Saving caches and sending the
daily TLS-RPT reports run in :meth:`run` (a background task the daemon starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.resolver

from mailrelayd import metrics
from mailrelayd.config import Config, RouteConfig
from mailrelayd.delivery import dane, mta_sts, tlsrpt
from mailrelayd.delivery.mta_sts import DnsPythonResolver, MtaSts, StsPolicy
from mailrelayd.delivery.mx import MxHost, MxResolver
from mailrelayd.delivery.tlspolicy import HostPlan, ReportPolicy, metric_result, normalize_level, plan_host
from mailrelayd.log import get_logger
from mailrelayd.smtp.address import AddressError, parse_mailbox

log = get_logger()

SAVE_INTERVAL = 30.0
REPORT_CONCURRENCY = 8  # TLS-RPT policy domains reported at once
Enqueue = Callable[[tuple[str, ...], bytes, str], Awaitable[None]]
"""Queue a report mail through our own spool: (recipients, message, sender domain); null sender."""


def client_context(verify: bool, ca_file: Path | None = None) -> ssl.SSLContext:
    """``verify``: PKIX with the host name checked, against ``ca_file`` or the system store."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file and verify else None)
    if not verify:  # opportunistic TLS and DANE (checked after the handshake): no PKIX here
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _txt(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    try:
        answer = await resolver.resolve(name, "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    # RFC 7208-style: the strings of one record are concatenated.
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]


class OutboundTls:
    def __init__(self, cfg: Config, mx: MxResolver) -> None:
        self._mx = mx
        self._dnssec: dns.asyncresolver.Resolver | None = None
        self._dnssec_of: Any = None
        self.sts = MtaSts(cfg.server.state_dir / "mta-sts.json", self._sts_txt, self._sts_fetch,
                          self._sts_fetch_failed)
        self.rpt = tlsrpt.TlsRptLog(cfg.server.state_dir / "tlsrpt")
        self.reconfigure(cfg)

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        ca = cfg.delivery.ca_file
        self.ctx_may = client_context(False)
        self.ctx_verify = client_context(True, ca)
        self.ctx_fetch = client_context(True, ca)

    @property
    def resolver(self) -> dns.asyncresolver.Resolver:
        return self._mx.resolver

    def _dnssec_resolver(self) -> dns.asyncresolver.Resolver:
        if self._dnssec is None or self._dnssec_of is not self._mx.resolver:
            self._dnssec, self._dnssec_of = dane.make_dnssec(self._mx.resolver), self._mx.resolver
        return self._dnssec

    async def _sts_txt(self, domain: str) -> str | None:
        return mta_sts.parse_txt(await _txt(self.resolver, f"_mta-sts.{domain}."))

    async def _sts_fetch(self, domain: str) -> StsPolicy:
        return await mta_sts.fetch_policy(domain, self.resolver, self.ctx_fetch)

    def _sts_fetch_failed(self, domain: str, e: mta_sts.FetchError) -> None:
        """RFC 8460 §4.3.2.2: a policy that was announced but could not be had is reported."""
        if self.cfg.tls_rpt.enabled:
            self.rpt.record(ReportPolicy("sts", domain), e.result_type)

    # --- the delivery path ------------------------------------------------------------------
    def level(self, route: RouteConfig | None) -> str:
        return normalize_level(route.tls if route else self.cfg.delivery.tls)

    async def domain_policy(self, domain: str, route: RouteConfig | None) -> StsPolicy | None:
        """The MTA-STS policy for MX delivery to ``domain``; None for routes (their host is the
        operator's choice, not the domain's MX) and at level "none"."""
        if route is not None or not self.cfg.delivery.mta_sts or self.level(None) == "none":
            return None
        entry = self.sts.current(domain)
        if entry is None:
            entry = await self.sts.lookup(domain)
        p = entry.policy
        return p if p is not None and p.mode != "none" else None

    async def plan(self, level: str, domain: str, host: MxHost, sts: StsPolicy | None, *,
                   via_mx: bool = True) -> HostPlan:
        """``via_mx``: the host came from the domain's MX records (not a route's configured host)."""
        lookup = None
        if level in ("dane", "dane-only"):
            resolver = self._dnssec_resolver()
            if via_mx and not await dane.mx_secure(resolver, domain):
                lookup = dane.DaneLookup("insecure", detail=f"the MX records of {domain} are not DNSSEC-validated")
            else:
                lookup = await dane.lookup(resolver, host.name, host.port)
        return plan_host(level, domain, host.name, sts, lookup)

    def context(self, plan: HostPlan) -> ssl.SSLContext:
        return self.ctx_verify if plan.auth == "pkix" else self.ctx_may

    @staticmethod
    def check_dane(plan: HostPlan, ssl_object: Any, host: MxHost) -> str | None:
        """None when the presented certificate satisfies the plan's TLSA records, else the reason."""
        if plan.auth != "dane":
            return None
        if ssl_object is None:
            return "no TLS session to check"
        chain: list[bytes] = []
        get_chain = getattr(ssl_object, "get_unverified_chain", None)  # public from Python 3.13
        if get_chain is not None:
            chain = [c.public_bytes(ssl.ENCODING_DER) if hasattr(c, "public_bytes") else bytes(c)
                     for c in get_chain() or []]
        if not chain:
            leaf = ssl_object.getpeercert(binary_form=True)
            chain = [leaf] if leaf else []
        ok, detail = dane.verify_chain(plan.tlsa, chain, (host.name,))
        return None if ok else detail

    def record(self, plan: HostPlan, host: MxHost | None, addr: str, result_type: str | None,
               success: str = "", *, report: ReportPolicy | None = None, count_metric: bool = True,
               sending_ip: str = "") -> None:
        """One session's TLS outcome: the metric, and the day's TLS-RPT counts."""
        if count_metric:
            metrics.OUTBOUND_TLS.labels(plan.mode, success if result_type is None else metric_result(result_type)
                                        ).inc()
        # RFC 8460 counts TLS sessions: a plaintext session under no policy is neither success nor failure.
        if self.cfg.tls_rpt.enabled and (result_type is not None or (success != "plaintext" and plan.report_success)):
            rtype = result_type
            if rtype == "mx_not_in_policy":
                rtype = "validation-failure"  # RFC 8460 has no narrower type for an unlisted MX
            self.rpt.record(report or plan.report, rtype, mx=host.name if host else "", receiving_ip=addr,
                            sending_ip=sending_ip)

    # --- background: save state, send reports ---------------------------------------------
    async def load(self) -> None:
        await asyncio.to_thread(self.sts.load)
        await asyncio.to_thread(self.rpt.load)

    async def save(self) -> None:
        self.sts.prune()
        snap = self.sts.snapshot()
        if snap is not None:
            await asyncio.to_thread(self.sts.save, snap)
        rows = self.rpt.snapshot()
        if rows:
            await asyncio.to_thread(self.rpt.save, rows)

    async def run(self, enqueue: Enqueue | None) -> None:
        """Save every SAVE_INTERVAL; after each UTC midnight, send the finished days' reports.

        Sending runs in a task of its own: a day's reports can take minutes (each https rua has a
        minute to answer), and the caches must still be saved meanwhile."""
        sending: asyncio.Task[int] | None = None
        try:
            while True:
                await asyncio.sleep(SAVE_INTERVAL)
                try:
                    await self.save()
                except Exception as e:  # keep the loop alive; the next round retries
                    log.exception("tlsrpt.background_error", error=str(e))
                if self.cfg.tls_rpt.enabled and (sending is None or sending.done()):
                    sending = asyncio.get_running_loop().create_task(self._send_logged(enqueue))
        finally:
            if sending is not None and not sending.done():
                sending.cancel()  # the day's file stays; the next start sends it
                with contextlib.suppress(asyncio.CancelledError):
                    await sending

    async def _send_logged(self, enqueue: Enqueue | None) -> int:
        try:
            return await self.send_due_reports(enqueue)
        except Exception as e:  # the day's file stays; the next round retries
            log.exception("tlsrpt.background_error", error=str(e))
            return 0

    async def close(self) -> None:
        await self.sts.close()
        try:
            await self.save()
        except OSError as e:
            log.warning("tls.state_save_failed", error=str(e))

    async def send_due_reports(self, enqueue: Enqueue | None, now: float | None = None) -> int:
        """Send every saved day before today (UTC); a day's file moves to sent/ once handled."""
        now = time.time() if now is None else now
        directory = self.rpt.directory
        if directory is None or not directory.is_dir():
            return 0
        today = tlsrpt.day_of(now)
        sent = 0
        for path in sorted(directory.glob("*.json")):
            day = path.stem
            if day >= today:
                continue
            rows = await asyncio.to_thread(tlsrpt.load_day, path)
            org, contact, submitter = tlsrpt.report_identity(self.cfg)
            reports = tlsrpt.build_reports(rows or [], day, organization=org, contact=contact, submitter=submitter)
            sent += await self._send_day(day, reports, submitter, enqueue)
            (directory / "sent").mkdir(exist_ok=True, mode=0o700)
            await asyncio.to_thread(path.replace, directory / "sent" / path.name)
            self.rpt.forget(day)
        return sent

    async def _send_day(self, day: str, reports: dict[str, dict[str, Any]], submitter: str,
                        enqueue: Enqueue | None) -> int:
        # Domains in parallel, a few at a time: one whose rua never answers holds up only its own
        # report, not the thousands after it.
        gate = asyncio.Semaphore(REPORT_CONCURRENCY)

        async def send(domain: str, report: dict[str, Any]) -> int:
            async with gate:
                return await self._send_one(domain, day, report, submitter, enqueue)
        results = await asyncio.gather(*(send(d, r) for d, r in reports.items()), return_exceptions=True)
        for res in results:  # a failure (the spool refused a report mail) leaves the day to retry
            if isinstance(res, BaseException):
                raise res
        return sum(r for r in results if isinstance(r, int))

    async def _send_one(self, domain: str, day: str, report: dict[str, Any], submitter: str,
                        enqueue: Enqueue | None) -> int:
        try:
            ruas = tlsrpt.parse_rua(await _txt(self.resolver, f"_smtp._tls.{domain}."))
        except dns.exception.DNSException as e:
            log.info("tlsrpt.rua_lookup_failed", domain=domain, error=type(e).__name__)
            return 0
        filename = tlsrpt.report_filename(submitter, domain, day)
        n = 0
        mailto = mailto_recipients(ruas, domain)[:tlsrpt.MAX_RUA]
        if mailto and enqueue is not None:
            data = tlsrpt.report_mail(report, to=mailto, domain=domain, submitter=submitter,
                                      from_addr=f"postmaster@{submitter}", filename=filename)
            await enqueue(tuple(mailto), data, submitter)
            n += 1
        https = [u for u in ruas if u.lower().startswith("https:")][:tlsrpt.MAX_RUA]
        n += sum(await asyncio.gather(*(self._post(uri, report, domain) for uri in https)))
        log.info("tlsrpt.sent", domain=domain, day=day, rua=ruas)
        return n

    async def _post(self, uri: str, report: dict[str, Any], domain: str) -> int:
        """POST the report to one https rua. Redirects are not followed: the rua is the remote
        domain's, and a 307/308 would carry the report on to any URL, http: and internal hosts
        included, past the https-only choice in parse_rua."""
        conn = aiohttp.TCPConnector(resolver=DnsPythonResolver(self.resolver), ssl=self.ctx_fetch)
        try:
            async with aiohttp.ClientSession(connector=conn, trust_env=False,
                                             timeout=aiohttp.ClientTimeout(total=60)) as http, \
                    http.post(uri, data=tlsrpt.gzip_report(report), allow_redirects=False,
                              headers={"Content-Type": "application/tlsrpt+gzip"}) as resp:
                if 200 <= resp.status < 300:
                    return 1
                log.warning("tlsrpt.post_refused", domain=domain, uri=uri, status=resp.status)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("tlsrpt.post_failed", domain=domain, uri=uri, error=f"{type(e).__name__}: {e}")
        return 0


def mailto_recipients(ruas: list[str], domain: str) -> list[str]:
    """The addresses of the ``mailto:`` rua URIs (RFC 8460 §3, RFC 6068 §2), each one valid
    mailbox. The record is the remote domain's: a %-encoded CR/LF, a second ``@`` or anything else
    that is no address is dropped and logged, never put in our queue or in a header we sign."""
    out: list[str] = []
    for uri in ruas:
        if not uri.lower().startswith("mailto:"):
            continue
        try:
            box = parse_mailbox(urllib.parse.unquote(uri[7:].split("?", 1)[0], errors="strict"))
        except (AddressError, UnicodeDecodeError):
            log.info("tlsrpt.bad_rua", domain=domain, uri=uri[:200])
            continue
        if str(box) not in out:
            out.append(str(box))
    return out


def today() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
