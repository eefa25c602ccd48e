"""DKIM signing: byte-identity with dkimpy, and verification by dkimpy, Mail::DKIM and mailauth."""

from __future__ import annotations

import base64
import dataclasses
import random
import re
import stat
import subprocess
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import dkim
import dns.asyncresolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from dkim.canonicalization import Relaxed
from prometheus_client import REGISTRY

from mailrelayd.dkim import (
    DEFAULT_HEADERS,
    DkimKeyError,
    DkimKeySpec,
    DkimSigner,
    LoadedKey,
    check_published,
    generate_key,
    load_key,
    load_keys,
    relaxed_body,
    split_message,
    txt_record,
    txt_value,
    write_private_key,
)
from tests.support.dnsserver import DnsServer
from tests.support.verifiers import (
    KeyZone,
    Verdict,
    dkimpy_ed25519,
    dkimpy_verify,
    mail_dkim_verify_many,
    mailauth_verify,
    mailauth_verify_many,
)

NOW = 1_750_000_000  # fixed t= for byte-identity tests

# A 512-bit RSA key (too small for DKIM: RFC 8301 §3.2); cryptography refuses to generate one.
RSA_512 = b"""-----BEGIN PRIVATE KEY-----
MIIBVwIBADANBgkqhkiG9w0BAQEFAASCAUEwggE9AgEAAkEAxXAvNLk0PJp/UifU
U2Nm7BQw21IMNmtjwHU9uLaEZTVSJwT9lGLD96UUOQd5lbQuiQim0CgKSG6dGbGP
7aufqwIDAQABAkEAohBi/1Ei2rgq2KIO/F/0pMYyEGU51xWxbNIP1uYiqPt5cjJ/
wEj9pColFwGI0v+TM9DlkxbaMQOoQXim6mQqkQIhAOeraq7cDi/4fYP1FerXBT1l
/YXytCivucyxssFNcD+ZAiEA2ixvfiW3sKwqryFbvd0wr2Hx5TQ2k7NC28FgLNwN
8+MCIQCe6rt3z4P77B1Nk6XBPlZd08ShSefDsSdm/s58Qz6ooQIhAJ0/0cxWWyNX
tBwuKvWZ63E9YyAUlhG27sV9h1hN8zCJAiEAtslNzfvYRO1XzU0+4zIX+lOt7HDK
Yillh2uceL8xpow=
-----END PRIVATE KEY-----
"""


# --- keys and messages ------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    rsa: LoadedKey
    ed: LoadedKey
    rsa_pem: bytes
    ed_pem: bytes
    path: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("dkim-keys")
    rsa_pem, _ = generate_key("rsa-sha256")
    ed_pem, _ = generate_key("ed25519-sha256")
    write_private_key(d / "rsa.key", rsa_pem)
    write_private_key(d / "ed.key", ed_pem)
    rsa_key, ed_key = load_keys([
        DkimKeySpec("example.com", "s-rsa", d / "rsa.key", "rsa-sha256"),
        DkimKeySpec("example.com", "s-ed", d / "ed.key", "ed25519-sha256"),
    ])
    return Keys(rsa_key, ed_key, rsa_pem, ed_pem, d)


@pytest.fixture(scope="module")
def zone(keys: Keys) -> KeyZone:
    zone = KeyZone()
    zone.add_key(keys.rsa)
    zone.add_key(keys.ed)
    return zone


@pytest.fixture(scope="module")
def dns_srv(zone: KeyZone):
    with DnsServer() as srv:
        zone.publish(srv)
        yield srv


def message(*, sender: str = "Alice Example <alice@example.com>", subject: bytes = b"Hello",
            body: bytes = b"Hi Bob,\r\n\r\nSee you tomorrow.\r\n", extra: bytes = b"") -> bytes:
    return (
        b"From: " + sender.encode() + b"\r\n"
        b"To: Bob <bob@example.org>\r\n"
        b"Subject: " + subject + b"\r\n"
        b"Date: Mon, 16 Jun 2025 10:00:00 +0000\r\n"
        b"Message-ID: <1234@example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Received: from x by y; Mon, 16 Jun 2025 10:00:00 +0000\r\n"
        + extra + b"\r\n" + body
    )


