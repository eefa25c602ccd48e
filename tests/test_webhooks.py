"""Delivery-event webhooks through the real daemon: a real aiohttp receiver verifies every
signature, is down for a while (connection refused, then 503), and the events still arrive, once
each in the end, in order per message, across a daemon restart."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from mailrelayd.webhooks import SIGNATURE_HEADER, sign, verify
from tests.conftest import TEST_PASSWORD
from tests.support.sink import Sink

SECRET = b"webhook-test-secret-0123456789"


class Receiver:
    """An aiohttp server that checks Mailrelayd-Signature and records the events."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.events: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.posts = 0
        self.status = 200
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts += 1
        assert request.headers["Content-Type"] == "application/json"
        if not verify(SECRET, body, request.headers.get(SIGNATURE_HEADER, "")):
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.status != 200:
            return web.Response(status=self.status)
        doc = json.loads(body)
        self.events.extend(doc.get("events", [doc]))
        return web.Response(text="ok")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        if not self.port:
            self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def wait(self, pred: Any, timeout: float = 30) -> None:
        async def poll() -> None:
            while not pred(self.events):
                await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(poll(), timeout)
        except TimeoutError:
            raise AssertionError(f"events so far: {[(e['event'], e['recipient']) for e in self.events]}") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, sink: Sink, url: str, events: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    secret = tmp_path / "hook.secret"
    secret.write_bytes(b"  " + SECRET + b"\n")  # surrounding whitespace is not part of the secret
    hook: dict[str, Any] = {"url": url, "secret_file": str(secret), "name": "app"}
    if events is not None:
        hook["events"] = events
    return {"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
            "delivery": {"retry_initial": "1s", "retry_max": "1s", "retry_jitter": 0.0},
            "events": {"retry_initial": "100ms", "retry_max": "500ms", **extra},
            "webhooks": [hook]}


async def _submit(port: int, tls: Any, to: list[str], msgid: str = "<reset-1@example.com>") -> str:
    body = (f"From: app@example.com\r\nTo: {', '.join(to)}\r\nSubject: reset\r\nMessage-ID: {msgid}\r\n\r\n"
            "your link\r\n")
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=tls, timeout=10)
    await c.connect()
    await c.login("alice", TEST_PASSWORD)
    _, reply = await c.sendmail("app@example.com", to, body.encode())
    await c.quit()
    return reply.rsplit(" ", 1)[1]


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_signature_format() -> None:
    body = b'{"events":[]}'
    header = sign(b"s3cret", body, 1700000000)
    import hashlib
    import hmac
    want = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={want}"
    assert verify(b"s3cret", body, header, now=1700000010)
    assert not verify(b"s3cret", body + b" ", header, now=1700000010)
    assert not verify(b"other", body, header, now=1700000010)
    assert not verify(b"s3cret", body, header, now=1700009999)  # replayed long after
    assert not verify(b"s3cret", body, "garbage", now=1700000010)


