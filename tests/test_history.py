"""`mailrelayd history` after delivery, deferral, bounce and suppression: through the admin socket of
a running daemon, and on the spool when the daemon is stopped; the Message-ID and AUTH user are
logged at accept."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiosmtplib

from mailrelayd.spool.store import HistoryQuery
from tests.conftest import TEST_PASSWORD, mailrelayd_cmd
from tests.support.sink import Sink


async def _submit(port: int, tls: Any, to: list[str], msgid: str) -> str:
    body = (f"From: app@example.com\r\nTo: {', '.join(to)}\r\nSubject: password reset\r\n"
            f"Message-ID: {msgid}\r\n\r\nyour link\r\n")
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=tls, timeout=10)
    await c.connect()
    await c.login("alice", TEST_PASSWORD)
    _, reply = await c.sendmail("app@example.com", to, body.encode())
    await c.quit()
    return reply.rsplit(" ", 1)[1]


async def _history(config: Path, *args: str) -> tuple[int, Any]:
    env = {**os.environ, "MAILRELAYD_CONFIG": str(config)}
    p = await asyncio.create_subprocess_exec(*mailrelayd_cmd(), "history", *args, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(p.communicate(), 60)
    if "--json" in args:
        return p.returncode or 0, json.loads(out)
    return p.returncode or 0, out.decode() + err.decode()


async def _until(pred: Any, timeout: float = 20) -> None:
    async def poll() -> None:
        while not await pred():
            await asyncio.sleep(0.1)
    await asyncio.wait_for(poll(), timeout)


async def test_history_after_delivery_deferral_bounce_and_suppression(start_daemon, client_tls, capfd) -> None:
    sink = await Sink().start()
    sink.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    sink.rcpt_replies["later@dest.test"] = "451 4.2.0 Mailbox busy"
    sink.rcpt_replies["flaky@dest.test"] = "452 4.2.2 Over quota"
    try:
        d = await start_daemon({"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
                                "delivery": {"retry_initial": "1s", "retry_max": "1s", "retry_jitter": 0.0}})
        qid = await _submit(d.port("submission"), client_tls,
                            ["ok@dest.test", "gone@dest.test", "later@dest.test", "flaky@dest.test"],
                            "<reset-42@example.com>")
        await _submit(d.port("submission"), client_tls, ["other@dest.test"], "<unrelated@example.com>")
        accepted = [json.loads(x) for x in capfd.readouterr().out.splitlines() if '"message.accepted"' in x]
        assert {(a["message_id"], a["user"]) for a in accepted} >= {("<reset-42@example.com>", "alice")}

        async def deferred_once() -> bool:
            recs = {h.recipient: h for h in await d.spool.history(HistoryQuery(message_id="reset-42@example.com"))}
            return recs.get("flaky@dest.test") is not None and recs["flaky@dest.test"].state == "deferred"
        await _until(deferred_once)
        # The address gets suppressed while the message waits: the next attempt skips it.
        await asyncio.to_thread(d.daemon.suppressions.add, "flaky@dest.test", "complained by phone")

        async def settled() -> bool:
            q = HistoryQuery(message_id="reset-42@example.com")
            recs = {h.recipient: h.state for h in await d.spool.history(q)}
            return recs.get("flaky@dest.test") == "suppressed" and recs.get("ok@dest.test") == "delivered"
        await _until(settled)

        code, rows = await _history(d.config, "--message-id", "reset-42@example.com", "--json")
        assert code == 0
        by = {r["recipient"]: r for r in rows}
        assert {r: x["state"] for r, x in by.items()} == {
            "ok@dest.test": "delivered", "gone@dest.test": "bounced", "later@dest.test": "deferred",
            "flaky@dest.test": "suppressed"}
        assert all(r["queue_id"] == qid and r["message_id"] == "<reset-42@example.com>" for r in rows)
        assert by["gone@dest.test"]["last_reply"].startswith("550 5.1.1")
        assert by["later@dest.test"]["last_reply"].startswith("451 4.2.0")
        assert by["ok@dest.test"]["sender"] == "app@example.com" and by["ok@dest.test"]["user"] == "alice"
        assert by["ok@dest.test"]["time"].endswith("Z")
        # Other filters.
        code, rows = await _history(d.config, "--rcpt", "OTHER@dest.test", "--since", "2h", "--json")
        assert [r["message_id"] for r in rows] == ["<unrelated@example.com>"]
        code, rows = await _history(d.config, "--user", "alice", "--sender", "app@example.com", "--json")
        assert len(rows) == 5
        code, rows = await _history(d.config, "--user", "bob", "--json")
        assert rows == []
        code, text = await _history(d.config, "--message-id", "<reset-42@example.com>")
        assert code == 0 and "bounced" in text and "gone@dest.test" in text
        code, text = await _history(d.config, "--message-id", "<nope@example.com>")
        assert code == 1 and "no matching" in text
        await d.stop()
        # Daemon stopped: the same answer from the spool directly (the bounce DSN is history too).
        code, rows = await _history(d.config, "--message-id", "reset-42@example.com", "--json")
        assert code == 0 and {r["recipient"] for r in rows} == set(by)
    finally:
        await sink.stop()


async def test_history_retention_is_configurable(start_daemon) -> None:
    from mailrelayd.config import ConfigError, load_config

    d = await start_daemon({"history": {"retention": "60d"}})
    assert d.daemon.cfg.history.retention == 60 * 86400
    text = d.config.read_text() + '\n'
    d.config.write_text(text.replace('retention = "60d"', 'retention = "1h"'))
    try:
        load_config(d.config)
        raise AssertionError("1h retention accepted")
    except ConfigError as e:
        assert "history.retention" in str(e)
