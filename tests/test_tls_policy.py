"""Outbound TLS policy as pure functions: MTA-STS parsing and matching, the level/policy decision,
DANE matching, TLS-RPT report building, and the MTA-STS cache (no sockets)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import ssl
import time
from email import message_from_bytes
from email.policy import default as email_default
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mailrelayd.delivery import dane, mta_sts, tlsrpt
from mailrelayd.delivery.dane import DaneLookup, Tlsa
from mailrelayd.delivery.mta_sts import FetchError, MtaSts, StsPolicy, mx_matches, parse_policy, parse_txt
from mailrelayd.delivery.tlspolicy import (
    CERT_EXPIRED,
    CERT_HOST_MISMATCH,
    CERT_NOT_TRUSTED,
    FAILURE_RESULTS,
    MODES,
    ReportPolicy,
    classify_tls_error,
    failure_text,
    normalize_level,
    plan_host,
    proven_auth,
    session_satisfies,
)
from tests.support.testca import TestCA

SCHEMA = Path(__file__).parent / "support" / "tlsrpt_schema.json"

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.dest.test\r\nmx: *.backup.dest.test\r\nmax_age: 86400\r\n"


# --- MTA-STS parsing -------------------------------------------------------------------------
@pytest.mark.parametrize(("texts", "want"), [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=x1"], "x1"),       # other TXT records are ignored
    (["v=STSv1; id=a", "v=STSv1; id=b"], None),        # §3.1: two records mean none
    (["v=STSv1; id="], None),
    (["v=STSv1; id=has-dash"], None),                  # id is 1*32(ALPHA / DIGIT)
    (["v=STSv1; id=" + "a" * 33], None),
    (["v=STSv2; id=a"], None),
    (["id=a; v=STSv1"], None),                         # v= must come first
    ([], None),
])
def test_parse_txt(texts: list[str], want: str | None) -> None:
    assert parse_txt(texts) == want


def test_parse_policy() -> None:
    p = parse_policy(POLICY)
    assert p.mode == "enforce" and p.mx == ("mx1.dest.test", "*.backup.dest.test") and p.max_age == 86400
    assert p.lines()[0] == "version: STSv1"
    # A large max_age is capped at one year (§3.2).
    assert parse_policy("version: STSv1\nmode: testing\nmx: a.b\nmax_age: 999999999\n").max_age == \
        mta_sts.MAX_AGE_LIMIT


@pytest.mark.parametrize("text", [
    "mode: enforce\nmx: a.b\nmax_age: 1\n",                       # no version
    "version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1\n",        # bad mode
    "version: STSv1\nmode: enforce\nmax_age: 1\n",                # enforce without mx
    "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1\n",      # bad max_age
    "version: STSv1\nmode: enforce\nmx: a.b\n",                   # no max_age
    "<html>not a policy</html>",
])
def test_parse_policy_refuses(text: str) -> None:
    with pytest.raises(mta_sts.PolicyError):
        parse_policy(text)


@pytest.mark.parametrize(("pattern", "host", "want"), [
    ("mx1.dest.test", "mx1.dest.test", True),
    ("mx1.dest.test", "MX1.Dest.Test.", True),
    ("*.dest.test", "mx1.dest.test", True),
    ("*.dest.test", "a.mx1.dest.test", False),     # §4.1: the wildcard is one label only
    ("*.dest.test", "dest.test", False),
    ("mx1.dest.test", "mx2.dest.test", False),
    ("*.dest.test", "mx1.evildest.test", False),
])
def test_mx_matches(pattern: str, host: str, want: bool) -> None:
    assert mx_matches(pattern, host) is want


# --- the decision --------------------------------------------------------------------------
ENFORCE = parse_policy(POLICY)
TESTING = parse_policy(POLICY.replace("enforce", "testing"))


def test_levels_and_alias() -> None:
    assert normalize_level("require") == "encrypt"
    assert normalize_level("dane-only") == "dane-only"
    p = plan_host("require", "dest.test", "mx1.dest.test", None, None)
    assert (p.mode, p.require_tls, p.auth) == ("encrypt", True, "none")


@pytest.mark.parametrize(("level", "sts", "mx", "want"), [
    # (mode, require_tls, auth, refused?)
    ("none", ENFORCE, "mx1.dest.test", ("none", False, "none", False)),
    ("may", None, "mx1.dest.test", ("may", False, "none", False)),
    ("may", ENFORCE, "mx1.dest.test", ("mta-sts", True, "pkix", False)),     # enforce honoured at "may"
    ("may", ENFORCE, "a.backup.dest.test", ("mta-sts", True, "pkix", False)),
    ("may", ENFORCE, "evil.test", ("mta-sts", True, "pkix", True)),          # MX not in policy: never used
    ("encrypt", ENFORCE, "mx1.dest.test", ("mta-sts", True, "pkix", False)),
    ("encrypt", None, "mx1.dest.test", ("encrypt", True, "none", False)),
    ("verify", None, "mx1.dest.test", ("verify", True, "pkix", False)),
    ("may", TESTING, "evil.test", ("may", False, "none", False)),            # testing never refuses
])
def test_plan_host(level: str, sts: StsPolicy | None, mx: str, want: tuple[str, bool, str, bool]) -> None:
    p = plan_host(level, "dest.test", mx, sts, None)
    assert (p.mode, p.require_tls, p.auth, bool(p.refuse)) == want
    assert p.mode in MODES
    if p.refuse:
        assert "does not list MX host evil.test" in p.refuse and p.refuse_result in FAILURE_RESULTS


def _tlsa(usage: int = 3, sel: int = 1, mt: int = 1, data: bytes = b"\x00" * 32) -> Tlsa:
    return Tlsa(usage, sel, mt, data)


@pytest.mark.parametrize(("level", "lookup", "sts", "want"), [
    ("dane", DaneLookup("usable", (_tlsa(),)), None, ("dane", True, "dane", "")),
    ("dane", DaneLookup("usable", (_tlsa(),)), ENFORCE, ("dane", True, "dane", "")),   # DANE wins (8461 §2)
    ("dane", DaneLookup("unusable", (_tlsa(usage=1),)), None, ("dane", True, "none", "")),
    ("dane", DaneLookup("failed", detail="SERVFAIL"), None, ("dane", True, "dane", "dnssec-invalid")),
    ("dane", DaneLookup("insecure"), None, ("may", False, "none", "")),
    ("dane", DaneLookup("none"), ENFORCE, ("mta-sts", True, "pkix", "")),
    ("dane-only", DaneLookup("insecure"), None, ("dane-only", True, "dane", "dane-required")),
    ("dane-only", DaneLookup("none"), None, ("dane-only", True, "dane", "dane-required")),
    ("dane-only", DaneLookup("usable", (_tlsa(),)), None, ("dane-only", True, "dane", "")),
])
def test_plan_host_dane(level: str, lookup: DaneLookup, sts: StsPolicy | None,
                        want: tuple[str, bool, str, str]) -> None:
    p = plan_host(level, "dest.test", "mx1.dest.test", sts, lookup)
    assert (p.mode, p.require_tls, p.auth, p.refuse_result) == want


def test_shared_session_must_prove_what_a_new_one_would() -> None:
    """Connection reuse across recipient domains on one MX host: the session opened under one
    domain's plan may carry another domain's mail only if it proved at least that domain's demands."""
    may = plan_host("may", "a.test", "mx1.dest.test", None, None)
    enforce = plan_host("may", "b.test", "mx1.dest.test", ENFORCE, None)
    testing = plan_host("may", "c.test", "mx1.dest.test", TESTING, None)
    unlisted = plan_host("may", "b.test", "evil.test", ENFORCE, None)
    encrypt = plan_host("encrypt", "d.test", "mx1.dest.test", None, None)
    rec, other = _tlsa(), _tlsa(data=b"\x01" * 32)
    dane_plan = plan_host("dane", "e.test", "mx1.dest.test", None, DaneLookup("usable", (rec,)))
    # What sessions opened under each plan proved.
    assert proven_auth(may, True) == "none" and proven_auth(may, False) == "none"
    assert proven_auth(enforce, True) == "pkix" and proven_auth(enforce, False) == "none"
    assert proven_auth(testing, True) == "pkix"  # a testing policy verifies (and only reports a failure)
    assert proven_auth(dane_plan, True) == "dane"
    # Weaker demands ride on stronger sessions; never the other way round.
    assert session_satisfies(may, True, "pkix", ())
    assert session_satisfies(may, False, "none", ())
    assert not session_satisfies(enforce, True, "none", ())  # encrypted but never verified
    assert not session_satisfies(enforce, False, "none", ())
    assert session_satisfies(enforce, True, "pkix", ())
    assert not session_satisfies(enforce, True, "dane", (rec,))  # MTA-STS asks for a WebPKI certificate
    assert not session_satisfies(unlisted, True, "pkix", ())  # a host the policy does not list: never
    assert not session_satisfies(testing, True, "none", ())  # its check and report are not skipped
    assert not session_satisfies(encrypt, False, "none", ()) and session_satisfies(encrypt, True, "none", ())
    assert session_satisfies(dane_plan, True, "dane", (rec,))
    assert not session_satisfies(dane_plan, True, "dane", (other,))  # checked against other records
    assert not session_satisfies(dane_plan, True, "pkix", ())


