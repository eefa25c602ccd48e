"""Outbound SMTP: one transaction per call, per-recipient results, connection reuse, pipelining.

``Transport.deliver`` never raises: every failure becomes a per-recipient result, temporary (4xx,
retry later) or permanent (5xx, bounce). The rule for ambiguity is at-least-once: anything we cannot
prove was refused or accepted (a drop after DATA, a timeout waiting for the final reply) is temporary.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailrelayd import metrics
from mailrelayd.config import Config, RouteConfig
from mailrelayd.delivery.dane import Tlsa
from mailrelayd.delivery.mta_sts import StsPolicy
from mailrelayd.delivery.mx import DnsError, DnsPermanentError, MxHost, MxResolver
from mailrelayd.delivery.outbound_tls import OutboundTls
from mailrelayd.delivery.smtpclient import ClientError, GreetingTimeout, Reply, SmtpClient, Timeout
from mailrelayd.delivery.tlspolicy import (
    STARTTLS_NOT_SUPPORTED,
    TLSA_INVALID,
    VALIDATION_FAILURE,
    Auth,
    HostPlan,
    classify_tls_error,
    failure_text,
    proven_auth,
    session_satisfies,
    testing_mx_mismatch,
)
from mailrelayd.log import get_logger

log = get_logger()

MAX_ADDRESSES_TRIED = 5
"""Like Postfix's smtp_mx_address_limit: a broken domain costs a bounded number of connects."""

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
_TOO_MANY_RCPTS = re.compile(r"too many (recipients|rcpts)", re.I)


@dataclass(frozen=True, slots=True)
class RcptResult:
    """The fate of one recipient in one attempt: the SMTP reply that decided it."""

    address: str
    code: int
    enhanced: str
    text: str
    """Our one-line account of what happened (never prefixed with the remote's name)."""
    remote_mta: str = ""
    remote_reply: str = ""
    """The remote's reply exactly as received, on one line (``"550 5.1.1 <x@y>: no such user"``);
    empty when the outcome is our own (DNS, connect failure, timeout). It becomes the DSN's
    ``Diagnostic-Code: smtp; ...`` (RFC 3464 §2.3.6)."""
    stage: str = ""
    """The command the reply answered (``"RCPT TO"``, ``"end of DATA"``...)."""

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


def _enhanced(code: int, text: str) -> tuple[str, str]:
    """Split "5.1.1 User unknown" into ("5.1.1", "User unknown"); default x.0.0 from the code."""
    m = _ENHANCED.match(text)
    if m and m.group(1) == str(code)[0]:
        return m.group(0), text[m.end():].strip()
    return f"{str(code)[0]}.0.0", text


def _one_line(text: str) -> str:
    return " ".join(text.split())


def names_us(reply_text: str, hostname: str) -> bool:
    """Whether a greeting or EHLO reply begins with our own host name: both begin with the server's
    domain (RFC 5321 §4.2, §4.1.1.1), so such a server is this relay (or one configured as it), and
    mail sent there comes back to us. Postfix's smtp client makes the same check. A name without a
    dot ("localhost", the development set-up's) names no one host: development sinks greet with it
    too, so it is never taken for a loop."""
    ours = hostname.rstrip(".").casefold()
    words = reply_text.split(None, 1)
    return "." in ours and bool(words) and words[0].rstrip(".").casefold() == ours


def _in_step(code: int) -> bool:
    """A completion reply (2xx, 4xx, 5xx): the server is where a command's answer leaves it. A 1xx
    or 3xx where none belongs (a 354 to the final dot) leaves its state unknown: the connection is
    not used again, lest the next message's commands become part of this one's data."""
    return code // 100 in (2, 4, 5)


def _size_limit(smtp: SmtpClient) -> int:
    """The fixed message size limit a server announced in EHLO (RFC 1870 §4); 0 for none (no SIZE,
    "SIZE" alone, "SIZE 0", or a parameter that is not a number)."""
    value = smtp.extensions.get("size", "")
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 20 else 0


def _too_many_recipients(r: RcptResult) -> bool:
    """A recipient refused at RCPT only because the transaction has enough of them (RFC 3463 X.5.3)."""
    return r.code == 452 and r.stage == "RCPT TO" and r.enhanced == "4.5.3"


class _Loop(Exception):
    """The host greeted us with our own name (see :func:`names_us`)."""


