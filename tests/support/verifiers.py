"""DKIM verifiers for tests: dkimpy, plus two implementations independent of it.

* dkimpy (``dkim.verify``), keys served by a ``dnsfunc``: always available.
* Perl Mail::DKIM (RSA only in Debian 12's 1.20230212), keys over real DNS from a
  :class:`~tests.support.dnsserver.DnsServer`.  Install: ``apt-get install -y libmail-dkim-perl``.
* Node mailauth (RSA and Ed25519), keys over real DNS from the same server.
  Install: ``npm ci --prefix tests/support/mailauth --no-audit --no-fund`` (Node >= 20.18.1).

Usage (e.g. from an SMTP-listener test)::

    zone = KeyZone()
    zone.add_key(loaded_key)                     # or zone.add(domain, selector, "v=DKIM1; k=rsa; p=...")
    assert all(v.ok for v in dkimpy_verify(signed, zone))
    with DnsServer() as dns_srv:
        zone.publish(dns_srv)
        assert all(v.ok for v in mailauth_verify(signed, dns_srv))       # skips if unavailable
        assert all(v.ok for v in mail_dkim_verify(signed, dns_srv))      # RSA signatures only

    # or everything in one call (starts its own DnsServer):
    results = verify_everywhere(signed, zone)    # {"dkimpy": [...], "mail-dkim": [...], "mailauth": [...]}

Each verifier returns one :class:`Verdict` per DKIM-Signature, in header order. Messages are
checked as they travel over SMTP: bare LF line endings are turned into CRLF first.

A verifier that is not installed makes the calling test skip (``pytest.skip``) with the install
command, except when ``MAILRELAYD_REQUIRE_VERIFIERS=1`` is set (CI), where it fails instead, so a
missing install step cannot hide behind a green run. ``ensure_mailauth`` runs the (lockfile-pinned,
local) ``npm ci`` itself when node_modules is missing; ``ensure_mail_dkim`` only runs apt-get when
``MAILRELAYD_TEST_AUTO_INSTALL=1`` (and as root).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

import dkim
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.support.dnsserver import DnsServer

MAILAUTH_DIR = Path(__file__).resolve().parent / "mailauth"
MAILAUTH_INSTALL = "npm ci --prefix tests/support/mailauth --no-audit --no-fund"
MAIL_DKIM_INSTALL = "apt-get install -y libmail-dkim-perl"
MAILAUTH_MIN_NODE = (20, 18, 1)
_TIMEOUT = 60


class VerifierUnavailable(Exception):
    """The verifier is not installed and could not be installed; the message says how."""


@dataclass(frozen=True)
class Verdict:
    """One verifier's result for one DKIM-Signature."""

    verifier: str
    domain: str
    selector: str
    algorithm: str
    result: str  # "pass", "fail", "neutral", "temperror", "permerror", ...
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result == "pass"


class PublicKeyLike(Protocol):
    """What KeyZone needs of a key (mailrelayd.dkim.LoadedKey fits)."""

    @property
    def domain(self) -> str: ...
    @property
    def selector(self) -> str: ...
    @property
    def algorithm(self) -> str: ...
    @property
    def public_key_b64(self) -> str: ...