def test_failure_text_names_policy_host_and_reason() -> None:
    p = plan_host("may", "example.com", "mx1.example.com",
                  parse_policy(POLICY.replace("mx1.dest.test", "mx1.example.com")), None)
    text = failure_text(p, "mx1.example.com", "certificate has expired")
    assert text == ("MTA-STS policy for example.com requires a valid certificate for mx1.example.com; "
                    "got certificate has expired")


def test_classify_tls_error() -> None:
    def err(code: int) -> ssl.SSLCertVerificationError:
        e = ssl.SSLCertVerificationError(1, "certificate verify failed")
        e.verify_code, e.verify_message = code, f"code {code}"
        return e
    assert classify_tls_error(err(10))[0] == CERT_EXPIRED
    assert classify_tls_error(err(62))[0] == CERT_HOST_MISMATCH
    assert classify_tls_error(err(18))[0] == CERT_NOT_TRUSTED
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = err(20)
    assert classify_tls_error(wrapped) == (CERT_NOT_TRUSTED, "code 20")


# --- DANE matching --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


def test_dane_ee_selectors_and_matching_types(ca: TestCA) -> None:
    leaf = ca.issue("mx", ["mx1.dest.test"])
    other = ca.issue("other", ["mx1.dest.test"])
    spki = leaf.cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    good = [Tlsa(3, 1, 1, hashlib.sha256(spki).digest()), Tlsa(3, 0, 1, hashlib.sha256(leaf.der).digest()),
            Tlsa(3, 1, 2, hashlib.sha512(spki).digest()), Tlsa(3, 0, 0, leaf.der), Tlsa(3, 1, 0, spki)]
    for rec in good:
        assert dane.verify_chain([rec], [leaf.der], ["mx1.dest.test"])[0], rec.text()[:12]
        assert not dane.verify_chain([rec], [other.der], ["mx1.dest.test"])[0]
    # DANE-EE ignores names and dates (RFC 7672 §3.1.1): an expired, wrong-name cert still matches.
    old = ca.issue("old", ["elsewhere.test"], expired=True)
    rec = Tlsa(3, 1, 1, hashlib.sha256(old.cert.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest())
    assert dane.verify_chain([rec], [old.der], ["mx1.dest.test"])[0]


def test_dane_ta(ca: TestCA) -> None:
    leaf = ca.issue("mx-ta", ["mx1.dest.test"])
    ca_der = ca.cert.public_bytes(Encoding.DER)
    ta = Tlsa(2, 0, 1, hashlib.sha256(ca_der).digest())
    assert dane.verify_chain([ta], [leaf.der, ca_der], ["mx1.dest.test"])[0]
    assert not dane.verify_chain([ta], [leaf.der, ca_der], ["other.dest.test"])[0]      # name checked for TA
    forged = ca.issue("forged", ["mx1.dest.test"], self_signed=True)
    assert not dane.verify_chain([ta], [forged.der, ca_der], ["mx1.dest.test"])[0]      # not signed by the TA


@pytest.mark.parametrize(("rec", "usable"), [
    (Tlsa(3, 1, 1, b"\x00" * 32), True),
    (Tlsa(2, 0, 2, b"\x00" * 64), True),
    (Tlsa(3, 1, 1, b"\x00" * 31), False),     # wrong digest length (RFC 7671 §5.2)
    (Tlsa(1, 1, 1, b"\x00" * 32), False),     # PKIX-EE is not for SMTP (RFC 7672 §3.1.3)
    (Tlsa(0, 1, 1, b"\x00" * 32), False),
    (Tlsa(3, 2, 1, b"\x00" * 32), False),
    (Tlsa(3, 1, 3, b"\x00" * 32), False),
])
def test_tlsa_usable(rec: Tlsa, usable: bool) -> None:
    assert rec.usable is usable


# --- TLS-RPT -------------------------------------------------------------------------------
def _mixed_day(log: tlsrpt.TlsRptLog, t: float) -> None:
    sts = ReportPolicy("sts", "dest.test", tuple(ENFORCE.lines()), ENFORCE.mx)
    for _ in range(3):
        log.record(sts, None, mx="mx1.dest.test", receiving_ip="192.0.2.1", now=t)
    log.record(sts, "certificate-expired", mx="mx1.dest.test", receiving_ip="192.0.2.1", sending_ip="198.51.100.7",
               now=t)
    log.record(sts, "certificate-expired", mx="mx1.dest.test", receiving_ip="192.0.2.1", sending_ip="198.51.100.7",
               now=t)
    log.record(sts, "starttls-not-supported", mx="mx2.backup.dest.test", receiving_ip="192.0.2.2", now=t)
    log.record(ReportPolicy("tlsa", "dane.test", ("3 1 1 " + "00" * 32,), ("mx.dane.test",)), "tlsa-invalid",
               mx="mx.dane.test", now=t)
    log.record(ReportPolicy("no-policy-found", "plain.test"), None, mx="mx.plain.test", now=t)


def test_tlsrpt_report_matches_rfc8460_schema(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    t = 1_700_000_000.0
    log = tlsrpt.TlsRptLog(tmp_path)
    _mixed_day(log, t)
    log.save(log.snapshot())
    day = tlsrpt.day_of(t)
    rows = tlsrpt.load_day(tmp_path / f"{day}.json")
    assert rows is not None
    reports = tlsrpt.build_reports(rows, day, organization="Relay Org", contact="mailto:tls@relay.test",
                                   submitter="relay.test")
    assert sorted(reports) == ["dane.test", "dest.test", "plain.test"]
    schema = json.loads(SCHEMA.read_text())
    for r in reports.values():
        jsonschema.validate(r, schema, format_checker=jsonschema.FormatChecker())
    d = reports["dest.test"]
    pol = d["policies"][0]
    assert pol["policy"]["policy-type"] == "sts" and pol["policy"]["mx-host"] == list(ENFORCE.mx)
    assert pol["summary"] == {"total-successful-session-count": 3, "total-failure-session-count": 3}
    by_type = {f["result-type"]: f for f in pol["failure-details"]}
    assert by_type["certificate-expired"]["failed-session-count"] == 2
    assert by_type["certificate-expired"]["sending-mta-ip"] == "198.51.100.7"
    assert d["date-range"] == {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"}
    # A report that breaks the RFC's rules is refused by the same schema (the test can fail).
    bad = json.loads(json.dumps(d))
    bad["policies"][0]["failure-details"][0]["result-type"] = "cert-bad"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    # gzip and the §5.1 file name
    assert json.loads(gzip.decompress(tlsrpt.gzip_report(d))) == d
    name = tlsrpt.report_filename("relay.test", "dest.test", day)
    assert name.startswith("relay.test!dest.test!") and name.endswith(".json.gz")
    b, e = name.split("!")[2:4]
    assert int(e.split(".")[0]) - int(b) == 86399 and tlsrpt.day_of(int(b)) == day


def test_tlsrpt_log_survives_restart(tmp_path: Path) -> None:
    t = 1_700_000_000.0
    a = tlsrpt.TlsRptLog(tmp_path)
    _mixed_day(a, t)
    a.save(a.snapshot())
    b = tlsrpt.TlsRptLog(tmp_path)
    b.load()
    b.record(ReportPolicy("no-policy-found", "plain.test"), None, mx="mx.plain.test", now=t)
    rows = b.snapshot()[tlsrpt.day_of(t)]
    plain = next(r for r in rows if r["domain"] == "plain.test")
    assert plain["success"] == 2


@pytest.mark.parametrize(("texts", "want"), [
    (["v=TLSRPTv1; rua=mailto:tls@dest.test"], ["mailto:tls@dest.test"]),
    (["v=TLSRPTv1;rua=mailto:a@d.test,https://r.d.test/v1"], ["mailto:a@d.test", "https://r.d.test/v1"]),
    (["v=TLSRPTv1; rua=ftp://x"], []),
    (["v=TLSRPTv1; rua=mailto:a@d.test", "v=TLSRPTv1; rua=mailto:b@d.test"], []),
    (["v=spf1 -all"], []),
])
def test_parse_rua(texts: list[str], want: list[str]) -> None:
    assert tlsrpt.parse_rua(texts) == want


def test_report_mail_format() -> None:
    report = {"report-id": "2026-01-01_dest.test@relay.test", "policies": []}
    raw = tlsrpt.report_mail(report, to=["tls@dest.test"], domain="dest.test", submitter="relay.test",
                             from_addr="postmaster@relay.test", filename="relay.test!dest.test!1!2.json.gz")
    msg = message_from_bytes(raw, policy=email_default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "dest.test" and msg["TLS-Report-Submitter"] == "relay.test"
    assert "Report-ID: <2026-01-01_dest.test@relay.test>" in msg["Subject"]
    att = [p for p in msg.iter_attachments() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert len(att) == 1 and json.loads(gzip.decompress(att[0].get_payload(decode=True))) == report
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")


# --- the MTA-STS cache ------------------------------------------------------------------------
class _Fake:
    def __init__(self) -> None:
        self.pid: str | None = "1"
        self.policy_text = POLICY
        self.txt_calls = 0
        self.fetch_calls = 0
        self.fail = False
        self.gate = asyncio.Event()
        self.gate.set()

    async def txt(self, domain: str) -> str | None:
        self.txt_calls += 1
        await self.gate.wait()
        return self.pid

    async def fetch(self, domain: str) -> StsPolicy:
        self.fetch_calls += 1
        if self.fail:
            raise FetchError("HTTP 500")
        return parse_policy(self.policy_text)


async def test_cache_first_contact_coalesces_and_then_never_waits(tmp_path: Path) -> None:
    f = _Fake()
    c = MtaSts(tmp_path / "sts.json", f.txt, f.fetch)
    assert c.current("dest.test") is None
    f.gate.clear()
    waiters = [asyncio.create_task(c.lookup("dest.test")) for _ in range(20)]
    await asyncio.sleep(0.05)
    f.gate.set()
    entries = await asyncio.gather(*waiters)
    assert f.txt_calls == 1 and f.fetch_calls == 1
    assert all(e.policy is not None and e.policy.mode == "enforce" for e in entries)
    f.gate.clear()  # from now on DNS would hang: current() must still answer at once
    e = c.current("dest.test", now=time.time() + mta_sts.RECHECK_INTERVAL + 1)
    assert e is not None and e.policy is not None
    f.gate.set()
    await asyncio.sleep(0.05)
    assert f.txt_calls == 2 and f.fetch_calls == 1  # same id: not fetched again
    await c.close()


async def test_cached_policies_are_held_to_todays_rules_on_load(tmp_path: Path) -> None:
    """A cache written by a version that accepted an mx matching no host (under enforce: every MX
    refused) must not keep refusing mail until the policy expires, a year later."""
    f = _Fake()
    later = time.time() + 86400 * 300
    good = "version: STSv1\nmode: enforce\nmx: mx.dest.test\nmax_age: 31557600\n"

    def entry(domain: str, mode: str, mx: list[str], text: str) -> dict[str, object]:
        return {"domain": domain, "policy_id": "1", "expires": later, "checked": time.time(),
                "policy": {"mode": mode, "mx": mx, "max_age": 31557600, "text": text}}
    (tmp_path / "sts.json").write_text(json.dumps({"policies": [
        entry("good.test", "enforce", ["mx.dest.test"], good),
        entry("notext.test", "enforce", ["*.dest.test"], ""),
        entry("star.test", "enforce", ["*."], "version: STSv1\nmode: enforce\nmx: *.\nmax_age: 86400\n"),
        entry("ulabel.test", "enforce", ["b\u00fccher.test"], ""),
        entry("kelvin.test", "enforce", ["\u212a.test"], "version: STSv1\nmode: enforce\nmx: \u212a.test\n"),
        entry("mode.test", "sometimes", ["mx.dest.test"], ""),
        entry("types.test", "enforce", "mx.dest.test", ""),
    ]}))
    c = MtaSts(tmp_path / "sts.json", f.txt, f.fetch)
    c.load()
    assert c.current("good.test").policy.mx == ("mx.dest.test",)  # type: ignore[union-attr]
    assert c.current("notext.test").policy.mx == ("*.dest.test",)  # type: ignore[union-attr]
    for domain in ("star.test", "ulabel.test", "kelvin.test", "mode.test", "types.test"):
        assert c.current(domain) is None, domain  # dropped: fetched again
    await c.close()


async def test_cache_keeps_policy_when_fetch_fails_and_persists(tmp_path: Path) -> None:
    f = _Fake()
    c = MtaSts(tmp_path / "sts.json", f.txt, f.fetch)
    await c.lookup("dest.test")
    f.pid, f.fail = "2", True               # a new id, but its policy cannot be fetched
    c.current("dest.test", now=time.time() + mta_sts.RECHECK_INTERVAL + 1)
    await asyncio.sleep(0.05)
    e = c.current("dest.test")
    assert e is not None and e.policy is not None and e.policy_id == "1"   # §5.1: keep the cached one
    f.pid = None                            # TXT removed: the cached policy still applies until max_age
    c.current("dest.test", now=time.time() + mta_sts.RECHECK_INTERVAL + 1)
    await asyncio.sleep(0.05)
    assert c.current("dest.test").policy is not None  # type: ignore[union-attr]
    snap = c.snapshot()
    assert snap is not None
    c.save(snap)
    assert (tmp_path / "sts.json").stat().st_mode & 0o777 == 0o600
    again = MtaSts(tmp_path / "sts.json", f.txt, f.fetch)
    again.load()
    e2 = again.current("dest.test")
    assert e2 is not None and e2.policy == e.policy
    # Past max_age the policy is gone (and a refresh starts).
    assert again.current("dest.test", now=time.time() + 86400 + 1) is None
    await asyncio.sleep(0.05)
    await c.close()
    await again.close()


async def test_no_policy_is_cached_negatively(tmp_path: Path) -> None:
    f = _Fake()
    f.pid = None
    c = MtaSts(None, f.txt, f.fetch)
    e = await c.lookup("plain.test")
    assert e.policy is None and f.fetch_calls == 0
    for _ in range(1000):
        assert c.current("plain.test") is e
    assert f.txt_calls == 1
    await c.close()


async def test_cache_prunes_stale_entries(tmp_path: Path) -> None:
    f = _Fake()
    f.pid = None
    c = MtaSts(None, f.txt, f.fetch)
    await c.lookup("plain.test")
    f.pid = "1"
    await c.lookup("dest.test")
    assert c.prune() == 0
    assert c.prune(now=time.time() + 2 * mta_sts.NEGATIVE_TTL + 1) == 1     # the negative entry
    assert c.prune(now=time.time() + 86400 + 1) == 1                         # the policy past max_age
    await c.close()
