"""DANE for SMTP (RFC 7672): TLSA lookup with DNSSEC, and matching a server's certificate against it.

DNSSEC validation is the resolver's job; we trust its AD bit only when every configured resolver is on
loopback (RFC 7672 §2.1.1, Postfix's rule too): an AD bit that crossed a network is forgeable.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.rdatatype
import dns.resolver
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mailrelayd.delivery.tolerantdns import tolerant

DANE_TA, DANE_EE = 2, 3
SPKI, FULL = 1, 0
_DIGEST_LEN = {0: None, 1: 32, 2: 64}

_UNREADABLE = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion, x509.DuplicateExtension,
               x509.UnsupportedGeneralNameType)
"""What cryptography raises for a certificate (or its key, or its extensions) it cannot read. The
chain is the remote server's: OpenSSL completed the handshake with it, cryptography's stricter
parser may still refuse it, and that must be "does not match", not an exception out of DANE."""

State = Literal["usable", "unusable", "insecure", "none", "failed"]
"""usable: secure TLSA records of which at least one can be used; unusable: secure records, none
usable (RFC 7672 §2.2: TLS is still mandatory); insecure: no AD bit, or a resolver not on loopback;
none: securely no TLSA records; failed: SERVFAIL (bogus) or no answer."""


@dataclass(frozen=True, slots=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes

    def text(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @property
    def usable(self) -> bool:
        """§3.1.3: only DANE-TA(2) and DANE-EE(3) are used for SMTP; a digest of the wrong length
        makes the record unusable (RFC 7671 §5.2)."""
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in (FULL, SPKI):
            return False
        if self.mtype not in _DIGEST_LEN:
            return False
        want = _DIGEST_LEN[self.mtype]
        return (want is None and len(self.data) > 0) or len(self.data) == want


@dataclass(frozen=True, slots=True)
class DaneLookup:
    state: State
    records: tuple[Tlsa, ...] = ()
    detail: str = ""

    @property
    def usable_records(self) -> tuple[Tlsa, ...]:
        return tuple(r for r in self.records if r.usable)


def resolver_on_loopback(resolver: dns.asyncresolver.Resolver) -> bool:
    """True when every nameserver the resolver asks is a loopback address."""
    addrs: list[str] = []
    for ns in resolver.nameservers:
        addrs.append(ns if isinstance(ns, str) else getattr(ns, "address", ""))
    try:
        return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)
    except ValueError:
        return False


def tlsa_name(host: str, port: int) -> str:
    return f"_{port}._tcp.{host.rstrip('.')}."


def _ad(response: dns.message.Message | None) -> bool:
    return response is not None and bool(response.flags & dns.flags.AD)


async def lookup(resolver: dns.asyncresolver.Resolver, host: str, port: int) -> DaneLookup:
    """TLSA for ``_<port>._tcp.<host>`` (§2.2). ``resolver`` must send the DO bit (see make_dnssec)."""
    if not resolver_on_loopback(resolver):
        return DaneLookup("insecure", detail="the DNS resolver is not on loopback, so its AD bit is not trusted")
    name = tlsa_name(host, port)
    try:
        answer = await tolerant(resolver).resolve(name, "TLSA", search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN as e:
        resp = e.responses().get(e.qnames()[0]) if e.qnames() else None
        return DaneLookup("none" if _ad(resp) else "insecure", detail=f"no TLSA record at {name}")
    except dns.resolver.NoNameservers:
        return DaneLookup("failed", detail=f"TLSA lookup of {name} failed: SERVFAIL (DNSSEC bogus?)")
    except dns.exception.DNSException as e:
        return DaneLookup("failed", detail=f"TLSA lookup of {name} failed: {type(e).__name__}")
    if not _ad(answer.response):
        return DaneLookup("insecure", detail=f"TLSA answer for {name} is not DNSSEC-validated (no AD bit)")
    # Records the parser had to skip are malformed, hence unusable (RFC 7672 §2.1.1); with none left
    # the RRset is "unusable", not absent: TLS stays mandatory (§2.2).
    malformed = len(answer.response.errors)
    skipped = f"; {malformed} malformed record(s) ignored" if malformed else ""
    records = tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer.rrset or ()
                    if r.rdtype == dns.rdatatype.TLSA)
    if not records:
        if malformed:
            return DaneLookup("unusable", detail=f"no usable TLSA record at {name}{skipped}")
        return DaneLookup("none", detail=f"no TLSA record at {name}")
    if not any(r.usable for r in records):
        return DaneLookup("unusable", records, f"no usable TLSA record at {name}{skipped}")
    return DaneLookup("usable", records, skipped.removeprefix("; "))


async def mx_secure(resolver: dns.asyncresolver.Resolver, domain: str) -> bool:
    """Is the domain's MX RRset DNSSEC-validated? RFC 7672 §2.2.1: TLSA records of MX hosts found
    through an insecure MX lookup are not used (an attacker could have chosen the host)."""
    if not resolver_on_loopback(resolver):
        return False
    try:
        answer = await resolver.resolve(domain.rstrip(".") + ".", "MX", search=False, raise_on_no_answer=False)
    except dns.exception.DNSException:
        return False
    return _ad(answer.response)


def make_dnssec(resolver: dns.asyncresolver.Resolver) -> dns.asyncresolver.Resolver:
    """The same resolver settings, asking with the DO bit so a validating resolver reports AD."""
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = list(resolver.nameservers)
    r.lifetime, r.timeout, r.cache = resolver.lifetime, resolver.timeout, dns.resolver.LRUCache(10_000)
    r.use_edns(0, dns.flags.DO, 1232)
    return r


# --- matching (pure) -----------------------------------------------------------------------
def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    if selector == SPKI:
        return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return der


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def record_matches(rec: Tlsa, der: bytes) -> bool:
    return _Digests(der).matches(rec)


class _Digests:
    """One presented certificate, parsed once, with each (selector, matching type) digest made once
    (RFC 6698 §2.1: at most 2 x 3 of them): a hostile TLSA RRset of a thousand records against a long
    chain would otherwise parse and hash every certificate once per record, on the event loop."""

    def __init__(self, der: bytes) -> None:
        self.der = der
        self._cert: x509.Certificate | None = None
        self._unreadable = False
        self._memo: dict[tuple[int, int], bytes | None] = {}

    def matches(self, rec: Tlsa) -> bool:
        key = (rec.selector, rec.mtype)
        if key not in self._memo:
            self._memo[key] = self._make(rec.selector, rec.mtype)
        got = self._memo[key]
        return got is not None and got == rec.data

    def _make(self, selector: int, mtype: int) -> bytes | None:
        if self._unreadable:
            return None
        try:
            if self._cert is None:
                self._cert = x509.load_der_x509_certificate(self.der)
            return _digest(_selected(self._cert, self.der, selector), mtype)
        except _UNREADABLE:
            self._unreadable = self._cert is None  # a certificate that cannot be read at all stays so
            return None


def _name_ok(cert: x509.Certificate, names: Iterable[str]) -> bool:
    """RFC 7672 §3.2.2: for DANE-TA the name must be the TLSA base domain (or the MX name)."""
    try:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns_names = [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
        except x509.ExtensionNotFound:
            dns_names = [a.value.lower() for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
                         if isinstance(a.value, str)]
    except _UNREADABLE:
        return False
    for want in names:
        want = want.lower().rstrip(".")
        for have in dns_names:
            if have == want or (have.startswith("*.") and want.partition(".")[2] == have[2:]):
                return True
    return False


def verify_chain(records: Sequence[Tlsa], chain: Sequence[bytes], names: Iterable[str]) -> tuple[bool, str]:
    """Does the presented chain (leaf first, DER) satisfy one usable TLSA record?

    DANE-EE(3): the leaf matches; name and dates are not checked (§3.1.1). DANE-TA(2): some
    certificate of the chain matches, every certificate below it was signed by the next one, and the
    leaf carries the host name (§3.1.2, §3.2.2).
    """
    usable = [r for r in records if r.usable]
    if not chain:
        return False, "the server presented no certificate"
    leaf = _Digests(chain[0])
    for r in usable:
        if r.usage == DANE_EE and leaf.matches(r):
            return True, f"DANE-EE {r.usage} {r.selector} {r.mtype} matches"
    ta = [r for r in usable if r.usage == DANE_TA]
    if ta and len(chain) > 1:
        for i, der in enumerate(chain[1:], start=1):
            presented = _Digests(der)
            if not any(presented.matches(r) for r in ta):
                continue
            try:
                certs = [x509.load_der_x509_certificate(c) for c in chain[:i + 1]]
                for j in range(i):
                    certs[j].verify_directly_issued_by(certs[j + 1])
            except (InvalidSignature, *_UNREADABLE):
                return False, "the chain does not lead to the DANE-TA trust anchor"
            if not _name_ok(certs[0], names):
                return False, f"the certificate is not for {', '.join(names)}"
            return True, "DANE-TA matches"
    return False, "no TLSA record matches the certificate presented"
