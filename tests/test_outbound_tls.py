"""MTA-STS, DANE and TLS-RPT through real sockets: the loopback DNS stub (with the AD bit where DANE is
tested), an HTTPS policy server on 127.0.0.1:443 with a test CA made here, and STARTTLS sinks with
good, expired, wrong-name and self-signed certificates."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from prometheus_client import REGISTRY

from mailrelayd.config import Config, parse_config
from mailrelayd.delivery.mx import MxResolver
from mailrelayd.delivery.tlspolicy import ReportPolicy
from mailrelayd.delivery.tlsrpt import day_of
from mailrelayd.delivery.transport import RcptResult, Transport
from tests.conftest import REPO, base_config, deep_merge, write_config
from tests.support.dnsserver import DnsServer
from tests.support.policyserver import PolicyServer, cannot_bind_443
from tests.support.sink import Sink
from tests.support.testca import Issued, TestCA

MSG = b"From: a@example.com\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\nbody\r\n"
MX = "mx.dest.test"


def _policy(mode: str = "enforce", mx: str = MX) -> str:
    return f"version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("outbound-ca"))


@pytest.fixture(scope="module")
def certs(ca: TestCA) -> dict[str, Issued]:
    return {
        "good": ca.issue("good", [MX]),
        "expired": ca.issue("expired", [MX], expired=True),
        "wrong-name": ca.issue("wrong", ["other.example.net"]),
        "self-signed": ca.issue("self", [MX], self_signed=True),
        "policy": ca.issue("policy", ["mta-sts.dest.test", "mta-sts.testing.test", "rpt.dest.test"]),
    }


@pytest.fixture
def dns_srv() -> Iterator[DnsServer]:
    with DnsServer() as srv:
        srv.add("dest.test.", "MX", f"10 {MX}.")
        srv.add(f"{MX}.", "A", "127.0.0.1")
        srv.add("mta-sts.dest.test.", "A", "127.0.0.1")
        srv.add("rpt.dest.test.", "A", "127.0.0.1")
        yield srv


@pytest.fixture
async def policy_server(certs: dict[str, Issued]) -> AsyncIterator[PolicyServer]:
    why = cannot_bind_443()
    if why:
        pytest.skip(why)
    srv = await PolicyServer(certs["policy"]).start()
    yield srv
    await srv.stop()


def _config(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA, dns_port: int, port: int,
            **delivery: Any) -> Config:
    write_config(tmp_path, {})
    over = {"delivery": {"port": port, "ca_file": str(ca.ca_file), **delivery}, "routes": [],
            "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": "3s"},
            "tls_rpt": {"enabled": True, "reporting_domain": "relay.test.example"}}
    return parse_config(deep_merge(base_config(tls_files), over), tmp_path / "mailrelayd.toml")


@contextlib.asynccontextmanager
async def _sink(issued: Issued | None) -> AsyncIterator[Sink]:
    s = await Sink(tls=issued.server_context() if issued else None).start()
    try:
        yield s
    finally:
        await s.stop()


def _metric(mode: str, result: str) -> float:
    return REGISTRY.get_sample_value("mailrelayd_delivery_tls_total", {"mode": mode, "result": result}) or 0.0


async def _deliver(t: Transport, domain: str = "dest.test") -> RcptResult:
    (r,) = await t.deliver(domain, "a@example.com", [f"b@{domain}"], MSG)
    return r


def _publish_sts(dns_srv: DnsServer, srv: PolicyServer, domain: str, text: str | list[bytes],
                 pid: str = "1") -> None:
    dns_srv.add(f"_mta-sts.{domain}.", "TXT", f'"v=STSv1; id={pid};"')
    srv.policies[domain] = text


# --- MTA-STS enforce -------------------------------------------------------------------------
async def test_enforce_valid_certificate_delivers_over_tls(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA,
                                                          certs: dict[str, Issued], dns_srv: DnsServer,
                                                          policy_server: PolicyServer) -> None:
    _publish_sts(dns_srv, policy_server, "dest.test", _policy())
    async with _sink(certs["good"]) as sink:
        t = Transport(_config(tmp_path, tls_files, ca, dns_srv.port, sink.port), MxResolver(
            _config(tmp_path, tls_files, ca, dns_srv.port, sink.port).dns))
        before = _metric("mta-sts", "verified")
        r = await _deliver(t)
        assert r.ok, r.text
        assert len(sink.messages) == 1 and sink.messages[0].tls
        assert _metric("mta-sts", "verified") == before + 1
        # The policy is cached: a second message does not fetch it again, nor look at DNS for it first.
        n_fetch = len(policy_server.requests)
        assert (await _deliver(t)).ok
        assert len(policy_server.requests) == n_fetch == 1
        await t.close()
    saved = json.loads((tmp_path / "state" / "mta-sts.json").read_text())
    assert saved["policies"][0]["domain"] == "dest.test"


@pytest.mark.parametrize(("cert", "reason"), [
    ("self-signed", "self-signed certificate"),
    ("expired", "certificate has expired"),
    ("wrong-name", "Hostname mismatch"),
])
async def test_enforce_bad_certificate_sends_nothing(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA,
                                                     certs: dict[str, Issued], dns_srv: DnsServer,
                                                     policy_server: PolicyServer, cert: str, reason: str) -> None:
    _publish_sts(dns_srv, policy_server, "dest.test", _policy())
    async with _sink(certs[cert]) as sink:
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port)
        t = Transport(cfg, MxResolver(cfg.dns))
        for _ in range(2):  # and it stays deferred: never a plaintext retry
            r = await _deliver(t)
            assert (r.code, r.enhanced) == (451, "4.7.5"), r
            assert f"MTA-STS policy for dest.test requires a valid certificate for {MX}; got" in r.text
            assert reason.lower() in r.text.lower()
        assert sink.messages == [] and sink.rcpt_seen == []
        await t.close()


async def test_enforce_without_starttls_sends_nothing(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA,
                                                      dns_srv: DnsServer, policy_server: PolicyServer) -> None:
    _publish_sts(dns_srv, policy_server, "dest.test", _policy())
    async with _sink(None) as sink:
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port, tls_fallback_plaintext=True)
        t = Transport(cfg, MxResolver(cfg.dns))
        before = _metric("mta-sts", "starttls_not_supported")
        r = await _deliver(t)
        assert (r.code, r.enhanced) == (451, "4.7.5")
        assert "TLS is required by MTA-STS policy for dest.test" in r.text
        assert sink.messages == [] and sink.rcpt_seen == []
        assert _metric("mta-sts", "starttls_not_supported") == before + 1
        await t.close()


async def test_enforce_unlisted_mx_is_never_contacted(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA,
                                                      certs: dict[str, Issued], dns_srv: DnsServer,
                                                      policy_server: PolicyServer) -> None:
    _publish_sts(dns_srv, policy_server, "dest.test", _policy(mx="mx.elsewhere.test"))
    async with _sink(certs["good"]) as sink:
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port)
        t = Transport(cfg, MxResolver(cfg.dns))
        r = await _deliver(t)
        assert r.enhanced == "4.7.5" and f"does not list MX host {MX}" in r.text
        assert sink.connections == 0
        await t.close()


async def test_policy_host_with_untrusted_certificate_is_no_policy(
        tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA, certs: dict[str, Issued], dns_srv: DnsServer,
        policy_server: PolicyServer) -> None:
    """A policy that cannot be fetched over validated HTTPS is not a policy (RFC 8461 §3.3), and the
    failure is kept for TLS-RPT; delivery goes on at the configured level."""
    _publish_sts(dns_srv, policy_server, "dest.test", _policy())
    other = TestCA(tmp_path, name="not the CA the policy server uses")
    async with _sink(certs["good"]) as sink:
        cfg = _config(tmp_path, tls_files, other, dns_srv.port, sink.port)
        t = Transport(cfg, MxResolver(cfg.dns))
        r = await _deliver(t)
        assert r.ok and sink.messages[0].tls
        assert t.tls.sts.fetch_errors["dest.test"].result_type == "sts-webpki-invalid"
        rows = t.tls.rpt.snapshot()[day_of(time.time())]
        assert any(r["domain"] == "dest.test" and r["type"] == "sts" and r["failures"][0][0] == "sts-webpki-invalid"
                   for r in rows)
        await t.close()


async def test_enforce_policy_sent_in_pieces_is_read_whole(
        tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA, certs: dict[str, Issued], dns_srv: DnsServer,
        policy_server: PolicyServer) -> None:
    """A policy that arrives in several TLS records or chunks (any policy over 16 KiB, or a slow
    server) is read to its end: the first piece alone was parsed, found invalid and counted as no
    policy, so an enforce domain got mail over an unverified connection. Past 64 KiB it is refused
    as too large, not as a cut-off line."""
    text = _policy().encode()
    _publish_sts(dns_srv, policy_server, "dest.test", [text[i:i + 7] for i in range(0, len(text), 7)])
    async with _sink(certs["self-signed"]) as sink:
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port)
        t = Transport(cfg, MxResolver(cfg.dns))
        r = await _deliver(t)
        assert (r.code, r.enhanced) == (451, "4.7.5"), r
        assert f"MTA-STS policy for dest.test requires a valid certificate for {MX}" in r.text
        assert sink.messages == [] and sink.rcpt_seen == []
        await t.close()
    dns_srv.add("mta-sts.testing.test.", "A", "127.0.0.1")
    _publish_sts(dns_srv, policy_server, "testing.test", [text] + [b"# padding\n" * 4000] * 3)
    t = Transport(cfg, MxResolver(cfg.dns))
    assert (await t.tls.sts.lookup("testing.test")).policy is None
    assert "larger than 65536 bytes" in str(t.tls.sts.fetch_errors["testing.test"])
    await t.close()


async def test_close_does_not_leave_a_first_contact_lookup_waiting(tmp_path: Path, tls_files: tuple[Path, Path],
                                                                   ca: TestCA, dns_srv: DnsServer) -> None:
    """A delivery waiting for a domain's first MTA-STS discovery when the transport is closed gets
    an error at once (not "no policy", and not a wait for ever)."""
    dns_srv.set_timeout("_mta-sts.dest.test.")
    cfg = _config(tmp_path, tls_files, ca, dns_srv.port, 25)
    t = Transport(cfg, MxResolver(cfg.dns))
    waiter = asyncio.ensure_future(t.tls.sts.lookup("dest.test"))
    await asyncio.sleep(0.2)
    await t.close()
    done, _ = await asyncio.wait([waiter], timeout=2)
    assert waiter in done and waiter.cancelled()


async def test_fetch_errors_are_forgotten_with_their_domain(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA,
                                                            dns_srv: DnsServer, policy_server: PolicyServer) -> None:
    """The last fetch failure of each domain is kept for TLS-RPT while the domain is cached, not for
    ever: every domain that announced a policy it could not serve stayed in memory until restart."""
    dns_srv.add("_mta-sts.dest.test.", "TXT", '"v=STSv1; id=1;"')  # and no policy served: 404
    cfg = _config(tmp_path, tls_files, ca, dns_srv.port, 25)
    t = Transport(cfg, MxResolver(cfg.dns))
    assert (await t.tls.sts.lookup("dest.test")).policy is None
    assert "HTTP 404" in str(t.tls.sts.fetch_errors["dest.test"])
    t.tls.sts.prune(now=time.time() + 3 * 3600)
    assert t.tls.sts.fetch_errors == {} and t.tls.sts.current("dest.test") is None
    await t.close()


# --- MTA-STS testing, TLS-RPT ------------------------------------------------------------------
async def test_testing_delivers_and_reports(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA,
                                            certs: dict[str, Issued], dns_srv: DnsServer,
                                            policy_server: PolicyServer) -> None:
    _publish_sts(dns_srv, policy_server, "dest.test", _policy("testing"))
    dns_srv.add("_smtp._tls.dest.test.", "TXT", '"v=TLSRPTv1; rua=mailto:tlsrpt@dest.test,https://rpt.dest.test/tlsrpt"')
    async with _sink(certs["self-signed"]) as sink:
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port)
        t = Transport(cfg, MxResolver(cfg.dns))
        r = await _deliver(t)
        assert r.ok, r.text
        assert len(sink.messages) == 1 and sink.messages[0].tls
        await t.tls.save()
        day_file = tmp_path / "state" / "tlsrpt" / f"{day_of(time.time())}.json"
        rows = json.loads(day_file.read_text())
        (row,) = [x for x in rows if x["domain"] == "dest.test"]
        assert row["type"] == "sts" and row["failures"][0][:4] == ["certificate-not-trusted", "127.0.0.1", MX,
                                                                   "127.0.0.1"]
        assert row["success"] == 0  # the fallback session is not an MTA-STS-validated one

        # `mailrelayd tlsrpt show --json` prints the report that would be sent.
        cfg_file = tmp_path / "mailrelayd.toml"
        data = deep_merge(base_config(tls_files), {"tls_rpt": {"enabled": True},
                                                   "delivery": {"ca_file": str(ca.ca_file)}})
        cfg_file.write_text(tomli_w.dumps(data))
        out = subprocess.run([sys.executable, "-m", "mailrelayd", "tlsrpt", "show", "--json", "-c", str(cfg_file)],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)
        rep = next(x for x in shown["reports"] if x["policy-domain"] == "dest.test")["report"]
        assert rep["policies"][0]["failure-details"][0]["result-type"] == "certificate-not-trusted"

        # The next day: one gzip JSON report per policy domain to each rua (mailto through the queue, https POST).
        queued: list[tuple[tuple[str, ...], bytes, str]] = []

        async def enqueue(rcpts: tuple[str, ...], msg: bytes, sender_domain: str) -> None:
            queued.append((rcpts, msg, sender_domain))
        sent = await t.tls.send_due_reports(enqueue, now=time.time() + 86400)
        assert sent == 2
        assert queued[0][0] == ("tlsrpt@dest.test",) and b'report-type="tlsrpt"' in queued[0][1]
        ctype, body = policy_server.posts[0]
        assert ctype == "application/tlsrpt+gzip"
        assert json.loads(gzip.decompress(body))["policies"][0]["policy"]["policy-domain"] == "dest.test"
        assert not day_file.exists() and (day_file.parent / "sent" / day_file.name).exists()
        await t.close()


async def test_a_hostile_rua_is_dropped_and_the_rest_is_reported(tmp_path: Path, tls_files: tuple[Path, Path],
                                                                  ca: TestCA, certs: dict[str, Issued],
                                                                  dns_srv: DnsServer,
                                                                  policy_server: PolicyServer) -> None:
    """The _smtp._tls record is the remote domain's: a %-encoded CR/LF (which made the report's To:
    raise, so the day was retried, and reported again, forever), two @, non-ASCII or undecodable
    bytes never reach our queue; the valid addresses still get the report, once each."""
    _publish_sts(dns_srv, policy_server, "dest.test", _policy("testing"))
    dns_srv.add("_smtp._tls.dest.test.", "TXT",
                '"v=TLSRPTv1; rua=mailto:a%0D%0ABcc:x@evil.test,mailto:ok@dest.test,mailto:b@@dest.test,'
                'mailto:%22q%20x%22@dest.test,mailto:%FF@dest.test,mailto:%C3%A9@dest.test,mailto:OK@dest.test?subject=x,'
                'mailto:ok@dest.test" ",' + ",".join(f"mailto:m{i}@dest.test" for i in range(1, 9)) + '"')
    async with _sink(certs["self-signed"]) as sink:
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port)
        t = Transport(cfg, MxResolver(cfg.dns))
        assert (await _deliver(t)).ok
        await t.tls.save()
        queued: list[tuple[str, ...]] = []

        async def enqueue(rcpts: tuple[str, ...], msg: bytes, sender_domain: str) -> None:
            assert b"evil" not in msg
            queued.append(rcpts)
        assert await t.tls.send_due_reports(enqueue, now=time.time() + 86400) == 1
        # The valid ones, the first MAX_RUA (5) of them: the record may name hundreds.
        assert queued == [("ok@dest.test", '"q x"@dest.test', "OK@dest.test", "m1@dest.test", "m2@dest.test")]
        day_file = tmp_path / "state" / "tlsrpt" / f"{day_of(time.time())}.json"
        assert not day_file.exists() and (day_file.parent / "sent" / day_file.name).exists()
        await t.close()


async def test_tlsrpt_post_does_not_follow_a_redirect(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA,
                                                      dns_srv: DnsServer, policy_server: PolicyServer) -> None:
    """An https rua that answers 307 to an http: URL (or an internal host) does not get the report
    sent there in clear: http: rua values are refused, and a redirect must not get round that."""
    plain: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        plain.append(await request.read())
        return web.Response(status=200)
    app = web.Application()
    app.router.add_post("/collect", collect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    policy_server.redirect_to = f"http://127.0.0.1:{port}/collect"
    dns_srv.add("_smtp._tls.dest.test.", "TXT", '"v=TLSRPTv1; rua=https://rpt.dest.test/moved"')
    cfg = _config(tmp_path, tls_files, ca, dns_srv.port, 25)
    t = Transport(cfg, MxResolver(cfg.dns))
    t.tls.rpt.record(ReportPolicy("no-policy-found", "dest.test"), None)
    await t.tls.save()
    try:
        assert await t.tls.send_due_reports(None, now=time.time() + 86400) == 0
        assert plain == []
    finally:
        await t.close()
        await runner.cleanup()


@pytest.fixture
async def silent_endpoint() -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A TCP port that accepts and never answers (not even a TLS handshake); the event is set on
    the first connection."""
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await reader.read()
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], connected
    finally:
        server.close()


