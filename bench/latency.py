#!/usr/bin/env python3
"""DATA-reply latency under load: time from the client's final "." to the server's 250 (which is
after the fsync), with 20 concurrent sessions, 2 KB messages and a connection per message, like
compare_postfix.py's smtp-source. Prints p50/p90/p99/max and the accept rate.

Uses bench/accept.toml (relay listener, trusted 127.0.0.1, "*" route to 127.0.0.1:2526). If Postfix's
smtp-sink is installed it is started on 2526 so deliveries run concurrently, as in production.

  .venv/bin/python bench/latency.py [--messages 5000] [--sessions 20] [--dkim off|rsa|ed25519|dual]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from accept import write_config  # noqa: E402

BODY = b"From: sender@client.bench.invalid\r\nTo: rcpt@dest.bench.invalid\r\nSubject: latency\r\n\r\n" + \
    (b"x" * 76 + b"\r\n") * 26


async def session(port: int, lat: list[float]) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await r.readline()
            if line[3:4] != b"-":
                return line

    await reply()
    w.write(b"EHLO client.bench.invalid\r\n")
    await reply()
    w.write(b"MAIL FROM:<sender@client.bench.invalid>\r\n")
    await reply()
    w.write(b"RCPT TO:<rcpt@dest.bench.invalid>\r\n")
    await reply()
    w.write(b"DATA\r\n")
    await reply()
    w.write(BODY + b".\r\n")
    t0 = time.perf_counter()
    line = await reply()
    lat.append(time.perf_counter() - t0)
    if not line.startswith(b"250"):
        raise RuntimeError(line)
    w.write(b"QUIT\r\n")
    await reply()
    w.close()


async def drive(port: int, messages: int, sessions: int) -> tuple[list[float], float]:
    lat: list[float] = []
    left = messages

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await session(port, lat)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    return lat, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=2532)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--dkim", choices=("off", "rsa", "ed25519", "dual"), default="off")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mailrelayd-latency-"))
    cfg = write_config(work, a.port, a.dkim)
    sink = None
    tool = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None)
    if tool:
        sink = subprocess.Popen([tool, "-u", "postfix", "-c", "127.0.0.1:2526", "1024"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mailrelayd"), "run", "-c", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for raw in proc.stdout:
        try:
            if json.loads(raw).get("event") == "daemon.ready":
                break
        except ValueError:
            continue
    drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
    try:
        lat, elapsed = asyncio.run(drive(a.port, a.messages, a.sessions))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        drain.wait(10)
        if sink:
            sink.terminate()
        shutil.rmtree(work, ignore_errors=True)
    lat.sort()
    q = statistics.quantiles(lat, n=100)
    print(f"{len(lat)} messages, {a.sessions} sessions, dkim={a.dkim}: {len(lat) / elapsed:.0f} msg/s; "
          f"DATA reply p50 {q[49] * 1000:.1f} ms, p90 {q[89] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms, "
          f"max {lat[-1] * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
