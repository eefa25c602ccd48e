"""DKIM signing in the helper process (mailrelayd.signworker), under asyncio's loop and uvloop:
same signatures as signing in the daemon, counted by the daemon, and every way the helper can fail
(killed, hung, stopped) ends in the message being signed in the daemon instead."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from mailrelayd import metrics
from mailrelayd.dkim import DkimKeySpec, DkimSigner, generate_key, load_keys, write_private_key
from mailrelayd.signworker import SignerSpec, SignWorker
from tests.conftest import base_config, deep_merge, write_config
from tests.support.proc import DaemonProcess

NOW = 1_790_000_000
HEADERS = ("from", "to", "subject", "date", "message-id")
LOOPS = ["asyncio", "uvloop"]


def _msg(i: int, domain: str = "example.com") -> bytes:
    return (f"From: App <app@{domain}>\r\nTo: r{i}@dest.example\r\nSubject: message {i}\r\n\r\n"
            f"body {i}\r\n").encode()


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> list[DkimKeySpec]:
    d = tmp_path_factory.mktemp("keys")
    out = []
    for i, alg in enumerate(("rsa-sha256", "ed25519-sha256")):
        pem, _ = generate_key(alg, 2048)
        write_private_key(d / f"k{i}.key", pem)
        out.append(DkimKeySpec("example.com", f"s{i}", d / f"k{i}.key", alg))
    return out


def _run(loop: str, body: Callable[[], Awaitable[None]]) -> None:
    (uvloop.run if loop == "uvloop" else asyncio.run)(body())


async def _started(specs: list[DkimKeySpec], **kw: Any) -> tuple[DkimSigner, SignWorker]:
    signer = DkimSigner(load_keys(specs), headers=HEADERS)
    worker = SignWorker(signer, SignerSpec.of(specs, HEADERS, True, None), **kw)
    worker.start()
    await _until(lambda: worker.ready, 20)
    return signer, worker


async def _until(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # A zombie (exited, not yet reaped by its parent) is gone for our purpose.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("loop", LOOPS)
def test_helper_signs_what_the_daemon_would_and_the_daemon_counts_it(loop: str, specs) -> None:
    async def body() -> None:
        signer, worker = await _started(specs)
        try:
            assert worker.pid is not None and worker.pid != os.getpid()
            ok = metrics.DKIM_SIGNATURES.labels("example.com", "rsa-sha256", "ok")
            before, unsigned = ok._value.get(), metrics.DKIM_UNSIGNED._value.get()
            msgs = [_msg(i) for i in range(30)]
            results = await asyncio.gather(*(worker.sign(m, now=NOW) for m in msgs))
            for m, r in zip(msgs, results, strict=True):
                assert r.headers == signer.compute(m, now=NOW).headers
                assert r.algorithms == ("rsa-sha256", "ed25519-sha256") and r.signed_by == ("s0", "s1")
            other = await worker.sign(_msg(0, "nokey.example"))
            assert other.status == "unsigned" and "nokey.example" in (other.reason or "")
            assert ok._value.get() == before + 30
            assert metrics.DKIM_UNSIGNED._value.get() == unsigned + 1
        finally:
            worker.close()
    _run(loop, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_killed_helper_requests_are_signed_in_the_daemon_and_it_restarts(loop: str, specs) -> None:
    async def body() -> None:
        signer, worker = await _started(specs)
        try:
            pid = worker.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)  # requests now wait in the pipe...
            waiting = [asyncio.ensure_future(worker.sign(_msg(i), now=NOW)) for i in range(5)]
            await asyncio.sleep(0.2)
            assert not any(t.done() for t in waiting)
            os.kill(pid, signal.SIGKILL)  # ...and the helper dies with them
            results = await asyncio.wait_for(asyncio.gather(*waiting), 10)
            assert [r.headers for r in results] == [signer.compute(_msg(i), now=NOW).headers for i in range(5)]
            assert not worker.ready
            assert (await worker.sign(_msg(9), now=NOW)).signed  # meanwhile, in the daemon
            await _until(lambda: worker.ready, 20)  # started again
            assert worker.pid not in (None, pid)
            assert (await worker.sign(_msg(10), now=NOW)).headers == signer.compute(_msg(10), now=NOW).headers
        finally:
            worker.close()
    _run(loop, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_hung_helper_is_killed_after_the_timeout(loop: str, specs) -> None:
    async def body() -> None:
        signer, worker = await _started(specs, timeout=0.6)
        try:
            pid = worker.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            result = await asyncio.wait_for(worker.sign(_msg(1), now=NOW), 10)
            assert 0.5 < time.monotonic() - t0 < 5
            assert result.headers == signer.compute(_msg(1), now=NOW).headers
            await _until(lambda: not _alive(pid), 10)
            await _until(lambda: worker.ready, 20)
        finally:
            worker.close()
    _run(loop, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_helper_ignores_sigterm_and_exits_when_closed(loop: str, specs) -> None:
    async def body() -> None:
        signer, worker = await _started(specs)
        pid = worker.pid
        assert pid is not None
        # systemctl stop signals the whole group; the daemon may still be signing what it finishes.
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        await asyncio.sleep(0.2)
        assert worker.ready and _alive(pid)
        assert (await worker.sign(_msg(2), now=NOW)).headers == signer.compute(_msg(2), now=NOW).headers
        worker.close()
        await _until(lambda: not _alive(pid), 10)
        assert not worker.ready
        assert (await worker.sign(_msg(3), now=NOW)).signed  # closed: signed in the daemon
    _run(loop, body)


def test_helper_exits_with_a_killed_daemon(tmp_path: Path, tls_files, specs) -> None:
    """kill -9 of the daemon leaves no helper behind: it sees end of file on its stdin."""
    cfg = write_config(tmp_path / "d", deep_merge(base_config(tls_files), {
        "dkim": [{"domain": s.domain, "selector": s.selector, "key_file": str(s.key_file), "algorithm": s.algorithm}
                 for s in specs]}))
    d = DaemonProcess(cfg).wait_ready()
    pid = d.wait_event("dkim.worker_ready")["pid"]
    assert _alive(pid)
    d.kill9()
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the signing helper outlived its daemon"
        time.sleep(0.05)


# A helper that loads nothing and answers every request with a frame the daemon cannot read.
_GARBLED = """
import struct, sys
inp, out = sys.stdin.buffer, sys.stdout.buffer
inp.readline()
out.write(struct.pack("<III", 0, 0, 0)); out.flush()
while True:
    head = inp.read(16)
    if len(head) < 16:
        break
    rid, _, n = struct.unpack("<IqI", head)
    inp.read(n)
    out.write(struct.pack("<III", rid, 5, 0) + b"{oops"); out.flush()