async def _stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_tlsrpt_endpoint_that_never_answers_holds_up_only_its_own_report(
        tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA, dns_srv: DnsServer,
        policy_server: PolicyServer, silent_endpoint: tuple[int, asyncio.Event]) -> None:
    """Reports were sent one domain after another, each https rua with a minute to answer: a few
    silent endpoints held every other domain's report (and, in the same loop, the cache saves)."""
    port, _ = silent_endpoint
    for i in range(5):  # reported first (in name order)
        dns_srv.add(f"_smtp._tls.a-silent{i}.test.", "TXT", f'"v=TLSRPTv1; rua=https://rpt.dest.test:{port}/r"')
    dns_srv.add("_smtp._tls.dest.test.", "TXT", '"v=TLSRPTv1; rua=https://rpt.dest.test/tlsrpt"')
    cfg = _config(tmp_path, tls_files, ca, dns_srv.port, 25)
    t = Transport(cfg, MxResolver(cfg.dns))
    for i in range(5):
        t.tls.rpt.record(ReportPolicy("no-policy-found", f"a-silent{i}.test"), None)
    t.tls.rpt.record(ReportPolicy("no-policy-found", "dest.test"), None)
    await t.tls.save()
    sending = asyncio.get_running_loop().create_task(t.tls.send_due_reports(None, now=time.time() + 86400))
    try:
        async with asyncio.timeout(10):
            while not policy_server.posts:
                await asyncio.sleep(0.05)
        assert json.loads(gzip.decompress(policy_server.posts[0][1]))["policies"][0]["policy"]["policy-domain"] \
            == "dest.test"
        assert not sending.done()  # the silent ones are still waiting for their answer
    finally:
        await _stop(sending)
        await t.close()


