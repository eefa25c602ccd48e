"""A throwaway PostgreSQL server for tests: Debian's ``postgresql`` binaries, a fresh cluster in a
temporary directory, listening on 127.0.0.1 on a free port, stopped and deleted afterwards.

The binaries are installed with apt when missing and we are root (as tests/system-deps.sh does);
otherwise :func:`find_bindir` returns None and the fixture skips with the reason. initdb refuses to
run as root, so under root the cluster runs as the ``postgres`` user (created by the package).

Connections from the daemon use TCP with a SCRAM password (role ``mailrelayd``, database
``mailrelayd``), so the password-file path of the real configuration is what the tests exercise.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from functools import cache
from pathlib import Path

PASSWORD = "pg-test-secret-0123456789"
USER = "mailrelayd"
DATABASE = "mailrelayd"


def _versions() -> list[Path]:
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        return []
    found = [p / "bin" for p in root.iterdir() if (p / "bin" / "initdb").is_file() and p.name.isdigit()]
    return sorted(found, key=lambda p: int(p.parent.name))


@cache
def find_bindir() -> tuple[Path | None, str]:
    """The newest PostgreSQL bin directory, installing Debian's ``postgresql`` when missing.

    Returns (bindir, "") or (None, why not)."""
    found = _versions()
    if found:
        return found[-1], ""
    if os.geteuid() != 0:
        return None, "PostgreSQL is not installed and we are not root (apt-get install -y postgresql)"
    if not shutil.which("apt-get"):
        return None, "PostgreSQL is not installed and apt-get is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Debian's postinst would start the default cluster: a policy-rc.d answering 101 prevents that.
    policy = Path("/usr/sbin/policy-rc.d")
    made = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made = True
    try:
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600",
                   "postgresql"]
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:  # package lists may be missing on a fresh machine
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
            result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    finally:
        if made:
            policy.unlink(missing_ok=True)
    found = _versions()
    if found:
        return found[-1], ""
    return None, "could not install Debian's postgresql package: " + (result.stderr or result.stdout)[-300:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One cluster: :meth:`start`, :meth:`stop` (and start again: the data survive), :meth:`destroy`."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mailrelayd-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            pw = pwd.getpwnam(self._user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.dir.chmod(0o700)
        pwfile = self.dir / "superuser.pw"
        pwfile.write_text(PASSWORD + "\n")
        if self._user is not None:
            os.chown(pwfile, pwd.getpwnam(self._user).pw_uid, -1)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.dir}'\nfsync = off\nsynchronous_commit = off\n"
                    "full_page_writes = off\nmax_connections = 60\nshared_buffers = 16MB\n")
        self.start()
        self.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        self.psql(f"CREATE DATABASE {DATABASE} OWNER {USER}")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bindir / tool), *args], capture_output=True, text=True, check=check,
                              user=self._user, cwd=self.dir, timeout=120)

    @property
    def dsn(self) -> str:
        """The ``[feedback] store`` value: no password (it comes from a file)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def password_file(self, directory: Path) -> Path:
        path = directory / "pg.password"
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(PASSWORD + "\n")
        path.chmod(0o600)
        return path

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop", check=False)

    def processes(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, ...)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True, text=True,
                                  check=True).stdout.split()
        return [postmaster, *(int(c) for c in children)]

    def pause(self) -> None:
        """SIGSTOP every server process: connections are accepted by the kernel, nothing answers
        (a hung server, or a network partition that drops packets)."""
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run SQL as the superuser over the UNIX socket; returns unaligned output."""
        r = self._run("psql", "-h", str(self.dir), "-p", str(self.port), "-U", "postgres", "-d", db,
                      "-v", "ON_ERROR_STOP=1", "-At", "-c", sql)
        return r.stdout.strip()

    def destroy(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)


def new_database(server: PgServer, name: str) -> str:
    """A fresh, empty database owned by the test role; returns its store URL."""
    server.psql(f"CREATE DATABASE {name} OWNER {USER}")
    return f"postgresql://{USER}@127.0.0.1:{server.port}/{name}"
