"""The queue and suppression CLIs as an operator runs them: subprocesses, against a running daemon
(through its admin socket) and against a stopped one (directly on the spool / state)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.conftest import TEST_PASSWORD, base_config, deep_merge, mailrelayd_cmd, write_config
from tests.support.sink import Sink


async def _cli(env: dict[str, str], config: Path | None, *args: str, stdin: bytes | None = None
               ) -> tuple[int, str, str]:
    conf = ["-c", str(config)] if config is not None else []
    p = await asyncio.create_subprocess_exec(*mailrelayd_cmd(), *args, *conf, env=env,
                                             stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(stdin), 60)
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


async def _submit(port: int, tls: Any, rcpt: str) -> str:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=tls, timeout=10)
    await c.connect()
    await c.login("alice", TEST_PASSWORD)
    _, reply = await c.sendmail("app@example.com", [rcpt], b"From: app@example.com\r\nSubject: q\r\n\r\nx\r\n")
    await c.quit()
    return reply.rsplit(" ", 1)[1]


async def _wait(pred: Any, timeout: float = 15) -> None:
    async def loop() -> None:
        while not await pred():
            await asyncio.sleep(0.05)
    await asyncio.wait_for(loop(), timeout)


async def test_queue_commands_against_running_and_stopped_daemon(start_daemon, client_tls, cli_env) -> None:
    sink = await Sink().start()
    try:
        for r in ("a", "b", "c", "d"):
            sink.rcpt_replies[f"{r}@dest.test"] = "451 4.3.2 try again later"
        d = await start_daemon({"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
                                "delivery": {"retry_initial": "1h", "retry_max": "2h"}})
        q = {r: await _submit(d.port("submission"), client_tls, f"{r}@dest.test") for r in "abcd"}

        async def all_deferred() -> bool:
            outs = [await d.spool.recipient_outcomes(qid) for qid in q.values()]
            return all(o and all(st == "deferred" for st, _ in o.values()) for o in outs)
        await _wait(all_deferred)

        code, out, err = await _cli(cli_env, d.config, "queue", "list", "--json")
        assert code == 0, err
        listed = {m["queue_id"]: m for m in json.loads(out)}
        assert set(listed) == set(q.values())
        rec = listed[q["a"]]["recipients"][0]
        assert rec["state"] == "deferred" and "4.3.2" in rec["last_reply"] and rec["attempts"] == 1
        code, out, _ = await _cli(cli_env, d.config, "queue", "list")
        assert code == 0 and q["a"] in out and "deferred" in out

        code, out, _ = await _cli(cli_env, d.config, "queue", "show", q["a"].lower())  # ids are case-insensitive
        assert code == 0 and json.loads(out)["queue_id"] == q["a"]
        code, _, err = await _cli(cli_env, d.config, "queue", "show", "0000000000000")
        assert code == 1 and err

        # flush: retry now, not in an hour
        del sink.rcpt_replies["a@dest.test"]
        code, _, err = await _cli(cli_env, d.config, "queue", "flush", q["a"])
        assert code == 0, err
        await sink.wait_for(1)
        assert sink.messages[0].rcpts == ["a@dest.test"]

        # delete: gone, nobody told
        code, _, err = await _cli(cli_env, d.config, "queue", "delete", q["b"])
        assert code == 0, err
        await _wait(lambda: _gone(d, q["b"]))

        # bounce: gone, and the sender gets a DSN
        code, _, err = await _cli(cli_env, d.config, "queue", "bounce", q["c"])
        assert code == 0, err
        await sink.wait_for(2)
        dsn = sink.messages[1]
        assert dsn.mail_from in ("", "<>") and dsn.rcpts == ["app@example.com"]
        assert b"c@dest.test" in dsn.data and b"multipart/report" in dsn.data
        assert len(sink.messages) == 2  # no DSN for the deleted one

        await d.stop()
        # Stopped daemon: the CLI works on the spool directly.
        code, out, err = await _cli(cli_env, d.config, "queue", "list", "--json")
        assert code == 0, err
        assert [m["queue_id"] for m in json.loads(out)] == [q["d"]]
        code, _, err = await _cli(cli_env, d.config, "queue", "delete", q["d"])
        assert code == 0, err
        code, out, _ = await _cli(cli_env, d.config, "queue", "list")
        assert code == 0 and "empty" in out
    finally:
        await sink.stop()


async def test_release_of_every_hold_needs_all(start_daemon, client_tls, cli_env) -> None:
    """`queue release --all` releases every hold, through the admin socket and on a stopped daemon's
    spool; a request with no filter, or an empty one, is refused (it released every hold), and so is
    one that would delete or bounce the whole queue."""
    import aiohttp

    sink = await Sink().start()
    try:
        d = await start_daemon({"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}]})
        code, out, err = await _cli(cli_env, d.config, "queue", "hold", "--domain", "dest.test")
        assert code == 0, err
        qid = await _submit(d.port("submission"), client_tls, "a@dest.test")
        sock = d.config.parent / "state" / "admin.sock"
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as http:
            for path, body in (("queue/release", b""), ("queue/release", b"{}"), ("queue/release", b'{"filter": {}}'),
                               ("queue/release", b'{"filter": {"queue_ids": []}, "all": false}'),
                               ("queue/delete", b"{}"), ("queue/bounce", b'{"filter": {}}'),
                               ("queue/delete", b'{"all": true}'), ("queue/hold", b"{}")):
                async with http.post(f"http://localhost/{path}", data=body,
                                     headers={"Content-Type": "application/json"}) as resp:
                    error = (await resp.json())["error"]
                    assert resp.status == 400 and "filter" in error, (path, body, resp.status, error)
                    assert ('"all": true' in error) == (body != b'{"all": true}' and path == "queue/release"), error
        code, out, err = await _cli(cli_env, d.config, "queue", "list", "--json")
        assert [m["state"] for m in json.loads(out)] == ["held"], out
        code, out, err = await _cli(cli_env, d.config, "queue", "release")
        assert code == 2 and "--all" in err, err
        code, out, err = await _cli(cli_env, d.config, "queue", "release", "--all", "--dry-run")
        assert code == 0 and "would release 1 message(s)" in out, (out, err)
        code, out, err = await _cli(cli_env, d.config, "queue", "release", "--all")
        assert code == 0 and "released 1 message(s)" in out and "rule removed: domain dest.test" in out, (out, err)
        (msg,) = await sink.wait_for(1)
        assert msg.rcpts == ["a@dest.test"]
        await _wait(lambda: _gone(d, qid))

        await d.stop()  # the same on the spool, with the daemon stopped
        code, _, err = await _cli(cli_env, d.config, "queue", "hold", "--sender", "@example.com")
        assert code == 0, err
        code, out, err = await _cli(cli_env, d.config, "queue", "release", "--all")
        assert code == 0 and "rule removed: sender @example.com" in out, (out, err)
        code, out, err = await _cli(cli_env, d.config, "queue", "destinations", "--json")
        assert code == 0 and json.loads(out)["holds"] == [], out
    finally:
        await sink.stop()


async def _gone(d: Any, qid: str) -> bool:
    return await d.spool.get(qid) is None


async def test_suppress_commands(tmp_path: Path, tls_files: tuple[Path, Path], cli_env: dict[str, str]) -> None:
    cfg = write_config(tmp_path, deep_merge(base_config(tls_files), {}))
    code, _, err = await _cli(cli_env, cfg, "suppress", "add", "Someone@Example.NET", "--reason", "asked to stop")
    assert code == 0, err
    code, out, _ = await _cli(cli_env, cfg, "suppress", "list", "--json")
    rows = json.loads(out)
    assert [(r["address"], r["kind"], r["source"], r["reason"]) for r in rows] == [
        ("Someone@example.net", "manual", "manual", "asked to stop")]  # domain lowercased, local part kept
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("address,reason,kind\nold@example.org,imported from postfix,hard_bounce\n"
                      "angry@example.org,fbl,complaint\n")
    code, out, err = await _cli(cli_env, cfg, "suppress", "import", str(csv_in))
    assert code == 0, err
    code, out, _ = await _cli(cli_env, cfg, "suppress", "list", "--json", "--kind", "complaint")
    assert [r["address"] for r in json.loads(out)] == ["angry@example.org"]
    code, out, _ = await _cli(cli_env, cfg, "suppress", "list", "--since", "1h")
    assert code == 0 and "old@example.org" in out
    code, out, _ = await _cli(cli_env, cfg, "suppress", "export")
    lines = out.strip().splitlines()
    assert lines[0].startswith("address,") and len(lines) == 4
    code, _, err = await _cli(cli_env, cfg, "suppress", "remove", "Someone@example.net")
    assert code == 0, err
    code, _, _ = await _cli(cli_env, cfg, "suppress", "remove", "nobody@example.net")
    assert code != 0
    code, out, _ = await _cli(cli_env, cfg, "suppress", "list", "--json")
    assert sorted(r["address"] for r in json.loads(out)) == ["angry@example.org", "old@example.org"]


async def test_feedback_parse_cli(cli_env: dict[str, str], tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    fx = Path(__file__).parent / "fixtures" / "feedback"
    cfg = write_config(tmp_path, deep_merge(base_config(tls_files), {}))
    files = [str(fx / n) for n in ("dsn-hard.eml", "arf-abuse.eml", "autoreply.eml")]
    code, out, err = await _cli(cli_env, None, "feedback", "parse", "--json", *files)
    assert code == 0, err
    got = {Path(o["file"]).name: o for o in json.loads(out)}
    assert got["dsn-hard.eml"]["kind"] == "hard_bounce"
    assert got["dsn-hard.eml"]["recipients"] == [
        {"address": "Nobody-Here@example.net", "kind": "hard_bounce", "status": "5.1.1", "reason": "userunknown"}]
    assert got["arf-abuse.eml"]["kind"] == "complaint"
    assert got["autoreply.eml"] == {**got["autoreply.eml"], "kind": "not_feedback", "recipients": []}
    code, out, _ = await _cli(cli_env, None, "feedback", "parse", files[0])
    assert code == 0 and "hard_bounce" in out and "Nobody-Here@example.net" in out
    # The store is not touched by parse.
    code, out, _ = await _cli(cli_env, cfg, "suppress", "list", "--json")
    assert json.loads(out) == []


async def test_spool_has_one_owner(start_daemon, cli_env) -> None:
    """A second daemon on the same spool would deliver everything twice: it refuses to start. And
    the CLI never edits a spool a running daemon owns, even when the admin socket is gone."""
    import pytest

    from mailrelayd.daemon import Daemon, SetupError

    d = await start_daemon()
    with pytest.raises(SetupError, match="spool is in use"):
        await Daemon(d.config).run()
    sock = d.config.parent / "state" / "admin.sock"
    assert sock.exists()
    sock.unlink()
    code, _, err = await _cli(cli_env, d.config, "queue", "list")
    assert code != 0 and "did not answer" in err


async def test_admin_socket_answers_bodies_that_are_not_requests(start_daemon) -> None:
    """Whatever a local program writes to the admin socket gets a 4xx with a JSON error (nested
    JSON raised RecursionError inside the sidecar), and the queue is untouched."""
    import aiohttp

    d = await start_daemon()
    sock = d.config.parent / "state" / "admin.sock"
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as http:
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"{", b"\xff",
                     b"[]", b'"x"', b"1e999", b'{"filter": "x"}', b'{"filtre": {}}'):
            for path in ("queue/flush", "queue/release", "history"):
                async with http.post(f"http://localhost/{path}", data=body,
                                     headers={"Content-Type": "application/json"}) as resp:
                    assert resp.status == 400, (path, body[:20], resp.status)
                    assert "error" in await resp.json()
        async with http.get("http://localhost/queue") as resp:
            assert resp.status == 200


async def test_cli_refuses_non_domains_and_multiline_reasons(tmp_path: Path, tls_files: tuple[Path, Path],
                                                             cli_env: dict[str, str]) -> None:
    """`queue hold --domain 'not a domain!!'` stored a rule that could never match; a reason with a
    newline broke the one-line-per-entry output of `suppress list` (and `queue destinations`)."""
    from mailrelayd.queueops import filter_from_json

    cfg = write_config(tmp_path, base_config(tls_files))
    code, _, err = await _cli(cli_env, cfg, "queue", "hold", "--domain", "not a domain!!")
    assert code == 2 and "--domain: 'not a domain!!' is not a domain name" in err, err
    code, _, err = await _cli(cli_env, cfg, "queue", "hold", "--domain", "x.example", "--reason", "a\nb")
    assert code == 2 and "--reason: the reason must be one line" in err, err
    code, _, err = await _cli(cli_env, cfg, "suppress", "add", "a@x.example", "--reason", "a\nb")
    assert code == 2 and "--reason: the reason must be one line" in err, err
    code, out, _ = await _cli(cli_env, cfg, "suppress", "list", "--json")
    assert json.loads(out) == []
    # The admin socket's own check (the same normaliser): IDNA and case, as recipients are stored.
    assert filter_from_json({"domain": "Bücher.Example."}, "hold").domain == "xn--bcher-kva.example"
    with pytest.raises(ValueError, match="not a domain name"):
        filter_from_json({"domain": "not a domain!!"}, "hold")
    assert filter_from_json({"domain": "not a domain!!"}, "release").domain  # lifts a rule stored before


async def test_delete_and_bounce_leave_a_message_being_delivered_alone(start_daemon, client_tls, cli_env) -> None:
    """A message deleted or bounced while the remote had its DATA arrived all the same, while the
    CLI said "deleted"/"bounced", the history said so, and its sender got a failure DSN."""
    sink = await Sink().start()
    sink.data_delay = 3.0  # the remote sits on the message
    try:
        d = await start_daemon({"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}]})
        qid = await _submit(d.port("submission"), client_tls, "r@dest.test")

        async def in_flight() -> bool:
            return bool(sink.mail_seen) and qid in d.daemon.scheduler.inflight
        await _wait(in_flight)
        code, out, err = await _cli(cli_env, d.config, "queue", "delete", qid)
        assert code == 1 and "is being delivered right now" in err, (code, out, err)
        code, out, err = await _cli(cli_env, d.config, "queue", "bounce", "--domain", "dest.test")
        assert code == 1 and "1 message(s) being delivered right now were left alone" in out, (code, out, err)

        async def delivered() -> bool:
            return await d.spool.recipient_outcomes(qid) == {"r@dest.test": ("delivered", "250 2.0.0 Ok: queued")}
        await _wait(delivered)
        await asyncio.sleep(0.5)
        assert len(sink.messages) == 1  # the message, and no DSN to its sender
    finally:
        await sink.stop()


async def test_deleting_some_recipients_keeps_the_others_scheduled(start_daemon, client_tls, cli_env) -> None:
    """`queue delete` takes a message off the schedule while it writes (no attempt may start in between);
    a recipient it did not select goes back on the schedule and is delivered."""
    sink = await Sink().start()
    sink.rcpt_replies.update({"a@dest.test": "451 4.3.2 try again later", "b@other.test": "451 4.3.2 try again later"})
    try:
        d = await start_daemon({"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
                                "delivery": {"retry_initial": "3s", "retry_max": "3s"}})
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.port("submission"), start_tls=True, tls_context=client_tls,
                            timeout=10)
        await c.connect()
        await c.login("alice", TEST_PASSWORD)
        _, reply = await c.sendmail("app@example.com", ["a@dest.test", "b@other.test"],
                                    b"From: app@example.com\r\nSubject: q\r\n\r\nx\r\n")
        await c.quit()
        qid = reply.rsplit(" ", 1)[1]

        async def states() -> dict[str, str]:
            return {a: st for a, (st, _) in (await d.spool.recipient_outcomes(qid)).items()}

        async def deferred() -> bool:
            return await states() == {"a@dest.test": "deferred", "b@other.test": "deferred"}
        await _wait(deferred)
        code, out, err = await _cli(cli_env, d.config, "queue", "delete", "--domain", "dest.test")
        assert code == 0 and "deleted 1 message(s), 1 recipient(s)" in out, (code, out, err)
        sink.rcpt_replies.clear()

        async def done() -> bool:
            return await states() == {"a@dest.test": "deleted", "b@other.test": "delivered"}
        await _wait(done)
    finally:
        await sink.stop()
