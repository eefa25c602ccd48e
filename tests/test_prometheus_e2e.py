"""A real Prometheus (Debian's ``prometheus`` server) scrapes a real daemon; every alert
expression of docs/alerts.yml and every query of docs/grafana-dashboard.json is evaluated
through its HTTP API after a short mixed workload.

What "returns a series" means here:
- every expression must parse and evaluate without error (Prometheus also loads alerts.yml as
  its rule file: every rule must report health "ok");
- a dashboard query must return at least one series, unless it is a filter (a comparison at the
  top, like the restart annotation ``changes(...) > 0``), which is judged like an alert;
- an alert expression is legitimately empty while it does not fire, so its operands are judged
  instead: the expression is split at its top-level comparison and set operators (``> 0.2``,
  ``and``, ``unless``, ``or on (...)``), ``absent(x)`` is replaced by ``x``, scalar literals are
  dropped, and every remaining operand (the rate, the ratio, the gauge) must return a series.
  A ratio of two zero rates is NaN, which is still a series: the family and its labels exist.
Grafana variables become match-all (``$instance`` -> ``.*``) and ``$__rate_interval`` 30s.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from mailrelayd.dkim import generate_key, write_private_key
from tests.conftest import REPO, TEST_PASSWORD, base_config, deep_merge, write_config
from tests.support.proc import DaemonProcess
from tests.support.sink import Sink
from tests.test_ops_docs import alert_rules, dashboard_expressions

PROMETHEUS = shutil.which("prometheus")
ALERTS = REPO / "docs" / "alerts.yml"

_CMP = ("==", "!=", ">=", "<=", ">", "<")
_WORD_OPS = ("and", "or", "unless")
_MODIFIER = re.compile(r"^\s*(?:bool\b|(?:on|ignoring|group_left|group_right)\s*(?:\([^)]*\))?)\s*", re.S)
_SCALAR = re.compile(r"[\d\s.+\-*/^%()e]+")


# A webhook whose receiver is down (discard port): its families (sent, failed, backlog) have series.
_WEBHOOK = {"webhooks": [{"url": "http://127.0.0.1:9/hook", "secret_file": "hook.secret", "name": "app"}]}

def _scan(expr: str) -> Iterator[tuple[int, int]]:
    """(index, bracket depth before it) of every character outside string literals."""
    depth, quote, i = 0, "", 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        else:
            yield i, depth
            depth += (c in "([{") - (c in ")]}")
        i += 1


def _strip_outer(expr: str) -> str:
    expr = expr.strip()
    while expr.startswith("(") and _match_paren(expr) == len(expr) - 1:
        expr = expr[1:-1].strip()
    return expr


def _match_paren(expr: str) -> int:
    """Index of the bracket closing the one at index 0."""
    return next((i for i, depth in _scan(expr) if i and depth == 1 and expr[i] in ")]}"), -1)


def _split_top(expr: str) -> list[str]:
    """Operands of the top-level comparison and set operators of ``expr``."""
    parts: list[str] = []
    start = skip = 0
    for i, depth in _scan(expr):
        if i < skip or depth != 0 or expr[i] in "([{":
            continue
        op = next((o for o in _CMP if expr.startswith(o, i)), None)
        if op is None:
            before = expr[i - 1] if i else " "
            for w in _WORD_OPS:
                after = expr[i + len(w)] if i + len(w) < len(expr) else " "
                if expr.startswith(w, i) and not (before.isalnum() or before in "_:") \
                        and not (after.isalnum() or after in "_:"):
                    op = w
                    break
        if op is not None:
            parts.append(expr[start:i])
            start = skip = i + len(op)
    parts.append(expr[start:])
    return parts


def operands(expr: str) -> list[str]:
    """The vector operands an alert's verdict is computed from (see the module docstring)."""
    expr = _strip_outer(expr)
    parts = _split_top(expr)
    if len(parts) == 1:
        m = re.fullmatch(r"absent\s*\((.*)\)", expr, re.S)
        if m:
            return operands(m.group(1))
        return [] if _SCALAR.fullmatch(expr) else [expr]
    out: list[str] = []
    for p in parts:
        while True:
            m = _MODIFIER.match(p)
            if not m or not m.group(0).strip():
                break
            p = p[m.end():]
        out += operands(p)
    return out