async def test_caches_are_saved_while_a_report_waits_for_its_endpoint(
        tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA, dns_srv: DnsServer,
        monkeypatch: pytest.MonkeyPatch, silent_endpoint: tuple[int, asyncio.Event]) -> None:
    """Saving and sending shared one loop: while a day's reports waited for a silent endpoint, the
    MTA-STS cache and today's TLS-RPT counts were not saved (a crash then lost them)."""
    from mailrelayd.delivery import outbound_tls
    port, connected = silent_endpoint
    dns_srv.add("_smtp._tls.dest.test.", "TXT", f'"v=TLSRPTv1; rua=https://rpt.dest.test:{port}/r"')
    monkeypatch.setattr(outbound_tls, "SAVE_INTERVAL", 0.05)
    cfg = _config(tmp_path, tls_files, ca, dns_srv.port, 25)
    t = Transport(cfg, MxResolver(cfg.dns))
    t.tls.rpt.record(ReportPolicy("no-policy-found", "dest.test"), None)
    await t.tls.save()
    directory = tmp_path / "state" / "tlsrpt"
    today = directory / f"{day_of(time.time())}.json"
    today.rename(directory / f"{day_of(time.time() - 86400)}.json")  # yesterday's: due now
    running = asyncio.get_running_loop().create_task(t.tls.run(None))
    try:
        async with asyncio.timeout(10):
            await connected.wait()  # the report is being sent, and will wait a minute
            t.tls.rpt.record(ReportPolicy("no-policy-found", "other.test"), None)
            while not today.exists():
                await asyncio.sleep(0.05)
        assert "other.test" in today.read_text()
    finally:
        await _stop(running)
        await t.close()


