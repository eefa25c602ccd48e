"""Nodes on a least-privilege PostgreSQL role (docs/scale-out.md): the owner creates and migrates the
schema with ``mailrelayd store migrate``; the nodes run as a role with exactly the GRANTs the doc
lists (run here as written, on a database where ``PUBLIC`` has no rights), through the daemon's
own paths: feedback, RCPT lookups, the CLI, the shared AUTH lockout and sending limits. A schema
such a role may not migrate is one clear line, and the node connects once the owner has migrated."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailrelayd.feedback.pgstore import PostgresSuppressionStore
from mailrelayd.log import configure_logging
from mailrelayd.pg import MIGRATIONS, SCHEMA_VERSION, PgClient, PgSettings
from tests.conftest import TEST_PASSWORD, base_config, deep_merge, mailrelayd_cmd, write_config
from tests.support.pg import PASSWORD, USER
from tests.support.sink import Sink
from tests.support.smtptalk import SmtpTalk
from tests.test_scale_out import BOUNCE_DOMAIN, VERP_SECRET, _http, _processed, _refused_within, _sent_and_bounced
from tests.test_scale_out import _start as _start_nodes

DOC = Path(__file__).resolve().parents[1] / "docs" / "scale-out.md"


def _grants_block() -> str:
    """The SQL block of the doc that follows ``<!-- node-role-grants -->``, unindented."""
    m = re.search(r"<!-- node-role-grants -->\n\s*```sql\n(.*?)```", DOC.read_text(), re.S)
    assert m is not None, "docs/scale-out.md lost its node-role GRANT block"
    return "\n".join(line[3:] if line.startswith("   ") else line for line in m.group(1).splitlines())


def _node_role(pg_server: Any, db: str) -> str:
    """Take every right from ``PUBLIC`` on ``db``, then run the doc's block for a new role; returns it."""
    role = "node_" + uuid.uuid4().hex[:12]
    pg_server.psql(f"REVOKE ALL ON DATABASE {db} FROM PUBLIC; REVOKE ALL ON SCHEMA public FROM PUBLIC;"
                   f" GRANT ALL ON SCHEMA public TO {USER}", db=db)
    sql = (_grants_block().replace("mailrelayd_node", role).replace("ON DATABASE mailrelayd ", f"ON DATABASE {db} ")
           .replace("PASSWORD '...'", f"PASSWORD '{PASSWORD}'"))
    pg_server.psql(sql, db=db)
    assert pg_server.psql(f"SELECT has_schema_privilege('{role}', 'public', 'CREATE'),"
                          f" has_database_privilege('{role}', '{db}', 'CREATE')", db=db) == "f|f"
    return role


def _owner_at_version_1(pg_server: Any, db: str) -> None:
    """The schema as the owner left it at version 1: what an upgrade of mailrelayd finds."""
    pg_server.psql(f"SET ROLE {USER}; CREATE TABLE mailrelayd_schema (version integer NOT NULL);"
                   f" {MIGRATIONS[0]}; INSERT INTO mailrelayd_schema (version) VALUES (1)", db=db)


def _node_config(tmp_path: Path, name: str, tls_files: Any, url: str, password: Path, sink_port: int) -> Path:
    return write_config(tmp_path / name, deep_merge(base_config(tls_files), {
        "auth": {"default_rate": "100/h"},  # so that MAIL is counted in the shared table
        "feedback": {"bounce_domain": BOUNCE_DOMAIN, "verp_secret": VERP_SECRET, "store": url,
                     "store_password_file": str(password), "store_poll_interval": "500ms",
                     "store_connect_timeout": "2s"},
        "routes": [{"domain": "*", "host": f"127.0.0.1:{sink_port}"}],
    }))


def _store_migrate(url: str, password: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*mailrelayd_cmd(), "store", "migrate", "--url", url, "--password-file", str(password)],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def password(pg_server: Any, tmp_path: Path) -> Path:
    return pg_server.password_file(tmp_path / "secrets")


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    """The client logs from its own thread: into a file of this test."""
    path = tmp_path / "log.jsonl"
    with open(path, "w") as f:
        configure_logging("json", "info", stream=f)
        yield path
        configure_logging("json", "info", stream=sys.__stderr__)


def _events(path: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, path.read_text().splitlines()) if e.get("event") == name]


