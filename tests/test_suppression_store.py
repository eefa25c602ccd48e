"""The SQLite suppression store: kinds, soft-bounce promotion, CSV, cross-process refresh."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mailrelayd.feedback.store import (
    KINDS,
    SqliteSuppressionStore,
    Suppression,
    SuppressionStore,
    normalise,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    with SqliteSuppressionStore(tmp_path / "suppressions.db", soft_threshold=3, soft_window=100.0) as s:
        yield s


def test_is_a_suppression_store(store: SqliteSuppressionStore) -> None:
    assert isinstance(store, SuppressionStore)


def test_wal_mode(store: SqliteSuppressionStore, tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "suppressions.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_normalise() -> None:
    assert normalise(" <User@Example.COM.> ") == "User@example.com"
    assert normalise("User@Example.COM", case_insensitive_local=True) == "user@example.com"
    for bad in ("", "no-at-sign", "@example.com", "user@", "us er@example.com", "a\x00b@example.com"):
        with pytest.raises(ValueError):
            normalise(bad)


def test_hard_bounce_and_complaint_suppress_at_once(store: SqliteSuppressionStore) -> None:
    assert store.record(
        "Gone@Example.NET.", "hard_bounce", "userunknown", "dsn", queue_id="01JD3K5Q8Z7XM", now=10
    )
    assert store.is_suppressed("Gone@example.net")
    assert store.is_suppressed("<Gone@EXAMPLE.net>")
    assert not store.is_suppressed("gone@example.net")  # local part is case-sensitive by default
    assert store.record("angry@example.org", "complaint", "feedback", "arf", now=11)
    assert store.get("Gone@example.net") == Suppression(
        "Gone@example.net", "hard_bounce", "userunknown", "dsn", "01JD3K5Q8Z7XM", 10.0, 10.0, 1
    )
    assert len(store) == 2


def test_case_insensitive_local(tmp_path: Path) -> None:
    with SqliteSuppressionStore(tmp_path / "ci.db", case_insensitive_local=True) as s:
        s.record("Gone@Example.net", "hard_bounce", "userunknown", "dsn")
        assert s.is_suppressed("gone@example.net")
        assert s.get("GONE@EXAMPLE.NET") is not None


def test_soft_bounces_promote_only_within_the_window(store: SqliteSuppressionStore) -> None:
    address = "full@example.org"
    assert not store.record(address, "soft_bounce", "mailboxfull", "dsn", now=0)
    assert not store.record(address, "soft_bounce", "mailboxfull", "dsn", now=60)
    assert not store.is_suppressed(address)
    # The first one has left the 100 s window: still two within it.
    assert not store.record(address, "soft_bounce", "mailboxfull", "dsn", now=150)
    assert store.soft_bounce_count(address, now=150) == 2
    assert not store.is_suppressed(address)
    assert store.record(address, "soft_bounce", "mailboxfull", "smtp", now=155)
    assert store.is_suppressed(address)
    record = store.get(address)
    assert record is not None
    assert (record.kind, record.count, record.first_seen, record.last_seen) == ("soft_bounce", 3, 60.0, 155.0)
    # Further soft bounces keep it suppressed and count.
    assert store.record(address, "soft_bounce", "mailboxfull", "dsn", now=160)
    assert store.get(address).count == 4  # type: ignore[union-attr]


def test_copies_of_one_messages_soft_bounce_count_once(store: SqliteSuppressionStore) -> None:
    # A DSN sent again after a lost 250, or two NDRs for one message: one transient failure.
    for t in range(5):
        assert not store.record("full@example.org", "soft_bounce", "mailboxfull", "dsn", "Q1", now=t)
    assert store.soft_bounce_count("full@example.org", now=5) == 1
    assert not store.record("full@example.org", "soft_bounce", "mailboxfull", "dsn", "Q2", now=6)
    assert store.record("full@example.org", "soft_bounce", "mailboxfull", "dsn", "Q3", now=7)


def test_soft_bounces_are_per_address(store: SqliteSuppressionStore) -> None:
    for i, address in enumerate(["a@example.org", "b@example.org", "a@example.org", "c@example.org"]):
        assert not store.record(address, "soft_bounce", "expired", "dsn", now=i)
    assert len(store) == 0


def test_kind_only_moves_up(store: SqliteSuppressionStore) -> None:
    store.record("x@example.org", "complaint", "feedback", "arf", now=1)
    store.record("x@example.org", "hard_bounce", "userunknown", "dsn", now=2)
    record = store.get("x@example.org")
    assert record is not None
    assert (record.kind, record.reason, record.count, record.first_seen, record.last_seen) == (
        "complaint",
        "feedback",
        2,
        1.0,
        2.0,
    )
    store.record("y@example.org", "hard_bounce", "userunknown", "dsn", now=1)
    store.record("y@example.org", "complaint", "feedback", "arf", now=2)
    assert store.get("y@example.org").kind == "complaint"  # type: ignore[union-attr]


def test_add_remove_list_counts(store: SqliteSuppressionStore) -> None:
    assert store.add("manual@example.com", "asked by phone")
    assert not store.add("manual@example.com", "asked again")
    store.record("hard@example.com", "hard_bounce", "userunknown", "dsn", now=1000)
    store.record("cmp@example.com", "complaint", "feedback", "arf", now=2000)
    assert store.counts_by_kind() == {"hard_bounce": 1, "complaint": 1, "soft_bounce": 0, "manual": 1}
    assert [s.address for s in store.list(kind="complaint")] == ["cmp@example.com"]
    assert [s.address for s in store.list(since=1500)] == ["cmp@example.com", "manual@example.com"]
    assert [s.address for s in store.list()] == ["cmp@example.com", "hard@example.com", "manual@example.com"]
    assert store.remove("hard@example.com")
    assert not store.remove("hard@example.com")
    assert not store.is_suppressed("hard@example.com")
    assert store.get("hard@example.com") is None


def test_remove_forgets_soft_bounces(store: SqliteSuppressionStore) -> None:
    store.record("s@example.org", "soft_bounce", "expired", "dsn", now=1)
    store.record("s@example.org", "soft_bounce", "expired", "dsn", now=2)
    store.remove("s@example.org")
    assert not store.record("s@example.org", "soft_bounce", "expired", "dsn", now=3)


def test_prune(store: SqliteSuppressionStore) -> None:
    store.record("p@example.org", "soft_bounce", "expired", "dsn", now=0)
    store.record("q@example.org", "soft_bounce", "expired", "dsn", now=90)
    assert store.prune(now=150) == 1
    assert store.soft_bounce_count("q@example.org", now=150) == 1


def test_bad_input(store: SqliteSuppressionStore) -> None:
    with pytest.raises(ValueError):
        store.record("x@example.org", "bogus", "r", "dsn")
    with pytest.raises(ValueError):
        store.record("not an address", "hard_bounce", "r", "dsn")
    with pytest.raises(ValueError):
        store.add("x@example.org", "r", kind="bogus")
    assert not store.is_suppressed("not an address")
    assert not store.is_suppressed("")


def test_csv_import_export_round_trip(store: SqliteSuppressionStore, tmp_path: Path) -> None:
    imported = store.import_csv(
        io.StringIO(
            "address,reason,kind\n"
            "One@Example.com,bounced in old system,hard_bounce\n"
            "\n"
            "two@example.com,complained,complaint\n"
            "three@example.com,by hand\n"
        )
    )
    assert imported == 3
    assert store.is_suppressed("One@example.com")
    assert store.get("three@example.com").kind == "manual"  # type: ignore[union-attr]
    out = io.StringIO()
    store.export_csv(out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "address,reason,kind,source,queue_id,first_seen,last_seen,count"
    assert len(lines) == 4
    with SqliteSuppressionStore(tmp_path / "other.db") as other:
        assert other.import_csv(io.StringIO(out.getvalue())) == 3
        assert {(s.address, s.kind, s.reason) for s in other.list()} == {
            (s.address, s.kind, s.reason) for s in store.list()
        }


@pytest.mark.parametrize(
    "text",
    [
        "email,reason\nx@example.com,r\n",  # no address column
        "address,reason,kind\nx@example.com,r,hard_bounce\ny@example.com,r,bogus\n",
        "address,reason\nx@example.com,r\nnot-an-address,r\n",
    ],
)
def test_csv_import_is_all_or_nothing(store: SqliteSuppressionStore, text: str) -> None:
    with pytest.raises(ValueError):
        store.import_csv(io.StringIO(text))
    assert store.list() == []


def test_persistence(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    with SqliteSuppressionStore(path) as s:
        s.record("keep@example.org", "hard_bounce", "userunknown", "dsn")
    with SqliteSuppressionStore(path) as s:
        assert s.is_suppressed("keep@example.org")


def test_refresh_sees_another_connection(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    with SqliteSuppressionStore(path) as daemon, SqliteSuppressionStore(path) as cli:
        assert not daemon.refresh()
        cli.add("cli@example.org", "manual entry")
        assert not daemon.is_suppressed("cli@example.org")  # not yet refreshed
        assert daemon.refresh()
        assert daemon.is_suppressed("cli@example.org")
        assert not daemon.refresh()
        cli.remove("cli@example.org")
        assert daemon.refresh()
        assert not daemon.is_suppressed("cli@example.org")
        # A soft bounce written elsewhere changes the file but not the suppressions.
        cli.record("soft@example.org", "soft_bounce", "expired", "dsn")
        assert not daemon.refresh()
        # Our own writes do not need a reload.
        daemon.record("own@example.org", "hard_bounce", "userunknown", "dsn")
        assert daemon.is_suppressed("own@example.org")
        assert not daemon.refresh()


def test_refresh_sees_another_process(tmp_path: Path) -> None:
    path = tmp_path / "proc.db"
    with SqliteSuppressionStore(path) as daemon:
        code = (
            "import sys; from pathlib import Path\n"
            "from mailrelayd.feedback.store import SqliteSuppressionStore\n"
            "with SqliteSuppressionStore(Path(sys.argv[1])) as s:\n"
            "    s.add('other-process@example.org', 'cli')\n"
        )
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=REPO, timeout=60)
        assert daemon.refresh()
        assert daemon.is_suppressed("other-process@example.org")


def test_concurrent_writers_from_threads(store: SqliteSuppressionStore) -> None:
    def work(n: int) -> None:
        for i in range(50):
            store.record(f"t{n}-{i}@example.org", "hard_bounce", "userunknown", "dsn")
            assert store.is_suppressed(f"t{n}-{i}@example.org")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store) == 200
    assert store.counts_by_kind()["hard_bounce"] == 200


def test_counts_cover_every_kind(store: SqliteSuppressionStore) -> None:
    assert set(store.counts_by_kind()) == set(KINDS)
    assert sum(store.counts_by_kind().values()) == 0
