"""The HTTP submission API with aiohttp client calls: keys from `mailrelayd user apikey`, both body
forms, the same policy as SMTP (allowed_from, suppression, limits) with its enhanced codes, TLS."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mailrelayd.api import BadRequest, build_json_message
from mailrelayd.config import ConfigError, load_config
from mailrelayd.spool.store import HistoryQuery
from mailrelayd.users import load_users
from tests.conftest import base_config, deep_merge, mailrelayd_cmd, write_config
from tests.support.sink import Sink

USERS = {"alice": ("@example.com",), "bob": ("bob@example.org",)}


def _apikey(config: Path, name: str) -> str:
    env = {**os.environ, "MAILRELAYD_CONFIG": str(config)}
    out = subprocess.run([*mailrelayd_cmd(), "user", "apikey", name], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("mrk_")
    return key


def _overrides(sink: Sink, tls: bool = False, **extra: Any) -> dict[str, Any]:
    return deep_merge({"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
                       "delivery": {"retry_initial": "1s", "retry_max": "1s", "retry_jitter": 0.0},
                       "api": {"address": "127.0.0.1:0", "tls": tls}}, extra)


async def _daemon_with_key(start_daemon: Any, tmp_path: Path, tls_files: Any, overrides: dict[str, Any],
                           user: str = "alice") -> tuple[Any, str, str]:
    directory = tmp_path / "relay"
    cfg = write_config(directory, deep_merge(base_config(tls_files), overrides), USERS)
    key = _apikey(cfg, user)
    # Stored hashed, never in clear.
    assert key not in (directory / "users.toml").read_text()
    assert load_users(directory / "users.toml")[user].api_keys
    # (start_daemon would rewrite users.toml and drop the key: start the daemon directly.)
    from mailrelayd.daemon import Daemon
    from tests.conftest import RunningDaemon
    daemon = Daemon(cfg)
    task = asyncio.create_task(daemon.run())
    for _ in range(500):
        if daemon.api is not None and daemon.api.bound:
            break
        await asyncio.sleep(0.01)
    d = RunningDaemon(daemon, task, cfg)
    scheme = "https" if overrides["api"]["tls"] else "http"
    return d, key, f"{scheme}://127.0.0.1:{daemon.api.bound[1]}/v1/messages"


async def test_json_and_rfc822_submissions_are_delivered(start_daemon, tmp_path, tls_files) -> None:
    sink = await Sink().start()
    d = None
    try:
        d, key, url = await _daemon_with_key(start_daemon, tmp_path, tls_files, _overrides(sink))
        auth = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, headers=auth, json={
                    "from": "App <app@example.com>", "to": ["a@dest.test"], "cc": "c@dest.test",
                    "bcc": ["hidden@dest.test"], "subject": "Réinitialisation", "text": "hello\n",
                    "html": "<p>hello</p>", "headers": {"X-Campaign": "reset"}}) as r:
                assert r.status == 202, await r.text()
                qid1 = (await r.json())["queue_id"]
            raw = b"From: app@example.com\nTo: b@dest.test\nBcc: hidden2@dest.test\nSubject: raw\n\nbody\n"
            async with http.post(url, headers={**auth, "Content-Type": "message/rfc822"}, data=raw) as r:
                assert r.status == 202, await r.text()
                qid2 = (await r.json())["queue_id"]
            async with http.post(url + "?from=app@example.com&to=x@dest.test,y@dest.test",
                                 headers={**auth, "Content-Type": "message/rfc822"},
                                 data=b"From: app@example.com\r\nSubject: env\r\n\r\nbody\r\n") as r:
                assert r.status == 202, await r.text()
        msgs = await sink.wait_for(3)
        by_rcpts = {tuple(sorted(m.rcpts)): m for m in msgs}
        m1 = by_rcpts[("a@dest.test", "c@dest.test", "hidden@dest.test")]
        p1 = email.message_from_bytes(m1.data, policy=email.policy.default)
        assert p1["Subject"] == "Réinitialisation" and p1["X-Campaign"] == "reset"
        assert p1["Bcc"] is None and p1["Message-ID"] and p1["Date"]
        assert p1.get_body(("html",)).get_content().strip() == "<p>hello</p>"
        assert "with HTTP" in str(p1["Received"])
        m2 = by_rcpts[("b@dest.test", "hidden2@dest.test")]
        assert b"hidden2" not in m2.data
        assert ("x@dest.test", "y@dest.test") in by_rcpts
        hist = await d.spool.history(HistoryQuery(user="alice"))
        assert {qid1, qid2} <= {h.queue_id for h in hist}
    finally:
        if d is not None:
            await d.stop()
        await sink.stop()


async def test_errors_carry_smtp_codes(start_daemon, tmp_path, tls_files) -> None:
    sink = await Sink().start()
    d = None
    try:
        d, key, url = await _daemon_with_key(start_daemon, tmp_path, tls_files,
                                             _overrides(sink, auth={"default_rate": "3/h"},
                                                        limits={"max_message_size": "512KB"}))
        await asyncio.to_thread(d.daemon.suppressions.add, "blocked@dest.test", "test")
        ok = {"from": "app@example.com", "to": ["a@dest.test"], "subject": "s", "text": "t"}

        async def post(body: Any = None, headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, Any]:
            h = {"Authorization": f"Bearer {key}", **(headers or {})}
            async with aiohttp.ClientSession() as http, http.post(url, headers=h, json=body, **kw) as r:
                return r.status, await r.json()

        status, body = await post(ok, headers={"Authorization": "Bearer mrk_wrong"})
        assert (status, body["error"]["enhanced"]) == (401, "5.7.8")
        async with aiohttp.ClientSession() as http, http.post(url, json=ok) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == 530
        status, body = await post({**ok, "from": "ceo@other.test"})
        assert (status, body["error"]["code"], body["error"]["enhanced"]) == (403, 550, "5.7.1")
        status, body = await post({**ok, "to": ["blocked@dest.test"]})
        assert (status, body["error"]["enhanced"]) == (403, "5.7.1")
        assert "suppressed" in body["error"]["message"]
        status, body = await post({**ok, "headers": {"Bcc": "x@y.test"}})
        assert (status, body["error"]["enhanced"]) == (400, "5.5.4")
        status, body = await post({**ok, "subject": "a\r\nBcc: injected@dest.test"})
        assert status == 400, body
        status, body = await post(None, data=b"hello", headers={"Content-Type": "text/plain"})
        assert (status, body["error"]["enhanced"]) == (415, "5.6.1")
        # ?from=<> is the null sender, which alice's allowed_from (no "*") does not allow: said so.
        status, body = await post(None, data=b"From: app@example.com\r\n\r\nx\r\n", headers={
            "Content-Type": "message/rfc822"}, params={"from": "<>", "to": "a@dest.test"})
        assert (status, body["error"]["code"], body["error"]["enhanced"]) == (403, 550, "5.7.1"), body
        assert body["error"]["message"].startswith("Null sender <> not allowed"), body
        # The rate, 3/h, counts messages that passed the sender checks (the suppressed one did).
        codes = [(await post(ok))[0] for _ in range(3)]
        assert codes == [202, 202, 429], codes
        status, body = await post(ok)
        assert (status, body["error"]["code"], body["error"]["enhanced"]) == (429, 451, "4.7.1")
        status, body = await post({**ok, "text": "x" * (600 * 1024)})
        assert (status, body["error"]["enhanced"]) == (413, "5.3.4")
        status, body = await post({**ok, "text": "x" * (2 * 1024 * 1024)})  # past what the server reads
        assert (status, body["error"]["enhanced"]) == (413, "5.3.4")
    finally:
        if d is not None:
            await d.stop()
        await sink.stop()


async def test_tls_api(start_daemon, tmp_path, tls_files, client_tls) -> None:
    sink = await Sink().start()
    d = None
    try:
        d, key, url = await _daemon_with_key(start_daemon, tmp_path, tls_files, _overrides(sink, tls=True))
        assert url.startswith("https://")
        async with aiohttp.ClientSession() as http:
            async with http.post(url, ssl=client_tls, headers={"Authorization": f"Bearer {key}"},
                                 json={"from": "app@example.com", "to": "t@dest.test", "text": "x"}) as r:
                assert r.status == 202
            with pytest.raises(aiohttp.ClientError):  # no plaintext on a TLS port
                async with http.post(url.replace("https", "http"), json={}) as r:
                    await r.read()
        (m,) = await sink.wait_for(1)
        assert "with HTTPS" in m.data.decode()
    finally:
        if d is not None:
            await d.stop()
        await sink.stop()


def test_json_addresses_read_alike_on_every_python() -> None:
    """The JSON form's from/to/cc/bcc through the lenient address reader: Python 3.13's strict default
    of email.utils.getaddresses/parseaddr dropped domain literals (a From of app@[192.0.2.1] was an
    empty sender, refused as bad syntax, and a literal recipient vanished), 3.11 kept them."""
    sub = build_json_message({
        "from": "App <app@[192.0.2.1]>", "to": ["user@[192.0.2.1]", "b@dest.test"],
        "cc": "Ré <c@[IPv6:2001:db8::1]>", "bcc": "D <d@[192.0.2.4]>, e@dest.test", "text": "x"})
    sender, rcpts, data = sub.mail_from, sub.recipients, sub.data
    assert sender == "app@[192.0.2.1]" and not sub.refused
    assert rcpts == ["user@[192.0.2.1]", "b@dest.test", "c@[IPv6:2001:db8::1]", "d@[192.0.2.4]", "e@dest.test"]
    head = email.message_from_bytes(data, policy=email.policy.default)
    assert head["Cc"].addresses[0].addr_spec == "c@[IPv6:2001:db8::1]"  # the non-ASCII name encoded, the address kept
    assert head["Cc"].addresses[0].display_name == "Ré"
    # The author's address, never the null sender: "<>" (no address) is refused as a missing from.
    for frm in ("<>", "Nobody <>", " "):
        with pytest.raises(BadRequest) as e:
            build_json_message({"from": frm, "to": "a@dest.test", "text": "x"})
        assert (e.value.reply.code, e.value.reply.enhanced) == (550, "5.6.0"), frm
        assert "from is required" in e.value.reply.text


def test_plaintext_api_only_on_loopback(tmp_path, tls_files) -> None:
    data = deep_merge(base_config(tls_files), {"api": {"address": "0.0.0.0:9026", "tls": False}})
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, data))
    assert "api.tls" in str(e.value)
    load_config(write_config(tmp_path, deep_merge(base_config(tls_files),
                                                  {"api": {"address": "[::1]:9026", "tls": False}})))


@pytest.mark.timeout(60)
async def test_a_body_that_trickles_gets_408_after_the_data_timeout(start_daemon, tmp_path, tls_files) -> None:
    """Headers, then a body that never arrives in full: answered 408 once limits.data_timeout has
    passed, and the connection closed, instead of holding the request for as long as the client likes."""
    sink = await Sink().start()
    d = None
    try:
        d, key, url = await _daemon_with_key(start_daemon, tmp_path, tls_files,
                                             _overrides(sink, limits={"data_timeout": "2s"}))
        port = int(url.split(":")[2].split("/")[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"from\": ".encode())
        await writer.drain()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        assert 1.5 < loop.time() - t0 < 15
        assert head.startswith(b"HTTP/1.1 408"), head[:200]
        # The server closes after the reply (once aiohttp's lingering for the unread body is over).
        assert b"\r\nConnection: close\r\n" in head, head
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        assert b'"4.4.2"' in body
        writer.close()
    finally:
        if d is not None:
            await d.stop()
        await sink.stop()