async def test_events_for_delivery_and_bounce_are_signed_and_complete(start_daemon, client_tls, tmp_path) -> None:
    sink = await Sink().start()
    sink.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    rx = await Receiver().start()
    sent0 = _metric("mailrelayd_webhook_events_sent_total", webhook="app")
    try:
        d = await start_daemon(_config(tmp_path, sink, rx.url))
        qid = await _submit(d.port("submission"), client_tls, ["ok@dest.test", "gone@dest.test"])
        await rx.wait(lambda evs: {(e["event"], e["recipient"]) for e in evs} >= {
            ("accepted", "ok@dest.test"), ("accepted", "gone@dest.test"),
            ("delivered", "ok@dest.test"), ("bounced", "gone@dest.test")})
        assert rx.bad_signatures == 0
        by = {(e["event"], e["recipient"]): e for e in rx.events}
        ok = by[("delivered", "ok@dest.test")]
        assert ok["queue_id"] == qid
        assert ok["message_id"] == "<reset-1@example.com>"
        assert ok["sender"] == "app@example.com"
        assert ok["user"] == "alice"
        assert ok["attempts"] == 1
        assert ok["reply"].startswith("250")
        assert ok["time"].endswith("Z") and "T" in ok["time"]
        bad = by[("bounced", "gone@dest.test")]
        assert bad["reply"].startswith("550 5.1.1")
        # In order per message: accepted before the outcome.
        order = [(e["event"], e["recipient"]) for e in rx.events]
        assert order.index(("accepted", "ok@dest.test")) < order.index(("delivered", "ok@dest.test"))
        ids = [e["id"] for e in rx.events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        for _ in range(100):  # counted once the sender has the 2xx, just after the receiver stored them
            if _metric("mailrelayd_webhook_events_sent_total", webhook="app") - sent0 >= 4:
                break
            await asyncio.sleep(0.05)
        assert _metric("mailrelayd_webhook_events_sent_total", webhook="app") - sent0 >= 4
    finally:
        await rx.stop()
        await sink.stop()


async def test_receiver_down_then_back_and_daemon_restart(start_daemon, client_tls, tmp_path) -> None:
    """Down (nothing listening), then up but failing (503), across a daemon restart: every event
    arrives, in order, and only deferred/delivered kinds are sent to a webhook that asked for them."""
    sink = await Sink().start()
    sink.rcpt_replies["later@dest.test"] = "451 4.2.0 Try later"
    port = _free_port()
    rx = Receiver(port)
    failed0 = _metric("mailrelayd_webhook_events_failed_total", webhook="app")
    try:
        cfg = _config(tmp_path, sink, rx.url, events=["delivered", "deferred"])
        d = await start_daemon(cfg, directory=tmp_path / "relay")
        await _submit(d.port("submission"), client_tls, ["a@dest.test", "later@dest.test"], "<m1@example.com>")
        await _submit(d.port("submission"), client_tls, ["b@dest.test"], "<m2@example.com>")
        await sink.wait_for(2)
        await asyncio.sleep(1.5)  # a few failed POSTs (connection refused)
        assert _metric("mailrelayd_webhook_events_failed_total", webhook="app") > failed0
        await d.stop()
        # The events survive the restart; the receiver comes up but answers 503 for a while.
        rx.status = 503
        await rx.start()
        d = await start_daemon(cfg, directory=tmp_path / "relay")
        await asyncio.sleep(1.0)
        assert rx.events == [] and rx.posts > 0
        rx.status = 200
        await rx.wait(lambda evs: {("delivered", "a@dest.test"), ("delivered", "b@dest.test"),
                                   ("deferred", "later@dest.test")} <= {(e["event"], e["recipient"]) for e in evs})
        assert {e["event"] for e in rx.events} <= {"delivered", "deferred"}
        ids = [e["id"] for e in rx.events]
        assert ids == sorted(ids)
        assert rx.bad_signatures == 0
        await asyncio.sleep(1.0)
        await d.daemon.webhooks.update_gauges()
        # Deferred again on each retry: the backlog drains to (near) zero once the receiver is up.
        assert _metric("mailrelayd_webhook_backlog_events", webhook="app") <= 2
    finally:
        await rx.stop()
        await sink.stop()


async def test_backlog_is_bounded_oldest_dropped(start_daemon, client_tls, tmp_path) -> None:
    sink = await Sink().start()
    port = _free_port()  # nothing listens: the receiver is down the whole time
    dropped0 = _metric("mailrelayd_webhook_events_dropped_total")
    try:
        d = await start_daemon(_config(tmp_path, sink, f"http://127.0.0.1:{port}/hook", max_backlog=3))
        for i in range(4):
            await _submit(d.port("submission"), client_tls, ["x@dest.test"], f"<b{i}@example.com>")
        await sink.wait_for(4)

        async def dropped() -> None:
            while _metric("mailrelayd_webhook_events_dropped_total") - dropped0 < 5:
                await asyncio.sleep(0.2)
        await asyncio.wait_for(dropped(), 30)  # 8 events (4 accepted, 4 delivered), 3 kept
        await d.daemon.webhooks.update_gauges()
        assert _metric("mailrelayd_webhook_backlog_events", webhook="app") == 3
    finally:
        await sink.stop()


class RawReceiver:
    """A receiver that is not aiohttp: it takes each POST whole, then answers as ``mode`` says."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.bodies: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                self.bodies.append(await reader.readexactly(length))
                if self.mode == "endless":  # 200, then a chunked body that never ends
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    while True:
                        writer.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
                        await writer.drain()
                elif self.mode == "stalls":  # 200 that promises more than it sends, then silence
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2000000000\r\n\r\nok")
                    await writer.drain()
                    await reader.read()
                    return
                else:  # "garbage": not HTTP at all
                    writer.write(b"SMTP/1.0 250 ok\r\n\r\n")
                    await writer.drain()
                    return
        except (OSError, asyncio.IncompleteReadError, StopIteration, ValueError):
            return
        finally:
            writer.close()

    async def start(self) -> RawReceiver:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"

    def events(self) -> list[str]:
        return [e["event"] for b in self.bodies for e in json.loads(b).get("events", [])]


@pytest.mark.parametrize("mode", ["endless", "stalls", "garbage"])
async def test_a_receiver_that_is_not_well_behaved(mode: str, start_daemon, client_tls, tmp_path) -> None:
    """The status decides: a 200 whose body never ends (or never arrives) is a 200 at once, not a
    timeout retried forever with the body read into memory; an answer that is not HTTP is a failure."""
    sink = await Sink().start()
    rx = await RawReceiver(mode).start()
    sent0 = _metric("mailrelayd_webhook_events_sent_total", webhook="app")
    failed0 = _metric("mailrelayd_webhook_events_failed_total", webhook="app")
    try:
        cfg = _config(tmp_path, sink, rx.url, events=["delivered"])
        cfg["webhooks"][0]["timeout"] = "3s"
        d = await start_daemon(cfg)
        await _submit(d.port("submission"), client_tls, ["a@dest.test"])
        await sink.wait_for(1)
        for _ in range(100):
            if rx.events():
                break
            await asyncio.sleep(0.05)
        assert rx.events()[:1] == ["delivered"]
        if mode == "garbage":
            for _ in range(100):
                if _metric("mailrelayd_webhook_events_failed_total", webhook="app") > failed0:
                    break
                await asyncio.sleep(0.05)
            assert _metric("mailrelayd_webhook_events_failed_total", webhook="app") > failed0
            assert _metric("mailrelayd_webhook_events_sent_total", webhook="app") == sent0
        else:
            for _ in range(40):  # well before the 3 s timeout
                if _metric("mailrelayd_webhook_events_sent_total", webhook="app") > sent0:
                    break
                await asyncio.sleep(0.05)
            assert _metric("mailrelayd_webhook_events_sent_total", webhook="app") == sent0 + 1
            await asyncio.sleep(0.5)
            assert _metric("mailrelayd_webhook_events_failed_total", webhook="app") == failed0
            assert rx.events() == ["delivered"]  # taken once, not posted again
        await d.stop()
    finally:
        assert rx.server is not None
        rx.server.close()
        await sink.stop()