LONG_SUBJECT = b"A rather long subject " + b"that keeps going " * 12 + b"\r\n\tand is folded\r\n  twice"
MESSAGES: dict[str, bytes] = {
    "plain": message(),
    "8bit": message(subject="Grüße aus Köln".encode(),
                    body="Grüße, ça va? 日本語\r\n".encode() + b"latin-1 \xe9\xff\r\n"),
    "long-folded-headers": message(subject=LONG_SUBJECT, extra=(
        b"Cc: " + b",\r\n ".join(b"person%d <p%d@example.net>" % (i, i) for i in range(25)) + b"\r\n"
        b"List-Unsubscribe: <https://example.com/unsubscribe/" + b"x" * 150
        + b">,\r\n <mailto:u@example.com>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"Reply-To: support@example.com\r\n"
    )),
    # Repeated fields: h= names each instance, bottom-up (RFC 6376 §5.4.2), plus From once more.
    "repeated-fields": message(extra=b"To: second <s@example.net>\r\nCc: a@example.net\r\n"
                                     b"Cc: b@example.net\r\nREPLY-TO: r@example.com\r\n"),
    "lf-line-endings": message().replace(b"\r\n", b"\n"),
    "mixed-line-endings": message(body=b"line one\nline two\r\nline three\n"),
    "whitespace": message(subject=b"  spaced \t out  ",
                          body=b"a  b\t\tc \r\n \t\r\nend \t \r\n\r\n\r\n \r\n"),
    "empty-body": message(body=b""),
    "body-no-final-crlf": message(body=b"no newline at the end"),
    "lone-cr": message(body=b"a\rb\r\n\rc\r d\r\n"),
    # A bare CR right before the final CRLFs: dkimpy and Mail::DKIM keep it, mailauth drops it.
    "cr-before-final-crlf": message(body=b"c\r\r\n\r\n"),
    "100k": message(body=b"".join(b"%05d the quick brown fox  jumps over\tthe lazy dog \r\n" % i
                                  for i in range(2000))),
}


def expected_h(msg: bytes, headers: tuple[str, ...] = DEFAULT_HEADERS) -> list[str]:
    """The h= list the issue asks for, computed independently of mailrelayd.dkim."""
    names = [n.decode().lower() for n, _ in dkim.rfc822_parse(msg)[0]]
    present = [n for n in names if n in headers]
    return present + ["from"] * names.count("from")


def h_tag(signature: bytes) -> list[str]:
    m = re.search(rb"h=([^;]*);", re.sub(rb"\r\n[ \t]", b" ", signature))
    assert m
    return [x.strip().decode() for x in m.group(1).split(b":")]


def split_sigs(headers: bytes) -> list[bytes]:
    return [b"DKIM-Signature:" + s for s in headers.split(b"DKIM-Signature:")[1:]]


def dkimpy_sign(monkeypatch: pytest.MonkeyPatch, msg: bytes, key: LoadedKey, pem: bytes,
                include: list[str]) -> bytes:
    """dkimpy's own signature (its RSA and key parsing) at t=NOW."""
    monkeypatch.setattr(dkim, "time", types.SimpleNamespace(time=lambda: NOW))
    if key.algorithm == "ed25519-sha256":
        seed = key.private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                             serialization.NoEncryption())
        privkey = base64.b64encode(seed)  # dkimpy's Ed25519 key format
    else:
        privkey = pem
    with dkimpy_ed25519():
        return dkim.sign(msg, key.selector.encode(), key.domain.encode(), privkey,
                         canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=key.algorithm.encode(),
                         include_headers=[h.encode() for h in include])


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# --- canonicalization and parsing equivalence -------------------------------------------


RELAXED_EDGE_CASES = [
    b"", b"\r\n", b"\r\n\r\n", b" \r\n", b"\t\r\n\r\n", b"a", b"a ", b"a\t", b"a\r\n", b"a \r\n",
    b"a\t \t\r\n", b" a\r\n", b"a  b\r\n", b"a\t\tb\r\n", b"a \t b\r\n", b"a\r\n\r\n\r\n",
    b"a\r\n \r\n\t\r\n",
    b"\r", b"\n", b"a\r", b"a\n", b"a \r", b"a \n", b"a \r \n", b"a\r\r\n", b"a\r\n\r", b"\r\n\n",
    b"a \r\r\n\r\n", b"a\r\n\r\nb\r\n\r\n", b"\xc3\xa9  \xe9\t\r\n", b"  \r\n  \r\n", b"a" * 1000 + b" \r\n",
]


@pytest.mark.parametrize("body", RELAXED_EDGE_CASES)
def test_relaxed_body_matches_dkimpy_edge_cases(body: bytes) -> None:
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


