"""Shared fixtures: certificates, config files, users, and a real daemon on loopback ephemeral ports."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from mailrelayd.devsetup import make_self_signed
from mailrelayd.users import User, hash_password, save_users

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# A cheap scrypt cost for tests (the production default is deliberately slow).
TEST_PASSWORD = "correct horse battery staple"
TEST_HASH = hash_password(TEST_PASSWORD, ln=8)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    make_self_signed(d / "cert.pem", d / "key.pem", "relay.test.example")
    return d / "cert.pem", d / "key.pem"


@pytest.fixture
def client_tls() -> ssl.SSLContext:
    """A client context that accepts our self-signed test certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def base_config(tls_files: tuple[Path, Path]) -> dict[str, Any]:
    cert, key = tls_files
    return {
        "server": {"hostname": "relay.test.example", "spool_dir": "spool", "state_dir": "state",
                   "shutdown_timeout": "5s", "min_free_space": "1MB"},
        "tls": {"cert_file": str(cert), "key_file": str(key)},
        "listeners": [
            {"name": "relay", "address": "127.0.0.1:0", "mode": "relay", "tls": "starttls"},
            {"name": "submission", "address": "127.0.0.1:0", "mode": "submission", "tls": "starttls"},
            {"name": "submissions", "address": "127.0.0.1:0", "mode": "submission", "tls": "implicit"},
        ],
        "http": {"address": "127.0.0.1:0"},
        "auth": {"users_file": "users.toml", "max_failures": 3, "failure_window": "1m", "lockout": "1m"},
        "relay": {"local_domains": ["bounces.test.example"], "trusted_networks": ["127.0.0.1/32"]},
        "delivery": {"retry_initial": "1s", "retry_max": "2s", "connect_timeout": "2s"},
        "routes": [{"domain": "*", "host": "127.0.0.1:9"}],  # discard port: nothing listens; tests override
        "logging": {"format": "json", "level": "info"},
    }


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def write_config(directory: Path, data: dict[str, Any], users: dict[str, tuple[str, ...]] | None = None) -> Path:
    """Write mailrelayd.toml (and users.toml) into ``directory``; returns the config path."""
    directory.mkdir(parents=True, exist_ok=True)
    if users is None:
        users = {"alice": ("@example.com",), "bob": ("bob@example.org",)}
    save_users(directory / "users.toml", {n: User(n, TEST_HASH, pats) for n, pats in users.items()})
    path = directory / "mailrelayd.toml"
    path.write_text(tomli_w.dumps(data))
    return path


class RunningDaemon:
    """A daemon running inside the test's event loop."""

    def __init__(self, daemon: Any, task: asyncio.Task[int], config: Path) -> None:
        self.daemon = daemon
        self.task = task
        self.config = config

    def port(self, listener: str) -> int:
        for lst in self.daemon.listeners:
            if lst.name == listener:
                assert lst.bound is not None
                return lst.bound[1]
        raise KeyError(listener)

    @property
    def http_port(self) -> int:
        assert self.daemon.sidecar is not None and self.daemon.sidecar.bound is not None
        return self.daemon.sidecar.bound[1]

    @property
    def spool(self) -> Any:
        return self.daemon.spool

    async def stop(self) -> int:
        self.daemon.stop()
        return await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def start_daemon(tmp_path: Path, tls_files: tuple[Path, Path]
                       ) -> AsyncIterator[Callable[..., Any]]:
    """``await start_daemon(overrides, users=...)`` starts a daemon with ``base_config`` merged with
    ``overrides``; every daemon started is stopped at the end of the test."""
    from mailrelayd.daemon import Daemon

    running: list[RunningDaemon] = []
    counter = 0

    async def _start(overrides: dict[str, Any] | None = None, users: dict[str, tuple[str, ...]] | None = None,
                     directory: Path | None = None) -> RunningDaemon:
        nonlocal counter
        counter += 1
        d = directory or (tmp_path / f"d{counter}")
        cfg_path = write_config(d, deep_merge(base_config(tls_files), overrides or {}), users)
        daemon = Daemon(cfg_path)
        task = asyncio.create_task(daemon.run())
        for _ in range(500):
            if daemon.listeners and all(lst.serving for lst in daemon.listeners) and \
                    getattr(daemon, "sidecar", None) is not None and daemon.sidecar.bound:
                break
            if task.done():
                task.result()
                raise AssertionError("daemon exited during start-up")
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("daemon did not become ready")
        rd = RunningDaemon(daemon, task, cfg_path)
        running.append(rd)
        return rd

    yield _start
    for rd in running:
        if not rd.task.done():
            with contextlib.suppress(Exception):
                await rd.stop()


@pytest.fixture(autouse=True)
def _no_stray_daemons() -> Iterator[None]:
    """Subprocess daemons never outlive their test (a failed assertion must not leave one running)."""
    yield
    from tests.support.proc import DaemonProcess
    DaemonProcess.kill_all()


def mailrelayd_cmd() -> list[str]:
    """How to run the CLI in a subprocess (the venv's console script, or -m)."""
    exe = Path(sys.executable).parent / "mailrelayd"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mailrelayd"]


@pytest.fixture
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MAILRELAYD_CONFIG", None)
    env.pop("NOTIFY_SOCKET", None)
    return env


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster for the whole session (tests/support/pg.py); skips without one."""
    from tests.support.pg import PgServer, find_bindir

    bindir, why = find_bindir()
    if bindir is None:
        pytest.skip(f"PostgreSQL not available: {why}")
    server = PgServer(bindir)
    yield server
    server.destroy()


@pytest.fixture
def pg_url(pg_server: Any) -> str:
    """A fresh empty database on the session's PostgreSQL; its store URL (no password)."""
    import uuid

    from tests.support.pg import new_database

    return new_database(pg_server, "t" + uuid.uuid4().hex[:16])