async def test_a_domain_changing_its_policy_text_does_not_grow_the_report_without_end(
        tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA, certs: dict[str, Issued], dns_srv: DnsServer,
        policy_server: PolicyServer) -> None:
    """With max_age 0 a policy is fetched again for each message, and its text is the domain's:
    a new unknown line each time made a new TLS-RPT policy entry (up to 64 KiB each) per message."""
    async with _sink(certs["good"]) as sink:
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port, max_messages_per_connection=1)
        t = Transport(cfg, MxResolver(cfg.dns))
        for i in range(60):
            _publish_sts(dns_srv, policy_server, "dest.test",
                         _policy().replace("86400", "0") + f"x-pad: {i} {'#' * 1000}\n")
            assert (await _deliver(t)).ok
        rows = [r for r in t.tls.rpt.snapshot()[day_of(time.time())] if r["domain"] == "dest.test"]
        assert len(policy_server.requests) >= 60 and len(rows) == 50
        await t.close()


# --- DANE ------------------------------------------------------------------------------------
def _tlsa_311(issued: Issued) -> str:
    spki = issued.cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return f"3 1 1 {hashlib.sha256(spki).hexdigest()}"


@pytest.mark.parametrize(("level", "ad", "matching", "delivered", "mode", "result"), [
    ("dane", True, True, True, "dane", "dane"),
    ("dane", True, False, False, "dane", "tlsa_invalid"),
    ("dane", False, False, True, "may", "encrypted"),      # no AD bit: no DANE (opportunistic TLS)
    ("dane-only", False, True, False, "dane-only", "dane_required"),
    ("dane-only", True, True, True, "dane-only", "dane"),
])
async def test_dane(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA, certs: dict[str, Issued],
                    dns_srv: DnsServer, level: str, ad: bool, matching: bool, delivered: bool, mode: str,
                    result: str) -> None:
    # DANE-EE pins the key: a self-signed certificate is fine (RFC 7672 §3.1.1).
    async with _sink(certs["self-signed"]) as sink:
        pinned = certs["self-signed"] if matching else certs["good"]
        dns_srv.add(f"_{sink.port}._tcp.{MX}.", "TLSA", _tlsa_311(pinned))
        dns_srv.set_ad(ad)
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port, tls=level, mta_sts=False)
        t = Transport(cfg, MxResolver(cfg.dns))
        before = _metric(mode, result)
        r = await _deliver(t)
        assert r.ok is delivered, r.text
        assert len(sink.messages) == (1 if delivered else 0)
        if delivered:
            assert sink.messages[0].tls
        else:
            assert r.enhanced == "4.7.5" and sink.rcpt_seen == []
        assert _metric(mode, result) == before + 1
        await t.close()


