"""SMTP TLS Reporting (RFC 8460): count outbound TLS results per policy domain and day, build the
daily JSON report, and say where it goes (the ``rua`` of ``_smtp._tls.<domain>``).

Recording is a dict update on the delivery path; saving to ``<state_dir>/tlsrpt/<day>.json`` happens
in a thread. Building, compressing and the report mail are pure functions.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

from mailrelayd.config import Config
from mailrelayd.delivery.tlspolicy import ReportPolicy

MAX_DOMAINS_PER_DAY = 100_000
"""Bound on memory: past it, further domains of that day are not recorded."""
MAX_POLICIES_PER_DOMAIN = 50
"""Per domain and day: distinct policies kept. A policy domain chooses its policy text (up to 64 KiB)
and, with max_age 0, gets it fetched again for every message: each new text was a new entry."""
MAX_FAILURE_ROWS = 1000
"""Per policy: distinct failure-details rows kept (RFC 8460 §4.4 allows aggregation)."""


@dataclass
class _PolicyCounts:
    success: int = 0
    failures: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    """(result-type, sending-mta-ip, receiving-mx-hostname, receiving-ip) -> count"""


class TlsRptLog:
    """Results by day -> policy domain -> policy (type, strings, mx-host)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._days: dict[str, dict[str, dict[ReportPolicy, _PolicyCounts]]] = {}
        self._dirty: set[str] = set()

    def record(self, policy: ReportPolicy, result_type: str | None, *, mx: str = "", receiving_ip: str = "",
               sending_ip: str = "", now: float | None = None) -> None:
        """One session's outcome: ``result_type`` None is a success (RFC 8460 §4.3)."""
        day = day_of(time.time() if now is None else now)
        domains = self._days.setdefault(day, {})
        policies = domains.get(policy.domain)
        if policies is None:
            if len(domains) >= MAX_DOMAINS_PER_DAY:
                return
            policies = domains[policy.domain] = {}
        counts = policies.get(policy)
        if counts is None:
            if len(policies) >= MAX_POLICIES_PER_DOMAIN:
                return
            counts = policies[policy] = _PolicyCounts()
        if result_type is None:
            counts.success += 1
        else:
            key = (result_type, sending_ip, mx, receiving_ip)
            if key in counts.failures or len(counts.failures) < MAX_FAILURE_ROWS:
                counts.failures[key] = counts.failures.get(key, 0) + 1
        self._dirty.add(day)

    # --- persistence ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Changed days as JSON-ready data (taken on the event loop; written by :meth:`save`)."""
        out = {day: _dump(self._days.get(day, {})) for day in self._dirty}
        self._dirty.clear()
        return out

    def save(self, snap: dict[str, list[dict[str, Any]]]) -> None:
        if self.directory is None or not snap:
            return
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for day, rows in snap.items():
            path = self.directory / f"{day}.json"
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(rows, f)
            os.replace(tmp, path)

    def load(self) -> None:
        """Read saved days back (startup), so a restart does not lose the day's counts."""
        if self.directory is None or not self.directory.is_dir():
            return
        for path in self.directory.glob("*.json"):
            rows = load_day(path)
            if rows is not None:
                self._days[path.stem] = _undump(rows)

    def forget(self, day: str) -> None:
        self._days.pop(day, None)
        self._dirty.discard(day)


def report_identity(cfg: Config) -> tuple[str, str, str]:
    """(organization-name, contact-info, submitter) from ``[tls_rpt]``."""
    t = cfg.tls_rpt
    submitter = t.reporting_domain or cfg.server.hostname
    return (t.organization_name or submitter, t.contact_info or f"mailto:postmaster@{submitter}", submitter)


