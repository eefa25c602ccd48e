#!/usr/bin/env python3
"""What delivery events and history cost at accept: the same daemon with and without webhooks (all
event kinds, a receiver that answers 200), alternating runs, N messages over C concurrent SMTP
clients to the relay listener; delivery goes to a local sink so delivered events are produced too.

A relative measurement on this machine (loopback, durable spool), not a Postfix comparison:
  .venv/bin/python bench/events_cost.py --messages 2000 --concurrency 20 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib
from aiohttp import web
from aiosmtpd.controller import Controller

HERE = Path(__file__).resolve().parent
KINDS = '["accepted", "delivered", "deferred", "bounced", "expired", "complained", "suppressed"]'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SinkHandler:
    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        return "250 OK"


def config(directory: Path, port: int, sink_port: int, hook_port: int | None) -> Path:
    text = (HERE / "accept.toml").read_text().replace("@PORT@", str(port)).replace("127.0.0.1:2526",
                                                                                  f"127.0.0.1:{sink_port}")
    if hook_port is not None:
        (directory / "hook.secret").write_text("bench-secret-0123456789\n")
        text += (f'\n[[webhooks]]\nurl = "http://127.0.0.1:{hook_port}/hook"\nsecret_file = "hook.secret"\n'
                 f"events = {KINDS}\n")
    text = text.replace('level = "info"', 'level = "warning"')
    path = directory / "mailrelayd.toml"
    path.write_text(text)
    return path


async def send_all(port: int, n: int, conc: int) -> float:
    body = (b"From: app@client.bench.invalid\r\nTo: rcpt@dest.bench.invalid\r\nSubject: bench\r\n"
            b"Message-ID: <x@client.bench.invalid>\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26)
    q: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        q.put_nowait(i)

    async def worker() -> None:
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60, start_tls=False)
        await c.connect()
        while not q.empty():
            q.get_nowait()
            await c.sendmail("app@client.bench.invalid", ["rcpt@dest.bench.invalid"], body)
        await c.quit()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return n / (time.perf_counter() - t0)


async def one_run(with_hooks: bool, n: int, conc: int, sink_port: int, hook_port: int) -> float:
    with tempfile.TemporaryDirectory(prefix="mrd-events-") as tmp:
        port = free_port()
        cfg = config(Path(tmp), port, sink_port, hook_port if with_hooks else None)
        exe = Path(sys.executable).parent / "mailrelayd"
        proc = subprocess.Popen([str(exe), "run", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "NOTIFY_SOCKET": ""})
        try:
            for _ in range(300):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            await send_all(port, 50, 5)  # warm-up
            return await send_all(port, n, conc)
        finally:
            proc.terminate()
            proc.wait(30)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    sink_port = free_port()
    sink = Controller(SinkHandler(), hostname="127.0.0.1", port=sink_port)
    sink.start()
    received = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal received
        await request.read()
        received += 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    hook_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    res: dict[bool, list[float]] = {False: [], True: []}
    try:
        for r in range(a.rounds):
            for with_hooks in (False, True) if r % 2 == 0 else (True, False):
                rate = await one_run(with_hooks, a.messages, a.concurrency, sink_port, hook_port)
                res[with_hooks].append(rate)
                print(f"round {r + 1}: {'webhooks' if with_hooks else 'baseline'}: {rate:.0f} msg/s", flush=True)
    finally:
        await runner.cleanup()
        sink.stop()
    base, hooks = statistics.median(res[False]), statistics.median(res[True])
    print(f"median baseline {base:.0f} msg/s, with all events {hooks:.0f} msg/s: "
          f"{(1 - hooks / base) * 100:+.1f}% cost; webhook POSTs received: {received}")


if __name__ == "__main__":
    asyncio.run(main())
