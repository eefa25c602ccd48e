"""The PostgreSQL suppression store against a real server (tests/support/pg.py): two store objects on
one database stand for two relays. Propagation, soft-bounce counting across nodes, the outbox and
snapshot while the database is down, schema versioning, the shared AUTH lockout, and the CLI."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from mailrelayd.config import ConfigError, parse_config
from mailrelayd.feedback.pgstore import Outbox, PostgresSuppressionStore
from mailrelayd.feedback.store import SqliteSuppressionStore, StoreUnavailableError
from mailrelayd.log import configure_logging
from mailrelayd.pg import SCHEMA_VERSION, PgClient, PgSettings
from mailrelayd.sharedlimits import SharedAuthThrottle
from tests.conftest import mailrelayd_cmd


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until ``cond()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture(autouse=True)
def _log_to_file(tmp_path: Path) -> Iterator[None]:
    """The stores log from their own thread: into a file of this test, not into a capture stream an
    earlier test may have left configured (and closed)."""
    with open(tmp_path / "log.jsonl", "w") as f:
        configure_logging("json", "info", stream=f)
        yield
        configure_logging("json", "info", stream=sys.__stderr__)


@pytest.fixture
def nodes(pg_url: str, pg_server: Any, tmp_path: Path, _log_to_file: None
          ) -> Iterator[Callable[..., PostgresSuppressionStore]]:
    """``make(name, outbox=True, **kw)``: a store as one node (daemon mode: with an outbox) would open it."""
    made: list[PostgresSuppressionStore] = []
    password = pg_server.password_file(tmp_path)

    def make(name: str, outbox: bool = True, wait: float = 10.0, **kw: Any) -> PostgresSuppressionStore:
        client = PgClient(PgSettings(pg_url, password, poll_interval=0.3, timeout=2.0), name=name)
        store = PostgresSuppressionStore(client, outbox=Outbox(tmp_path / f"{name}-outbox.db") if outbox else None,
                                         **kw)
        made.append(store)
        client.start(wait=wait)
        return store

    yield make
    for s in made:
        s.close()


def test_a_hard_bounce_on_one_node_is_enforced_by_the_other(nodes) -> None:
    a, b = nodes("a"), nodes("b")
    assert a.record("Gone@Example.COM", "hard_bounce", "550 5.1.1", "dsn", "Q1")
    assert wait_until(lambda: b.is_suppressed("Gone@example.com"), 2.0) < 2.0
    assert not b.is_suppressed("gone@example.com")  # local part case is kept (RFC 5321 2.4)
    row = b.get("Gone@example.com")
    assert row is not None and (row.kind, row.source, row.queue_id, row.count) == ("hard_bounce", "dsn", "Q1", 1)
    # The kind only moves up, whichever node writes.
    b.record("Gone@example.com", "soft_bounce", "452", "dsn")
    a.add("Gone@example.com", "by hand")
    a.record("Gone@example.com", "complaint", "abuse", "arf")
    row = a.get("Gone@example.com")
    assert row is not None and row.kind == "manual" and row.count == 4
    # A removal on one node lifts it everywhere.
    assert b.remove("Gone@example.com")
    wait_until(lambda: not a.is_suppressed("Gone@example.com"), 2.0)
    assert not b.remove("Gone@example.com")


def test_soft_bounces_count_across_nodes(nodes) -> None:
    a, b = nodes("a", soft_threshold=3), nodes("b", soft_threshold=3)
    assert not a.record("full@example.org", "soft_bounce", "452", "dsn")
    assert not b.record("full@example.org", "soft_bounce", "452", "dsn")
    assert b.soft_bounce_count("full@example.org") == 2
    assert a.record("full@example.org", "soft_bounce", "452", "dsn")  # the third, on either node
    wait_until(lambda: b.is_suppressed("full@example.org"), 2.0)
    row = b.get("full@example.org")
    assert row is not None and row.kind == "soft_bounce" and row.count == 3
    # Outside the window they do not add up.
    old = time.time() - 30 * 86400
    assert not a.record("old@example.org", "soft_bounce", "452", "dsn", now=old)
    assert not a.record("old@example.org", "soft_bounce", "452", "dsn", now=old + 1)
    assert not b.record("old@example.org", "soft_bounce", "452", "dsn")
    assert a.prune() == 0 or True  # pruning old rows is allowed to find them already gone
    assert b.soft_bounce_count("old@example.org") == 1
    # Copies of one message's soft bounce, on either node, count once.
    for node in (a, b, a):
        assert not node.record("copy@example.org", "soft_bounce", "452", "dsn", "Q1")
    assert b.soft_bounce_count("copy@example.org") == 1


def test_concurrent_writers_from_both_nodes_converge(nodes) -> None:
    a, b = nodes("a"), nodes("b")

    async def hammer() -> None:
        def write(store: PostgresSuppressionStore, i: int) -> None:
            store.record(f"u{i}@example.net", "hard_bounce", "550", "dsn")
            if i % 3 == 0:
                store.remove(f"u{i}@example.net")
        await asyncio.gather(*(asyncio.to_thread(write, a if i % 2 else b, i) for i in range(60)))

    asyncio.run(hammer())
    expected = {f"u{i}@example.net" for i in range(60) if i % 3}
    for store in (a, b):
        wait_until(lambda store=store: {f"u{i}@example.net" for i in range(60)
                                        if store.is_suppressed(f"u{i}@example.net")} == expected, 3.0)
    assert {s.address for s in a.list()} == expected
    assert a.counts_by_kind()["hard_bounce"] == len(expected)


def test_import_export_list_and_a_late_node_loads_everything(nodes) -> None:
    a = nodes("a")
    n = a.import_csv(io.StringIO("address,reason,kind\nx@example.com,imported,\ny@example.com,why,hard_bounce\n\n"
                                 "y@example.com,worse,complaint\n"))
    assert n == 2  # one row per address: the same address twice is merged (the kind only moves up)
    with pytest.raises(ValueError, match="line 2"):
        a.import_csv(io.StringIO("address,reason\nnot-an-address,x\n"))
    out = io.StringIO()
    a.export_csv(out)
    assert out.getvalue().splitlines()[0] == "address,reason,kind,source,queue_id,first_seen,last_seen,count"
    assert [(s.kind, s.reason, s.count) for s in a.list()] == [("manual", "imported", 1), ("complaint", "worse", 2)]
    assert [s.address for s in a.list(kind="complaint")] == ["y@example.com"]
    b = nodes("b")  # started after the writes: loads the whole list at connect
    assert b.is_suppressed("x@example.com") and b.is_suppressed("y@example.com")
    b.import_csv(io.StringIO(out.getvalue()))  # an export imports again
    wait_until(lambda: a.is_suppressed("x@example.com"), 2.0)


def test_database_down_keeps_last_list_outbox_and_snapshot(nodes, pg_server, tmp_path: Path) -> None:
    a, b = nodes("a"), nodes("b")
    cli = nodes("cli", outbox=False)
    a.record("known@example.com", "hard_bounce", "550", "dsn")
    wait_until(lambda: b.is_suppressed("known@example.com"), 2.0)
    pg_server.stop()
    try:
        wait_until(lambda: not a.status().up, 15.0)
        # Reads keep answering from memory; writes go to the outbox and apply here at once.
        assert a.is_suppressed("known@example.com")
        assert a.record("learned@example.com", "hard_bounce", "550 5.1.1", "dsn", "Q9")
        assert a.is_suppressed("learned@example.com")
        assert not a.record("soft@example.com", "soft_bounce", "452", "dsn")
        st = a.status()
        assert not st.up and st.outbox == 2 and "unreachable" in st.detail
        # Without an outbox (the CLI) the caller is told, never silently ignored.
        with pytest.raises(StoreUnavailableError):
            cli.add("x@example.com", "by hand")
        # A restart during the outage keeps the last known list and what it learned.
        a.close()
        again = nodes("a", wait=1.0)
        assert not again.status().up
        assert again.is_suppressed("known@example.com") and again.is_suppressed("learned@example.com")
    finally:
        pg_server.start()
    # When the database returns the outbox is written and every node learns it.
    wait_until(lambda: b.is_suppressed("learned@example.com"), 15.0)
    wait_until(lambda: again.status().outbox == 0, 5.0)
    row = b.get("learned@example.com")
    assert row is not None and row.queue_id == "Q9" and row.source == "dsn"
    assert b.soft_bounce_count("soft@example.com") == 1
    wait_until(lambda: cli.status().up, 15.0)  # a client without an outbox reconnects too (backoff <= 5 s)
    assert cli.add("x@example.com", "by hand")


def test_lost_notifications_are_caught_up_by_the_poll(nodes, pg_server) -> None:
    a, b = nodes("a"), nodes("b")
    # A write that bypasses NOTIFY (as if the notification were lost): the generation still moves.
    pg_server.psql("INSERT INTO mailrelayd_suppressions (address, kind, first_seen, last_seen)"
                   " VALUES ('silent@example.com', 'manual', 0, 0);"
                   " UPDATE mailrelayd_meta SET value = value + 1 WHERE key = 'generation'",
                   db=a.client.settings.url.rsplit("/", 1)[1])
    wait_until(lambda: a.is_suppressed("silent@example.com") and b.is_suppressed("silent@example.com"), 5.0)


def test_schema_is_versioned_and_a_newer_one_refused(nodes, pg_server, pg_url: str) -> None:
    a = nodes("a")
    db = pg_url.rsplit("/", 1)[1]
    assert pg_server.psql("SELECT max(version) FROM mailrelayd_schema", db=db) == str(SCHEMA_VERSION)
    a.close()
    assert nodes("again").status().up  # an up-to-date schema is left alone
    pg_server.psql("INSERT INTO mailrelayd_schema (version) VALUES (999)", db=db)
    with pytest.raises(Exception, match="newer than this mailrelayd"):
        nodes("new")
    assert pg_server.psql("SELECT count(*) FROM mailrelayd_schema", db=db) == str(SCHEMA_VERSION + 1)


def test_store_url_never_carries_a_password(tmp_path: Path) -> None:
    base = {"server": {"hostname": "relay.example"},
            "listeners": [{"name": "r", "address": "127.0.0.1:0", "mode": "relay", "tls": "none"}]}
    for url, msg in (("postgresql://u:hunter2@db:5432/m", "must not contain a password"),
                     ("postgresql://u@db:5432/m?password=hunter2", "must not contain a password"),
                     ("mysql://u@db/m", "must be \"sqlite\" or a URL"),
                     ("postgresql://u@db:5432/", "database name")):
        with pytest.raises(ConfigError, match=msg) as exc:
            parse_config({**base, "feedback": {"store": url}}, tmp_path / "m.toml")
        assert "hunter2" not in str(exc.value)
        assert str(exc.value).startswith(f"{tmp_path / 'm.toml'}: feedback.store: ")
    cfg = parse_config({**base, "feedback": {"store": "postgresql://u@db.example:5432/mail"}}, tmp_path / "m.toml")
    assert cfg.feedback.store == "postgresql://u@db.example:5432/mail"


async def test_auth_lockout_counts_across_nodes(nodes) -> None:
    loop = asyncio.get_running_loop()
    a, b = await asyncio.to_thread(nodes, "a"), await asyncio.to_thread(nodes, "b")
    ta = SharedAuthThrottle(a.client, loop, 4, 60, 60)
    tb = SharedAuthThrottle(b.client, loop, 4, 60, 60)
    assert not ta.failure("192.0.2.7") and not ta.failure("192.0.2.7")
    assert not tb.failure("192.0.2.7")
    await asyncio.sleep(0.3)
    assert not tb.is_locked("192.0.2.7") and not ta.is_locked("192.0.2.7")  # 3 of 4
    assert not tb.failure("192.0.2.7")  # the fourth, on the other node: locked on both
    for _ in range(200):
        if ta.is_locked("192.0.2.7") and tb.is_locked("192.0.2.7"):
            break
        await asyncio.sleep(0.01)
    assert ta.is_locked("192.0.2.7") and tb.is_locked("192.0.2.7")
    assert not ta.is_locked("192.0.2.8")
    # A node that starts later learns the lockout at connect.
    c = await asyncio.to_thread(nodes, "c")
    tc = SharedAuthThrottle(c.client, loop, 4, 60, 60)
    for _ in range(200):
        if tc.is_locked("192.0.2.7"):
            break
        await asyncio.sleep(0.01)
    assert tc.is_locked("192.0.2.7")


def _cli(args: list[str], cfg: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*mailrelayd_cmd(), *args, "-c", str(cfg)], capture_output=True, text=True, env=env,
                          timeout=60)


def test_cli_list_import_export_and_migrate(tmp_path: Path, pg_url: str, pg_server, cli_env) -> None:
    password = pg_server.password_file(tmp_path)
    base = {"server": {"hostname": "relay.example", "state_dir": "state"},
            "listeners": [{"name": "r", "address": "127.0.0.1:0", "mode": "relay", "tls": "none"}]}
    local_cfg = tmp_path / "local.toml"
    local_cfg.write_text(tomli_w.dumps(base))
    (tmp_path / "state").mkdir()
    with SqliteSuppressionStore(tmp_path / "state" / "suppressions.db", soft_threshold=3) as local:
        local.record("hard@example.com", "hard_bounce", "550 5.1.1", "dsn", "QA")
        local.record("soft@example.com", "soft_bounce", "452", "dsn")
        local.add("manual@example.com", "asked")
    r = _cli(["suppress", "migrate", "--to", pg_url, "--password-file", str(password)], local_cfg, cli_env)
    assert r.returncode == 0, r.stderr
    assert "copied 2 suppression(s) and 1 soft bounce(s)" in r.stdout
    r = _cli(["suppress", "migrate", "--to", pg_url, "--password-file", str(password)], local_cfg, cli_env)
    assert r.returncode == 0, r.stderr  # idempotent
    r = _cli(["suppress", "migrate", "--to", pg_url.replace("@", ":pw@")], local_cfg, cli_env)
    assert r.returncode == 2 and "must not contain a password" in r.stderr and ":pw@" not in r.stderr

    shared_cfg = tmp_path / "shared.toml"
    shared_cfg.write_text(tomli_w.dumps({**base, "feedback": {"store": pg_url,
                                                              "store_password_file": str(password)}}))
    r = _cli(["suppress", "list"], shared_cfg, cli_env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split("\t")[:2] for ln in lines] == [["hard@example.com", "hard_bounce"],
                                                    ["manual@example.com", "manual"]]
    assert lines[0].split("\t")[4] == "x1"  # migrated twice, counted once
    csv_file = tmp_path / "more.csv"
    csv_file.write_text("address,reason\nnew@example.com,from the CRM\n")
    r = _cli(["suppress", "import", str(csv_file)], shared_cfg, cli_env)
    assert r.returncode == 0 and "imported 1" in r.stdout, r.stderr
    r = _cli(["suppress", "export"], shared_cfg, cli_env)
    assert r.returncode == 0 and "new@example.com,from the CRM,manual" in r.stdout
    r = _cli(["suppress", "add", "x@example.com", "--reason", "r"], shared_cfg, cli_env)
    assert r.returncode == 0 and "suppressed" in r.stdout
    with PostgresSuppressionStore(PgClient(PgSettings(pg_url, password)), soft_threshold=3) as check:
        check.client.start(wait=10)
        assert check.soft_bounce_count("soft@example.com") == 1

    # The database down: a clear error, exit 2, no traceback, no password.
    pg_server.stop()
    try:
        r = _cli(["suppress", "list"], shared_cfg, cli_env)
    finally:
        pg_server.start()
    assert r.returncode == 2 and "unreachable" in r.stderr and "Traceback" not in r.stderr
    assert "pg-test-secret" not in r.stderr + r.stdout


async def test_rate_limiter_counts_across_nodes_with_a_sliding_window(nodes) -> None:
    from mailrelayd.ratelimit import Rate
    from mailrelayd.sharedlimits import PgRateLimiter

    loop = asyncio.get_running_loop()
    a, b = await asyncio.to_thread(nodes, "a"), await asyncio.to_thread(nodes, "b")
    now = [1_000_000 * 3600.0 + 10]
    la = PgRateLimiter(a.client, loop, clock=lambda: now[0])
    lb = PgRateLimiter(b.client, loop, clock=lambda: now[0])
    rate = Rate(4, 3600)

    async def take(limiter: PgRateLimiter, key: str = "alice") -> Any:
        verdict = limiter.take(key, rate)  # synchronous: no database round trip
        await asyncio.sleep(0.2)  # messages a moment apart: the other node has heard of it
        return verdict

    verdicts = [await take(la if i % 2 else lb) for i in range(6)]
    assert [v.allowed for v in verdicts] == [True] * 4 + [False] * 2
    assert verdicts[4].first_refusal and verdicts[5].first_refusal  # logged once per window on each node
    assert not (await take(la)).first_refusal
    assert 0 < verdicts[4].retry_after <= 3600
    assert (await take(la, "bob")).allowed  # per user
    # A node that starts later loads the fleet's counts.
    c = await asyncio.to_thread(nodes, "c")
    lc = PgRateLimiter(c.client, loop, clock=lambda: now[0])
    await asyncio.sleep(0.5)
    assert not (await take(lc)).allowed
    # Half-way through the next window half of the previous window's count still weighs.
    now[0] += 3600 + 1800 - 10
    assert [(await take(la)).allowed for _ in range(3)] == [True, True, False]
    # Two windows later the slate is clean.
    now[0] += 7200
    assert (await take(lb)).allowed


async def test_rate_limiter_keeps_counting_while_the_database_is_down(nodes, pg_server) -> None:
    from mailrelayd.ratelimit import Rate
    from mailrelayd.sharedlimits import PgRateLimiter

    loop = asyncio.get_running_loop()
    a, b = await asyncio.to_thread(nodes, "a"), await asyncio.to_thread(nodes, "b")
    la, lb = PgRateLimiter(a.client, loop), PgRateLimiter(b.client, loop)
    rate = Rate(6, 86400)
    assert la.take("carol", rate).allowed
    await asyncio.sleep(0.3)
    await asyncio.to_thread(pg_server.stop)
    try:
        for _ in range(50):
            if not a.status().up:
                break
            await asyncio.sleep(0.1)
        # Mail keeps flowing: the node decides on its own view and counts what it admits.
        assert [la.take("carol", rate).allowed for _ in range(3)] == [True, True, True]
    finally:
        await asyncio.to_thread(pg_server.start)
    # Back: node A writes what it admitted meanwhile, node B learns it.
    for _ in range(200):
        await asyncio.sleep(0.1)
        total = pg_server.psql("SELECT coalesce(sum(count), 0) FROM mailrelayd_rate_counters"
                               " WHERE key = 'carol/86400'", db=a.client.settings.url.rsplit("/", 1)[1])
        if total == "4":
            break
    assert total == "4"
    await asyncio.sleep(0.3)
    assert [lb.take("carol", rate).allowed for _ in range(3)] == [True, True, False]


def test_password_from_pgpassfile(pg_url: str, pg_server, tmp_path: Path, monkeypatch) -> None:
    from tests.support.pg import PASSWORD

    host_port_db = pg_url.split("@", 1)[1]
    host, port_db = host_port_db.split(":", 1)
    port, db = port_db.split("/", 1)
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"{host}:{port}:{db}:mailrelayd:{PASSWORD}\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    with PostgresSuppressionStore(PgClient(PgSettings(pg_url, None, timeout=3.0))) as store:
        assert store.client.start(wait=10), store.client.last_error
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "missing"))
    with PostgresSuppressionStore(PgClient(PgSettings(pg_url, None, timeout=3.0))) as store:
        assert not store.client.start(wait=10)
        assert PASSWORD not in store.client.last_error
