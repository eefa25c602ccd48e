"""TLSA RRsets holding malformed records, served by a real DNS responder on loopback (RFC 7672 §2.1.1,
RFC 6698 §2.1): a record that cannot be read is unusable and only it is ignored; the RRset's good
records still authenticate the server, and an RRset of nothing but bad records is "unusable" (TLS
mandatory, no authentication: §2.2), not a failed lookup.

dnspython refuses such an answer as a whole (2.9 even refuses a SHA-256 digest of the wrong length),
so these tests put raw rdata bytes on the wire next to records in presentation format.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import dns.asyncresolver
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mailrelayd.config import DnsConfig, HostPort
from mailrelayd.delivery import dane
from mailrelayd.delivery.mx import MxResolver
from mailrelayd.delivery.tlspolicy import plan_host
from tests.support.dnsserver import DnsServer
from tests.support.testca import Issued, TestCA

MX = "mx.dane.test"
TLSA_NAME = f"_25._tcp.{MX}."
LIFETIME = 2.0
QUICK = 1.0  # an answer the resolver can read comes back well inside its lifetime

SHORT_DIGEST = bytes([3, 1, 1]) + b"\x5a" * 20  # SHA-256 (matching type 1) with 20 bytes, not 32
NO_HEADER = bytes([3, 1])  # rdata shorter than the usage/selector/matching-type header


class RawDns(DnsServer):
    """The test responder, plus raw rdata bytes: ``add_raw`` records go on the wire exactly as given,
    added to the answer the base responder gives (AD bit, rcodes and CNAMEs as it decides)."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: dict[tuple[dns.name.Name, int], list[bytes]] = {}

    def add_raw(self, name: str, rtype: str, rdata: bytes) -> None:
        key = (dns.name.from_text(name), dns.rdatatype.from_text(rtype))
        self.raw.setdefault(key, []).append(rdata)

    def answer(self, wire: bytes) -> bytes | None:
        base = super().answer(wire)
        if base is None:
            return None
        response = dns.message.from_wire(base)
        if not response.question:
            return base
        q = response.question[0]
        owners = [q.name] + [rd.target for rrset in response.answer
                             if rrset.rdtype == dns.rdatatype.CNAME for rd in rrset]
        added = False
        for owner in owners:
            for data in self.raw.get((owner, q.rdtype), []):
                rrset = response.find_rrset(response.answer, owner, dns.rdataclass.IN, q.rdtype, create=True)
                rrset.add(dns.rdata.GenericRdata(dns.rdataclass.IN, q.rdtype, data), 300)
                added = True
        if added and response.rcode() == dns.rcode.NXDOMAIN:
            response.set_rcode(dns.rcode.NOERROR)
        # Any size: the UDP side truncates past 512 bytes and the client retries over TCP.
        return response.to_wire(max_size=65535)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("dane-records-ca"))


@pytest.fixture(scope="module")
def leaf(ca: TestCA) -> Issued:
    return ca.issue("leaf", [MX])


@pytest.fixture(scope="module")
def stranger(ca: TestCA) -> Issued:
    return ca.issue("stranger", [MX])


@pytest.fixture
def dns_srv() -> Iterator[RawDns]:
    with RawDns() as srv:
        srv.set_ad(True)
        yield srv


def _resolver(srv: DnsServer) -> dns.asyncresolver.Resolver:
    mx = MxResolver(DnsConfig(nameservers=[HostPort("127.0.0.1", srv.port)], timeout=LIFETIME))
    return dane.make_dnssec(mx.resolver)


def _spki_sha256(issued: Issued) -> bytes:
    spki = issued.cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


async def _lookup(srv: DnsServer) -> tuple[dane.DaneLookup, float]:
    t0 = time.perf_counter()
    got = await dane.lookup(_resolver(srv), MX, 25)
    return got, time.perf_counter() - t0


async def test_good_record_next_to_malformed_ones_is_used(dns_srv: RawDns, leaf: Issued, stranger: Issued) -> None:
    good = dane.Tlsa(3, 1, 1, _spki_sha256(leaf))
    dns_srv.add(TLSA_NAME, "TLSA", good.text())
    dns_srv.add_raw(TLSA_NAME, "TLSA", SHORT_DIGEST)
    dns_srv.add_raw(TLSA_NAME, "TLSA", NO_HEADER)
    got, took = await _lookup(dns_srv)
    assert (got.state, got.records, got.usable_records) == ("usable", (good,), (good,)), got.detail
    assert "2 malformed" in got.detail and took < QUICK
    assert dane.verify_chain(got.usable_records, [leaf.der], [MX])[0]
    assert not dane.verify_chain(got.usable_records, [stranger.der], [MX])[0]
    plan = plan_host("dane-only", "dane.test", MX, None, got)
    assert (plan.require_tls, plan.auth, plan.tlsa, plan.refuse) == (True, "dane", (good,), "")