class _TempFail(Exception):
    """This host could not take the message now; try the next one (code, enhanced, text)."""

    def __init__(self, code: int, enhanced: str, text: str, mta: str = "", reply: str = "",
                 stage: str = "") -> None:
        super().__init__(text)
        self.code, self.enhanced, self.text = code, enhanced, text
        self.mta, self.reply, self.stage = mta, reply, stage  # the remote's own reply, if it gave one


class _PermFail(_TempFail):
    """A host refused the session permanently (5xx greeting or EHLO, SMTPUTF8 unsupported...)."""


class _ReportOnly(Exception):
    """An MTA-STS testing policy's certificate check failed: reported; reconnect without it (RFC 8461 §5)."""


@dataclass(eq=False)
class _Conn:
    smtp: SmtpClient
    host: MxHost
    address: str
    key: str
    tls: bool
    used: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    clean: bool = True  # the server is between transactions (no MAIL outstanding)
    unchecked: bool = False  # reused without an RSET: liveness not yet shown (see _reuse)
    auth: Auth = "none"
    """What the TLS session proved about the host (see tlspolicy.proven_auth)."""
    tlsa: tuple[Tlsa, ...] = ()
    """The TLSA records a DANE session was checked against."""


REUSE_WITHOUT_RSET = 2.0
"""Seconds a connection may sit idle and still be reused without an RSET round trip first."""


QUIT_WAIT = 1.0
"""Seconds shutdown (Transport.close) waits for the 221s of its idle sessions, all at once: there
nothing else waits on them, so RFC 5321 §4.1.1.10's orderly end costs at most this, once."""


class _Stale(Exception):
    """A connection reused without RSET was gone (or said 421) at MAIL: nothing was sent; try a new one."""


def _source_for(cfg: Config, route: RouteConfig | None, addr: str) -> str | bool | None:
    """The local address to bind for a connection to ``addr``: the route's source_address, else
    [delivery] source_address / source_address6 by family; None = let the kernel choose; False =
    the route's source is of the other family, so ``addr`` cannot be used."""
    v6 = ":" in addr
    if route is not None and route.source_address:
        return route.source_address if (":" in route.source_address) == v6 else False
    d = cfg.delivery
    return (d.source_address6 if v6 else d.source_address) or None