def test_operand_splitting() -> None:
    assert operands('sum by (a) (rate(x{y=">"}[5m])) > 0.2 <= 0.5\n and\n sum(z) >= 100') == \
        ['sum by (a) (rate(x{y=">"}[5m]))', "sum(z)"]
    assert operands("(\n (r == 0)\n and on (i, j)\n (s == 0)\n)\nor on (i, j)\n (s == 0)") == ["r", "s", "s"]
    assert operands('absent(up{job="m"})') == ['up{job="m"}']
    assert operands("m_free < 1024 ^ 3") == ["m_free"]
    assert operands("((x > 0) - time()) < 7 * 86400") == ["(x > 0) - time()"]
    assert operands("a unless on (i) b > 0") == ["a", "b"]
    assert operands("random_orders_total") == ["random_orders_total"]


def _grafana(expr: str) -> str:
    expr = expr.replace("$__rate_interval", "30s")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prom:
    def __init__(self, port: int, http: aiohttp.ClientSession) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.http = http

    async def query(self, expr: str) -> tuple[str, Any]:
        """("success", result) or ("error", message)."""
        async with self.http.post(f"{self.base}/api/v1/query", data={"query": expr, "time": str(time.time())}) as r:
            body = await r.json()
        if body.get("status") != "success":
            return "error", f"{body.get('errorType')}: {body.get('error')}"
        return "success", body["data"]["result"]

    async def rules(self) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.base}/api/v1/rules") as r:
            body = await r.json()
        return [rule for g in body["data"]["groups"] for rule in g["rules"]]


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[Any]:
    """``await prometheus(target)`` starts the server scraping ``target`` every second."""
    if PROMETHEUS is None:
        pytest.skip("no prometheus server binary (tests/system-deps.sh installs Debian's prometheus package)")
    procs: list[subprocess.Popen[bytes]] = []
    http = aiohttp.ClientSession()

    async def start(target: str) -> Prom:
        d = tmp_path / "prometheus"
        d.mkdir()
        (d / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {ALERTS}\n"
            "scrape_configs:\n  - job_name: mailrelayd\n    static_configs:\n"
            f"      - targets: ['{target}']\n")
        port = _free_port()
        log = open(d / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
        assert PROMETHEUS is not None
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={d / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=d)
        procs.append(proc)
        deadline = time.monotonic() + 60
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/-/ready") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("prometheus did not start:\n" + (d / "prometheus.log").read_text()[-3000:])
            await asyncio.sleep(0.2)
        return Prom(port, http)

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    await http.close()


def _msg(to: str, frm: str = "app@example.com") -> EmailMessage:
    m = EmailMessage()
    m["From"] = frm
    m["To"] = to
    m["Subject"] = "prometheus workload"
    m.set_content("hello\n")
    return m


async def _workload(d: DaemonProcess, client_tls: ssl.SSLContext) -> None:
    """Deliveries, a bounce (DSN), a deferral, an AUTH failure, a failed TLS handshake and a
    feedback message: the events behind every family."""
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.ports["submission"], start_tls=True, tls_context=client_tls,
                        timeout=20)
    await c.connect()
    await c.login("alice", TEST_PASSWORD)
    for to in ("ok1@dest.test", "ok2@dest.test", "gone@dest.test", "later@dest.test"):
        await c.send_message(_msg(to))
    await c.quit()
    bad = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.ports["submission"], start_tls=True, tls_context=client_tls,
                          timeout=20)
    await bad.connect()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await bad.login("alice", "wrong password")
    await bad.quit()
    r, w = await asyncio.open_connection("127.0.0.1", d.ports["submissions"])
    w.write(b"EHLO not-tls\r\n" * 4)
    await w.drain()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):  # the server gives up the handshake
        await asyncio.wait_for(r.readexactly(10_000), 30)
    w.close()
    relay = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.ports["relay"], timeout=20, start_tls=False)
    await relay.connect()
    await relay.sendmail("mailer-daemon@remote.example", ["bounces@bounces.test.example"],
                         b"From: mailer-daemon@remote.example\r\nSubject: hi\r\n\r\nnot a bounce\r\n")
    await relay.quit()


