"""Domains are normalised once, where they enter (config load, SMTP command): lower case, IDNA,
no trailing dot. A route written with capitals matches, a local domain written with a trailing dot
is local to the scheduler as well as to SMTP policy."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path
from typing import Any

import pytest

from mailrelayd.config import ConfigError, LocalDomains, normalize_domain, parse_config
from mailrelayd.smtp.address import AddressError, parse_command_path
from mailrelayd.smtp.policy import Policy
from tests.conftest import base_config, deep_merge
from tests.support.dnsserver import DnsServer
from tests.support.sink import Sink


@pytest.mark.parametrize(("raw", "want"), [
    ("Partner.Example", "partner.example"),
    ("partner.example.", "partner.example"),
    ("  MiXeD.Example.  ", "mixed.example"),
    ("Bücher.Example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
])
def test_normalize_domain(raw: str, want: str) -> None:
    assert normalize_domain(raw) == want


@pytest.mark.parametrize("bad", ["", ".", "a..b", "example.com..", "-x.example", "a b.example", "x_y.example"])
def test_normalize_domain_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_domain(bad)


def test_smtp_addresses_use_the_same_normal_form() -> None:
    for arg, want in [("<a@Partner.Example.>", "partner.example"), ("<a@PARTNER.example>", "partner.example"),
                      ('<"x.y"@Partner.Example.>', "partner.example")]:
        mb, _ = parse_command_path(arg, allow_null=False)
        assert mb is not None and mb.domain == want == normalize_domain("Partner.Example.")
    mb, _ = parse_command_path("<a@Bücher.Example>", allow_null=False, utf8=True)
    assert mb is not None and mb.domain == normalize_domain("Bücher.Example")
    with pytest.raises(AddressError):
        parse_command_path("<a@Bücher.Example>", allow_null=False, utf8=False)
    with pytest.raises(AddressError):
        parse_command_path("<a@example.com..>", allow_null=False)


def _cfg(tls_files: tuple[Path, Path], tmp_path: Path, **over: Any) -> Any:
    data = deep_merge(base_config(tls_files), over)
    data["auth"]["users_file"] = str(tmp_path / "users.toml")
    (tmp_path / "users.toml").write_text("")
    return parse_config(data, tmp_path / "mailrelayd.toml")


def test_config_domains_normalised_on_load(tls_files, tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("placeholder")
    cfg = _cfg(tls_files, tmp_path,
               relay={"local_domains": ["Bounces.Example.COM."]},
               feedback={"bounce_domain": "FB.Example.", "verp_secret": "x" * 32},
               dkim=[{"domain": "Mail.Example.", "selector": "s1", "key_file": str(key)}],
               routes=[{"domain": "Partner.Example", "host": "127.0.0.1:2525"},
                       {"domain": "*", "host": "127.0.0.1:9"}])
    assert cfg.relay.local_domains == ["bounces.example.com"]
    assert cfg.feedback.bounce_domain == "fb.example"
    assert cfg.dkim[0].domain == "mail.example"
    assert [r.domain for r in cfg.routes] == ["partner.example", "*"]
    assert cfg.route_for("partner.example").host.port == 2525
    assert cfg.route_for("sub.partner.example").host.port == 2525
    assert cfg.route_for("other.example").host.port == 9
    assert isinstance(cfg.local_domains, LocalDomains)
    assert set(cfg.local_domains) == {"bounces.example.com", "fb.example"}
    assert "bounces.example.com" in cfg.local_domains and "bounces.example.com." not in cfg.local_domains


def test_one_local_domains_object_for_policy_and_scheduler(tls_files, tmp_path: Path) -> None:
    cfg = _cfg(tls_files, tmp_path, relay={"local_domains": ["bounces.example.com."]})
    policies = [Policy(cfg, lst, lambda a: False) for lst in cfg.listeners]
    assert all(p.local_domains is cfg.local_domains for p in policies)
    assert cfg.local_domains is cfg.local_domains  # built once per loaded config


def test_duplicate_routes_after_normalisation_are_an_error(tls_files, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"routes\[1\]\.domain: duplicate route"):
        _cfg(tls_files, tmp_path, routes=[{"domain": "partner.example", "host": "127.0.0.1:1"},
                                          {"domain": "Partner.Example.", "host": "127.0.0.1:2"}])


def test_bad_domain_names_the_key(tls_files, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"routes\[0\]\.domain: 'bad domain!' is not a valid domain name"):
        _cfg(tls_files, tmp_path, routes=[{"domain": "bad domain!", "host": "127.0.0.1:1"}])
    with pytest.raises(ConfigError, match=r"relay\.local_domains\[0\]: must be a domain name string"):
        _cfg(tls_files, tmp_path, relay={"local_domains": [3]})


def _send(port: int, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.sendmail("app@example.com", [rcpt], b"From: app@example.com\r\nSubject: t\r\n\r\nhello\r\n")


async def test_route_written_with_capitals_matches(start_daemon) -> None:
    """The smarthost route for "Partner.Example" takes mail for partner.example; MX (whose answer
    points at a different sink) is never used."""
    route_sink = await Sink().start()
    mx_sink = await Sink().start()
    try:
        with DnsServer() as dns_srv:
            for dom in ("partner.example.", "other.example."):
                dns_srv.add(dom, "MX", "10 mx.partner.example.")
            dns_srv.add("mx.partner.example.", "A", "127.0.0.1")
            d = await start_daemon({
                "routes": [{"domain": "Partner.Example", "host": f"127.0.0.1:{route_sink.port}"}],
                "dns": {"nameservers": [f"127.0.0.1:{dns_srv.port}"]},
                "delivery": {"port": mx_sink.port}})
            await asyncio.to_thread(_send, d.port("relay"), "someone@partner.example")
            await asyncio.to_thread(_send, d.port("relay"), "someone@other.example")
            got = await route_sink.wait_for(1)
            assert got[0].rcpts == ["someone@partner.example"]
            mx = await mx_sink.wait_for(1)
            assert mx[0].rcpts == ["someone@other.example"]  # the control: MX delivery works here
            await asyncio.sleep(0.5)
            assert [m.rcpts for m in route_sink.messages] == [["someone@partner.example"]]
            assert [m.rcpts for m in mx_sink.messages] == [["someone@other.example"]]
    finally:
        await route_sink.stop()
        await mx_sink.stop()


async def test_local_domain_with_trailing_dot_is_local_to_the_scheduler(start_daemon) -> None:
    """local_domains = ["bounces.example.com."]: mail for it is accepted from anyone (policy) AND
    handed to the feedback pipeline, never to the outbound transport (scheduler)."""
    sink = await Sink().start()
    try:
        with DnsServer() as dns_srv:
            dns_srv.add("bounces.example.com.", "MX", "10 mx.example.com.")
            dns_srv.add("mx.example.com.", "A", "127.0.0.1")
            d = await start_daemon({
                "relay": {"local_domains": ["Bounces.Example.COM."], "trusted_networks": []},
                "routes": [], "dns": {"nameservers": [f"127.0.0.1:{dns_srv.port}"]},
                "delivery": {"port": sink.port}})
            assert d.daemon.policy_domains("bounces.example.com")
            def talk() -> tuple[int, bytes]:
                with smtplib.SMTP("127.0.0.1", d.port("relay"), timeout=10) as c:
                    c.ehlo("client.example")
                    c.mail("mailer-daemon@remote.example")
                    code, _ = c.rcpt("bounces@bounces.example.com")
                    assert code == 250  # local to policy even from an untrusted client
                    return c.data(b"From: mailer-daemon@remote.example\r\nSubject: hi\r\n\r\nnot a DSN\r\n")
            code, resp = await asyncio.to_thread(talk)
            assert code == 250
            qid = resp.decode().rsplit(" ", 1)[1]
            for _ in range(300):
                rec = await d.spool.get(qid)
                if rec is None or not rec.active_recipients():
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"feedback message {qid} still queued: {rec}")
            assert rec is None or {r.state for r in rec.recipients} == {"processed"}
            await asyncio.sleep(0.5)
            assert sink.connections == 0 and sink.messages == []
            assert dns_srv.query_count("bounces.example.com.") == 0
    finally:
        await sink.stop()
