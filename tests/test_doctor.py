"""`mailrelayd doctor` against a loopback DNS responder: exit 0 all good, 1 problems, 2 could not check."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailrelayd.cli import main
from mailrelayd.dkim import generate_key, txt_value, write_private_key
from tests.conftest import base_config, deep_merge, mailrelayd_cmd, write_config
from tests.support.dnsserver import DnsServer

DOMAIN = "example.com"
SELECTOR = "s2026"
RELAY_IP = "192.0.2.10"
HOSTNAME = "relay.test.example"  # base_config's server.hostname


def _txt(text: str) -> str:
    """Zone-file TXT presentation: 255-byte quoted character-strings."""
    return " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(key file, public key base64) of a fresh RSA key."""
    pem, pub = generate_key("rsa-sha256", 2048)
    path = tmp_path_factory.mktemp("dkim") / f"{DOMAIN}.{SELECTOR}.key"
    write_private_key(path, pem)
    return path, pub


@pytest.fixture
def zone(dkim_key: tuple[Path, str]) -> Iterator[DnsServer]:
    """A DNS server with an all-good example.com: MX, SPF (ip4 and include), DKIM, DMARC p=reject."""
    with DnsServer() as srv:
        srv.add(f"{DOMAIN}.", "MX", "10 mx1.example.com.")
        srv.add("mx1.example.com.", "A", "192.0.2.25")
        srv.add(f"{DOMAIN}.", "TXT", '"google-site-verification=abc123"')
        srv.add(f"{DOMAIN}.", "TXT", '"v=spf1 mx include:_spf.mailer.example.net ip4:192.0.2.8/30 -all"')
        srv.add("_spf.mailer.example.net.", "TXT", f'"v=spf1 ip4:{RELAY_IP} ip4:198.18.0.0/15 ~all"')
        srv.add(f"{SELECTOR}._domainkey.{DOMAIN}.", "TXT", _txt(txt_value("rsa-sha256", dkim_key[1])))
        srv.add(f"_dmarc.{DOMAIN}.", "TXT", '"v=DMARC1; p=reject; rua=mailto:dmarc@example.com"')
        srv.add(f"{HOSTNAME}.", "A", RELAY_IP)
        srv.add(f"_smtp._tls.{DOMAIN}.", "TXT", '"v=TLSRPTv1; rua=mailto:tlsrpt@example.com"')
        yield srv


@pytest.fixture
def config(tmp_path: Path, tls_files: tuple[Path, Path], zone: DnsServer, dkim_key: tuple[Path, str]) -> Path:
    return make_config(tmp_path / "cfg", tls_files, zone, dkim_key)


def make_config(directory: Path, tls_files: tuple[Path, Path], srv: DnsServer, dkim_key: tuple[Path, str],
                **over: Any) -> Path:
    data = deep_merge(base_config(tls_files), {
        # Generous: on a loaded CI machine the first of nine concurrent lookups can take over a second.
        "dns": {"nameservers": [srv.nameserver], "timeout": "3s"},
        "dkim": [{"domain": DOMAIN, "selector": SELECTOR, "key_file": str(dkim_key[0])}],
    })
    return write_config(directory, deep_merge(data, over))


def doctor(capsys: pytest.CaptureFixture[str], cfg: Path, *extra: str, domain: str = DOMAIN,
           ) -> tuple[int, dict[str, Any]]:
    """Run the CLI in-process with --format json; (exit status, parsed report)."""
    code = main(["doctor", "-c", str(cfg), "--domain", domain, "--format", "json", *extra])
    report = json.loads(capsys.readouterr().out)
    assert report["exit"] == code
    return code, report


def statuses(report: dict[str, Any]) -> dict[str, str]:
    """name -> status (worst wins for repeated names)."""
    order = ["ok", "warn", "error", "fail"]
    out: dict[str, str] = {}
    for c in report["checks"]:
        prev = out.get(c["name"], "ok")
        out[c["name"]] = max(prev, c["status"], key=order.index)
    return out


def detail(report: dict[str, Any], name: str) -> str:
    return "\n".join(c["detail"] for c in report["checks"] if c["name"] == name)


def make_cert(directory: Path, not_before: dt.datetime, not_after: dt.datetime) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOSTNAME)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory / "cert.pem", directory / "key.pem"