async def test_unusable_tlsa_does_not_set_aside_an_enforce_policy(
        tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA, certs: dict[str, Issued], dns_srv: DnsServer,
        policy_server: PolicyServer) -> None:
    """Only usable TLSA records take precedence over MTA-STS. Secure but unusable ones (PKIX-EE, a
    usage SMTP does not use, RFC 7672 §3.1.3) make TLS mandatory, and the domain's enforce policy
    still asks for a valid certificate: any certificate was accepted instead."""
    _publish_sts(dns_srv, policy_server, "dest.test", _policy())
    async with _sink(certs["self-signed"]) as sink:
        dns_srv.add(f"_{sink.port}._tcp.{MX}.", "TLSA", "1" + _tlsa_311(certs["self-signed"])[1:])
        dns_srv.set_ad(True)
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port, tls="dane")
        t = Transport(cfg, MxResolver(cfg.dns))
        r = await _deliver(t)
        assert (r.code, r.enhanced) == (451, "4.7.5"), r
        assert f"MTA-STS policy for dest.test requires a valid certificate for {MX}" in r.text
        assert sink.messages == [] and sink.rcpt_seen == []
        await t.close()


async def test_dane_bogus_tlsa_defers(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA,
                                      certs: dict[str, Issued], dns_srv: DnsServer) -> None:
    import dns.rcode
    async with _sink(certs["good"]) as sink:
        dns_srv.set_rcode(f"_{sink.port}._tcp.{MX}.", dns.rcode.SERVFAIL)  # what a validator says for bogus
        dns_srv.set_ad(True)
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port, tls="dane", mta_sts=False)
        t = Transport(cfg, MxResolver(cfg.dns))
        r = await _deliver(t)
        assert r.enhanced == "4.7.5" and "TLSA lookup" in r.text
        assert sink.connections == 0
        await t.close()