async def test_nodes_run_with_only_the_documented_grants(tmp_path, tls_files, pg_server, pg_url, password,
                                                         cli_env) -> None:
    db = pg_url.rsplit("/", 1)[1]
    r = await asyncio.to_thread(_store_migrate, pg_url, password, cli_env)  # the owner, once
    assert r.returncode == 0 and f"migrated from version 0 to {SCHEMA_VERSION}" in r.stdout, r.stderr
    r = await asyncio.to_thread(_store_migrate, pg_url, password, cli_env)
    assert r.returncode == 0 and f"already at version {SCHEMA_VERSION}" in r.stdout, r.stderr
    role = _node_role(pg_server, db)
    node_url = pg_url.replace(f"{USER}@", f"{role}@")

    sink = await Sink().start()
    try:
        a, b = await _start_nodes(*(_node_config(tmp_path, name, tls_files, node_url, password, sink.port)
                              for name in ("a", "b")))
        # Feedback processed on A, enforced at RCPT on B.
        await _sent_and_bounced(sink, a, "gone@dest.test")
        await _processed(a, "gone@dest.test")
        await _refused_within(b.ports["relay"], "gone@dest.test", 2.0)
        # The CLI with the node's config: add, and an import (a temporary table).
        csv_file = tmp_path / "list.csv"
        csv_file.write_text("address,reason\nimported@dest.test,from the CRM\n")
        for args in (["suppress", "add", "unsub@dest.test", "--reason", "asked"],
                     ["suppress", "import", str(csv_file)]):
            r = await asyncio.to_thread(subprocess.run, [*mailrelayd_cmd(), *args, "-c", str(b.config)],
                                        capture_output=True, text=True, env=cli_env, timeout=60)
            assert r.returncode == 0, r.stderr
        await _refused_within(a.ports["relay"], "unsub@dest.test", 2.0)
        await _refused_within(a.ports["relay"], "imported@dest.test", 2.0)
        # The shared AUTH lockout (3 failures over both nodes) and a shared sending limit.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE

        async def auth(port: int, secret: str) -> tuple[int, SmtpTalk]:
            t = await SmtpTalk.connect(port)
            await t.ehlo()
            await t.starttls(ctx)
            await t.ehlo()
            code, _ = await t.cmd("AUTH PLAIN " + base64.b64encode(f"\0alice\0{secret}".encode()).decode())
            return code, t

        code, t = await auth(a.ports["submission"], TEST_PASSWORD)
        assert code == 235
        assert (await t.cmd("MAIL FROM:<app@example.com>"))[0] == 250
        await t.close()
        for port in (a.ports["submission"], b.ports["submission"], a.ports["submission"]):
            code, t = await auth(port, "wrong password")
            await t.close()
            assert code == 535
        deadline = time.monotonic() + 2.0
        while True:
            code, t = await auth(b.ports["submission"], "wrong password")
            await t.close()
            if code == 421:
                break
            assert time.monotonic() < deadline, "node B did not apply the shared lockout"
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 5.0
        while pg_server.psql("SELECT count(*) FROM mailrelayd_rate_counters", db=db) == "0":
            assert time.monotonic() < deadline, "the admitted MAIL was not counted in the shared table"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.2)  # a couple of polls (generation check, outbox, pruning)
        for node in (a, b):
            ready = json.loads((await asyncio.to_thread(_http, node, "/ready"))[1])
            assert not ready.get("degraded"), ready
            for bad in ("pg.connect_refused", "pg.connect_failed", "pg.poll_failed", "pg.down",
                        "auth.shared_failed", "ratelimit.shared_failed"):
                assert not [e for e in list(node.events) if e.get("event") == bad], (bad, node.output[-3000:])
            assert "Traceback" not in node.output, node.output[-3000:]
        assert a.stop() == 0 and b.stop() == 0
    finally:
        await sink.stop()


def test_a_schema_the_node_role_may_not_migrate_is_one_line_until_the_owner_does(pg_server, pg_url, password,
                                                                                 log_file, cli_env) -> None:
    db = pg_url.rsplit("/", 1)[1]
    _owner_at_version_1(pg_server, db)
    role = _node_role(pg_server, db)
    client = PgClient(PgSettings(pg_url.replace(f"{USER}@", f"{role}@"), password, poll_interval=0.2, timeout=2.0),
                      name="node")
    store = PostgresSuppressionStore(client)
    try:
        assert not client.start(wait=10)
        time.sleep(1.0)  # retried meanwhile, logged once
        refused = _events(log_file, "pg.connect_refused")
        assert len(refused) == 1, refused
        error = refused[0]["error"]
        assert "\n" not in error and "mailrelayd store migrate" in error and "schema version 1" in error, error
        assert f"needs version {SCHEMA_VERSION}" in error and "permission denied" in error, error
        assert "mailrelayd store migrate" in store.status().detail
        assert pg_server.psql("SELECT max(version) FROM mailrelayd_schema", db=db) == "1"  # untouched
        r = _store_migrate(pg_url, password, cli_env)
        assert r.returncode == 0 and f"migrated from version 1 to {SCHEMA_VERSION}" in r.stdout, r.stderr
        deadline = time.monotonic() + 10
        while not client.up:  # no restart: the next attempt finds a current schema
            assert time.monotonic() < deadline, client.last_error
            time.sleep(0.05)
        # The new table came with the rights (ALTER DEFAULT PRIVILEGES of the doc's block).
        assert store.add("late@dest.test", "asked")
        assert store.get("late@dest.test") is not None
    finally:
        store.close()


def test_the_cli_migration_as_the_node_role_says_what_to_do(pg_server, pg_url, password, cli_env) -> None:
    db = pg_url.rsplit("/", 1)[1]
    _owner_at_version_1(pg_server, db)
    role = _node_role(pg_server, db)
    r = _store_migrate(pg_url.replace(f"{USER}@", f"{role}@"), password, cli_env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "schema version 1" in r.stderr and "'mailrelayd store migrate' as the database owner" in r.stderr, r.stderr
    assert pg_server.psql("SELECT max(version) FROM mailrelayd_schema", db=db) == "1"


def test_the_owner_config_migrates_without_url(tmp_path: Path, pg_url, password, cli_env) -> None:
    import tomli_w

    cfg = tmp_path / "m.toml"
    cfg.write_text(tomli_w.dumps(deep_merge({"server": {"hostname": "relay.example", "state_dir": "state"},
                                             "listeners": [{"name": "r", "address": "127.0.0.1:0",
                                                            "mode": "relay", "tls": "none"}]},
                                            {"feedback": {"store": pg_url, "store_password_file": str(password)}})))
    r = subprocess.run([*mailrelayd_cmd(), "store", "migrate", "-c", str(cfg)], capture_output=True, text=True,
                       env=cli_env, timeout=60)
    assert r.returncode == 0 and f"migrated from version 0 to {SCHEMA_VERSION}" in r.stdout, r.stderr
    r = subprocess.run([*mailrelayd_cmd(), "store", "migrate", "--url", pg_url.replace("@", ":pw@")],
                       capture_output=True, text=True, env=cli_env, timeout=60)
    assert r.returncode == 2 and "must not contain a password" in r.stderr and ":pw@" not in r.stderr