class KeyZone:
    """DKIM key records (``<selector>._domainkey.<domain>`` TXT), served to every verifier."""

    def __init__(self) -> None:
        self.records: dict[str, str] = {}

    @staticmethod
    def name(domain: str, selector: str) -> str:
        return f"{selector}._domainkey.{domain}".lower().rstrip(".") + "."

    def add(self, domain: str, selector: str, txt: str) -> None:
        """Publish ``txt`` (the record text, e.g. ``v=DKIM1; k=rsa; p=...``)."""
        self.records[self.name(domain, selector)] = txt

    def add_key(self, key: PublicKeyLike) -> None:
        """Publish a key's public half (e.g. a :class:`mailrelayd.dkim.LoadedKey`).

        The record is written here (RFC 6376 §3.6.1, RFC 8463 §4), not by the code under test.
        """
        k = "ed25519" if key.algorithm.startswith("ed25519") else "rsa"
        self.add(key.domain, key.selector, f"v=DKIM1; k={k}; p={key.public_key_b64}")

    def dnsfunc(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc`` interface."""
        if isinstance(name, bytes):
            name = name.decode("ascii")
        txt = self.records.get(name.lower().rstrip(".") + ".")
        return None if txt is None else txt.encode("ascii")

    def publish(self, dns_srv: DnsServer) -> None:
        """Add every record to a running DnsServer, split into <=255-byte strings (RFC 1035 §3.3)."""
        for name, txt in self.records.items():
            dns_srv.remove(name, "TXT")
            dns_srv.add(name, "TXT", " ".join(f'"{txt[i:i + 255]}"' for i in range(0, len(txt), 255)))


def to_wire(message: bytes) -> bytes:
    """The message with every line ending CRLF, as SMTP carries it."""
    return re.sub(rb"\r?\n", b"\r\n", message)


def _skip_or_fail(reason: str) -> NoReturn:
    if os.environ.get("MAILRELAYD_REQUIRE_VERIFIERS") == "1":
        pytest.fail(f"{reason} (MAILRELAYD_REQUIRE_VERIFIERS=1)")
    pytest.skip(reason)


# --- dkimpy -----------------------------------------------------------------------------


class _SigningKey:
    """pynacl's SigningKey as dkimpy uses it, on cryptography (Ed25519 is deterministic, RFC 8032)."""

    def __init__(self, seed_b64: bytes, encoder: object = None) -> None:
        self._key = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(seed_b64))

    def sign(self, data: bytes) -> types.SimpleNamespace:
        return types.SimpleNamespace(signature=self._key.sign(data))


class _VerifyKey:
    def __init__(self, public_b64: bytes, encoder: object = None) -> None:
        try:
            self._key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64))
        except ValueError as exc:
            raise _NACL.exceptions.ValueError(str(exc)) from None

    def verify(self, data: bytes, signature: bytes) -> None:
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            raise _NACL.exceptions.BadSignatureError("signature was forged or corrupt") from None


_NACL = types.SimpleNamespace(
    signing=types.SimpleNamespace(SigningKey=_SigningKey, VerifyKey=_VerifyKey),
    encoding=types.SimpleNamespace(Base64Encoder=object),
    exceptions=types.SimpleNamespace(
        ValueError=type("ValueError", (ValueError,), {}),
        BadSignatureError=type("BadSignatureError", (Exception,), {}),
    ),
)


@contextlib.contextmanager
def dkimpy_ed25519() -> Iterator[None]:
    """Let dkimpy sign and verify Ed25519 inside this block.

    dkimpy needs pynacl for that, which mailrelayd does not depend on; without it, stand in a
    cryptography-backed module exposing the four names dkimpy uses. dkimpy still does all the
    parsing, canonicalization and hashing.
    """
    if hasattr(dkim, "nacl"):  # pynacl installed, or an outer block already patched
        yield
        return
    dkim.nacl = _NACL
    try:
        yield
    finally:
        del dkim.nacl


def dkimpy_verify(message: bytes, zone: KeyZone) -> list[Verdict]:
    """Verify every DKIM-Signature with dkimpy (RFC 8301 minimum of 1024-bit RSA keys)."""
    message = to_wire(message)
    headers, _ = dkim.rfc822_parse(message)
    signatures = [value for name, value in headers if name.lower() == b"dkim-signature"]
    verdicts = []
    with dkimpy_ed25519():
        for idx, value in enumerate(signatures):
            tags = _tags(value)
            verifier = dkim.DKIM(message, minkey=1024)
            try:
                ok = verifier.verify(idx=idx, dnsfunc=zone.dnsfunc)
                detail = "" if ok else "signature did not verify"
            except dkim.DKIMException as exc:
                ok, detail = False, f"{exc.__class__.__name__}: {exc}"
            verdicts.append(Verdict("dkimpy", tags.get("d", ""), tags.get("s", ""), tags.get("a", ""),
                                    "pass" if ok else "fail", detail))
    return verdicts


