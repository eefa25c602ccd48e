"""DKIM through the real daemon: submit on the submission listener, deliver to a loopback SMTP server,
verify what arrived with dkimpy and the independent verifiers (mailauth, Mail::DKIM), keys served by
a loopback DNS responder. Also key rotation by reload."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import tomli_w

from mailrelayd import metrics
from mailrelayd.dkim import generate_key, write_private_key
from tests.conftest import TEST_PASSWORD, deep_merge
from tests.support.sink import Sink
from tests.support.verifiers import KeyZone, verify_everywhere

DOMAINS = ("@rsa.example", "@ed.example", "@dual.example", "@nokey.example")


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dkim")
    out = {}
    for name, alg in (("rsa", "rsa-sha256"), ("ed", "ed25519-sha256"), ("rsa2", "rsa-sha256")):
        pem, _ = generate_key(alg, 2048)
        write_private_key(d / f"{name}.key", pem)
        out[name] = d / f"{name}.key"
    return out


def _dkim_config(keys: dict[str, Path], sink: Sink) -> dict[str, Any]:
    return {
        "routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
        "dkim": [
            {"domain": "rsa.example", "selector": "r1", "key_file": str(keys["rsa"]), "algorithm": "rsa-sha256"},
            {"domain": "ed.example", "selector": "e1", "key_file": str(keys["ed"]), "algorithm": "ed25519-sha256"},
            {"domain": "dual.example", "selector": "r1", "key_file": str(keys["rsa"]), "algorithm": "rsa-sha256"},
            {"domain": "dual.example", "selector": "e1", "key_file": str(keys["ed"]),
             "algorithm": "ed25519-sha256"},
        ],
    }


async def _submit(port: int, tls: Any, frm: str, raw: bytes) -> None:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=tls, timeout=10)
    await c.connect()
    await c.login("alice", TEST_PASSWORD)
    errors, _ = await c.sendmail(frm, ["rcpt@dest.example"], raw)
    await c.quit()
    assert errors == {}


def _zone(d: Any) -> KeyZone:
    zone = KeyZone()
    for k in d.daemon.rt.dkim_keys:
        zone.add_key(k)
    return zone


def _sigs(data: bytes) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    return [ln for ln in head.replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n")
            if ln.lower().startswith("dkim-signature:")]


def _check(results: dict[str, list[Any]], n_sigs: int, n_rsa: int) -> None:
    assert len(results["dkimpy"]) == n_sigs and all(v.ok for v in results["dkimpy"]), results["dkimpy"]
    if "mailauth" not in results and "mail-dkim" not in results:
        pytest.skip("no independent DKIM verifier installed (tests/system-deps.sh installs them)")
    if "mailauth" in results:
        assert len(results["mailauth"]) == n_sigs and all(v.ok for v in results["mailauth"]), results["mailauth"]
    if "mail-dkim" in results:
        assert len(results["mail-dkim"]) == n_rsa and all(v.ok for v in results["mail-dkim"]), results["mail-dkim"]


LONG_SUBJECT = "A subject that is long enough to need folding " * 8
CASES = {
    # name: (header From, raw message as the application submits it, signatures, of which RSA)
    "rsa": ("app@rsa.example", b"From: app@rsa.example\r\nTo: rcpt@dest.example\r\nSubject: rsa\r\n\r\nhello\r\n",
            1, 1),
    "ed25519": ("app@ed.example", b"From: app@ed.example\r\nTo: rcpt@dest.example\r\nSubject: ed\r\n\r\nhi\r\n",
                1, 0),
    "dual": ("app@dual.example",
             b"From: App <app@dual.example>\r\nTo: rcpt@dest.example\r\nSubject: dual\r\n\r\nboth\r\n", 2, 1),
    "8bit": ("app@dual.example",
             "From: app@dual.example\r\nTo: rcpt@dest.example\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
             "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
             "\r\nna\u00efve caf\u00e9 \u2014 \u65e5\u672c\u8a9e\r\n".encode(), 2, 1),
    "folding": ("app@rsa.example",
                ("From: app@rsa.example\r\nTo: " + ",\r\n ".join(f"user{i}@dest.example" for i in range(30)) +
                 "\r\nSubject: " + LONG_SUBJECT.strip().replace("folding A", "folding\r\n\tA") +
                 "\r\nList-Unsubscribe: <https://example.invalid/u?" + "x" * 300 + ">\r\n"
                 "\r\nbody\r\n").encode(), 1, 1),
    # LF-only line endings, trailing whitespace and trailing empty lines (relaxed body canonicalization)
    "lf": ("app@dual.example",
           b"From: app@dual.example\nTo: rcpt@dest.example\nSubject:   spaced   out  \n\nline with trailing   \n"
           b"\tindented\n\n\n\n", 2, 1),
}


async def test_signed_through_listener_verifies_everywhere(start_daemon, client_tls, key_files) -> None:
    sink = await Sink().start()
    try:
        d = await start_daemon(_dkim_config(key_files, sink), users={"alice": DOMAINS})
        # Every case through the signing helper process (mailrelayd.signworker).
        for _ in range(1000):
            if d.daemon.sign_worker is not None and d.daemon.sign_worker.ready:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the signing helper did not start")
        for frm, raw, _, _ in CASES.values():
            await _submit(d.port("submission"), client_tls, frm, raw)
        msgs = await sink.wait_for(len(CASES))
        zone = _zone(d)
        by_subject: dict[str, bytes] = {}
        for m in msgs:
            for name, (_, raw, _, _) in CASES.items():
                subj = raw.split(b"Subject:", 1)[1].split(b"\n", 1)[0]
                if subj in m.data:
                    by_subject[name] = m.data
        assert set(by_subject) == set(CASES)
        for name, (_, _, n, n_rsa) in CASES.items():
            data = by_subject[name]
            assert len(_sigs(data)) == n, (name, _sigs(data))
            results = await asyncio.to_thread(verify_everywhere, data, zone)
            _check(results, n, n_rsa)
        # From is over-signed: a second From added in transit breaks every signature.
        tampered = by_subject["rsa"].replace(b"\r\n\r\n", b"\r\nFrom: evil@attacker.example\r\n\r\n", 1)
        res = await asyncio.to_thread(verify_everywhere, tampered, zone)
        assert not any(v.ok for v in res["dkimpy"])
    finally:
        await sink.stop()


async def test_signing_in_the_daemon_without_the_helper(start_daemon, client_tls, key_files) -> None:
    sink = await Sink().start()
    try:
        d = await start_daemon(deep_merge(_dkim_config(key_files, sink), {"signing": {"helper": False}}),
                               users={"alice": DOMAINS})
        assert d.daemon.sign_worker is None
        frm, raw, n, n_rsa = CASES["dual"]
        await _submit(d.port("submission"), client_tls, frm, raw)
        (m,) = await sink.wait_for(1)
        _check(await asyncio.to_thread(verify_everywhere, m.data, _zone(d)), n, n_rsa)
    finally:
        await sink.stop()


async def test_from_without_key_is_sent_unsigned_and_counted(start_daemon, client_tls, key_files) -> None:
    sink = await Sink().start()
    try:
        d = await start_daemon(_dkim_config(key_files, sink), users={"alice": DOMAINS})
        before = metrics.DKIM_UNSIGNED._value.get()
        await _submit(d.port("submission"), client_tls, "app@nokey.example",
                      b"From: app@nokey.example\r\nTo: rcpt@dest.example\r\nSubject: no key\r\n\r\nx\r\n")
        (m,) = await sink.wait_for(1)
        assert _sigs(m.data) == []
        assert metrics.DKIM_UNSIGNED._value.get() == before + 1
    finally:
        await sink.stop()


async def test_key_rotation_by_reload(start_daemon, client_tls, key_files) -> None:
    sink = await Sink().start()
    try:
        d = await start_daemon(_dkim_config(key_files, sink), users={"alice": DOMAINS})
        raw = b"From: app@rsa.example\r\nTo: rcpt@dest.example\r\nSubject: rotate\r\n\r\nx\r\n"
        data = tomllib.loads(d.config.read_text())
        # Step 2 of the documented rotation: the new selector is published; add its key, reload.
        data["dkim"].append({"domain": "rsa.example", "selector": "r2", "key_file": str(key_files["rsa2"]),
                             "algorithm": "rsa-sha256"})
        d.config.write_text(tomli_w.dumps(data))
        assert await d.daemon.reload() is True
        await _submit(d.port("submission"), client_tls, "app@rsa.example", raw)
        (m,) = await sink.wait_for(1)
        sigs = _sigs(m.data)
        assert len(sigs) == 2 and any("s=r2" in s for s in sigs)
        _check(await asyncio.to_thread(verify_everywhere, m.data, _zone(d)), 2, 2)
        # Step 3: remove the old key; a broken key file on reload keeps the working set.
        data["dkim"] = [k for k in data["dkim"] if not (k["domain"] == "rsa.example" and k["selector"] == "r1")]
        bad = d.config.parent / "broken.key"
        bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        data["dkim"].append({"domain": "ed.example", "selector": "e2", "key_file": str(bad),
                             "algorithm": "ed25519-sha256"})
        d.config.write_text(tomli_w.dumps(data))
        assert await d.daemon.reload() is False
        assert metrics.CONFIG_LAST_RELOAD_SUCCESS._value.get() == 0
        await _submit(d.port("submission"), client_tls, "app@rsa.example", raw)
        await sink.wait_for(2)
        assert len(_sigs(sink.messages[1].data)) == 2  # still the old (r1 + r2) set
        data["dkim"] = data["dkim"][:-1]
        d.config.write_text(tomli_w.dumps(data))
        assert await d.daemon.reload() is True
        await _submit(d.port("submission"), client_tls, "app@rsa.example", raw)
        await sink.wait_for(3)
        sigs = _sigs(sink.messages[2].data)
        assert len(sigs) == 1 and "s=r2" in sigs[0]
        assert d.daemon.readiness()["dkim"] == "ok"
    finally:
        await sink.stop()
