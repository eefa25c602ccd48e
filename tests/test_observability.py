"""Observability through a real daemon subprocess: the structured log follows one message from
accept to final outcome by its queue id, and the sidecar's /health, /ready and /metrics answer
what operators (and docs/alerts.yml, docs/grafana-dashboard.json) rely on."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.error
import urllib.request
from collections import Counter
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
from prometheus_client.parser import text_string_to_metric_families

from mailrelayd import __version__
from mailrelayd.dkim import generate_key, write_private_key
from tests.conftest import TEST_PASSWORD, base_config, deep_merge, write_config
from tests.support.proc import DaemonProcess
from tests.support.sink import Sink
from tests.support.smtptalk import SmtpTalk
from tests.test_ops_docs import alert_rules, dashboard_expressions, promql_selectors

FIXTURES = Path(__file__).parent / "fixtures" / "feedback"


def _get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            status, body, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, body, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
    return status, (json.loads(body) if "json" in ctype else body.decode())


def _scrape(port: int) -> dict[str, Any]:
    """Family name -> family, from a live /metrics."""
    status, text = _get(port, "/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], sample: str, **labels: str) -> float:
    """Sum of the samples called ``sample`` whose labels include ``labels``."""
    total, seen = 0.0, False
    for fam in families.values():
        for s in fam.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                seen = True
    assert seen, f"no sample {sample}{labels}"
    return total


def _msg(to: list[str], frm: str = "app@example.com") -> EmailMessage:
    m = EmailMessage()
    m["From"] = frm
    m["To"] = ", ".join(to)
    m["Subject"] = "observability test"
    m.set_content("follow me through the log\n")
    return m


async def _submit(port: int, tls: ssl.SSLContext, to: list[str]) -> str:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=tls, timeout=10)
    await c.connect()
    await c.login("alice", TEST_PASSWORD)
    errors, reply = await c.send_message(_msg(to), sender="app@example.com", recipients=to)
    await c.quit()
    assert errors == {}
    return reply.rsplit(" ", 1)[1]


class _Once(dict):  # type: ignore[type-arg]
    """rcpt_replies that answer once: the first RCPT gets the scripted reply, the retry gets 250."""

    def get(self, key: Any, default: Any = None) -> Any:
        return self.pop(key, default)


async def test_one_message_followed_through_the_log(tmp_path: Path, tls_files, client_tls) -> None:
    sink = await Sink().start()
    sink.rcpt_replies = _Once({"b@two.test": "451 4.3.0 Try again later"})
    cfg = write_config(tmp_path, deep_merge(base_config(tls_files), {
        "routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
        "delivery": {"retry_initial": "1s", "retry_max": "1s", "retry_jitter": 0.0}}))
    d = await asyncio.to_thread(lambda: DaemonProcess(cfg).wait_ready())
    try:
        qid = await _submit(d.ports["submission"], client_tls, ["a@one.test", "b@two.test"])
        # A feedback message (a bounce to a local domain) and an idle session.
        t = await SmtpTalk.connect(d.ports["relay"])
        await t.ehlo()
        assert (await t.cmd("MAIL FROM:<>"))[0] == 250
        assert (await t.cmd("RCPT TO:<postmaster@bounces.test.example>"))[0] == 250
        assert (await t.cmd("DATA"))[0] == 354
        code, text = await t.cmd((FIXTURES / "dsn-hard.eml").read_bytes().replace(b"\r\n", b"\n")
                                 .replace(b"\n", b"\r\n") + b".")
        assert code == 250, text
        fb_qid = text.rsplit(" ", 1)[1]
        await t.cmd("QUIT")
        await t.close()
        t = await SmtpTalk.connect(d.ports["relay"])
        await t.ehlo()
        await t.cmd("QUIT")
        await t.close()

        await sink.wait_for(2)
        await asyncio.to_thread(d.wait_event, "message.done", 20, queue_id=qid)
        await asyncio.to_thread(d.wait_event, "feedback.received", 20, queue_id=fb_qid)
        await asyncio.to_thread(d.wait_event, "message.done", 20, queue_id=fb_qid)
    finally:
        assert await asyncio.to_thread(d.stop) == 0
        await sink.stop()

    # Every line of output is one JSON object with ts, level and event.
    assert d.lines and len(d.events) == len(d.lines), [ln for ln in d.lines if not ln.startswith("{")]
    for ev in d.events:
        assert {"ts", "level", "event"} <= ev.keys(), ev
        assert ev["ts"].endswith("Z") or "+00:00" in ev["ts"], ev

    # --- follow the message by its queue id ------------------------------------------------
    mine = [ev for ev in d.events if ev.get("queue_id") == qid]
    names = Counter(ev["event"] for ev in mine)
    assert names == {"message.accepted": 1, "delivery.attempt": 3, "message.done": 1}, names
    assert mine[0]["event"] == "message.accepted" and mine[-1]["event"] == "message.done"

    accepted = mine[0]
    assert accepted["listener"] == "submission" and accepted["peer"] == "127.0.0.1" and accepted["session"]
    assert accepted["mail_from"] == "app@example.com" and accepted["rcpts"] == 2 and accepted["user"] == "alice"
    assert accepted["size"] > 0 and accepted["level"] == "info"

    attempts = [ev for ev in mine if ev["event"] == "delivery.attempt"]
    per_rcpt = [(r["rcpt"], r["code"]) for ev in attempts for r in ev["results"]]
    assert sorted(per_rcpt) == [("a@one.test", 250), ("b@two.test", 250), ("b@two.test", 451)]
    # The deferral comes before the successful retry, each attempt names its domain and return path.
    b_codes = [r["code"] for ev in attempts for r in ev["results"] if r["rcpt"] == "b@two.test"]
    assert b_codes == [451, 250]
    for ev in attempts:
        assert ev["domain"] == ev["results"][0]["rcpt"].split("@")[1]
        assert ev["mail_from"] and ev["duration"] >= 0
        assert all({"rcpt", "code", "status", "mta", "text"} <= r.keys() for r in ev["results"])
    deferred = next(r for ev in attempts for r in ev["results"] if r["code"] == 451)
    assert deferred["status"] == "4.3.0" and "Try again later" in deferred["text"]

    done = mine[-1]
    assert done["states"] == {"delivered": 1} and done["age"] >= 1  # the last recipient, after the retry

    # --- one smtp.session per session, linked to the message by its session id ------------
    sessions = [ev for ev in d.events if ev["event"] == "smtp.session"]
    assert len(sessions) == 3, sessions
    assert len({s["session"] for s in sessions}) == 3
    sub = [s for s in sessions if s["session"] == accepted["session"]]
    assert len(sub) == 1
    assert sub[0]["listener"] == "submission" and sub[0]["peer"] == "127.0.0.1"
    assert sub[0]["user"] == "alice" and sub[0]["messages"] == 1 and sub[0]["end"] == "quit"
    assert sub[0]["tls"] and sub[0]["duration"] >= 0
    relay = sorted((s for s in sessions if s["listener"] == "relay"), key=lambda s: s["messages"])
    assert [s["messages"] for s in relay] == [0, 1] and all(s["trusted"] for s in relay)

    # --- one feedback event per feedback message ------------------------------------------
    fb = [ev for ev in d.events if ev["event"] == "feedback.received"]
    assert len(fb) == 1 and fb[0]["queue_id"] == fb_qid
    assert fb[0]["kind"] == "hard_bounce"
    assert [r["address"].lower() for r in fb[0]["recipients"]] == ["nobody-here@example.net"]
    fb_events = Counter(ev["event"] for ev in d.events if ev.get("queue_id") == fb_qid)
    assert fb_events == {"message.accepted": 1, "feedback.received": 1, "message.done": 1}, fb_events


def _dkim_config(tmp_path: Path, tls_files, **over: Any) -> Path:
    pem, _ = generate_key("ed25519-sha256")
    write_private_key(tmp_path / "dkim.key", pem)
    return write_config(tmp_path, deep_merge(base_config(tls_files), {
        "dkim": [{"domain": "example.com", "selector": "s1", "key_file": "dkim.key",
                  "algorithm": "ed25519-sha256"}], **over}))


def test_sidecar_health_ready_and_metrics_after_traffic(tmp_path: Path, tls_files, client_tls) -> None:
    d = DaemonProcess(_dkim_config(tmp_path, tls_files)).wait_ready()
    try:
        status, health = _get(d.http_port, "/health")
        assert status == 200 and health["status"] == "ok" and health["version"] == __version__
        assert isinstance(health["uptime_s"], int | float) and health["uptime_s"] >= 0
        status, ready = _get(d.http_port, "/ready")
        assert status == 200 and ready["status"] == "ok", ready
        assert ready["checks"] == {"listeners": "ok", "spool": "ok", "tls": "ok", "dkim": "ok", "scheduler": "ok",
                                 "spool_integrity": "ok", "delivery": "ok"}

        before = _scrape(d.http_port)
        assert "mailrelayd_build_info" in before or "mailrelayd_build" in before
        assert _value(before, "mailrelayd_build_info", version=__version__) == 1
        assert _value(before, "process_cpu_seconds_total") > 0
        assert _value(before, "mailrelayd_ready") == 1
        assert _value(before, "mailrelayd_dkim_keys_loaded") == 1
        assert _value(before, "mailrelayd_queue_messages") == 0

        # Traffic: one message (its route goes nowhere, so it stays queued) and one refused relay.
        qid = asyncio.run(_submit(d.ports["submission"], client_tls, ["x@dest.test"]))

        async def refused() -> None:
            t = await SmtpTalk.connect(d.ports["relay"], source="127.0.0.2")
            await t.ehlo()
            await t.cmd("MAIL FROM:<a@outside.test>")
            assert (await t.cmd("RCPT TO:<b@elsewhere.test>"))[0] == 554
            await t.cmd("QUIT")
            await t.close()

        asyncio.run(refused())
        d.wait_event("delivery.attempt", queue_id=qid)
        d.wait_event("smtp.session", listener="relay")
        # The attempt is logged before its outcome is written to the spool: wait for the deferral.
        deadline = time.monotonic() + 10
        while True:
            after = _scrape(d.http_port)
            if _value(after, "mailrelayd_queue_recipients", state="deferred") == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert _value(after, "mailrelayd_connections_total", listener="submission", result="accepted") == 1
        assert _value(after, "mailrelayd_connections_total", listener="relay", result="accepted") == 1
        assert _value(after, "mailrelayd_smtp_replies_total", listener="submission", command="DATA",
                      **{"class": "2xx"}) >= 1
        assert _value(after, "mailrelayd_smtp_replies_total", listener="relay", command="RCPT",
                      **{"class": "5xx"}) == 1
        assert _value(after, "mailrelayd_messages_received_total", listener="submission") == 1
        assert _value(after, "mailrelayd_recipients_received_total", listener="submission") == 1
        assert _value(after, "mailrelayd_message_size_bytes_count", listener="submission") == 1
        assert _value(after, "mailrelayd_auth_attempts_total", listener="submission") >= 1
        assert _value(after, "mailrelayd_dkim_signatures_total", domain="example.com", result="ok") == 1
        assert _value(after, "mailrelayd_queue_messages") == 1
        assert _value(after, "mailrelayd_queue_recipients", state="deferred") == 1
        assert _value(after, "mailrelayd_queue_oldest_message_age_seconds") >= 0
        assert _value(after, "mailrelayd_delivery_attempts_total", result="deferred") == 1
        assert _value(after, "mailrelayd_delivery_connections_total", result="refused") >= 1
        assert _value(after, "mailrelayd_spool_free_bytes") > 0
        assert _value(after, "mailrelayd_connections_active", listener="submission") == 0

        _docs_metrics_are_live(after)
    finally:
        assert d.stop() == 0


def _family_of(name: str, families: dict[str, Any]) -> str | None:
    """The live family that exposes series ``name`` (counters/histograms add suffixes)."""
    if name in families:
        return name
    for suffix in ("_total", "_created", "_bucket", "_sum", "_count", "_info"):
        if name.endswith(suffix) and name[: -len(suffix)] in families:
            return name[: -len(suffix)]
    return None


def _docs_metrics_are_live(families: dict[str, Any]) -> None:
    """Every metric named by an alert rule or a dashboard panel is in the live exposition: as a
    sample, or (a labelled metric nothing has observed yet) as a declared family."""
    used: set[str] = set()
    for rule in alert_rules():
        used |= promql_selectors(rule["expr"])[0]
    for _, expr in dashboard_expressions():
        used |= promql_selectors(expr)[0]
    used -= {"up", "time"}  # from Prometheus itself
    assert len(used) > 10, used
    samples = {s.name for f in families.values() for s in f.samples}
    missing = []
    for name in sorted(used):
        fam = _family_of(name, families)
        if fam is None:
            missing.append(name)
        elif families[fam].samples and name not in samples:
            missing.append(f"{name} (family {fam} has samples {sorted({s.name for s in families[fam].samples})})")
    assert missing == [], missing


def test_ready_degraded_is_visible_in_metrics_too(tmp_path: Path, tls_files) -> None:
    cfg = write_config(tmp_path, deep_merge(base_config(tls_files), {"server": {"min_free_space": "100000GB"}}))
    d = DaemonProcess(cfg).wait_ready()
    try:
        status, ready = _get(d.http_port, "/ready")
        assert status == 503 and ready["status"] == "degraded"
        assert ready["checks"]["spool"].startswith("fail: ") and "min_free_space" in ready["checks"]["spool"]
        assert {k for k, v in ready["checks"].items() if v != "ok"} == {"spool"}
        fams = _scrape(d.http_port)
        assert _value(fams, "mailrelayd_ready") == 0
        assert _value(fams, "mailrelayd_ready_check", check="spool") == 0
        assert _value(fams, "mailrelayd_ready_check", check="listeners") == 1
        assert _value(fams, "mailrelayd_ready_check", check="tls") == 1
        assert _get(d.http_port, "/health")[0] == 200
        assert _get(d.http_port, "/nope")[0] == 404
    finally:
        assert d.stop() == 0
