"""Connections lost and re-made under a running node (tests/support/pg.py) leave nothing for asyncio
to complain about: no "Future exception was never retrieved", no task destroyed while pending.

The cause was a connection attempt cancelled half-way: asyncpg, cancelled inside its SSLRequest
exchange (``sslmode=prefer``, its default), drops a future that the closing socket fails later.
Our teardown after a restart cancels the pool's reconnection of its floor connection, and a call's
timeout cancels a connection the pool opens for it. The window is a couple of loop iterations, so
the tests provoke many attempts: calls whose timeout ends while the pool connects (about one in two
left a future behind before the fix), and the backends killed the way a restart kills them."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailrelayd.feedback.pgstore import PostgresSuppressionStore
from mailrelayd.log import configure_logging
from mailrelayd.pg import PgClient, PgSettings, PgUnavailable


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def complaints(self) -> list[str]:
        """First and last line of each, after a garbage collection (an unretrieved exception is
        reported when its future is freed)."""
        gc.collect()
        return [" / ".join(r.getMessage().splitlines()[:2]) for r in self.records]


@pytest.fixture
def asyncio_log(tmp_path: Path) -> Iterator[_Records]:
    """What asyncio's default exception handler logs meanwhile (the ``asyncio`` logger); the store's
    own log goes to a file of this test."""
    handler = _Records()
    logger = logging.getLogger("asyncio")
    with open(tmp_path / "log.jsonl", "w") as f:
        configure_logging("json", "info", stream=f)
        logger.addHandler(handler)
        try:
            yield handler
        finally:
            logger.removeHandler(handler)
            configure_logging("json", "info", stream=sys.__stderr__)


def _wait_up(client: PgClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not client.up:
        assert time.monotonic() < deadline, client.last_error
        time.sleep(0.005)


def _client(pg_url: str, password: Path, **kw: Any) -> PgClient:
    return PgClient(PgSettings(pg_url, password, poll_interval=0.2, timeout=2.0), **kw)


def test_calls_timing_out_while_the_pool_connects_leave_no_future_behind(pg_server, pg_url, tmp_path,
                                                                        asyncio_log) -> None:
    client = _client(pg_url, pg_server.password_file(tmp_path), name="timeouts", pool_size=4)
    client.listen("mailrelayd_test", lambda _payload: None)
    assert client.start(wait=10)

    async def burst() -> None:
        # Four calls on a pool holding one connection: three open one each, and give up within
        # milliseconds, in the middle of it (the node then reconnects, as after any timeout).
        async def one() -> None:
            try:
                await client.acall(lambda c: c.fetchval("SELECT 1"), timeout=random.uniform(0.0005, 0.004))
            except PgUnavailable:
                pass
        await asyncio.gather(*(one() for _ in range(4)))

    try:
        for _ in range(40):
            client.submit(burst).result(10)
            _wait_up(client)
    finally:
        client.close()
    assert asyncio_log.complaints() == []


def test_backends_killed_as_by_a_restart_leave_no_future_behind(pg_server, pg_url, tmp_path,
                                                               asyncio_log) -> None:
    db = pg_url.rsplit("/", 1)[1]
    client = _client(pg_url, pg_server.password_file(tmp_path), name="restarts")
    store = PostgresSuppressionStore(client)  # a LISTEN, a pool, the on_connect and on_poll hooks
    assert client.start(wait=10)
    try:
        for i in range(20):
            # What a fast shutdown does to every backend: 57P01 and the connection closed. The pool
            # starts re-making its floor connection at once; the LISTEN loss tears it all down.
            pg_server.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                           f" WHERE datname = '{db}' AND pid <> pg_backend_pid()")
            deadline = time.monotonic() + 5
            while client.up and time.monotonic() < deadline:
                time.sleep(0.002)
            _wait_up(client)
            assert store.add(f"r{i}@example.com", "restart test")
        pg_server.stop()
        try:
            deadline = time.monotonic() + 5
            while client.up:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            pg_server.start()
        _wait_up(client, 20)
        assert store.is_suppressed("r19@example.com")
    finally:
        store.close()
    assert asyncio_log.complaints() == []
