"""Spool and state files are private whatever the umask (mailrelayd.statefiles), and an envelope the
spool cannot store as text is refused before any write, not counted as a spool write error."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from mailrelayd.errors import ENVELOPE_ENCODING, EnvelopeEncodingError, reply_for
from mailrelayd.feedback.store import SqliteSuppressionStore
from mailrelayd.spool.lock import SpoolLock
from mailrelayd.spool.store import NewMessage, Spool
from mailrelayd.statefiles import prepare_sqlite, write_private
from tests.conftest import base_config, mailrelayd_cmd, write_config


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def private(p: Path) -> bool:
    return mode(p) & 0o137 == 0  # at most 0640


async def test_spool_files_are_private_under_umask_022(tmp_path: Path) -> None:
    with umask(0o022):
        spool = Spool(tmp_path / "spool")
        await spool.open()
        try:
            await spool.commit(NewMessage(spool.new_queue_id(), "a@example.com", ("b@example.org",),
                                          b"Subject: x\r\n\r\nsecret body\r\n", time.time()))
            files = {p.name: mode(p) for p in (tmp_path / "spool").iterdir() if p.is_file()}
        finally:
            await spool.close()
        lock = SpoolLock(tmp_path / "spool2")
        lock.acquire()
        lock.release()
    assert {"spool.db", "spool.db-wal", "spool.db-shm"} <= files.keys()
    assert all(m == 0o600 for m in files.values()), files
    assert mode(tmp_path / "spool2" / "lock") == 0o640
    assert mode(tmp_path / "spool2") & 0o007 == 0


def test_suppression_store_is_private_under_umask_022(tmp_path: Path) -> None:
    with umask(0o022):
        store = SqliteSuppressionStore(tmp_path / "state" / "suppressions.db")
        store.record("x@example.com", "hard_bounce", "550 5.1.1", "dsn", "Q1")
        names = sorted(p.name for p in (tmp_path / "state").iterdir())
        try:
            assert "suppressions.db" in names
            assert all(mode(tmp_path / "state" / n) == 0o600 for n in names), names
        finally:
            store.close()


def test_files_an_older_version_left_world_readable_are_tightened(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    for p in (db, tmp_path / "spool.db-wal", tmp_path / "spool.db-shm"):
        p.write_bytes(b"")
        p.chmod(0o644)
    (tmp_path / "group-readable.db").write_bytes(b"")
    (tmp_path / "group-readable.db").chmod(0o640)
    prepare_sqlite(db)
    prepare_sqlite(tmp_path / "group-readable.db")
    # Group read is kept (an operator may grant it); anything for others goes.
    assert [mode(p) for p in sorted(tmp_path.iterdir())] == [0o640, 0o640, 0o640, 0o640]


def test_write_private(tmp_path: Path) -> None:
    with umask(0o000):
        write_private(tmp_path / "kept.eml", b"report")
    assert mode(tmp_path / "kept.eml") == 0o600
    assert (tmp_path / "kept.eml").read_bytes() == b"report"


@pytest.mark.parametrize("field", ["mail_from", "rcpt"])
async def test_envelope_that_is_not_utf8_is_refused_before_the_writer(tmp_path: Path, field: str) -> None:
    bad = b"\xff\xfe@evil.example".decode("utf-8", "surrogateescape")
    spool = Spool(tmp_path / "spool")
    await spool.open()
    before = REGISTRY.get_sample_value("mailrelayd_spool_write_errors_total") or 0.0
    try:
        msg = NewMessage(spool.new_queue_id(), bad if field == "mail_from" else "a@example.com",
                         (bad if field == "rcpt" else "b@example.org",), b"x\r\n", time.time())
        with pytest.raises(EnvelopeEncodingError) as ei:
            await spool.commit(msg)
        assert reply_for(ei.value) == ENVELOPE_ENCODING and ENVELOPE_ENCODING.code == 554
        with pytest.raises(EnvelopeEncodingError):
            await spool.update([], [msg])
        assert (await spool.stats()).messages == 0
    finally:
        await spool.close()
    assert (REGISTRY.get_sample_value("mailrelayd_spool_write_errors_total") or 0.0) == before


def test_files_the_cli_creates_are_private_under_umask_022(tmp_path: Path, tls_files: tuple[Path, Path],
                                                           cli_env: dict[str, str]) -> None:
    cfg = write_config(tmp_path, base_config(tls_files))
    r = subprocess.run([*mailrelayd_cmd(), "suppress", "add", "someone@example.net", "--reason", "asked",
                        "-c", str(cfg)], env=cli_env, capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: os.umask(0o022))
    assert r.returncode == 0, r.stderr
    files = [p for p in (tmp_path / "state").rglob("*") if p.is_file()]
    assert "suppressions.db" in {p.name for p in files}
    assert all(private(p) for p in files), {p.name: oct(mode(p)) for p in files}