# --- the same enforce path under uvloop --------------------------------------------------------
def test_enforce_under_uvloop(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA, certs: dict[str, Issued],
                              dns_srv: DnsServer) -> None:
    uvloop = pytest.importorskip("uvloop")
    why = cannot_bind_443()
    if why:
        pytest.skip(why)

    async def scenario() -> None:
        srv = await PolicyServer(certs["policy"]).start()
        try:
            _publish_sts(dns_srv, srv, "dest.test", _policy())
            for name, ok in (("good", True), ("self-signed", False)):
                async with _sink(certs[name]) as sink:
                    cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port)
                    t = Transport(cfg, MxResolver(cfg.dns))
                    r = await _deliver(t)
                    assert r.ok is ok, r.text
                    assert len(sink.messages) == (1 if ok else 0)
                    await t.close()
        finally:
            await srv.stop()
    run: Callable[[Awaitable[None]], None] = uvloop.run
    run(scenario())


# --- doctor: the operator's own inbound records ------------------------------------------------
async def test_doctor_checks_own_mta_sts_and_tls_rpt(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA,
                                                     dns_srv: DnsServer, policy_server: PolicyServer) -> None:
    from mailrelayd.delivery.mx import make_resolver
    from mailrelayd.doctor import check_mta_sts, check_tls_rpt

    cfg = _config(tmp_path, tls_files, ca, dns_srv.port, 25)  # a fresh resolver each time: no cached NXDOMAIN
    r = await check_mta_sts(make_resolver(cfg.dns), cfg, "dest.test")
    assert r.status == "warn" and '_mta-sts.dest.test. TXT "v=STSv1; id=' in r.detail and f"mx: {MX}" in r.detail
    _publish_sts(dns_srv, policy_server, "dest.test", _policy())
    r = await check_mta_sts(make_resolver(cfg.dns), cfg, "dest.test")
    assert r.status == "ok", r.detail
    dns_srv.remove("_mta-sts.dest.test.")
    _publish_sts(dns_srv, policy_server, "dest.test", _policy(mx="mx.elsewhere.test"), pid="2")
    r = await check_mta_sts(make_resolver(cfg.dns), cfg, "dest.test")
    assert r.status == "fail" and MX in r.detail
    assert (await check_tls_rpt(make_resolver(cfg.dns), "dest.test")).status == "warn"
    dns_srv.add("_smtp._tls.dest.test.", "TXT", '"v=TLSRPTv1; rua=mailto:tls@dest.test"')
    r = await check_tls_rpt(make_resolver(cfg.dns), "dest.test")
    assert r.status == "ok" and "mailto:tls@dest.test" in r.detail