async def test_alerts_and_dashboard_evaluate_against_a_real_prometheus(prometheus, tmp_path: Path, tls_files,
                                                                       client_tls) -> None:
    sink = await Sink().start()
    sink.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    sink.rcpt_replies["later@dest.test"] = "451 4.7.1 Greylisted"
    pem, _ = generate_key("ed25519-sha256")
    write_private_key(tmp_path / "dkim.key", pem)
    (tmp_path / "hook.secret").write_text("webhook-secret\n")
    cfg = write_config(tmp_path, deep_merge(base_config(tls_files), {
        "dkim": [{"domain": "example.com", "selector": "s1", "key_file": "dkim.key", "algorithm": "ed25519-sha256"}],
        "routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
        "delivery": {"retry_initial": "2s", "retry_max": "2s"},
        **_WEBHOOK}))
    d = DaemonProcess(cfg).wait_ready()
    try:
        prom = await prometheus(f"127.0.0.1:{d.http_port}")
        # First, a scrape before any traffic: every labelled family is already there.
        for _ in range(150):
            st, res = await prom.query('count(up{job="mailrelayd"} == 1)')
            if st == "success" and res:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("prometheus never scraped the daemon")
        for family in ("mailrelayd_delivery_attempts_total", "mailrelayd_auth_failures_total",
                       "mailrelayd_tls_handshake_failures_total", "mailrelayd_feedback_received_total",
                       "mailrelayd_connections_total", "mailrelayd_accept_duration_seconds_count",
                       "mailrelayd_sent_recipients_total", "mailrelayd_smtp_replies_total"):
            st, res = await prom.query(family)
            assert st == "success" and res, f"{family} missing from a scrape before any traffic"

        await _workload(d, client_tls)
        await sink.wait_for(3, timeout=30)  # two deliveries and the DSN for gone@
        t_end = time.time()
        # Enough scrapes and rule evaluations after the workload for rate() and deriv().
        while time.time() - t_end < 5:
            await asyncio.sleep(0.5)

        problems: list[str] = []
        for rule in await prom.rules():
            if rule.get("health") != "ok":
                problems.append(f"rule {rule['name']}: health {rule.get('health')}: {rule.get('lastError')}")
        for rule in alert_rules():
            expr = rule["expr"]
            st, res = await prom.query(expr)
            if st != "success":
                problems.append(f"alert {rule['alert']}: {res}")
                continue
            for op in operands(expr):
                st, res = await prom.query(op)
                if st != "success" or not res:
                    problems.append(f"alert {rule['alert']}: operand returns no series: {op.strip()}"
                                    + (f" ({res})" if st != "success" else ""))
        for where, raw in dashboard_expressions():
            expr = _grafana(raw)
            st, res = await prom.query(expr)
            if st != "success":
                problems.append(f"dashboard {where}: {res}")
            elif not res:
                ops = operands(expr)
                if ops == [_strip_outer(expr)]:
                    problems.append(f"dashboard {where}: no series: {expr}")
                for op in ops:
                    st, r2 = await prom.query(op)
                    if st != "success" or not r2:
                        problems.append(f"dashboard {where}: operand returns no series: {op}")
        assert not problems, "\n".join(problems)
        # The workload really happened (the zeros above are not all there is).
        st, res = await prom.query('sum(mailrelayd_delivery_attempts_total{result="delivered"})')
        assert st == "success" and float(res[0]["value"][1]) >= 2
        st, res = await prom.query("sum(mailrelayd_auth_failures_total)")
        assert st == "success" and float(res[0]["value"][1]) >= 1
    finally:
        d.stop()
        await sink.stop()


def test_every_family_is_in_the_first_scrape(tmp_path: Path, tls_files) -> None:
    """Without Prometheus: the daemon's very first /metrics has a sample for every family (with a
    DKIM key configured: without one, the DKIM signature family has no label values to show)."""
    import urllib.request

    pem, _ = generate_key("ed25519-sha256")
    write_private_key(tmp_path / "dkim.key", pem)
    (tmp_path / "hook.secret").write_text("webhook-secret\n")
    cfg = write_config(tmp_path, deep_merge(base_config(tls_files), {
        "dkim": [{"domain": "example.com", "selector": "s1", "key_file": "dkim.key", "algorithm": "ed25519-sha256"}],
        **_WEBHOOK}))
    d = DaemonProcess(cfg).wait_ready()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{d.http_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        d.stop()
    families = re.findall(r"^# TYPE (mailrelayd_\w+) (\w+)$", text, re.M)
    assert len(families) > 20
    empty = []
    for name, kind in families:
        sample = name if kind not in ("histogram", "summary") else f"{name}_count"
        if not re.search(rf"^{re.escape(sample)}(\{{|\s)", text, re.M):
            empty.append(name)
    assert not empty, f"families without a sample in the first scrape: {empty}"
