#!/usr/bin/env python3
"""Cost of the RCPT suppression check: the local SQLite store against the shared PostgreSQL store.

Both keep the suppressed addresses in memory and answer ``is_suppressed`` with a set lookup; this
measures that it stays so, in the same run:

1. ``is_suppressed`` alone, 100,000 suppressed addresses, hits and misses (ns per call);
2. RCPT over SMTP against a real daemon (relay listener, trusted client, no DATA): 4 sessions x
   N RCPT commands, half of them suppressed (550) and half not (250); reply-time percentiles and
   RCPTs per second. Runs alternate sqlite / postgresql to even out machine noise.

PostgreSQL: ``--pg-url postgresql://user@host:port/db --pg-password-file F``, or nothing to start a
throwaway cluster (tests/support/pg.py: needs Debian's postgresql package and root or a user that
may run initdb).

  .venv/bin/python bench/rcpt_check.py [--suppressed 100000] [--rcpts 4000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CONFIG = """
[server]
hostname = "relay.bench.invalid"
spool_dir = "spool"
state_dir = "state"
min_free_space = "10MB"

[[listeners]]
name = "relay"
address = "127.0.0.1:0"
mode = "relay"
tls = "none"

[http]
address = "127.0.0.1:0"

[relay]
trusted_networks = ["127.0.0.1/32"]

[limits]
max_recipients = 1000

[[routes]]
domain = "*"
host = "127.0.0.1:9"

[logging]
level = "info"
format = "json"
"""


def addresses(n: int) -> list[str]:
    return [f"user{i}@dest{i % 997}.bench.invalid" for i in range(n)]


def csv_of(addrs: list[str]) -> str:
    return "address,reason\n" + "".join(f"{a},bench\n" for a in addrs)


def micro(store: object, addrs: list[str]) -> tuple[float, float]:
    hits = addrs[::97][:1000]
    misses = [f"nobody{i}@dest.bench.invalid" for i in range(1000)]
    check = store.is_suppressed  # type: ignore[attr-defined]
    assert all(check(a) for a in hits) and not any(check(a) for a in misses)
    t_hit = min(timeit.repeat(lambda: [check(a) for a in hits], number=50, repeat=5)) / (50 * len(hits))
    t_miss = min(timeit.repeat(lambda: [check(a) for a in misses], number=50, repeat=5)) / (50 * len(misses))
    return t_hit * 1e9, t_miss * 1e9


def start_daemon(directory: Path, store_lines: str) -> tuple[subprocess.Popen[bytes], int]:
    cfg = directory / "mailrelayd.toml"
    cfg.write_text(CONFIG + store_lines)
    exe = Path(sys.executable).parent / "mailrelayd"
    log = directory / "daemon.log"
    with open(log, "wb") as out:  # a file, not a pipe: a full pipe would stall the daemon
        proc = subprocess.Popen([str(exe), "run", "-c", str(cfg), "--log-format", "json"], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "NOTIFY_SOCKET": ""})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        port = 0
        for line in log.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "listener.started":
                port = int(ev["bound"].rsplit(":", 1)[1])
            if ev.get("event") == "daemon.ready" and port:
                return proc, port
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"daemon did not start; see {log}")


async def rcpt_load(port: int, rcpts: list[str], sessions: int) -> tuple[list[float], float]:
    lat: list[float] = []

    async def one(chunk: list[str]) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)

        async def reply() -> bytes:
            while True:
                line = await r.readline()
                if line[3:4] != b"-":
                    return line

        await reply()
        w.write(b"EHLO bench.invalid\r\n")
        await reply()
        for i, a in enumerate(chunk):
            if i % 500 == 0:
                w.write(b"RSET\r\nMAIL FROM:<s@client.bench.invalid>\r\n")
                await reply()
                await reply()
            w.write(f"RCPT TO:<{a}>\r\n".encode())
            t0 = time.perf_counter()
            line = await reply()
            lat.append(time.perf_counter() - t0)
            if line[:3] not in (b"250", b"550"):
                raise RuntimeError(line)
        w.write(b"QUIT\r\n")
        await reply()
        w.close()

    per = len(rcpts) // sessions
    t0 = time.perf_counter()
    await asyncio.gather(*(one(rcpts[i * per:(i + 1) * per]) for i in range(sessions)))
    return lat, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suppressed", type=int, default=100_000)
    ap.add_argument("--rcpts", type=int, default=4000)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pg-url")
    ap.add_argument("--pg-password-file")
    args = ap.parse_args()

    from mailrelayd.feedback.pgstore import PostgresSuppressionStore
    from mailrelayd.feedback.store import SqliteSuppressionStore
    from mailrelayd.pg import PgClient, PgSettings

    server = None
    if args.pg_url:
        url, password = args.pg_url, Path(args.pg_password_file) if args.pg_password_file else None
    else:
        from tests.support.pg import PgServer, find_bindir, new_database

        bindir, why = find_bindir()
        if bindir is None:
            print(f"no PostgreSQL: {why}", file=sys.stderr)
            return 2
        server = PgServer(bindir)
        url = new_database(server, "bench")
        password = server.password_file(Path(tempfile.mkdtemp(prefix="rcpt-bench-")))
    addrs = addresses(args.suppressed)
    work = Path(tempfile.mkdtemp(prefix="rcpt-bench-"))
    try:
        (work / "sqlite" / "state").mkdir(parents=True)
        (work / "pg" / "state").mkdir(parents=True)
        sqlite_store = SqliteSuppressionStore(work / "sqlite" / "state" / "suppressions.db")
        sqlite_store.import_csv(io.StringIO(csv_of(addrs)))
        pg_store = PostgresSuppressionStore(PgClient(PgSettings(url, password)))
        pg_store.client.start(wait=15)
        pg_store.import_csv(io.StringIO(csv_of(addrs)))
        deadline = time.monotonic() + 30
        while len(pg_store) < len(addrs) and time.monotonic() < deadline:
            time.sleep(0.05)

        print(f"is_suppressed, {len(addrs):,} suppressed (ns per call, best of 5):")
        for name, store in (("sqlite", sqlite_store), ("postgresql", pg_store), ("sqlite", sqlite_store),
                            ("postgresql", pg_store)):
            hit, miss = micro(store, addrs)
            print(f"  {name:<11} hit {hit:6.0f} ns   miss {miss:6.0f} ns")
        sqlite_store.close()
        pg_store.close()

        rcpts = [a for pair in zip(addrs[::53], (f"free{i}@dest.bench.invalid" for i in range(10**9)), strict=False)
                 for a in pair][: args.rcpts]
        pw_line = f'store_password_file = "{password}"\n' if password else ""
        stores = {"sqlite": "", "postgresql": f'\n[feedback]\nstore = "{url}"\n{pw_line}'}
        print(f"RCPT over SMTP: {args.sessions} sessions, {len(rcpts)} RCPT, half suppressed:")
        for rnd in range(args.rounds):
            for name in ("sqlite", "postgresql") if rnd % 2 == 0 else ("postgresql", "sqlite"):
                proc, port = start_daemon(work / ("sqlite" if name == "sqlite" else "pg"), stores[name])
                try:
                    lat, took = asyncio.run(rcpt_load(port, rcpts, args.sessions))
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
                q = statistics.quantiles(lat, n=100)
                print(f"  {name:<11} {len(lat) / took:7.0f} RCPT/s   p50 {q[49] * 1e3:.3f} ms   "
                      f"p99 {q[98] * 1e3:.3f} ms")
    finally:
        if server is not None:
            server.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