async def test_dane_only_with_insecure_mx_defers(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA,
                                                 certs: dict[str, Issued], dns_srv: DnsServer) -> None:
    """RFC 7672 §2.2.1: TLSA of an MX host found through an insecure MX lookup is not used."""
    async with _sink(certs["self-signed"]) as sink:
        dns_srv.add(f"_{sink.port}._tcp.{MX}.", "TLSA", _tlsa_311(certs["self-signed"]))
        dns_srv.set_ad(True, f"_{sink.port}._tcp.{MX}.")   # the TLSA answer is secure, the MX answer is not
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port, tls="dane-only", mta_sts=False)
        t = Transport(cfg, MxResolver(cfg.dns))
        r = await _deliver(t)
        assert r.enhanced == "4.7.5" and "MX records of dest.test are not DNSSEC-validated" in r.text
        assert sink.connections == 0
        await t.close()


@pytest.mark.skipif(not hasattr(__import__("ssl").SSLObject, "get_unverified_chain"),
                    reason="DANE-TA needs the server's chain: ssl.SSLObject.get_unverified_chain (Python 3.13+)")
@pytest.mark.parametrize(("name", "delivered"), [(MX, True), ("other.example.net", False)])
async def test_dane_ta(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA, dns_srv: DnsServer,
                       name: str, delivered: bool) -> None:
    """DANE-TA(2) 2 0 1 of our test CA: the chain leads to it and the leaf names the MX (RFC 7672 §3.2.2)."""
    leaf = ca.issue(f"ta-{name}", [name])
    chain = tmp_path / "chain.pem"
    chain.write_bytes(leaf.cert_file.read_bytes() + ca.ca_file.read_bytes())
    leaf.cert_file = chain
    ca_der = ca.cert.public_bytes(Encoding.DER)
    async with _sink(leaf) as sink:
        dns_srv.add(f"_{sink.port}._tcp.{MX}.", "TLSA", f"2 0 1 {hashlib.sha256(ca_der).hexdigest()}")
        dns_srv.set_ad(True)
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port, tls="dane-only", mta_sts=False)
        t = Transport(cfg, MxResolver(cfg.dns))
        r = await _deliver(t)
        assert r.ok is delivered, r.text
        assert len(sink.messages) == (1 if delivered else 0)
        await t.close()


