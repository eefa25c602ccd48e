#!/usr/bin/env python3
"""Peak memory of the daemon while it takes K large messages in parallel (issue 11: "peak RSS growth
<= 2x the bytes of messages in flight").

Starts the daemon from bench/accept.toml (relay listener, trusted 127.0.0.1, durable spool) with
``limits.max_message_size`` / ``limits.max_data_memory`` raised to fit, sends one small warm-up
message, reads VmRSS from /proc/PID/status at rest, resets the kernel's peak (VmHWM, by writing 5 to
/proc/PID/clear_refs), then sends K messages of S MB over K parallel SMTP sessions (raw asyncio
sockets, 64 KB writes) and samples VmRSS from a thread every ``--interval`` ms until all are accepted
(and, with a sink, delivered). Prints peak growth over rest (the sampled maximum and VmHWM, which the
kernel keeps exactly), the bytes in flight (K x S) and their ratio.

Two set-ups (``--mode``; default both, each with a fresh daemon):

- ``queued``: the "*" route points at a closed port (127.0.0.1:9), so nothing is delivered. The
  scheduler still makes one attempt per message right after its commit: it reads the body back from
  the spool, the connection is refused and the body is dropped. This is "accept only" as far as the
  daemon allows it.
- ``deliver``: the route points at a sink that answers 250 to everything and throws the data away
  while keeping nothing (Postfix's smtp-sink if installed, else a blackhole sink in this process), so
  deliveries run while later messages are still arriving. Sampling goes on until the sink has had
  all K messages.

  .venv/bin/python bench/memory.py [--messages 6] [--size 24] [--mode both|queued|deliver] [--dkim off|rsa]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from accept import write_config  # noqa: E402

MB = 1024 * 1024


def make_body(size: int) -> bytes:
    head = (b"From: sender@client.bench.invalid\r\nTo: rcpt@dest.bench.invalid\r\n"
            b"Subject: memory\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    return head + line * ((size - len(head)) // len(line))


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for raw in f:
            if raw.startswith(("VmRSS:", "VmHWM:")):
                key, value = raw.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, proc_status(self.pid)["VmRSS"])
            self.samples += 1
            time.sleep(self.interval)


async def send(port: int, body: bytes, n: int = 1) -> None:
    """One SMTP session, ``n`` messages."""
    r, w = await asyncio.open_connection("127.0.0.1", port)

    async def reply(expect: bytes) -> bytes:
        while True:
            line = await r.readline()
            if line[3:4] != b"-":
                if not line.startswith(expect):
                    raise RuntimeError(f"expected {expect!r}, got {line!r}")
                return line

    await reply(b"220")
    w.write(b"EHLO client.bench.invalid\r\n")
    await reply(b"250")
    for _ in range(n):
        w.write(f"MAIL FROM:<sender@client.bench.invalid> SIZE={len(body)}\r\n".encode())
        await reply(b"250")
        w.write(b"RCPT TO:<rcpt@dest.bench.invalid>\r\n")
        await reply(b"250")
        w.write(b"DATA\r\n")
        await reply(b"354")
        view = memoryview(body)
        for i in range(0, len(body), 65536):
            w.write(view[i:i + 65536])
            await w.drain()
        w.write(b".\r\n")
        await reply(b"250")
    w.write(b"QUIT\r\n")
    await reply(b"221")
    w.close()


class BlackholeSink:
    """An SMTP sink that answers 250 to everything and keeps nothing of the data but a count."""

    def __init__(self) -> None:
        self.messages = 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 sink ESMTP\r\n")
        try:
            while True:
                line = await r.readline()
                if not line:
                    return
                cmd = line[:4].upper()
                if cmd == b"EHLO":
                    w.write(b"250-sink\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 SIZE 0\r\n")
                elif cmd == b"DATA":
                    w.write(b"354 go ahead\r\n")
                    tail = b""
                    while True:  # read to the terminator, keeping only a few bytes
                        chunk = await r.read(262144)
                        if not chunk:
                            return
                        if (tail + chunk[:5]).find(b"\r\n.\r\n") >= 0 or chunk.find(b"\r\n.\r\n") >= 0:
                            break
                        tail = chunk[-5:]
                    self.messages += 1
                    w.write(b"250 2.0.0 Ok: queued\r\n")
                elif cmd == b"QUIT":
                    w.write(b"221 bye\r\n")
                    await w.drain()
                    return
                else:
                    w.write(b"250 ok\r\n")
                await w.drain()
        except (asyncio.CancelledError, ConnectionError):  # the bench is over; the daemon stops
            return
        finally:
            w.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_one(mode: str, a: argparse.Namespace) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="mailrelayd-memory-"))
    port = free_port()
    cfg = write_config(work, port, a.dkim)
    size = a.size * MB
    body = make_body(size)
    sink_port = 9 if mode == "queued" else free_port()
    text = cfg.read_text().replace('host = "127.0.0.1:2526"', f'host = "127.0.0.1:{sink_port}"')
    # Room for the messages: each is at most max_message_size, all together within max_data_memory.
    limit = size + MB
    text = text.replace("[limits]\n", f"[limits]\nmax_message_size = {limit}\n"
                                      f"max_data_memory = {limit * (a.messages + 1)}\n")
    cfg.write_text(text)
    sink_proc = None
    sink = BlackholeSink()
    server = None
    delivered: list[str] = []
    tool = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None)
    if mode == "deliver":
        if tool and os.geteuid() == 0 and not a.builtin_sink:
            sink_proc = subprocess.Popen([tool, "-u", "postfix", "-c", f"127.0.0.1:{sink_port}", "64"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            server = await asyncio.start_server(sink.handle, "127.0.0.1", sink_port)
    env = dict(os.environ)
    if a.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mailrelayd"), "run", "-c", str(cfg),
                             "--log-format", "json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    stdout = proc.stdout
    ready = threading.Event()

    def read_log() -> None:  # drain the daemon's log; note deliveries
        for raw in stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            name = ev.get("event")
            if name == "daemon.ready":
                ready.set()
            elif name == "delivery.attempt" and any(str(r.get("code")) == "250" for r in ev.get("results", ())):
                delivered.append(ev.get("queue_id", ""))

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        for _ in range(300):
            if ready.wait(0.1) or proc.poll() is not None:
                break
        if not ready.is_set():
            raise RuntimeError("daemon did not start")
        await send(port, make_body(2048))  # warm-up: code paths, spool, logging
        await asyncio.sleep(1.0)
        rest = proc_status(proc.pid)["VmRSS"]
        hwm_reset = True
        try:
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            hwm_reset = False
        sampler = Sampler(proc.pid, a.interval / 1000)
        sampler.start()
        t0 = time.perf_counter()
        await asyncio.gather(*(send(port, body) for _ in range(a.messages)))
        accepted_s = time.perf_counter() - t0
        peak_accept = sampler.peak
        hwm_accept = proc_status(proc.pid)["VmHWM"]
        if mode == "deliver":
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                done = sink.messages - 1 if server is not None else len(set(delivered)) - 1
                if done >= a.messages:
                    break
                await asyncio.sleep(0.05)
            else:
                print("  (not all deliveries seen within 120 s)")
        await asyncio.sleep(0.2)
        sampler.stop.set()
        sampler.join()
        end = proc_status(proc.pid)
        peak = max(sampler.peak, end["VmRSS"])
        hwm = end["VmHWM"] if hwm_reset else 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if server is not None:
            server.close()
        if sink_proc is not None:
            sink_proc.terminate()
            sink_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    flight = a.messages * len(body)
    sink_name = "" if mode == "queued" else (" (smtp-sink)" if sink_proc else " (in-process blackhole sink)")
    print(f"{mode}{sink_name}: {a.messages} x {len(body) / MB:.1f} MB = {flight / MB:.0f} MB in flight, "
          f"dkim={a.dkim}, MALLOC_MMAP_THRESHOLD_={env.get('MALLOC_MMAP_THRESHOLD_', 'unset')}\n"
          f"  accepted in {accepted_s:.2f}s; RSS at rest {rest / MB:.0f} MB")
    print(f"  until accepted: peak {peak_accept / MB:.0f} MB sampled ({sampler.samples} samples), "
          f"VmHWM {hwm_accept / MB:.0f} MB -> growth {(max(peak_accept, hwm_accept) - rest) / MB:.0f} MB "
          f"= {(max(peak_accept, hwm_accept) - rest) / flight:.2f}x in flight")
    if mode == "deliver":
        print(f"  until delivered: peak {peak / MB:.0f} MB sampled, VmHWM {hwm / MB:.0f} MB -> growth "
              f"{(max(peak, hwm) - rest) / MB:.0f} MB = {(max(peak, hwm) - rest) / flight:.2f}x in flight")
    print(f"  at the end: RSS {end['VmRSS'] / MB:.0f} MB")
    return {"ratio": (max(peak_accept, hwm_accept) - rest) / flight}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", "-k", type=int, default=6, help="parallel messages (K)")
    ap.add_argument("--size", "-s", type=int, default=24, help="message size in MB (S)")
    ap.add_argument("--mode", choices=("both", "queued", "deliver"), default="both")
    ap.add_argument("--dkim", choices=("off", "rsa", "ed25519", "dual"), default="off",
                    help="sign with keys for the sender domain (large messages are signed in a thread)")
    ap.add_argument("--interval", type=float, default=2.0, help="RSS sampling interval, ms")
    ap.add_argument("--mmap-threshold", type=int, default=None,
                    help="the daemon's MALLOC_MMAP_THRESHOLD_ (systemd/mailrelayd.service sets 1048576)")
    ap.add_argument("--builtin-sink", action="store_true", help="use the in-process sink even if smtp-sink exists")
    a = ap.parse_args()
    modes = ("queued", "deliver") if a.mode == "both" else (a.mode,)
    for mode in modes:
        asyncio.run(run_one(mode, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