def _tags(value: bytes) -> dict[str, str]:
    tags = {}
    for part in re.sub(rb"\s+", b"", value).split(b";"):
        if b"=" in part:
            k, v = part.split(b"=", 1)
            tags[k.decode("ascii", "replace")] = v.decode("ascii", "replace")
    return tags


# --- Perl Mail::DKIM --------------------------------------------------------------------

_PERL_VERIFY = r"""
use strict;
use warnings;
use JSON::PP;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;

my ($host, $port, @files) = @ARGV;
# All key lookups go to the test DNS server (Mail::DKIM::DNS::resolver sets the Net::DNS object).
my $res = Net::DNS::Resolver->new(
    nameservers => [$host], port => $port, recurse => 1,
    retry => 2, retrans => 1, udp_timeout => 5, tcp_timeout => 5,
);
Mail::DKIM::DNS::resolver($res);
my $json = JSON::PP->new->canonical;
for my $file (@files) {
    open(my $fh, '<:raw', $file) or die "$file: $!";
    my $dkim = Mail::DKIM::Verifier->new();
    $dkim->load($fh);
    close($fh);
    my @sigs = map { {
        domain => $_->domain // '', selector => $_->selector // '', algorithm => $_->algorithm // '',
        result => $_->result // '', detail => $_->result_detail // '',
    } } $dkim->signatures;
    print $json->encode({ file => $file, signatures => \@sigs }), "\n";
}
"""


@functools.cache
def _mail_dkim_present() -> bool:
    perl = shutil.which("perl")
    if perl is None:
        return False
    probe = subprocess.run([perl, "-MMail::DKIM::Verifier", "-MNet::DNS::Resolver", "-MJSON::PP", "-e", "1"],
                           capture_output=True, timeout=_TIMEOUT)
    return probe.returncode == 0


def ensure_mail_dkim() -> str:
    """Path to a perl with Mail::DKIM, or VerifierUnavailable.

    Install with ``apt-get install -y libmail-dkim-perl`` (Debian 12: Mail::DKIM 1.20230212,
    pulls in Net::DNS). Done here only when MAILRELAYD_TEST_AUTO_INSTALL=1 and running as root.
    """
    if not _mail_dkim_present() and os.environ.get("MAILRELAYD_TEST_AUTO_INSTALL") == "1" \
            and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "libmail-dkim-perl"], capture_output=True,
                       timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        _mail_dkim_present.cache_clear()
    if not _mail_dkim_present():
        raise VerifierUnavailable(f"Perl Mail::DKIM is not installed ({MAIL_DKIM_INSTALL})")
    return shutil.which("perl") or "perl"


def mail_dkim_verify_many(messages: Sequence[bytes], dns_srv: DnsServer) -> list[list[Verdict]]:
    """Verify each message with Mail::DKIM in one perl process; keys come from ``dns_srv``.

    Skips (or fails, see module doc) when Mail::DKIM is missing. Debian 12's Mail::DKIM has no
    Ed25519: its Ed25519 signatures come back as "invalid" with "unsupported algorithm".
    """
    try:
        perl = ensure_mail_dkim()
    except VerifierUnavailable as exc:
        _skip_or_fail(str(exc))
    return _run_batch("mail-dkim", [perl, "-e", _PERL_VERIFY, dns_srv.host, str(dns_srv.port)], messages)


def mail_dkim_verify(message: bytes, dns_srv: DnsServer) -> list[Verdict]:
    """Verify one message with Mail::DKIM (see :func:`mail_dkim_verify_many`)."""
    return mail_dkim_verify_many([message], dns_srv)[0]


# --- Node mailauth ----------------------------------------------------------------------


@functools.cache
def _node_version(node: str) -> tuple[int, ...]:
    """``node --version`` as a tuple, ``()`` when it cannot be read."""
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=_TIMEOUT).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    match = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)\S*", out.strip())
    return tuple(int(g) for g in match.groups()) if match else ()