def test_relaxed_body_matches_dkimpy_fuzz() -> None:
    rng = random.Random(6376)
    atoms = [b"a", b"xyz", b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\r\n", b"\r", b"\n", b"\xc3\xa9", b"\x00"]
    for _ in range(5000):
        body = b"".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
        assert relaxed_body(body) == Relaxed.canonicalize_body(body), body


def test_relaxed_body_large() -> None:
    body = MESSAGES["100k"].split(b"\r\n\r\n", 1)[1]
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


def _parse_outcome(parse: Callable[[bytes], object], msg: bytes) -> object:
    try:
        return parse(msg)
    except Exception as exc:
        return type(exc)


def test_split_message_matches_rfc822_parse_fuzz() -> None:
    rng = random.Random(5322)
    lines = [b"From: a@example.com", b"Subject:  x ", b"X-Y:", b" folded", b"\tfolded", b"bad line",
             b"From nobody", b"", b"", b"body text", b"  ", b"\xc3\xa9"]
    seps = [b"\r\n", b"\r\n", b"\n", b"\r", b"\r\r\n"]
    for _ in range(5000):
        parts = [rng.choice(lines) for _ in range(rng.randint(0, 8))]
        msg = b"".join(p + rng.choice(seps) for p in parts)
        if rng.random() < 0.3:
            msg = msg[: rng.randint(0, len(msg))]
        assert _parse_outcome(split_message, msg) == _parse_outcome(dkim.rfc822_parse, msg), msg


@pytest.mark.parametrize("name", list(MESSAGES))
def test_split_message_matches_rfc822_parse(name: str) -> None:
    assert split_message(MESSAGES[name]) == dkim.rfc822_parse(MESSAGES[name])


# --- byte identity with dkimpy ----------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
@pytest.mark.parametrize("name", list(MESSAGES))
def test_signature_is_byte_identical_to_dkimpy(monkeypatch: pytest.MonkeyPatch, keys: Keys,
                                               algorithm: str, name: str) -> None:
    key, pem = (keys.rsa, keys.rsa_pem) if algorithm == "rsa-sha256" else (keys.ed, keys.ed_pem)
    msg = MESSAGES[name]
    ours = DkimSigner([key]).sign(msg, now=NOW)
    assert ours.status == "signed"
    assert h_tag(ours.headers) == expected_h(msg)
    assert ours.headers == dkimpy_sign(monkeypatch, msg, key, pem, expected_h(msg))


def test_dual_signature_is_two_dkimpy_signatures(monkeypatch: pytest.MonkeyPatch, keys: Keys) -> None:
    msg = MESSAGES["8bit"]
    result = DkimSigner([keys.rsa, keys.ed]).sign(msg, now=NOW)
    assert result.algorithms == ("rsa-sha256", "ed25519-sha256")
    include = expected_h(msg)
    assert result.headers == (dkimpy_sign(monkeypatch, msg, keys.rsa, keys.rsa_pem, include)
                              + dkimpy_sign(monkeypatch, msg, keys.ed, keys.ed_pem, include))


def test_lf_and_crlf_input_give_the_same_signature(keys: Keys) -> None:
    signer = DkimSigner([keys.rsa, keys.ed])
    crlf = MESSAGES["long-folded-headers"]
    lf = crlf.replace(b"\r\n", b"\n")
    assert signer.sign(lf, now=NOW).headers == signer.sign(crlf, now=NOW).headers


def test_output_is_folded_crlf_header_fields(keys: Keys) -> None:
    result = DkimSigner([keys.rsa, keys.ed]).sign(MESSAGES["plain"])
    assert result.headers.endswith(b"\r\n")
    for line in result.headers.split(b"\r\n")[:-1]:
        assert len(line) <= 78 and b"\n" not in line and b"\r" not in line
    assert result.headers.count(b"DKIM-Signature: ") == 2
    assert all(b"c=relaxed/relaxed" in s for s in split_sigs(result.headers))


# --- verification by dkimpy and the independent verifiers --------------------------------


@dataclass(frozen=True)
class Case:
    msg: bytes
    signer: str  # "rsa", "ed", "dual", "parent"
    expect: str  # "pass" or "fail"
    tamper: Callable[[bytes], bytes] | None = None
    #: verifier -> why it disagrees on this (invalid, RFC 5322 §2.3) input
    divergent: tuple[tuple[str, str], ...] = ()


CASES: dict[str, Case] = {
    **{f"rsa-{n}": Case(m, "rsa", "pass") for n, m in MESSAGES.items() if n != "cr-before-final-crlf"},
    "rsa-cr-before-final-crlf": Case(MESSAGES["cr-before-final-crlf"], "rsa", "pass", divergent=(
        ("mailauth", "mailauth strips bare CRs with the trailing empty lines (bare CR is invalid anyway)"),)),
    **{f"ed25519-{n}": Case(m, "ed", "pass") for n, m in MESSAGES.items() if n in ("plain", "8bit", "100k")},
    "dual-8bit": Case(MESSAGES["8bit"], "dual", "pass"),
    "dual-long-folded-headers": Case(MESSAGES["long-folded-headers"], "dual", "pass"),
    "parent-domain": Case(message(sender="news@mail.news.example.com"), "parent", "pass"),
    # Over-signed From: a second From, above or below, breaks every signature.
    "second-from-prepended": Case(MESSAGES["plain"], "dual", "fail",
                                  lambda m: b"From: mallory@evil.test\r\n" + m),
    "second-from-appended": Case(MESSAGES["plain"], "dual", "fail",
                                 lambda m: m.replace(b"\r\n\r\n", b"\r\nFrom: mallory@evil.test\r\n\r\n", 1)),
    "body-changed": Case(MESSAGES["plain"], "dual", "fail", lambda m: m.replace(b"tomorrow", b"today")),
    "subject-changed": Case(MESSAGES["plain"], "dual", "fail", lambda m: m.replace(b"Hello", b"Hell0")),
}


def _signer_for(kind: str, keys: Keys) -> DkimSigner:
    return {
        "rsa": lambda: DkimSigner([keys.rsa]),
        "ed": lambda: DkimSigner([keys.ed]),
        "dual": lambda: DkimSigner([keys.rsa, keys.ed]),
        "parent": lambda: DkimSigner([keys.rsa, keys.ed], parent_domains=True),
    }[kind]()


@pytest.fixture(scope="module")
def signed_cases(keys: Keys) -> dict[str, bytes]:
    out = {}
    for name, case in CASES.items():
        result = _signer_for(case.signer, keys).sign(case.msg)
        assert result.status == "signed", (name, result)
        signed = result.headers + case.msg
        out[name] = case.tamper(signed) if case.tamper else signed
    return out


@pytest.fixture(scope="module")
def independent(signed_cases: dict[str, bytes],
                dns_srv: DnsServer) -> dict[str, dict[str, list[Verdict]] | str]:
    """Each independent verifier run once over every case (one process each)."""
    names = list(signed_cases)
    out: dict[str, dict[str, list[Verdict]] | str] = {}
    for verifier, run in (("mailauth", mailauth_verify_many), ("mail-dkim", mail_dkim_verify_many)):
        try:
            out[verifier] = dict(zip(names, run([signed_cases[n] for n in names], dns_srv), strict=True))
        except pytest.skip.Exception as exc:
            out[verifier] = str(exc)  # the reason: each test using it skips with it
    return out


def _expected_count(case: Case, verifier: str) -> int:
    n = 2 if case.signer in ("dual", "parent") else 1
    if verifier == "mail-dkim" and case.signer in ("dual", "parent"):
        n = 1  # Debian 12's Mail::DKIM checks only the RSA signature
    elif verifier == "mail-dkim" and case.signer == "ed":
        n = 0
    return n


def _check(case: Case, verdicts: list[Verdict], verifier: str) -> None:
    if verifier == "mail-dkim":
        verdicts = [v for v in verdicts if v.algorithm != "ed25519-sha256"]
    assert len(verdicts) == _expected_count(case, verifier), verdicts
    if case.expect == "pass":
        assert all(v.ok for v in verdicts), verdicts
    else:
        assert not any(v.ok for v in verdicts), verdicts


@pytest.mark.parametrize("name", list(CASES))
def test_dkimpy_verifies(name: str, signed_cases: dict[str, bytes], zone: KeyZone) -> None:
    _check(CASES[name], dkimpy_verify(signed_cases[name], zone), "dkimpy")


@pytest.mark.parametrize("verifier", ["mailauth", "mail-dkim"])
@pytest.mark.parametrize("name", list(CASES))
def test_independent_verifier(name: str, verifier: str, independent: dict) -> None:
    results = independent[verifier]
    if isinstance(results, str):
        pytest.skip(results)
    if verifier in dict(CASES[name].divergent):
        assert not any(v.ok for v in results[name])  # still disagrees: keep this case documented
        pytest.skip(dict(CASES[name].divergent)[verifier])
    if verifier == "mail-dkim" and CASES[name].signer == "ed":
        assert [v.result for v in results[name]] == ["invalid"]  # no Ed25519 in Mail::DKIM 1.2023
        pytest.skip("Mail::DKIM in Debian 12 has no Ed25519")
    _check(CASES[name], results[name], verifier)


def test_parent_domain_signature_uses_parent_d(signed_cases: dict[str, bytes]) -> None:
    sigs = [v for n, v in dkim.rfc822_parse(signed_cases["parent-domain"])[0] if n == b"DKIM-Signature"]
    assert len(sigs) == 2
    assert all(b"d=example.com;" in s for s in sigs)


# --- signer behaviour -------------------------------------------------------------------


def test_no_key_for_from_domain_leaves_message_unsigned(keys: Keys) -> None:
    before = sample("mailrelayd_dkim_unsigned_messages_total")
    result = DkimSigner([keys.rsa]).sign(message(sender="x@other.example"))
    assert (result.status, result.headers, result.domain) == ("unsigned", b"", None)
    assert "other.example" in (result.reason or "")
    assert sample("mailrelayd_dkim_unsigned_messages_total") == before + 1


@pytest.mark.parametrize("msg, reason", [
    (b"Subject: no from\r\n\r\nbody\r\n", "no From"),
    (b"From: a@example.com\r\nFrom: b@example.com\r\n\r\nbody\r\n", "2 From"),
    (b"From: a@example.com, b@example.net\r\n\r\nbody\r\n", "several domains"),
    (b"From: undisclosed\r\n\r\nbody\r\n", "unparsable From"),
    (b"From: undisclosed-recipients:;\r\n\r\nbody\r\n", "unparsable From"),
    # What receivers read differently is not signed for (the parser the submission policy uses).
    (b"From: ceo@example.net@example.com\r\n\r\nbody\r\n", "unparsable From"),
    (b"From: a@=?utf-8?q?example.com?=\r\n\r\nbody\r\n", "unparsable From"),
    (b"From: a\xff@example.com\r\n\r\nbody\r\n", "unparsable From"),
    (b"From: a@example.com.\r\n\r\nbody\r\n", "unparsable From"),  # no trailing dot in RFC 5322
    (b"", "no From"),
])
def test_messages_without_one_from_domain_are_unsigned(keys: Keys, msg: bytes, reason: str) -> None:
    result = DkimSigner([keys.rsa]).sign(msg)
    assert result.status == "unsigned" and result.headers == b""
    assert reason in (result.reason or "")


@pytest.mark.parametrize("msg", [
    b"From: a@example.com\r\nthis is not a header\r\n\r\nbody\r\n",
    b" continuation first\r\nFrom: a@example.com\r\n\r\n",
])
def test_malformed_header_never_raises(keys: Keys, msg: bytes) -> None:
    result = DkimSigner([keys.rsa]).sign(msg)
    assert result.status == "unsigned" and result.headers == b"" and result.error is None
    assert "unparsable header" in (result.reason or "")


def test_from_with_display_name_and_mixed_case(keys: Keys) -> None:
    signer = DkimSigner([keys.rsa])
    msg = message(sender='"Example, Inc." <Billing@EXAMPLE.COM>')
    assert signer.sign(msg).domain == "example.com"
    # One author domain however its case is written (it was "several domains", and unsigned).
    msg = b"From: a@Example.COM, b@example.com\r\nSender: a@example.com\r\n\r\nbody\r\n"
    assert signer.sign(msg).domain == "example.com"


def test_domain_for_parent_domains(keys: Keys) -> None:
    closer = load_key(DkimKeySpec("News.Example.com", "s-rsa", keys.path / "rsa.key", "rsa-sha256"))
    signer = DkimSigner([keys.rsa, closer], parent_domains=True)
    assert signer.domain_for("example.com") == "example.com"
    assert signer.domain_for("a.b.example.com") == "example.com"
    assert signer.domain_for("x.news.example.com") == "news.example.com"
    assert signer.domain_for("EXAMPLE.COM.") == "example.com"
    assert signer.domain_for("notexample.com") is None
    assert signer.domain_for("example.org") is None
    strict = DkimSigner([keys.rsa, closer])
    assert strict.domain_for("a.b.example.com") is None
    assert strict.domain_for("news.example.com") == "news.example.com"


def test_custom_header_list(keys: Keys) -> None:
    result = DkimSigner([keys.rsa], headers=("From", "Subject", "X-Campaign")).sign(
        message(extra=b"X-Campaign: 42\r\n"))
    assert h_tag(result.headers) == ["from", "subject", "x-campaign", "from"]


@pytest.mark.parametrize("headers", [("to", "subject"), ("from", "received"), ("from", "dkim-signature"),
                                     ("from", "bad name")])
def test_invalid_header_list_is_rejected(keys: Keys, headers: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        DkimSigner([keys.rsa], headers=headers)


def test_expiry_tag(keys: Keys, dns_srv: DnsServer, zone: KeyZone) -> None:
    msg = MESSAGES["plain"]
    now = int(time.time())
    result = DkimSigner([keys.rsa, keys.ed], expire=3600).sign(msg, now=now)
    for sig in split_sigs(result.headers):
        assert f"t={now};".encode() in sig and f"x={now + 3600};".encode() in sig
    assert b" x=" not in DkimSigner([keys.rsa]).sign(msg).headers
    assert b" x=" not in DkimSigner([keys.rsa], expire=0).sign(msg).headers
    signed = result.headers + msg
    assert all(v.ok for v in dkimpy_verify(signed, zone))
    assert all(v.ok for v in mailauth_verify(signed, dns_srv, now=now + 60))
    expired = mailauth_verify(signed, dns_srv, now=now + 7200)
    assert [(v.result, v.detail) for v in expired] == [("neutral", "expired")] * 2


def test_sign_is_thread_safe(keys: Keys) -> None:
    signer = DkimSigner([keys.rsa, keys.ed])
    msgs = [message(subject=b"n%d" % i, body=b"body %d\r\n" % i * (i % 7 + 1)) for i in range(40)]
    sequential = [signer.sign(m, now=NOW).headers for m in msgs]
    barrier = threading.Barrier(4)

    def work(offset: int) -> list[bytes]:
        barrier.wait()
        return [signer.sign(m, now=NOW).headers for m in msgs[offset:] + msgs[:offset]]

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(work, [0, 10, 20, 30]))
    for offset, run in zip([0, 10, 20, 30], runs, strict=True):
        assert run == sequential[offset:] + sequential[:offset]


def test_metrics(keys: Keys) -> None:
    ok = {"domain": "example.com", "algorithm": "ed25519-sha256", "result": "ok"}
    before = sample("mailrelayd_dkim_signatures_total", ok)
    seconds = sample("mailrelayd_dkim_sign_seconds_count")
    signer = DkimSigner([keys.rsa, keys.ed])
    result = signer.sign(MESSAGES["plain"])
    assert result.error is None and result.duration > 0
    assert sample("mailrelayd_dkim_signatures_total", ok) == before + 1
    assert sample("mailrelayd_dkim_sign_seconds_count") == seconds + 1
    assert sample("mailrelayd_dkim_signatures_total", {**ok, "result": "error"}) is not None


def test_repr_never_shows_private_key(keys: Keys) -> None:
    der = keys.rsa.private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
    text = repr(keys.rsa) + str(keys.rsa) + repr(keys.ed)
    assert "PRIVATE" not in text and base64.b64encode(der)[40:80].decode() not in text
    assert "private_key" not in text


# --- key loading ------------------------------------------------------------------------


def _spec(path: Path, algorithm: str = "rsa-sha256", domain: str = "example.com") -> DkimKeySpec:
    return DkimKeySpec(domain, "sel", path, algorithm)


def test_key_errors_name_the_file(tmp_path: Path, keys: Keys) -> None:
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    small = tmp_path / "rsa512.pem"
    small.write_bytes(RSA_512)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"hello\n")
    public = tmp_path / "public.pem"
    public.write_bytes(keys.rsa.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(keys.rsa.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    unreadable = tmp_path / "dir.key"
    unreadable.mkdir()
    cases = [
        (_spec(bad_pem), "not a valid PEM private key"),
        (_spec(small), "512 bits"),
        (_spec(tmp_path / "missing.key"), "cannot read key file: No such file"),
        (_spec(unreadable), "cannot read key file"),
        (_spec(keys.path / "rsa.key", "ed25519-sha256"), "holds an RSA key"),
        (_spec(keys.path / "ed.key", "rsa-sha256"), "holds an Ed25519 key"),
        (_spec(keys.path / "rsa.key", "rsa-sha1"), "unsupported algorithm 'rsa-sha1'"),
        (_spec(garbage), "expected a PEM private key"),
        (_spec(garbage, "ed25519-sha256"), "base64 32-byte Ed25519 seed"),
        (_spec(public), "holds a public key"),
        (_spec(encrypted), "encrypted"),
        (_spec(ec_key), "unsupported key type"),
        (_spec(keys.path / "rsa.key", domain="bad domain!"), "invalid domain"),
    ]
    for spec, problem in cases:
        with pytest.raises(DkimKeyError) as err:
            load_keys([spec])
        assert str(spec.key_file) in str(err.value), spec
        assert problem in str(err.value), (problem, str(err.value))


def test_load_keys_stops_at_first_bad_and_rejects_duplicate_selectors(keys: Keys) -> None:
    good = _spec(keys.path / "rsa.key")
    with pytest.raises(DkimKeyError, match=r"missing\.key"):
        load_keys([good, _spec(keys.path / "missing.key"), _spec(keys.path / "also-missing.key")])
    with pytest.raises(DkimKeyError, match="already used"):
        load_keys([good, DkimKeySpec("Example.COM", "SEL", keys.path / "ed.key", "ed25519-sha256")])


def test_key_file_formats(tmp_path: Path, keys: Keys) -> None:
    rsa_priv = keys.rsa.private_key
    pkcs1 = tmp_path / "pkcs1.pem"
    pkcs1.write_bytes(rsa_priv.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.TraditionalOpenSSL,
                                             serialization.NoEncryption()))
    assert pkcs1.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert load_key(_spec(pkcs1)).public_key_b64 == keys.rsa.public_key_b64
    # dkimpy's Ed25519 format: the base64 32-byte seed.
    seed = tmp_path / "dkimpy-ed25519.key"
    seed.write_bytes(base64.b64encode(keys.ed.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())) + b"\n")
    assert load_key(_spec(seed, "ed25519-sha256")).public_key_b64 == keys.ed.public_key_b64
    assert len(base64.b64decode(keys.ed.public_key_b64)) == 32  # RFC 8463 §4: raw key in p=