"""


@pytest.mark.parametrize("loop", LOOPS)
def test_unreadable_answer_replaces_the_helper(loop: str, specs) -> None:
    async def body() -> None:
        signer, worker = await _started(specs, command=[sys.executable, "-c", _GARBLED])
        try:
            pid = worker.pid
            assert pid is not None
            result = await asyncio.wait_for(worker.sign(_msg(4), now=NOW), 10)
            assert result.headers == signer.compute(_msg(4), now=NOW).headers  # signed in the daemon
            await _until(lambda: not _alive(pid), 10)
            await _until(lambda: worker.ready and worker.pid != pid, 20)  # another one started
        finally:
            worker.close()
    _run(loop, body)


def test_helper_exits_quietly_when_the_daemon_is_gone(specs: list[DkimKeySpec]) -> None:
    """A daemon that exits (a bind failure at start) leaves the helper writing its READY frame into a
    pipe nobody reads: it printed a BrokenPipeError traceback after the daemon's last words."""
    import dataclasses
    import json
    import subprocess

    read_end, write_end = os.pipe()
    os.close(read_end)  # the daemon's end of the helper's stdout: gone
    try:
        p = subprocess.run([sys.executable, "-m", "mailrelayd.signworker"], stdout=write_end, stderr=subprocess.PIPE,
                           input=json.dumps(dataclasses.asdict(SignerSpec.of(specs, HEADERS, True, None))).encode()
                           + b"\n", timeout=30)
    finally:
        os.close(write_end)
    assert (p.returncode, p.stderr) == (0, b"")


def test_helper_refuses_key_files_the_daemon_did_not_load(tmp_path: Path) -> None:
    """After a reload failed on a key file replaced by a broken one, every restart of the helper printed
    a traceback; one replaced by another valid key, the helper signed with a key the daemon never
    loaded (and DNS may not have). The helper now exits with one line: the daemon signs meanwhile."""
    import dataclasses
    import json
    import subprocess

    pem, _ = generate_key("ed25519-sha256")
    key = tmp_path / "k.key"
    write_private_key(key, pem)
    loaded = load_keys([DkimKeySpec("example.com", "s1", key, "ed25519-sha256")])

    def helper() -> subprocess.CompletedProcess[bytes]:
        spec = SignerSpec.of([loaded[0].spec], HEADERS, True, None, public_keys=[loaded[0].public_key_b64])
        return subprocess.run([sys.executable, "-m", "mailrelayd.signworker"], capture_output=True, timeout=30,
                              input=json.dumps(dataclasses.asdict(spec)).encode() + b"\n")

    assert helper().returncode == 0  # the keys the daemon loaded: ready, then EOF
    key.unlink()
    write_private_key(key, generate_key("ed25519-sha256")[0])  # `dkim keygen --force`, not reloaded
    for _ in range(2):
        p = helper()
        assert p.returncode == 1 and p.stdout == b"", p
        assert p.stderr.startswith(b"mailrelayd signworker: ") and p.stderr.count(b"\n") == 1, p.stderr
        key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")  # then a broken one
