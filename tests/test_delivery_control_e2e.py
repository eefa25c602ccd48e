"""Delivery control through the real daemon: address family, source address, per-route EHLO name,
[[shaping]] rate and throttling backoff, holds and bulk queue actions from the CLI. Remote MTAs are
loopback sinks; MX answers come from the loopback DNS responder."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import aiosmtplib

from tests.conftest import TEST_PASSWORD
from tests.support.dnsserver import DnsServer
from tests.support.sink import Sink


async def _submit_many(port: int, tls: Any, rcpts: list[list[str]], frm: str = "app@example.com") -> list[str]:
    """One submission session, one message per recipient list; returns the queue ids."""
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=tls, timeout=20)
    await c.connect()
    await c.login("alice", TEST_PASSWORD)
    qids = []
    for to in rcpts:
        data = f"From: {frm}\r\nTo: {', '.join(to)}\r\nSubject: control\r\n\r\nbody\r\n".encode()
        _, reply = await c.sendmail(frm, to, data)
        qids.append(reply.rsplit(" ", 1)[1])
    await c.quit()
    return qids


async def _states(d: Any, qid: str) -> dict[str, str]:
    return {a: st for a, (st, _) in (await d.spool.recipient_outcomes(qid)).items()}


async def _until(pred: Any, timeout: float = 20, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _cli(env: dict[str, str], config: Path, *args: str) -> tuple[int, str, str]:
    from tests.conftest import mailrelayd_cmd
    p = await asyncio.create_subprocess_exec(*mailrelayd_cmd(), *args, "-c", str(config), env=env,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 60)
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


def _mx_zone(dns_srv: DnsServer) -> None:
    dns_srv.add("dual.test.", "MX", "10 mx.dual.test.")
    dns_srv.add("mx.dual.test.", "AAAA", "::1")  # nothing listens there on the sink's port
    dns_srv.add("mx.dual.test.", "A", "127.0.0.1")


async def test_ip_family_ipv6_never_delivers_ipv4_at_once(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        with DnsServer() as dns_srv:
            _mx_zone(dns_srv)
            base = {"routes": [], "dns": {"nameservers": [dns_srv.nameserver]}}
            d6 = await start_daemon({**base, "delivery": {"port": sink.port, "ip_family": "ipv6",
                                                          "retry_initial": "1s", "retry_max": "1s"}})
            (q6,) = await _submit_many(d6.port("submission"), client_tls, [["a@dual.test"]])

            async def deferred_twice() -> bool:
                rec = await d6.spool.get(q6)
                return rec is not None and rec.recipients[0].attempts >= 2
            await _until(deferred_twice, what="two IPv6-only attempts")
            assert sink.messages == []
            assert "::1" in (await d6.spool.get(q6)).recipients[0].last_reply
            await d6.stop()

            dns_srv.queries.clear()
            d4 = await start_daemon({**base, "delivery": {"port": sink.port, "ip_family": "ipv4",
                                                          "retry_initial": "1h", "retry_max": "1h"}})
            (q4,) = await _submit_many(d4.port("submission"), client_tls, [["b@dual.test"]])
            # Delivered on the first attempt (a failed first try would wait an hour).
            await _until(lambda: _is(d4, q4, {"b@dual.test": "delivered"}), what="IPv4 delivery")
            assert [m.rcpts for m in sink.messages] == [["b@dual.test"]]
            assert dns_srv.query_count("mx.dual.test", "AAAA") == 0  # ipv4 never even asks
    finally:
        await sink.stop()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


async def _is(d: Any, qid: str, want: dict[str, str]) -> bool:
    return await _states(d, qid) == want


async def test_source_address_and_route_helo_name(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        d = await start_daemon({
            "routes": [{"domain": "Partner.Example", "host": f"127.0.0.1:{sink.port}",
                        "source_address": "127.0.0.3", "helo_name": "out.partner-relay.test"},
                       {"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
            "delivery": {"source_address": "127.0.0.2"}})
        await _submit_many(d.port("submission"), client_tls, [["a@dest.test"], ["b@partner.example"]])
        msgs = await sink.wait_for(2)
        by_rcpt = {m.rcpts[0]: m for m in msgs}
        assert by_rcpt["a@dest.test"].peer == "127.0.0.2"
        assert by_rcpt["a@dest.test"].helo == "relay.test.example"
        # The route written with capitals matches, with its own source address and EHLO name.
        assert by_rcpt["b@partner.example"].peer == "127.0.0.3"
        assert by_rcpt["b@partner.example"].helo == "out.partner-relay.test"
    finally:
        await sink.stop()


async def test_max_rate_is_observed_at_the_sink(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        d = await start_daemon({"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
                                "shaping": [{"match": "dest.test", "max_rate": "600/min"}]})
        n = 25
        await _submit_many(d.port("submission"), client_tls, [[f"r{i}@dest.test"] for i in range(n)])
        msgs = await sink.wait_for(n, timeout=60)
        times = sorted(m.at for m in msgs)
        # 600/min = one every 100 ms: any 11 consecutive arrivals span about 1 s (10 intervals, less
        # the jitter of a loaded machine, where one late transaction bunches up with the next).
        # Unshaped, all 25 arrive within a few hundred ms, so 0.7 s still tells them apart.
        spans = [times[i + 10] - times[i] for i in range(n - 10)]
        assert min(spans) >= 0.7, spans
        assert times[-1] - times[0] >= 2.2
    finally:
        await sink.stop()


async def test_throttling_reply_suspends_destination_without_bouncing(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        sink.mail_reply = "421 4.7.0 rate limited, slow down"
        backoff = 4.0
        d = await start_daemon({"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
                                "delivery": {"retry_initial": "1s", "retry_max": "1s"},
                                "shaping": [{"match": "dest.test", "throttle_backoff": f"{backoff}s"}]})
        (q1,) = await _submit_many(d.port("submission"), client_tls, [["a@dest.test"]])
        await _until(lambda: _is(d, q1, {"a@dest.test": "deferred"}), what="the throttled attempt")
        t_421 = sink.mail_seen[-1]
        assert len(sink.mail_seen) == 1
        sink.mail_reply = None  # the receiver would accept now, but we must not ask yet
        more = await _submit_many(d.port("submission"), client_tls, [["b@dest.test"], ["c@dest.test"]])
        metrics = await asyncio.to_thread(_scrape, d.http_port)
        assert 'mailrelayd_destination_suspended{destination="dest.test"} 1.0' in metrics
        dests = d.daemon.queue_ops.destinations()["destinations"]
        assert any(x["destination"] == "dest.test" and x["suspended_until"] for x in dests)
        for qid, rcpt in zip([q1, *more], ["a@dest.test", "b@dest.test", "c@dest.test"], strict=True):
            await _until(lambda q=qid, r=rcpt: _is(d, q, {r: "delivered"}), timeout=backoff + 30,
                         what=f"{rcpt} after the backoff")
        assert len(sink.mail_seen) == 4
        assert min(sink.mail_seen[1:]) - t_421 >= backoff * 0.95  # nobody was contacted earlier
        assert all(m.mail_from not in ("", "<>") for m in sink.messages)  # nothing bounced
        metrics = await asyncio.to_thread(_scrape, d.http_port)
        assert 'mailrelayd_destination_suspended{destination="dest.test"} 0.0' in metrics
    finally:
        await sink.stop()


async def test_hold_and_release_by_domain_from_the_cli(start_daemon, client_tls, cli_env) -> None:
    sink = await Sink().start()
    try:
        d = await start_daemon({"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}]})
        code, out, err = await _cli(cli_env, d.config, "queue", "hold", "--domain", "Dest.Test.",
                                    "--reason", "provider says 421")
        assert code == 0, err
        assert out.startswith("held 0 message(s)") and "rule: domain dest.test" in out
        (qid,) = await _submit_many(d.port("submission"), client_tls, [["a@dest.test", "b@other.test"]])
        await sink.wait_for(1)
        await asyncio.sleep(1.5)  # retry_initial is 1s: a chance to (wrongly) deliver
        assert [m.rcpts for m in sink.messages] == [["b@other.test"]]
        code, out, err = await _cli(cli_env, d.config, "queue", "list", "--json")
        assert code == 0, err
        (m,) = json.loads(out)
        assert m["state"] == "held"
        assert {r["address"]: r["state"] for r in m["recipients"]} == {"a@dest.test": "held",
                                                                       "b@other.test": "delivered"}
        code, out, _ = await _cli(cli_env, d.config, "queue", "list")
        assert code == 0 and "held" in out and "hold   domain dest.test" in out
        code, out, err = await _cli(cli_env, d.config, "queue", "release", "--domain", "dest.test")
        assert code == 0, err
        assert out.startswith("released 1 message(s), 1 recipient(s)")
        await sink.wait_for(2)
        await _until(lambda: _is(d, qid, {"a@dest.test": "delivered", "b@other.test": "delivered"}))
    finally:
        await sink.stop()


async def test_bulk_actions_dry_run_and_offline(start_daemon, client_tls, cli_env) -> None:
    sink = await Sink().start()
    try:
        for i in range(3):
            sink.rcpt_replies[f"r{i}@dest.test"] = "451 4.3.0 try later"
        d = await start_daemon({"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
                                "delivery": {"retry_initial": "1h", "retry_max": "1h"}})
        qids = await _submit_many(d.port("submission"), client_tls, [[f"r{i}@dest.test"] for i in range(3)])

        async def all_deferred() -> bool:
            for i, q in enumerate(qids):
                if await _states(d, q) != {f"r{i}@dest.test": "deferred"}:
                    return False
            return True
        await _until(all_deferred)
        code, out, err = await _cli(cli_env, d.config, "queue", "delete", "--domain", "dest.test", "--dry-run")
        assert code == 0, err
        assert out.strip() == "would delete 3 message(s), 3 recipient(s)"
        code, out, _ = await _cli(cli_env, d.config, "queue", "bounce", "--older-than", "1h", "--dry-run")
        assert out.strip() == "would bounce 0 message(s), 0 recipient(s)"
        code, out, _ = await _cli(cli_env, d.config, "queue", "hold", qids[0], qids[1].lower(), "--dry-run",
                                  "--json")
        assert json.loads(out) == {"action": "hold", "messages": 2, "recipients": 2, "dry_run": True}
        code, out, _ = await _cli(cli_env, d.config, "queue", "flush", "--sender", "@example.com", "--dry-run")
        assert out.strip() == "would flush 3 message(s), 3 recipient(s)"
        for q in qids:
            assert await d.spool.get(q) is not None  # a dry run changes nothing
        code, _, err = await _cli(cli_env, d.config, "queue", "delete")
        assert code == 2 and "needs queue ids or a filter" in err
        code, out, err = await _cli(cli_env, d.config, "queue", "delete", qids[2])
        assert code == 0, err
        await d.stop()

        # Stopped daemon: the same verbs work on the spool through the queue manager.
        code, out, err = await _cli(cli_env, d.config, "queue", "hold", "--sender", "app@example.com")
        assert code == 0, err
        assert out.startswith("held 2 message(s), 2 recipient(s)")
        code, out, _ = await _cli(cli_env, d.config, "queue", "list", "--json")
        assert [m["state"] for m in json.loads(out)] == ["held", "held"]
        code, out, err = await _cli(cli_env, d.config, "queue", "bounce", "--domain", "dest.test")
        assert code == 0 and out.startswith("bounced 2 message(s)"), err
        code, out, _ = await _cli(cli_env, d.config, "queue", "list", "--json")
        assert [m["dsn"] for m in json.loads(out)] == [True, True]  # the DSNs wait for the daemon
    finally:
        await sink.stop()


async def test_under_uvloop_source_address_ip_family_and_hold(tmp_path: Path, tls_files, client_tls,
                                                              cli_env) -> None:
    """The subprocess daemon runs on uvloop: source binding, address family and holds there too."""
    from tests.conftest import base_config, deep_merge, write_config
    from tests.support.proc import DaemonProcess

    sink = await Sink().start()
    try:
        with DnsServer() as dns_srv:
            _mx_zone(dns_srv)
            cfg = write_config(tmp_path, deep_merge(base_config(tls_files), {
                "routes": [], "dns": {"nameservers": [dns_srv.nameserver]},
                "delivery": {"port": sink.port, "ip_family": "ipv4", "source_address": "127.0.0.2"}}))
            d = await asyncio.to_thread(lambda: DaemonProcess(cfg).wait_ready())
            try:
                code, out, err = await _cli(cli_env, cfg, "queue", "hold", "--user", "alice")
                assert code == 0 and "rule: user alice" in out, err
                await _submit_many(d.ports["submission"], client_tls, [["a@dual.test"]])
                await asyncio.sleep(2)
                assert sink.messages == []
                code, out, err = await _cli(cli_env, cfg, "queue", "list", "--json")
                assert [m["state"] for m in json.loads(out)] == ["held"], out + err
                code, out, err = await _cli(cli_env, cfg, "queue", "release", "--user", "alice")
                assert code == 0 and out.startswith("released 1 message(s)"), out + err
                (m,) = await sink.wait_for(1, timeout=30)
                assert m.rcpts == ["a@dual.test"] and m.peer == "127.0.0.2"
            finally:
                assert await asyncio.to_thread(d.stop) == 0
    finally:
        await sink.stop()
