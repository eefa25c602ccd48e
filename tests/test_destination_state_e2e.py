"""Destination state that must outlive the process, through the real daemon: a suspension after a
throttling reply survives kill -9 (nobody is contacted before it ends, nothing bounces); the CLI
shows and lifts it; held recipients have their own queue gauge. Remote MTAs are loopback sinks."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from mailrelayd.spool.store import Spool
from tests.conftest import base_config, deep_merge, write_config
from tests.support.proc import LOOPS, DaemonProcess
from tests.support.sink import Sink
from tests.support.smtptalk import SmtpTalk


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


async def _relay(port: int, rcpts: list[str]) -> list[str]:
    """One relay session (127.0.0.1 is a trusted network), one message per recipient."""
    t = await SmtpTalk.connect(port)
    await t.ehlo()
    qids = []
    for rcpt in rcpts:
        assert (await t.cmd("MAIL FROM:<app@example.com>"))[0] == 250
        assert (await t.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
        assert (await t.cmd("DATA"))[0] == 354
        code, text = await t.cmd(f"From: app@example.com\r\nTo: {rcpt}\r\nSubject: s\r\n\r\nbody\r\n.".encode())
        assert code == 250, text
        qids.append(text.rsplit(" ", 1)[1])
    await t.close()
    return qids


async def _until(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await pred() if asyncio.iscoroutinefunction(pred) else pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_suspension_survives_kill9(tmp_path: Path, tls_files: Any) -> None:
    """A receiver answers ``421 4.7.0 rate limited``; the daemon is killed (-9) and started again
    while the destination is suspended: nobody connects to the receiver before the backoff ends,
    then everything is delivered and nothing bounces. (uvloop here; the next test restarts a daemon
    on asyncio's loop and checks the same silence, without the 10 s wait twice over.)"""
    loop = LOOPS[0]
    backoff = 10.0
    sink = await Sink().start()
    sink.mail_reply = "421 4.7.0 rate limited"
    cfg = write_config(tmp_path, deep_merge(base_config(tls_files), {
        "routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
        "delivery": {"retry_initial": "1s", "retry_max": "1s"},
        "shaping": [{"match": "dest.test", "throttle_backoff": f"{backoff:g}s"}]}))
    qids: list[str] = []
    d2: DaemonProcess | None = None
    try:
        d = await asyncio.to_thread(lambda: DaemonProcess(cfg, loop=loop).wait_ready())
        qids += await _relay(d.ports["relay"], ["a@dest.test"])
        await asyncio.to_thread(d.wait_event, "destination.suspended", 30)
        t_421 = sink.mail_seen[0]
        sink.mail_reply = None  # the receiver would accept now: we must not ask before the backoff ends
        qids += await _relay(d.ports["relay"], ["b@dest.test", "c@dest.test"])  # wait in memory only
        await asyncio.to_thread(d.kill9)
        connections = sink.connections
        d2 = await asyncio.to_thread(lambda: DaemonProcess(cfg, loop=loop).wait_ready())
        assert time.monotonic() < t_421 + backoff - 2, "restart too slow to test anything"
        metrics = await asyncio.to_thread(_scrape, d2.http_port)
        # The restarted daemon saw b and c due at once; it must leave the receiver alone until the end.
        while time.monotonic() < t_421 + backoff * 0.95:
            assert sink.connections == connections, "the suspended destination was contacted"
            await asyncio.sleep(0.05)
        assert 'mailrelayd_destination_suspended{destination="dest.test"} 1.0' in metrics
        assert 'mailrelayd_queue_recipients{state="deferred"} 1.0' in metrics  # a (b and c: pending)
        ev = await asyncio.to_thread(d2.wait_event, "destination.suspension_restored", 1)
        assert ev["destination"] == "dest.test" and "rate limited" in ev["reply"]
        await _until(lambda: len(sink.messages) >= 3, 30 + backoff, "delivery after the backoff")
        assert sorted(r for m in sink.messages for r in m.rcpts) == ["a@dest.test", "b@dest.test", "c@dest.test"]
        assert min(sink.mail_seen[1:]) - t_421 >= backoff * 0.95
        assert all(m.mail_from not in ("", "<>") for m in sink.messages)  # no DSN went anywhere
        metrics = await asyncio.to_thread(_scrape, d2.http_port)
        assert 'mailrelayd_destination_suspended{destination="dest.test"} 0.0' in metrics
    finally:
        if d2 is not None:
            assert await asyncio.to_thread(d2.stop) == 0
        await sink.stop()
    spool = Spool(tmp_path / "spool")
    await spool.open()
    try:
        for q in qids:
            assert [st for st, _ in (await spool.recipient_outcomes(q)).values()] == ["delivered"], q
        assert await spool.list_messages() == []  # no DSN queued either
        assert await spool.suspensions(0) == []  # removed when it ended
    finally:
        await spool.close()


async def _cli(env: dict[str, str], config: Path, *args: str) -> tuple[int, str, str]:
    from tests.conftest import mailrelayd_cmd
    p = await asyncio.create_subprocess_exec(*mailrelayd_cmd(), *args, "-c", str(config), env=env,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 60)
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


async def test_cli_shows_a_restored_suspension_and_flush_lifts_it(start_daemon, tmp_path, cli_env) -> None:
    sink = await Sink().start()
    sink.mail_reply = "421 4.7.0 rate limited"
    over = {"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
            "shaping": [{"match": "dest.test", "throttle_backoff": "1h"}]}
    try:
        d = await start_daemon(over, directory=tmp_path / "relay")
        (qid,) = await _relay(d.port("relay"), ["a@dest.test"])
        await _until(lambda: d.daemon.scheduler.suspended() == ["dest.test"], 30, "the suspension")
        sink.mail_reply = None
        (later,) = await _relay(d.port("relay"), ["b@dest.test"])  # waits in memory, pending in the spool
        await d.stop()
        connections = sink.connections
        d = await start_daemon(over, directory=tmp_path / "relay")
        await asyncio.sleep(1.0)  # the message was due at once after the restart: a chance to (wrongly) send it
        assert sink.connections == connections
        code, out, err = await _cli(cli_env, d.config, "queue", "destinations")
        assert code == 0, err
        assert "dest.test" in out and "suspended 59m more (421 4.7.0 rate limited)" in out
        code, out, err = await _cli(cli_env, d.config, "queue", "flush", "--domain", "dest.test", "--dry-run")
        assert code == 0, err
        assert "would lift the suspension of dest.test" in out and d.daemon.scheduler.suspended() == ["dest.test"]
        code, out, err = await _cli(cli_env, d.config, "queue", "flush", "--domain", "Dest.Test")
        assert code == 0, err
        assert out.startswith("flushed 2 message(s), 2 recipient(s)") and "lifted the suspension of dest.test" in out
        await sink.wait_for(2)

        async def finished() -> bool:
            return await d.daemon.spool.get(qid) is None and await d.daemon.spool.get(later) is None
        await _until(finished, 20, "the message to finish")
        assert await d.daemon.spool.suspensions(0) == []
        code, out, err = await _cli(cli_env, d.config, "queue", "destinations", "--json")
        assert code == 0, err
        assert not any(x["suspended_until"] for x in json.loads(out)["destinations"])
    finally:
        await sink.stop()


async def test_held_recipients_have_their_own_queue_gauge(start_daemon) -> None:
    from mailrelayd.spool.store import QueueFilter

    sink = await Sink().start()
    sink.rcpt_replies["later@other.test"] = "451 4.2.0 try later"
    try:
        d = await start_daemon({"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
                                "delivery": {"retry_initial": "1h", "retry_max": "1h"}})
        metrics = await asyncio.to_thread(_scrape, d.http_port)
        assert 'mailrelayd_queue_recipients{state="held"} 0.0' in metrics  # from the first scrape
        await d.daemon.queue_manager.hold(QueueFilter(domain="dest.test"), reason="provider 421s")
        (qid,) = await _relay(d.port("relay"), ["a@dest.test"])
        await _relay(d.port("relay"), ["later@other.test"])

        async def deferred() -> bool:
            st = await d.daemon.spool.stats()
            return st.recipients.get("deferred") == 1
        await _until(deferred, 20, "the deferral")
        metrics = await asyncio.to_thread(_scrape, d.http_port)
        for state, n in (("held", 1), ("pending", 0), ("deferred", 1), ("inflight", 0)):
            assert f'mailrelayd_queue_recipients{{state="{state}"}} {n}.0' in metrics, state
        await d.daemon.queue_manager.release(QueueFilter(domain="dest.test"))
        await sink.wait_for(1)
        metrics = await asyncio.to_thread(_scrape, d.http_port)
        assert 'mailrelayd_queue_recipients{state="held"} 0.0' in metrics
        assert [m.rcpts for m in sink.messages] == [["a@dest.test"]]
        assert await d.daemon.spool.get(qid) is None or (await d.daemon.spool.get(qid)).held_at == 0
    finally:
        await sink.stop()


async def test_offline_cli_shows_and_lifts_stored_suspensions(tmp_path: Path, tls_files: Any, cli_env) -> None:
    """With the daemon stopped, `queue destinations` reads the suspensions from the spool and
    `queue flush` removes them there."""
    from mailrelayd.spool.store import Suspension

    cfg = write_config(tmp_path, base_config(tls_files))
    spool = Spool(tmp_path / "spool")
    await spool.open()
    await spool.save_suspension(Suspension(".google.com", time.time() + 1800, "421-4.7.28 unusual rate", time.time()))
    await spool.save_suspension(Suspension("old.example", time.time() - 5, "421 busy", time.time() - 60))
    await spool.close()
    code, out, err = await _cli(cli_env, cfg, "queue", "destinations")
    assert code == 0, err
    assert "dest   .google.com" in out and "(421-4.7.28 unusual rate)" in out and "old.example" not in out
    code, out, err = await _cli(cli_env, cfg, "queue", "flush", "--sender", "app@example.com")
    assert code == 0 and "lift" not in out, (out, err)
    code, out, err = await _cli(cli_env, cfg, "queue", "flush", "--domain", ".google.com")
    assert code == 0 and "lifted the suspension of .google.com" in out, (out, err)
    code, out, err = await _cli(cli_env, cfg, "queue", "destinations", "--json")
    assert code == 0 and json.loads(out)["destinations"] == [], (out, err)