@pytest.mark.parametrize("algorithm, command", [
    ("ed25519-sha256", ["openssl", "genpkey", "-algorithm", "ed25519"]),
    ("rsa-sha256", ["openssl", "genpkey", "-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:1024"]),
    ("rsa-sha256", ["openssl", "genrsa", "-traditional", "1024"]),
])
def test_openssl_generated_keys_load(tmp_path: Path, algorithm: str, command: list[str]) -> None:
    try:
        pem = subprocess.run(command, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl unavailable: {exc}")
    path = tmp_path / "openssl.key"
    path.write_bytes(pem)
    key = load_key(_spec(path, algorithm))
    result = DkimSigner([key]).sign(MESSAGES["plain"])
    zone = KeyZone()
    zone.add_key(key)
    assert [v.result for v in dkimpy_verify(result.headers + MESSAGES["plain"], zone)] == ["pass"]


def test_write_private_key(tmp_path: Path) -> None:
    pem, _ = generate_key("ed25519-sha256")
    path = tmp_path / "k.key"
    write_private_key(path, pem)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == pem
    other, _ = generate_key("ed25519-sha256")
    with pytest.raises(FileExistsError):
        write_private_key(path, other)
    assert path.read_bytes() == pem
    write_private_key(path, other, overwrite=True)
    assert path.read_bytes() == other and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key"]  # no temp files left


def test_generate_key_rejects_small_rsa_and_unknown_algorithms() -> None:
    with pytest.raises(ValueError, match="1024"):
        generate_key("rsa-sha256", bits=512)
    with pytest.raises(ValueError):
        generate_key("rsa-sha1")


# --- keygen -> TXT record -> DNS -> verify ----------------------------------------------


def _resolver(dns_srv: DnsServer) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns_srv.host]
    resolver.port = dns_srv.port
    resolver.lifetime = 5
    return resolver


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
async def test_keygen_txt_record_verifies_over_dns(tmp_path: Path, algorithm: str) -> None:
    pem, public_b64 = generate_key(algorithm)
    write_private_key(tmp_path / "new.key", pem)
    key = load_key(DkimKeySpec("mail.example.net", "s2026", tmp_path / "new.key", algorithm))
    assert key.public_key_b64 == public_b64
    line = txt_record("mail.example.net", "s2026", algorithm, public_b64)
    name, rdata = line.split(" IN TXT ")
    assert name == "s2026._domainkey.mail.example.net."
    strings = re.findall(r'"([^"]*)"', rdata)
    assert all(len(s.encode()) <= 255 for s in strings)
    assert "".join(strings) == txt_value(algorithm, public_b64)
    assert strings[0].startswith(f"v=DKIM1; k={algorithm.split('-')[0]}; p=")
    msg = message(sender="ops@mail.example.net")
    signed = DkimSigner([key]).sign(msg).headers + msg
    with DnsServer() as srv:
        srv.add(name, "TXT", rdata)  # exactly the published zone line's data
        assert await check_published(key.domain, key.selector, key, _resolver(srv)) == (True, (
            f"s2026._domainkey.mail.example.net.: published key matches {tmp_path / 'new.key'} "
            f"({algorithm}, {key.bits} bits)"))
        # dkimpy through real DNS lookups too
        answer = await _resolver(srv).resolve(name, "TXT")
        txt = b"".join(answer[0].strings)
        with dkimpy_ed25519():
            assert dkim.verify(signed, dnsfunc=lambda _name, timeout=5: txt)
        assert [v.result for v in mailauth_verify(signed, srv)] == ["pass"]
        if algorithm == "rsa-sha256":
            assert [v.result for v in mail_dkim_verify_many([signed], srv)[0]] == ["pass"]