def ensure_mailauth() -> list[str]:
    """The command prefix to run tests/support/mailauth/verify.js, or VerifierUnavailable.

    Runs ``npm ci`` from the committed package-lock.json when node_modules is missing.
    """
    node = shutil.which("node")
    if node is None:
        raise VerifierUnavailable("Node.js >= 20.18.1 is not installed (apt-get install -y nodejs npm)")
    version = _node_version(node)
    if version < MAILAUTH_MIN_NODE:
        have = ".".join(map(str, version)) if version else "unknown"
        raise VerifierUnavailable(f"mailauth needs Node.js >= 20.18.1, {node} is {have}")
    if not (MAILAUTH_DIR / "node_modules" / "mailauth" / "package.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            raise VerifierUnavailable(f"mailauth is not installed and npm is missing ({MAILAUTH_INSTALL})")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=MAILAUTH_DIR,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise VerifierUnavailable(f"npm ci for mailauth failed: {done.stderr.strip()[-500:]}")
    return [node, str(MAILAUTH_DIR / "verify.js")]


def mailauth_verify_many(messages: Sequence[bytes], dns_srv: DnsServer, *,
                         now: int | None = None) -> list[list[Verdict]]:
    """Verify each message with mailauth in one node process; keys come from ``dns_srv``.

    ``now`` (Unix time) is the verifier's clock, for x= expiry tests.
    """
    try:
        command = ensure_mailauth()
    except VerifierUnavailable as exc:
        _skip_or_fail(str(exc))
    command += ["--dns", dns_srv.nameserver]
    if now is not None:
        command += ["--now", str(now)]
    return _run_batch("mailauth", command, messages)


def mailauth_verify(message: bytes, dns_srv: DnsServer, *, now: int | None = None) -> list[Verdict]:
    """Verify one message with mailauth (see :func:`mailauth_verify_many`)."""
    return mailauth_verify_many([message], dns_srv, now=now)[0]


# --- shared -----------------------------------------------------------------------------


def _run_batch(verifier: str, command: list[str], messages: Sequence[bytes]) -> list[list[Verdict]]:
    with tempfile.TemporaryDirectory(prefix=f"{verifier}-") as tmp:
        files = []
        for i, message in enumerate(messages):
            path = Path(tmp) / f"{i}.eml"
            path.write_bytes(to_wire(message))
            files.append(str(path))
        done = subprocess.run([*command, *files], capture_output=True, text=True, timeout=_TIMEOUT)
    if done.returncode != 0:
        raise AssertionError(f"{verifier} verifier crashed (exit {done.returncode}): {done.stderr[-2000:]}")
    by_file = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            by_file[row["file"]] = [
                Verdict(verifier, s["domain"], s["selector"], s["algorithm"], s["result"],
                        s.get("detail") or s.get("comment") or "")
                for s in row["signatures"]
            ]
    return [by_file[f] for f in files]


def verify_everywhere(message: bytes, zone: KeyZone, *, dns_srv: DnsServer | None = None,
                      rsa_only_mail_dkim: bool = True) -> dict[str, list[Verdict]]:
    """Verify with every available verifier: {"dkimpy": [...], "mailauth": [...], "mail-dkim": [...]}.

    Publishes ``zone`` on ``dns_srv`` (or on a DnsServer of its own). A verifier that is not
    installed is left out, unless MAILRELAYD_REQUIRE_VERIFIERS=1. With ``rsa_only_mail_dkim``,
    Mail::DKIM's verdicts for Ed25519 signatures (which it cannot check) are dropped.
    """
    results = {"dkimpy": dkimpy_verify(message, zone)}
    with contextlib.ExitStack() as stack:
        if dns_srv is None:
            dns_srv = stack.enter_context(DnsServer())
        zone.publish(dns_srv)
        for name, run in (("mailauth", mailauth_verify), ("mail-dkim", mail_dkim_verify)):
            try:
                results[name] = run(message, dns_srv)
            except pytest.skip.Exception:
                continue
    if rsa_only_mail_dkim and "mail-dkim" in results:
        results["mail-dkim"] = [v for v in results["mail-dkim"] if not v.algorithm.startswith("ed25519")]
    return results