class Transport:
    """Delivers one message to one destination domain per call, reusing idle connections."""

    def __init__(self, cfg: Config, resolver: MxResolver, tls: OutboundTls | None = None) -> None:
        self.resolver = resolver
        self.tls = tls or OutboundTls(cfg, resolver)
        self._idle: dict[str, list[_Conn]] = {}
        # (MX host name, port) -> pool keys (recipient domains) with idle sessions to that host, so
        # domains that share an MX host (every Google Workspace domain) can share its sessions.
        self._idle_at: dict[tuple[str, int], dict[str, None]] = {}
        self._domain_sems: dict[str, asyncio.Semaphore] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False
        self.reconfigure(cfg)

    def reconfigure(self, cfg: Config) -> None:
        """Apply a reloaded config; in-flight deliveries finish under the old limits."""
        self.cfg = cfg
        self.tls.reconfigure(cfg)
        self._global = asyncio.Semaphore(cfg.delivery.max_concurrency)
        self._domain_sems = {}
        self._passwords: dict[str, str | None] = {}
        for r in cfg.routes:
            pw = r.password
            if r.password_file is not None:
                pw = r.password_file.read_text(encoding="utf-8").strip()
            self._passwords[r.domain] = pw

    async def close(self) -> None:
        """QUIT every idle connection (shutdown)."""
        self._closing = True
        if self._reaper:
            self._reaper.cancel()
        conns = [c for lst in self._idle.values() for c in lst]
        self._idle.clear()
        self._idle_at.clear()
        await asyncio.gather(*(self._quit(c, QUIT_WAIT) for c in conns), return_exceptions=True)
        await self.tls.close()

    # --- the public operation ------------------------------------------------------------
    async def deliver(self, domain: str, mail_from: str, recipients: Sequence[str], data: bytes, *,
                      max_messages: int | None = None, max_connections: int | None = None,
                      max_recipients: int | None = None) -> list[RcptResult]:
        """``data`` for ``recipients`` (all at ``domain``): one SMTP transaction for up to
        ``max_recipients`` of them, the next ones in further transactions, on the same connection
        while it may be reused. A result for every recipient. ``max_messages`` / ``max_connections`` /
        ``max_recipients``: the destination's [[shaping]] limits (the scheduler enforces connections
        per destination; this only keeps the per-domain cap from undercutting it)."""
        t0 = time.perf_counter()
        try:
            results = await self._deliver(domain, mail_from, list(recipients), data, max_messages, max_connections,
                                          max_recipients or self.cfg.delivery.max_recipients_per_transaction)
        except Exception as e:  # a bug here must defer, not lose, the recipients
            log.exception("delivery.transport_error", domain=domain, error=str(e))
            results = [RcptResult(r, 451, "4.3.0", f"local error in delivery: {type(e).__name__}")
                       for r in recipients]
        outcome = ("delivered" if all(r.ok for r in results) else
                   "bounced" if all(r.permanent for r in results) else
                   "deferred" if all(r.temporary for r in results) else "mixed")
        metrics.DELIVERY_DURATION.labels(outcome).observe(time.perf_counter() - t0)
        return results

    async def _deliver(self, domain: str, mail_from: str, rcpts: list[str], data: bytes,
                       max_messages: int | None, max_connections: int | None, max_recipients: int
                       ) -> list[RcptResult]:
        route = self.cfg.route_for(domain)
        port = route.host.port if route else self.cfg.delivery.port
        key = f"route:{route.domain}" if route else domain.lower()
        family = self.cfg.delivery.ip_family
        try:
            if route:
                hosts = await self.resolver.resolve_host(route.host.host, port, family)
            else:
                hosts = await self.resolver.resolve(domain, port, family)
        except DnsError as e:
            code = 550 if isinstance(e, DnsPermanentError) else 451
            return [RcptResult(r, code, e.enhanced, str(e)) for r in rcpts]
        sts = await self.tls.domain_policy(domain.lower(), route)

        sem = self._domain_sems.get(key)
        if sem is None:
            sem = self._domain_sems[key] = asyncio.Semaphore(max_connections or self.cfg.delivery.domain_concurrency)
        max_used = max_messages or self.cfg.delivery.max_messages_per_connection
        results: dict[str, RcptResult] = {}
        todo = rcpts
        async with self._global, sem:
            conn = await self._reuse(key)
            if conn is None and route is None:
                conn = await self._reuse_shared(domain.lower(), hosts, sts)
            reusable = first = True
            while todo:
                chunk, todo = todo[:max_recipients], todo[max_recipients:]
                if not first and conn is not None:  # the next transaction: on this connection if it may
                    if reusable and conn.used < max_used:
                        conn = await self._usable(conn)  # RSET first if the last one was left open
                    else:
                        await self._quit(conn)
                        conn = None
                first = False
                while True:  # at most twice: only a reused connection can be stale, a new one never is
                    if conn is None:
                        try:
                            conn = await self._connect(key, hosts, route, domain.lower(), sts)
                        except _TempFail as e:
                            code = e.code if isinstance(e, _PermFail) else (e.code if 400 <= e.code < 500 else 451)
                            results.update((r, RcptResult(r, code, e.enhanced, e.text, e.mta, e.reply, e.stage))
                                           for r in (*chunk, *todo))
                            return [results[r] for r in rcpts]
                    try:
                        got, reusable = await self._transaction(conn, mail_from, chunk, data)
                        break
                    except _Stale:
                        conn.smtp.close()
                        conn = None
                results.update((r.address, r) for r in got)
                over = [r.address for r in got if _too_many_recipients(r)]
                if over and any(r.ok for r in got):
                    # RFC 5321 §4.5.3.1.10: the server took what it could; the rest go in the
                    # next transaction, as long as each one delivers something.
                    todo = over + todo
            if conn is None:
                return []
            if reusable and not self._closing and conn.used < max_used:
                conn.idle_since = time.monotonic()
                self._idle.setdefault(key, []).append(conn)
                if route is None:
                    self._idle_at.setdefault((conn.host.name, conn.host.port), {})[key] = None
                self._ensure_reaper()
            else:
                await self._quit(conn)  # the results are settled: the 221 is not awaited (SmtpClient.quit)
        return [results[r] for r in rcpts]

    # --- connections ---------------------------------------------------------------------
    async def _reuse(self, key: str) -> _Conn | None:
        """An idle connection to the same destination. One that ended its last transaction cleanly
        moments ago is used as it is (its MAIL shows whether it is alive: see _Stale); any other is
        checked with RSET first (RFC 5321 §4.1.1.5), which also ends a transaction left open."""
        lst = self._idle.get(key)
        while lst:
            conn = await self._usable(lst.pop())
            if conn is not None:
                return conn
        return None

    async def _reuse_shared(self, domain: str, hosts: list[MxHost], sts: StsPolicy | None) -> _Conn | None:
        """An idle session opened for another recipient domain, to a host this domain would try
        first (its most preferred MX, the same address), that has proved at least what this
        domain's TLS policy (level, MTA-STS, DANE) demands of a new connection. Sessions reused
        this way are not counted again for TLS-RPT (a session is reported when negotiated)."""
        if not hosts or not self._idle_at:
            return None
        for host in (h for h in hosts if h.preference == hosts[0].preference):
            keys = self._idle_at.get((host.name, host.port))
            if not keys or not any(c.host.name == host.name for k in keys for c in self._idle.get(k, ())):
                continue
            plan = await self.tls.plan(self.tls.level(None), domain, host, sts)
            while (conn := self._take_shared(keys, host, plan)) is not None:
                got = await self._usable(conn)
                if got is not None:
                    return got
        return None

    def _take_shared(self, keys: dict[str, None], host: MxHost, plan: HostPlan) -> _Conn | None:
        """Remove and return an idle session to ``host`` that satisfies ``plan`` (no await: the
        pools cannot change under the scan)."""
        for k in list(keys):
            lst = self._idle.get(k)
            if not lst:
                keys.pop(k, None)
                continue
            for i in range(len(lst) - 1, -1, -1):
                c = lst[i]
                if c.host.name == host.name and c.address in host.addresses and \
                        session_satisfies(plan, c.tls, c.auth, c.tlsa):
                    return lst.pop(i)
        return None

    async def _usable(self, conn: _Conn) -> _Conn | None:
        """``conn`` taken from a pool if it may carry the next transaction (see :meth:`_reuse`),
        else None (and it is closed)."""
        idle = time.monotonic() - conn.idle_since
        if idle > self.cfg.delivery.idle_timeout or not conn.smtp.is_connected:
            await self._quit(conn)
            return None
        if conn.clean and idle < REUSE_WITHOUT_RSET:
            conn.unchecked = True
            return conn
        try:
            resp = await conn.smtp.command(b"RSET", self.cfg.delivery.mail_timeout)
        except (ClientError, OSError):
            conn.smtp.close()
            return None
        if resp.code == 250:
            conn.clean = True
            return conn
        await self._quit(conn)
        return None

    async def _connect(self, key: str, hosts: list[MxHost], route: RouteConfig | None, domain: str,
                       sts: StsPolicy | None) -> _Conn:
        """Try each MX address in order until one gives a usable session."""
        d = self.cfg.delivery
        last = _TempFail(451, "4.4.1", "no MX host could be tried")
        all_perm = True
        tried = 0
        # Two MX names on one address are one server: an address is connected to once per attempt
        # (RFC 5321 §5.1 tries the addresses in order; the same server again only spends a connect
        # on what just failed). Skipped here rather than in the MX list, so a name refused by policy
        # (MTA-STS) does not take the address away from a later name that is allowed.
        connected: set[str] = set()
        level = self.tls.level(route)
        for host in hosts:
            plan = await self.tls.plan(level, domain, host, sts, via_mx=route is None)
            if plan.refuse:  # MX not in an enforced MTA-STS policy, DANE lookup failed, dane-only...
                self.tls.record(plan, host, "", plan.refuse_result)
                all_perm = False
                last = _TempFail(451, "4.7.5", plan.refuse)
                continue
            if testing_mx_mismatch(plan, sts, host.name):
                self.tls.record(plan, host, "", VALIDATION_FAILURE, count_metric=False)
                plan = dataclasses.replace(plan, sts_testing=False, report_success=False)
            for addr in host.addresses:
                if tried >= MAX_ADDRESSES_TRIED:
                    break
                if _source_for(self.cfg, route, addr) is False:
                    continue  # no source address of this family to bind (route.source_address)
                if addr in connected:
                    continue
                connected.add(addr)
                tried += 1
                try:
                    try:
                        return await self._open(key, host, addr, route, plan, plaintext=False)
                    except _ReportOnly:
                        return await self._open(key, host, addr, route,
                                                dataclasses.replace(plan, sts_testing=False, report_success=False),
                                                plaintext=False)
                except _PermFail as e:
                    last = e
                except _TempFail as e:
                    all_perm = False
                    last = e
                    if e.enhanced == "4.7.5" and route is None and d.tls_fallback_plaintext and d.tls == "may" \
                            and not plan.require_tls:
                        try:  # Postfix-like fallback for broken STARTTLS, only when configured
                            return await self._open(key, host, addr, route, plan, plaintext=True)
                        except _TempFail as e2:
                            last = e2
        if isinstance(last, _PermFail) and not all_perm:
            # Some host might still take it later: a 5xx greeting from a backup MX is not final.
            last = _TempFail(451, "4." + last.enhanced[2:], last.text)  # our verdict: no remote reply kept
        raise last

    async def _open(self, key: str, host: MxHost, addr: str, route: RouteConfig | None, plan: HostPlan, *,
                    plaintext: bool) -> _Conn:
        d = self.cfg.delivery
        where = f"{host.name}[{addr}]:{host.port}"
        source = _source_for(self.cfg, route, addr)
        helo = (route.helo_name if route is not None and route.helo_name else None) or self.cfg.server.hostname
        try:
            smtp, greeting = await SmtpClient.connect(
                addr, host.port, source=source if isinstance(source, str) else None,
                connect_timeout=d.connect_timeout, greeting_timeout=d.greeting_timeout)
        except GreetingTimeout:
            metrics.DELIVERY_CONNECTIONS.labels("timeout").inc()
            raise _TempFail(451, "4.4.2", f"conversation with {where} timed out while receiving the initial "
                                          "server greeting") from None
        except Timeout:
            metrics.DELIVERY_CONNECTIONS.labels("timeout").inc()
            raise _TempFail(451, "4.4.1", f"connect to {where}: timed out") from None
        except (ClientError, OSError) as e:
            metrics.DELIVERY_CONNECTIONS.labels("refused").inc()
            raise _TempFail(451, "4.4.1", f"connect to {where}: {_one_line(str(e))}") from None
        try:
            if greeting.code != 220:
                metrics.DELIVERY_CONNECTIONS.labels("refused_greeting").inc()
                cls = _PermFail if greeting.code >= 500 else _TempFail
                code = greeting.code if greeting.code >= 400 else 451
                enh, _ = _enhanced(code, greeting.text)  # of the code reported: never 451 with "2.0.0"
                raise cls(code, enh, f"host {where} refused to talk to me: {greeting.line()}", host.name,
                          greeting.line())
            if names_us(greeting.text, self.cfg.server.hostname):
                raise _Loop("greeted me")

            await self._ehlo(smtp, helo, where, host.name)
            tls = False
            local = smtp.extra("sockname")
            src = str(local[0]) if local else ""
            if plan.mode != "none" and not plaintext and smtp.supports("starttls"):
                await self._starttls(smtp, host, addr, where, plan, src)
                tls = True
                await self._ehlo(smtp, helo, where, host.name)  # RFC 3207 §4.2: forget what we knew, ask again
            elif plan.require_tls:
                self.tls.record(plan, host, addr, STARTTLS_NOT_SUPPORTED, sending_ip=src)
                why = f" by {plan.why}" if plan.why else ""
                raise _TempFail(451, "4.7.5", f"TLS is required{why}, but was not offered by host {where}")
            else:
                if plan.sts_testing and not plaintext:
                    self.tls.record(plan, host, addr, STARTTLS_NOT_SUPPORTED, count_metric=False, sending_ip=src)
                self.tls.record(plan, host, addr, None, "plaintext")

            if route is not None and route.username:
                if not tls and plan.mode != "none":
                    raise _TempFail(451, "4.7.0", f"not sending AUTH credentials to {where} without TLS")
                try:
                    r = await smtp.login(route.username, self._passwords.get(route.domain) or "", d.mail_timeout)
                except (ClientError, OSError) as e:
                    raise _TempFail(451, "4.7.0", f"AUTH at {where} failed: {_one_line(str(e))}") from None
                if r.code != 235:
                    raise _TempFail(451, "4.7.0", f"AUTH at {where} failed: {r.line()}")
        except _Loop as e:
            smtp.close()
            # A loop is final for this host (Postfix bounces it as 5.4.6 too); another MX may differ.
            metrics.DELIVERY_CONNECTIONS.labels("loop").inc()
            log.warning("delivery.loop", host=host.name, address=addr, hostname=self.cfg.server.hostname)
            raise _PermFail(550, "5.4.6", f"mail loops back to myself: host {where} {e} with my own "
                            f"hostname {self.cfg.server.hostname}") from None
        except BaseException:
            smtp.close()
            raise
        metrics.DELIVERY_CONNECTIONS.labels("ok").inc()
        return _Conn(smtp, host, addr, key, tls, auth=proven_auth(plan, tls), tlsa=plan.tlsa if tls else ())

    async def _starttls(self, smtp: SmtpClient, host: MxHost, addr: str, where: str, plan: HostPlan,
                        src: str) -> None:
        """STARTTLS as the plan demands (RFC 3207); DANE is checked on the finished handshake."""
        ctx = self.tls.ctx_verify if plan.sts_testing else self.tls.context(plan)
        try:
            r = await smtp.starttls(ctx, host.name, self.cfg.delivery.greeting_timeout)
        except (ClientError, ssl.SSLError, OSError) as e:
            rtype, reason = classify_tls_error(e)
            if plan.sts_testing and isinstance(e, ssl.SSLCertVerificationError):
                self.tls.record(plan, host, addr, rtype, count_metric=False, sending_ip=src)
                log.info("delivery.mta_sts_testing_failure", host=host.name, address=addr, result=rtype,
                         reason=reason)
                raise _ReportOnly() from None
            metrics.DELIVERY_CONNECTIONS.labels("tls_failed").inc()
            self.tls.record(plan, host, addr, rtype, sending_ip=src)
            text = failure_text(plan, host.name, reason) if plan.why else f"TLS with {where} failed: {reason}"
            raise _TempFail(451, "4.7.5", f"{text} (host {where})" if plan.why else text) from None
        if r.code != 220:  # offered, then refused (RFC 3207 §4: 454 "TLS not available")
            metrics.DELIVERY_CONNECTIONS.labels("tls_failed").inc()
            self.tls.record(plan, host, addr, STARTTLS_NOT_SUPPORTED, sending_ip=src)
            raise _TempFail(451, "4.7.5", f"STARTTLS refused by host {where}: {r.line()}")
        problem = self.tls.check_dane(plan, smtp.extra("ssl_object"), host)
        if problem is not None:
            metrics.DELIVERY_CONNECTIONS.labels("tls_failed").inc()
            self.tls.record(plan, host, addr, TLSA_INVALID, sending_ip=src)
            raise _TempFail(451, "4.7.5", f"{failure_text(plan, host.name, problem)} (host {where})")
        result = {"dane": "dane", "pkix": "verified"}.get(plan.auth, "encrypted")
        self.tls.record(plan, host, addr, None, "verified" if plan.sts_testing else result, sending_ip=src)

    async def _ehlo(self, smtp: SmtpClient, helo: str, where: str, mta: str) -> None:
        try:
            resp = await smtp.ehlo(helo, self.cfg.delivery.greeting_timeout)
        except (ClientError, OSError) as e:
            raise _TempFail(451, "4.4.2", f"EHLO to {where}: {_one_line(str(e))}") from None
        verb = "EHLO"
        if 500 <= resp.code < 600:
            # RFC 5321 §4.1.4: a server that does not take EHLO answers 500, 501, 502 or 550 and stays
            # where it was; HELO then opens a session without extensions (Postfix falls back too).
            # A 5xx to HELO as well is the server's verdict on the session.
            verb = "HELO"
            try:
                resp = await smtp.helo(helo, self.cfg.delivery.greeting_timeout)
            except (ClientError, OSError) as e:
                raise _TempFail(451, "4.4.2", f"HELO to {where}: {_one_line(str(e))}") from None
        if resp.code != 250:
            cls = _PermFail if resp.code >= 500 else _TempFail
            code = resp.code if resp.code >= 400 else 451
            enh, _ = _enhanced(code, resp.text)
            reply = resp.line()
            raise cls(code, enh, f"{verb} rejected by {where}: {reply}", mta, reply, verb)
        if names_us(resp.text, self.cfg.server.hostname):
            raise _Loop(f"replied to {verb}")

    async def _quit(self, conn: _Conn, wait: float = 0.0) -> None:
        """QUIT; its 221 awaited ``wait`` seconds at most: none while delivering (see SmtpClient.quit)."""
        with contextlib.suppress(Exception):
            await conn.smtp.quit(wait)
        conn.smtp.close()

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Close connections idle longer than ``idle_timeout`` (remote servers dislike idle clients)."""
        while self._idle:
            await asyncio.sleep(max(0.5, self.cfg.delivery.idle_timeout / 2))
            now = time.monotonic()
            for key, lst in list(self._idle.items()):
                keep = []
                for c in lst:
                    if now - c.idle_since > self.cfg.delivery.idle_timeout:
                        await self._quit(c)
                    else:
                        keep.append(c)
                if keep:
                    self._idle[key] = keep
                else:
                    self._idle.pop(key, None)
            for hk, keys in list(self._idle_at.items()):  # forget pools that are gone
                for k in [k for k in keys if k not in self._idle]:
                    del keys[k]
                if not keys:
                    del self._idle_at[hk]

    # --- the transaction -----------------------------------------------------------------
    async def _transaction(self, conn: _Conn, mail_from: str, rcpts: list[str], data: bytes
                           ) -> tuple[list[RcptResult], bool]:
        """MAIL, RCPT..., DATA on an open session. Returns results and whether the session is reusable.

        With PIPELINING (RFC 2920 §3.1) MAIL, every RCPT and DATA go in one write and the replies are
        read in order; otherwise each command waits for its reply. The outcome is the same either way."""
        d = self.cfg.delivery
        smtp = conn.smtp
        mta = conn.host.name
        done: dict[str, RcptResult] = {}

        def finish(code: int, enhanced: str, text: str) -> list[RcptResult]:
            return [done.get(r) or RcptResult(r, code, enhanced, text, mta) for r in rcpts]

        def finish_reply(resp: Reply, stage: str, *, final: bool = False) -> list[RcptResult]:
            """Every recipient not yet decided gets this reply of the remote's."""
            return [done.get(r) or self._reply(r, resp, mta, stage, final=final) for r in rcpts]

        conn.used += 1
        unchecked, conn.unchecked = conn.unchecked, False
        utf8 = not (mail_from.isascii() and all(r.isascii() for r in rcpts))
        limit = _size_limit(smtp)
        if limit and len(data) > limit:
            # RFC 1870 §6.1: the server said in advance it would refuse this; not sending it saves
            # the transfer and gives the sender the real reason (Postfix's smtp client does the same).
            return finish(552, "5.3.4", f"message size {len(data)} exceeds size limit {limit} of server "
                                        f"{mta}[{conn.address}]"), True
        mail = [b"MAIL FROM:<" + mail_from.encode() + b">"]
        if smtp.supports("size"):
            mail.append(b"SIZE=%d" % len(data))
        if smtp.supports("8bitmime") and not data.isascii():
            mail.append(b"BODY=8BITMIME")
        if utf8:
            if not smtp.supports("smtputf8"):
                # RFC 6531 §3.4: we cannot downgrade an internationalized address.
                return finish(553, "5.6.7", f"host {mta} does not support SMTPUTF8"), True
            mail.append(b"SMTPUTF8")
        rcpt_lines = [b"RCPT TO:<" + r.encode() + b">" for r in rcpts]
        pipelined = smtp.supports("pipelining")
        # Where a timeout or a lost connection found us, in Postfix's words: once the final dot is
        # out, the receiver may have taken the message, and the retry may deliver it again.
        doing = "sending MAIL FROM"
        try:
            try:
                smtp.send(b" ".join(mail), *([*rcpt_lines, b"DATA"] if pipelined else ()))
                resp = await smtp.reply(d.mail_timeout)
            except Timeout:
                raise
            except (ClientError, OSError):
                if unchecked:  # it was closed while idle: nothing of this message was taken
                    conn.used -= 1
                    raise _Stale() from None
                raise
            if resp.code == 421 and unchecked:  # e.g. closing after an idle or per-connection limit
                conn.used -= 1
                raise _Stale()
            if resp.code // 100 != 2:  # RFC 5321 §4.2: the first digit decides (a 251 accepts too)
                refused = finish_reply(resp, "MAIL FROM")
                if not _in_step(resp.code):
                    smtp.close()
                    return refused, False
                if pipelined and resp.code != 421:
                    # Decided: this reply came whole, and no RCPT counts without a MAIL (RFC 5321
                    # §3.3), so a broken reply or a drop in the rest of the group (RFC 2920 §3.1)
                    # ends the session but does not turn the refusal into a deferral.
                    done.update(zip(rcpts, refused, strict=True))
                    await self._abandon(smtp, len(rcpts))
                return refused, resp.code != 421
            conn.clean = False  # until the final reply to DATA (or an RSET)
            doing = "sending RCPT TO"
            accepted: list[str] = []
            for r, line in zip(rcpts, rcpt_lines, strict=True):
                if not pipelined:
                    smtp.send(line)
                resp = await smtp.reply(d.rcpt_timeout)
                if resp.code // 100 == 2:  # any 2xx (§4.2): a 252 kept as its own result read as delivered
                    accepted.append(r)
                elif resp.code == 421:
                    return finish_reply(resp, "RCPT TO"), False
                elif not _in_step(resp.code):
                    smtp.close()
                    return finish_reply(resp, "RCPT TO"), False
                else:
                    done[r] = self._reply(r, resp, mta, "RCPT TO")
            doing = "sending DATA command"
            if pipelined:
                resp = await smtp.reply(d.data_init_timeout)
                if not accepted and resp.code == 354:
                    await self._empty_message(smtp)
            if not accepted:
                return finish(451, "4.3.0", "no recipient accepted"), True
            if not pipelined:
                resp = await smtp.command(b"DATA", d.data_init_timeout)
            if resp.code != 354:  # the transaction stays open (RSET before reuse): RFC 5321 §4.1.1.4
                return finish_reply(resp, "DATA"), resp.code != 421 and resp.code // 100 in (4, 5)
            doing = "sending message body"
            await smtp.send_message(data, d.data_block_timeout)
            doing = "sending end of data -- message may be sent more than once"
            resp = await smtp.reply(d.data_done_timeout)
            conn.clean = True  # the final reply ends the transaction, whatever it says
            return finish_reply(resp, "end of DATA", final=True), resp.code != 421 and _in_step(resp.code)
        except Timeout:
            smtp.close()
            return finish(451, "4.4.2", f"conversation with {mta}[{conn.address}] timed out while {doing}"), False
        except (ClientError, OSError) as e:
            smtp.close()
            return finish(451, "4.4.2", f"lost connection with {mta}[{conn.address}] while {doing}: "
                                        f"{_one_line(str(e))}"), False

    async def _abandon(self, smtp: SmtpClient, n_rcpts: int) -> None:
        """MAIL was refused in a pipelined group: read the RCPT and DATA replies that follow, and end
        a DATA the server accepted anyway with an empty message (RFC 2920 §3.1)."""
        d = self.cfg.delivery
        for _ in range(n_rcpts):
            await smtp.reply(d.rcpt_timeout)
        if (await smtp.reply(d.data_init_timeout)).code == 354:
            await self._empty_message(smtp)

    async def _empty_message(self, smtp: SmtpClient) -> None:
        """A 354 after every recipient was refused: a lone dot ends DATA; the server has no one to
        deliver it to (RFC 2920 §3.1), so its reply does not matter."""
        smtp.send(b".")
        await smtp.reply(self.cfg.delivery.data_done_timeout)

    @staticmethod
    def _reply(rcpt: str, resp: Reply, mta: str, stage: str, *, final: bool = False) -> RcptResult:
        """A recipient's result from a remote reply: the reply is kept verbatim (once), the text
        says where it came from. Only the reply to the dot (``final``) can deliver; any other code
        that is not a refusal is out of place for its command and defers (451)."""
        code = resp.code if 400 <= resp.code < 600 or (final and 200 <= resp.code < 300) else 451
        enh, _ = _enhanced(code, resp.text)
        if stage == "RCPT TO" and code in (452, 552) and (enh[2:] == "5.3" or _TOO_MANY_RCPTS.search(resp.text)):
            # RFC 5321 §4.5.3.1.10: "too many recipients" is temporary, whatever the code (RFC 821
            # gave it 552); only that is turned into a 452: a 552 for a full mailbox stays one.
            code, enh = 452, "4.5.3"
        reply = resp.line()
        return RcptResult(rcpt, code, enh, f"host {mta} said: {reply} (in reply to {stage})", mta, reply, stage)