@pytest.mark.parametrize("published, expect", [
    (None, "no such name"),
    ("other-key", "differs from the key file"),
    ("truncated", "truncated copy"),
    ("revoked", "revoked"),
    ("wrong-k", "k=ed25519 but rsa-sha256 needs k=rsa"),
    ("two-records", "2 TXT records"),
    ("testing", "matches"),
    ("pkcs1", "matches"),
])
async def test_check_published_explains_mismatches(keys: Keys, published: str | None, expect: str) -> None:
    key = keys.rsa
    name = "s-rsa._domainkey.example.com."
    good = txt_value(key.algorithm, key.public_key_b64)
    _, other_b64 = generate_key("rsa-sha256", bits=1024)
    pkcs1_b64 = base64.b64encode(key.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1)).decode()
    records = {
        "other-key": [txt_value("rsa-sha256", other_b64)],
        "truncated": [good[:255]],
        "revoked": ["v=DKIM1; k=rsa; p="],
        "wrong-k": [good.replace("k=rsa", "k=ed25519")],
        "two-records": [good, good + " "],
        "testing": [good + "; t=y"],
        "pkcs1": [f"v=DKIM1; p={pkcs1_b64}"],
    }.get(published or "", [])
    with DnsServer() as srv:
        for txt in records:
            srv.add(name, "TXT", " ".join(f'"{txt[i:i + 255]}"' for i in range(0, len(txt), 255)))
        ok, explanation = await check_published("Example.com.", "s-rsa", key, _resolver(srv))
    assert ok == (expect == "matches")
    assert expect in explanation
    if not ok and published != "revoked":
        assert txt_record(key.domain, key.selector, key.algorithm, key.public_key_b64) in explanation