# --- all good ----------------------------------------------------------------------------
def test_all_good_text_subprocess(config: Path, cli_env: dict[str, str]) -> None:
    r = subprocess.run([*mailrelayd_cmd(), "doctor", "-c", str(config), "--domain", DOMAIN, "--ip", RELAY_IP],
                       capture_output=True, text=True, env=cli_env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    by_name = {ln.split()[1]: ln for ln in lines if not ln.startswith(("--", " "))}  # not continuation lines
    assert set(by_name) == {"mx", "spf", "dkim", "dmarc", "tls", "spool", "hostname", "mta-sts", "tls-rpt"}
    for name, line in by_name.items():
        if name == "mta-sts":  # not published in this zone: a warning that says what to publish
            assert line.startswith("WARN "), (name, r.stdout)
            continue
        assert line.startswith("OK "), (name, r.stdout)
    assert "10 mx1.example.com" in by_name["mx"]
    assert "p=reject" in by_name["dmarc"]
    assert f"{HOSTNAME} -> {RELAY_IP}" in by_name["hostname"]
    assert lines[-1].endswith("exit 0")


def test_all_good_via_include(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, report = doctor(capsys, config, "--ip", RELAY_IP)
    assert code == 0, report
    # No MTA-STS policy is published in this zone: a warning that says what to publish.
    assert {k: v for k, v in statuses(report).items() if k != "mta-sts"} == dict.fromkeys(
        ["mx", "spf", "dkim", "dmarc", "tls", "spool", "hostname", "tls-rpt"], "ok")
    assert statuses(report)["mta-sts"] == "warn" and "_mta-sts.example.com. TXT" in detail(report, "mta-sts")
    assert "include:_spf.mailer.example.net" in detail(report, "spf")
    assert "published key matches" in detail(report, "dkim")


def test_all_good_via_ip4(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, report = doctor(capsys, config, "--ip", "192.0.2.9")  # inside ip4:192.0.2.8/30 only
    assert code == 0, report
    assert "ip4:192.0.2.8/30" in detail(report, "spf")
    assert statuses(report)["hostname"] == "warn"  # the EHLO name points at another address


def test_json_subprocess(config: Path, cli_env: dict[str, str]) -> None:
    r = subprocess.run([*mailrelayd_cmd(), "doctor", "-c", str(config), "--domain", DOMAIN.upper() + ".",
                        "--ip", RELAY_IP, "--selector", SELECTOR, "--format", "json"],
                       capture_output=True, text=True, env=cli_env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["domain"] == DOMAIN
    assert report["exit"] == 0
    assert [c["name"] for c in report["checks"]] == ["mx", "spf", "dkim", "dmarc", "tls", "spool", "hostname",
                                                     "mta-sts", "tls-rpt"]
    assert all(set(c) == {"name", "status", "detail"} for c in report["checks"])


# --- problems: exit 1 --------------------------------------------------------------------
def test_spf_not_including_ip(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, report = doctor(capsys, config, "--ip", "203.0.113.7")
    assert code == 1
    assert statuses(report)["spf"] == "fail"
    assert "203.0.113.7 is not authorized: fail (-all in example.com)" in detail(report, "spf")


def test_spf_softfail_through_include_is_not_a_pass(capsys: pytest.CaptureFixture[str], zone: DnsServer,
                                                    config: Path) -> None:
    zone.remove(f"{DOMAIN}.", "TXT")
    zone.add(f"{DOMAIN}.", "TXT", '"v=spf1 redirect=_spf.mailer.example.net"')
    code, report = doctor(capsys, config, "--ip", "203.0.113.7")
    assert code == 1
    assert "softfail" in detail(report, "spf")
    code, report = doctor(capsys, config, "--ip", RELAY_IP)
    assert code == 0, report
    assert "redirect=_spf.mailer.example.net" in detail(report, "spf")


def test_dkim_mismatch(capsys: pytest.CaptureFixture[str], zone: DnsServer, config: Path) -> None:
    _, other = generate_key("rsa-sha256", 2048)
    zone.remove(f"{SELECTOR}._domainkey.{DOMAIN}.", "TXT")
    zone.add(f"{SELECTOR}._domainkey.{DOMAIN}.", "TXT", _txt(txt_value("rsa-sha256", other)))
    code, report = doctor(capsys, config, "--ip", RELAY_IP)
    assert code == 1
    assert statuses(report) == {"mx": "ok", "spf": "ok", "dkim": "fail", "dmarc": "ok", "tls": "ok",
                                "spool": "ok", "hostname": "ok", "mta-sts": "warn", "tls-rpt": "ok"}
    assert "publish:" in detail(report, "dkim")


def test_dkim_record_missing_and_unknown_selector(capsys: pytest.CaptureFixture[str], zone: DnsServer,
                                                  config: Path) -> None:
    zone.remove(f"{SELECTOR}._domainkey.{DOMAIN}.")
    code, report = doctor(capsys, config)
    assert code == 1
    assert "no such name" in detail(report, "dkim")
    code, report = doctor(capsys, config, "--selector", "other")
    assert code == 1
    assert "no [[dkim]] key with selector 'other'" in detail(report, "dkim")


def test_missing_dmarc(capsys: pytest.CaptureFixture[str], zone: DnsServer, config: Path) -> None:
    zone.remove(f"_dmarc.{DOMAIN}.")
    code, report = doctor(capsys, config, "--ip", RELAY_IP)
    assert code == 1
    assert statuses(report)["dmarc"] == "fail"
    assert "no v=DMARC1 TXT record" in detail(report, "dmarc")


def test_dmarc_p_none_is_a_warning(capsys: pytest.CaptureFixture[str], zone: DnsServer, config: Path) -> None:
    zone.remove(f"_dmarc.{DOMAIN}.")
    zone.add(f"_dmarc.{DOMAIN}.", "TXT", '"v=DMARC1; p=none"')
    code, report = doctor(capsys, config, "--ip", RELAY_IP)
    assert code == 0
    assert statuses(report)["dmarc"] == "warn"


def test_spf_missing_or_duplicated(capsys: pytest.CaptureFixture[str], zone: DnsServer, config: Path) -> None:
    zone.add(f"{DOMAIN}.", "TXT", '"v=spf1 -all"')
    code, report = doctor(capsys, config)
    assert code == 1
    assert "2 v=spf1 TXT records" in detail(report, "spf")
    zone.remove(f"{DOMAIN}.", "TXT")
    code, report = doctor(capsys, config)
    assert code == 1
    assert "no v=spf1 TXT record" in detail(report, "spf")


def test_hostname_does_not_resolve(capsys: pytest.CaptureFixture[str], zone: DnsServer, config: Path) -> None:
    zone.remove(f"{HOSTNAME}.")
    code, report = doctor(capsys, config)
    assert code == 1
    assert statuses(report)["hostname"] == "fail"


def test_spool_not_a_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path, tls_files: tuple[Path, Path],
                               zone: DnsServer, dkim_key: tuple[Path, str]) -> None:
    (tmp_path / "file").write_text("")
    cfg = make_config(tmp_path / "cfg", tls_files, zone, dkim_key, server={"spool_dir": str(tmp_path / "file")})
    code, report = doctor(capsys, cfg)
    assert code == 1
    assert statuses(report)["spool"] == "fail"


# --- warnings: exit 0 --------------------------------------------------------------------
def test_cert_expiring_in_10_days_warns(capsys: pytest.CaptureFixture[str], tmp_path: Path, zone: DnsServer,
                                        dkim_key: tuple[Path, str]) -> None:
    now = dt.datetime.now(dt.UTC)
    tls = make_cert(tmp_path / "tls", now - dt.timedelta(days=80), now + dt.timedelta(days=10))
    cfg = make_config(tmp_path / "cfg", tls, zone, dkim_key)
    code, report = doctor(capsys, cfg, "--ip", RELAY_IP)
    assert code == 0, report  # warnings do not change the exit status (see mailrelayd.doctor)
    assert statuses(report)["tls"] == "warn"
    assert "expires in 9.9 days" in detail(report, "tls") or "expires in 10.0 days" in detail(report, "tls")


def test_expired_cert_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path, zone: DnsServer,
                            dkim_key: tuple[Path, str]) -> None:
    now = dt.datetime.now(dt.UTC)
    tls = make_cert(tmp_path / "tls", now - dt.timedelta(days=90), now - dt.timedelta(days=1))
    cfg = make_config(tmp_path / "cfg", tls, zone, dkim_key)
    code, report = doctor(capsys, cfg, "--ip", RELAY_IP)
    assert code == 1
    assert statuses(report)["tls"] == "fail"
    assert "expired" in detail(report, "tls")


def test_null_mx_and_plus_all_warn(capsys: pytest.CaptureFixture[str], zone: DnsServer, config: Path) -> None:
    zone.remove(f"{DOMAIN}.", "MX")
    zone.add(f"{DOMAIN}.", "MX", "0 .")
    zone.remove(f"{DOMAIN}.", "TXT")
    zone.add(f"{DOMAIN}.", "TXT", '"v=spf1 +all"')
    code, report = doctor(capsys, config, "--ip", RELAY_IP)
    assert code == 0, report
    assert statuses(report)["mx"] == "warn"
    assert "null MX" in detail(report, "mx")
    assert statuses(report)["spf"] == "warn"


# --- could not check: exit 2 -------------------------------------------------------------
def test_servfail_on_the_domain(capsys: pytest.CaptureFixture[str], zone: DnsServer, config: Path) -> None:
    for name in (f"{DOMAIN}.", f"_dmarc.{DOMAIN}.", f"{SELECTOR}._domainkey.{DOMAIN}."):
        zone.set_rcode(name, dns.rcode.SERVFAIL)
    code, report = doctor(capsys, config, "--ip", RELAY_IP)
    assert code == 2
    st = statuses(report)
    assert {st[n] for n in ("mx", "spf", "dkim", "dmarc")} == {"error"}
    assert st["hostname"] == st["tls"] == st["spool"] == "ok"
    assert "SERVFAIL" in detail(report, "mx")


def test_servfail_text_subprocess(zone: DnsServer, config: Path, cli_env: dict[str, str]) -> None:
    zone.set_rcode(f"{DOMAIN}.", dns.rcode.SERVFAIL)
    r = subprocess.run([*mailrelayd_cmd(), "doctor", "-c", str(config), "--domain", DOMAIN],
                       capture_output=True, text=True, env=cli_env, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert any(ln.startswith("ERROR mx") for ln in r.stdout.splitlines()), r.stdout


def test_dns_timeout(capsys: pytest.CaptureFixture[str], zone: DnsServer, config: Path) -> None:
    zone.set_timeout(f"_dmarc.{DOMAIN}.")
    code, report = doctor(capsys, config, "--ip", RELAY_IP)
    assert code == 2
    assert statuses(report)["dmarc"] == "error"
    assert "timeout" in detail(report, "dmarc")


def test_a_fail_outranks_an_error(capsys: pytest.CaptureFixture[str], zone: DnsServer, config: Path) -> None:
    zone.set_rcode(f"_dmarc.{DOMAIN}.", dns.rcode.SERVFAIL)
    code, report = doctor(capsys, config, "--ip", "203.0.113.7")
    assert code == 1
    assert statuses(report)["dmarc"] == "error"


def test_unreadable_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, report = doctor(capsys, tmp_path / "missing.toml")
    assert code == 2
    assert report["checks"][0]["name"] == "config"
    assert report["checks"][0]["status"] == "error"


# --- SPF evaluation details --------------------------------------------------------------
@pytest.mark.parametrize(("record", "ip", "status", "needle"), [
    ("v=spf1 a -all", "192.0.2.1", "ok", "a in example.com"),
    ("v=spf1 a:mx1.example.com/24 -all", "192.0.2.200", "ok", "a:mx1.example.com/24"),
    ("v=spf1 mx -all", "192.0.2.25", "ok", "mx in example.com"),
    ("v=spf1 ip6:2001:db8::/32 -all", "2001:db8::25", "ok", "ip6:2001:db8::/32"),
    ("v=spf1 ip6:2001:db8::/32 -all", RELAY_IP, "fail", "fail (-all"),
    ("v=spf1 exists:%{i}.allow.example.com -all", RELAY_IP, "ok", "exists:"),
    ("v=spf1 ?all", RELAY_IP, "fail", "neutral"),
    ("v=spf1 include:nospf.example.com -all", RELAY_IP, "fail", "permerror"),
    ("v=spf1 foo:bar -all", RELAY_IP, "fail", "unknown mechanism"),
    ("v=spf1 include:loop.example.com -all", RELAY_IP, "fail", "more than 10"),
    ("v=spf1 a:n1.example.com a:n2.example.com a:n3.example.com -all", RELAY_IP, "fail", "void lookups"),
    ("v=spf1 include:broken.example.com -all", RELAY_IP, "error", "SERVFAIL"),
])
def test_spf_evaluation(capsys: pytest.CaptureFixture[str], zone: DnsServer, config: Path,
                        record: str, ip: str, status: str, needle: str) -> None:
    zone.remove(f"{DOMAIN}.", "TXT")
    zone.add(f"{DOMAIN}.", "TXT", f'"{record}"')
    zone.add(f"{DOMAIN}.", "A", "192.0.2.1")
    zone.add("mx1.example.com.", "AAAA", "2001:db8::25")
    zone.add("nospf.example.com.", "TXT", '"hello"')
    zone.add("loop.example.com.", "TXT", '"v=spf1 include:loop.example.com"')
    zone.add(f"{ipaddress.ip_address(RELAY_IP)}.allow.example.com.", "A", "127.0.0.2")
    zone.set_rcode("broken.example.com.", dns.rcode.SERVFAIL)
    code, report = doctor(capsys, config, "--ip", ip)
    assert statuses(report)["spf"] == status, report
    assert needle in detail(report, "spf")
    assert code == {"ok": 0, "fail": 1, "error": 2}[status]


def test_existing_spool_is_write_tested(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    spool = config.parent / "spool"
    spool.mkdir()
    code, report = doctor(capsys, config, "--ip", RELAY_IP)
    assert code == 0, report
    assert detail(report, "spool").startswith(f"{spool} writable, spool database 0 MB")
    assert list(spool.iterdir()) == []  # the probe file is removed