async def test_only_malformed_records_are_unusable_not_failed(dns_srv: RawDns, leaf: Issued) -> None:
    dns_srv.add_raw(TLSA_NAME, "TLSA", SHORT_DIGEST)
    dns_srv.add_raw(TLSA_NAME, "TLSA", NO_HEADER)
    got, took = await _lookup(dns_srv)
    assert (got.state, got.usable_records) == ("unusable", ()), got.detail
    assert "malformed" in got.detail and took < QUICK
    assert not dane.verify_chain(got.records, [leaf.der], [MX])[0]
    # As for any unusable TLSA RRset (RFC 7672 §2.2): TLS mandatory, without authentication, at both levels.
    for level in ("dane", "dane-only"):
        plan = plan_host(level, "dane.test", MX, None, got)
        assert (plan.require_tls, plan.auth, plan.refuse) == (True, "none", ""), level


async def test_good_record_behind_a_cname_next_to_a_malformed_one(dns_srv: RawDns, leaf: Issued) -> None:
    target = "_25._tcp.tlsa.hosting.test."
    good = dane.Tlsa(3, 1, 1, _spki_sha256(leaf))
    dns_srv.add(TLSA_NAME, "CNAME", target)
    dns_srv.add(target, "TLSA", good.text())
    dns_srv.add_raw(target, "TLSA", SHORT_DIGEST)
    got, took = await _lookup(dns_srv)
    assert (got.state, got.usable_records) == ("usable", (good,)), got.detail
    assert took < QUICK and dane.verify_chain(got.usable_records, [leaf.der], [MX])[0]


async def test_large_rrset_with_a_malformed_record_over_tcp(dns_srv: RawDns, leaf: Issued) -> None:
    """Past 512 bytes the UDP answer is truncated and the lookup retries over TCP (RFC 7766 §5)."""
    good = dane.Tlsa(3, 1, 1, _spki_sha256(leaf))
    others = [dane.Tlsa(3, 1, 1, hashlib.sha256(bytes([i])).digest()) for i in range(20)]
    for rec in (*others, good):
        dns_srv.add(TLSA_NAME, "TLSA", rec.text())
    dns_srv.add_raw(TLSA_NAME, "TLSA", SHORT_DIGEST)
    got, took = await _lookup(dns_srv)
    assert dns_srv.query_count(TLSA_NAME, "TLSA") == 2  # UDP (truncated), then TCP
    assert got.state == "usable" and set(got.usable_records) == {*others, good}, got.detail
    assert took < QUICK and dane.verify_chain(got.usable_records, [leaf.der], [MX])[0]


async def test_malformed_records_without_ad_bit_are_insecure(dns_srv: RawDns, leaf: Issued) -> None:
    dns_srv.set_ad(False)
    dns_srv.add(TLSA_NAME, "TLSA", dane.Tlsa(3, 1, 1, _spki_sha256(leaf)).text())
    dns_srv.add_raw(TLSA_NAME, "TLSA", SHORT_DIGEST)
    got, took = await _lookup(dns_srv)
    assert (got.state, got.records) == ("insecure", ()), got.detail
    assert took < QUICK


async def test_servfail_stays_failed(dns_srv: RawDns) -> None:
    """SERVFAIL (DNSSEC bogus) is a failed lookup, with or without a malformed record in the response."""
    dns_srv.set_rcode(TLSA_NAME, dns.rcode.SERVFAIL)
    got, _ = await _lookup(dns_srv)
    assert got.state == "failed" and "SERVFAIL" in got.detail, got.detail
    dns_srv.add_raw(TLSA_NAME, "TLSA", SHORT_DIGEST)
    got, took = await _lookup(dns_srv)
    assert got.state == "failed" and "SERVFAIL" in got.detail, got.detail
    assert took < QUICK
    plan = plan_host("dane", "dane.test", MX, None, got)
    assert plan.require_tls and plan.refuse



def test_a_large_rrset_parses_each_presented_certificate_once(monkeypatch: pytest.MonkeyPatch, ca: TestCA,
                                                              leaf: Issued, stranger: Issued) -> None:
    """A hostile RRset of many records that match nothing, against a chain: each certificate is read
    (and each of its digests made) once, not once per record, since this runs on the event loop."""
    parsed: list[bytes] = []
    load = dane.x509.load_der_x509_certificate

    def counting(der: bytes) -> Any:
        parsed.append(der)
        return load(der)

    monkeypatch.setattr(dane.x509, "load_der_x509_certificate", counting)
    junk = [dane.Tlsa(usage, sel, mt, hashlib.sha256(b"%d" % i).digest() if mt == 1 else
                      hashlib.sha512(b"%d" % i).digest() if mt == 2 else b"x%d" % i)
            for i in range(300) for usage in (2, 3) for sel in (0, 1) for mt in (0, 1, 2)]
    chain = [stranger.der, ca.cert.public_bytes(Encoding.DER), leaf.der]
    assert not dane.verify_chain(junk, chain, [MX])[0]
    assert len(parsed) <= len(chain), len(parsed)
    # The match itself is unchanged: a DANE-EE record for the leaf among them still wins.
    good = dane.Tlsa(3, 1, 1, _spki_sha256(stranger))
    assert dane.verify_chain([*junk, good], chain, [MX])[0]