# --- failures and the event-loop entry point --------------------------------------------


class _BrokenKey:
    def sign(self, data: bytes) -> bytes:
        raise RuntimeError("HSM unplugged")


def test_failing_key_gives_error_result_and_partial_success(keys: Keys) -> None:
    broken = dataclasses.replace(keys.ed, private_key=_BrokenKey())
    err = {"domain": "example.com", "algorithm": "ed25519-sha256", "result": "error"}
    before = sample("mailrelayd_dkim_signatures_total", err)
    alone = DkimSigner([broken]).sign(MESSAGES["plain"])
    assert (alone.status, alone.headers, alone.domain) == ("error", b"", "example.com")
    assert alone.error and "HSM unplugged" in alone.error
    dual = DkimSigner([keys.rsa, broken]).sign(MESSAGES["plain"])
    assert dual.status == "signed" and dual.algorithms == ("rsa-sha256",) and dual.error is None
    assert "HSM unplugged" in (dual.reason or "")
    assert sample("mailrelayd_dkim_signatures_total", err) == before + 2


async def test_sign_async_inline_and_in_thread(keys: Keys) -> None:
    signer = DkimSigner([keys.rsa, keys.ed])
    msg = MESSAGES["100k"]
    expected = signer.sign(msg, now=NOW).headers
    assert (await signer.sign_async(msg, now=NOW)).headers == expected
    main = threading.get_ident()
    seen: list[int] = []
    original = signer.sign

    def spy(message: bytes, *, now: int | None = None):  # records which thread signs
        seen.append(threading.get_ident())
        return original(message, now=now)

    signer.sign = spy  # type: ignore[method-assign]
    assert (await signer.sign_async(msg, now=NOW, inline_max=len(msg))).headers == expected
    assert (await signer.sign_async(msg, now=NOW, inline_max=1024)).headers == expected
    assert seen[0] == main and seen[1] != main