# --- sessions shared by recipient domains on one MX host -----------------------------------------
async def test_domains_on_one_mx_host_share_a_session(tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA,
                                                      certs: dict[str, Issued], dns_srv: DnsServer) -> None:
    dns_srv.add("other.test.", "MX", f"10 {MX}.")  # another domain hosted at the same provider
    dns_srv.add("pref.test.", "MX", "10 primary.pref.test.")
    dns_srv.add("pref.test.", "MX", f"20 {MX}.")  # the shared host is only its backup
    dns_srv.add("primary.pref.test.", "A", "127.0.0.3")  # nothing listens: refused
    async with _sink(certs["good"]) as sink:
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port, mta_sts=False)
        t = Transport(cfg, MxResolver(cfg.dns))
        assert (await _deliver(t, "dest.test")).ok
        assert (await _deliver(t, "other.test")).ok
        assert sink.connections == 1 and len({m.session_id for m in sink.messages}) == 1
        assert all(m.tls for m in sink.messages)
        # A domain whose preferred MX is elsewhere does not jump to its backup because a session to
        # the backup happens to be open: it tries its own MX first, as a new connection would.
        r = await _deliver(t, "pref.test")
        assert r.ok and r.remote_mta == MX
        assert sink.connections == 2
        await t.close()


async def test_shared_session_never_carries_mail_for_a_stricter_policy(
        tmp_path: Path, tls_files: tuple[Path, Path], ca: TestCA, certs: dict[str, Issued], dns_srv: DnsServer,
        policy_server: PolicyServer) -> None:
    """dest.test has no policy (an unverified STARTTLS session is enough); testing.test enforces
    MTA-STS for the same MX host: a session opened for dest.test must not carry its mail, while a
    session verified for testing.test may carry dest.test's."""
    dns_srv.add("testing.test.", "MX", f"10 {MX}.")
    dns_srv.add("mta-sts.testing.test.", "A", "127.0.0.1")
    dns_srv.add("third.test.", "MX", f"10 {MX}.")
    _publish_sts(dns_srv, policy_server, "testing.test", _policy())
    async with _sink(certs["good"]) as sink:
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port)
        t = Transport(cfg, MxResolver(cfg.dns))
        before = _metric("mta-sts", "verified")
        assert (await _deliver(t, "dest.test")).ok
        assert (await _deliver(t, "testing.test")).ok
        assert sink.connections == 2  # not the unverified session: a new one, verified
        assert _metric("mta-sts", "verified") == before + 1
        assert (await _deliver(t, "third.test")).ok  # no policy: either idle session will do
        assert sink.connections == 2
        await t.close()
    async with _sink(certs["good"]) as sink:
        cfg = _config(tmp_path, tls_files, ca, dns_srv.port, sink.port)
        t = Transport(cfg, MxResolver(cfg.dns))
        assert (await _deliver(t, "testing.test")).ok
        assert (await _deliver(t, "dest.test")).ok  # the verified session satisfies the weaker demand
        assert sink.connections == 1
        await t.close()