def day_of(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d")


def _dump(domains: dict[str, dict[ReportPolicy, _PolicyCounts]]) -> list[dict[str, Any]]:
    return [{"type": p.type, "domain": p.domain, "strings": list(p.strings), "mx_host": list(p.mx_host),
             "success": c.success, "failures": [[*k, n] for k, n in c.failures.items()]}
            for policies in domains.values() for p, c in policies.items()]


def _undump(rows: list[dict[str, Any]]) -> dict[str, dict[ReportPolicy, _PolicyCounts]]:
    out: dict[str, dict[ReportPolicy, _PolicyCounts]] = {}
    for r in rows:
        p = ReportPolicy(r["type"], r["domain"], tuple(r["strings"]), tuple(r["mx_host"]))
        c = _PolicyCounts(int(r["success"]), {(a, b, c_, d): int(n) for a, b, c_, d, n in r["failures"]})
        out.setdefault(p.domain, {})[p] = c
    return out


def load_day(path: Path) -> list[dict[str, Any]] | None:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rows if isinstance(rows, list) else None


# --- the report (pure) ------------------------------------------------------------------------
def build_reports(rows: list[dict[str, Any]], day: str, *, organization: str, contact: str,
                  submitter: str) -> dict[str, dict[str, Any]]:
    """One RFC 8460 §4.4 report per policy domain for ``day`` (YYYY-MM-DD, UTC)."""
    by_domain: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_domain.setdefault(r["domain"], []).append(r)
    reports = {}
    for domain, policies in sorted(by_domain.items()):
        entries = []
        for r in policies:
            policy: dict[str, Any] = {"policy-type": r["type"], "policy-domain": domain}
            if r["strings"]:
                policy["policy-string"] = list(r["strings"])
            if r["mx_host"]:
                policy["mx-host"] = list(r["mx_host"])
            failures = [{"result-type": rt, **({"sending-mta-ip": sip} if sip else {}),
                         **({"receiving-mx-hostname": mx} if mx else {}),
                         **({"receiving-ip": rip} if rip else {}), "failed-session-count": n}
                        for rt, sip, mx, rip, n in r["failures"]]
            entry: dict[str, Any] = {
                "policy": policy,
                "summary": {"total-successful-session-count": r["success"],
                            "total-failure-session-count": sum(f["failed-session-count"] for f in failures)},
            }
            if failures:
                entry["failure-details"] = failures
            entries.append(entry)
        reports[domain] = {
            "organization-name": organization,
            "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
            "contact-info": contact,
            "report-id": f"{day}_{domain}@{submitter}",
            "policies": entries,
        }
    return reports


def report_filename(submitter: str, domain: str, day: str) -> str:
    """RFC 8460 §5.1: submitter!policy-domain!begin!end.json.gz (begin/end as Unix times)."""
    start = int(dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.UTC).timestamp())
    return f"{submitter}!{domain}!{start}!{start + 86399}.json.gz"


def gzip_report(report: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(report, separators=(",", ":")).encode(), mtime=0)


_RUA_RE = re.compile(r"^v=TLSRPTv1\s*;")


MAX_RUA = 5
"""Of each kind (mailto, https), the valid rua URIs used: the record is the remote domain's, and each
costs a recipient or a POST of up to a minute (RFC 8460 §3 sets no number)."""


def parse_rua(texts: list[str]) -> list[str]:
    """The ``rua`` URIs of a ``_smtp._tls`` TXT record (RFC 8460 §3); [] if none is valid."""
    found = [t for t in texts if _RUA_RE.match(t)]
    if len(found) != 1:
        return []
    for part in found[0].split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k.strip() == "rua":
            uris = [u.strip() for u in v.split(",") if u.strip()]
            return [u for u in uris if u.lower().startswith(("mailto:", "https:"))]
    return []


def report_mail(report: dict[str, Any], *, to: list[str], domain: str, submitter: str, from_addr: str,
                filename: str, now: float | None = None) -> bytes:
    """RFC 8460 §5.3: multipart/report; report-type="tlsrpt" with the gzip JSON attached."""
    msg = EmailMessage()
    msg["From"] = from_addr
    msg["To"] = ", ".join(to)
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report['report-id']}>"
    msg["Date"] = formatdate(now, usegmt=True)
    msg["Message-ID"] = make_msgid(idstring=uuid.uuid4().hex[:12], domain=submitter)
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg.set_content(f"This is an aggregate TLS report from {submitter} for {domain} (RFC 8460).\n")
    msg.add_attachment(gzip_report(report), maintype="application", subtype="tlsrpt+gzip", filename=filename)
    msg.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"; boundary="'
                       + str(msg.get_boundary()) + '"')
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
