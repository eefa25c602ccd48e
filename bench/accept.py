#!/usr/bin/env python3
"""Accept and end-to-end throughput of mailrelayd side by side with Postfix (one run, same machine).

Writes a config from bench/accept.toml into a scratch directory (relay listener on --port, trusted
127.0.0.1, a "*" route to Postfix's smtp-sink on 127.0.0.1:2526, durable spool), starts the daemon,
and runs ../shared/bench/compare_postfix.py against it. Options:

  --dkim off|rsa|ed25519|dual   sign with keys for the benchmark's sender domain (default off)
  --shaping                     configure [[shaping]] for the benchmark's destination and the large
                                providers, none of it binding (issue 13's end-to-end condition)
  --preload N                   fill the spool with N deferred messages first (to an unreachable
                                domain) and report the start-up time: the 100k-queue check
  --compare PATH                compare_postfix.py (default ../shared/bench/compare_postfix.py)

Needs root and Debian's postfix package (compare_postfix.py's requirement). Example:
  .venv/bin/python bench/accept.py --messages 5000 --pairs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SENDER_DOMAIN = "client.bench.invalid"
SHAPING = """
[[shaping]]
match = "dest.bench.invalid"         # compare_postfix.py's recipient domain
max_connections = 20                 # = [delivery] domain_concurrency in accept.toml
max_messages_per_connection = 1000
max_rate = "10000/s"
throttle_backoff = "5m"

[[shaping]]
match = ".google.com"
max_connections = 20
max_rate = "600/min"

[[shaping]]
match = ".protection.outlook.com"
max_connections = 10
max_rate = "300/min"
"""  # smtp-source's -f/-M domain in compare_postfix.py


def write_config(directory: Path, port: int, dkim: str) -> Path:
    from mailrelayd.dkim import generate_key, write_private_key

    text = (HERE / "accept.toml").read_text().replace("@PORT@", str(port))
    algs = {"off": [], "rsa": ["rsa-sha256"], "ed25519": ["ed25519-sha256"],
            "dual": ["rsa-sha256", "ed25519-sha256"]}[dkim]
    for i, alg in enumerate(algs):
        pem, _ = generate_key(alg, 2048)
        key = directory / "dkim" / f"k{i}.key"
        write_private_key(key, pem, overwrite=True)
        text += (f'\n[[dkim]]\ndomain = "{SENDER_DOMAIN}"\nselector = "b{i}"\nkey_file = "{key}"\n'
                 f'algorithm = "{alg}"\n')
    path = directory / "mailrelayd.toml"
    path.write_text(text)
    return path


async def preload(spool_dir: Path, n: int) -> None:
    from mailrelayd.spool.store import DEFERRED, NewMessage, RecipientUpdate, Spool

    spool = Spool(spool_dir)
    await spool.open()
    body = b"From: a@example.com\r\nSubject: preload\r\n\r\n" + b"x" * 2000 + b"\r\n"
    later = time.time() + 86400
    batch = 2000
    for start in range(0, n, batch):
        msgs = [NewMessage(spool.new_queue_id(), "a@example.com", ("r@unreachable.invalid",), body, time.time(),
                           sender_domain="example.com") for _ in range(min(batch, n - start))]
        await asyncio.gather(*(spool.commit(m) for m in msgs))
        await spool.update([RecipientUpdate(m.queue_id, 0, DEFERRED, "451 4.4.1 preload", later) for m in msgs])
    await spool.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=2530)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--dkim", choices=("off", "rsa", "ed25519", "dual"), default="off")
    ap.add_argument("--preload", type=int, default=0)
    ap.add_argument("--shaping", action="store_true", help="[[shaping]] configured but not binding")
    ap.add_argument("--compare", default=str(REPO.parent / "shared" / "bench" / "compare_postfix.py"))
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--store", help='[feedback] store, e.g. "postgresql://user@host:5432/db" (default: sqlite)')
    ap.add_argument("--store-password-file", help="[feedback] store_password_file for --store")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))

    work = Path(tempfile.mkdtemp(prefix="mailrelayd-bench-"))
    cfg = write_config(work, a.port, a.dkim)
    if a.store:  # the RCPT check against the shared store's in-memory list
        extra = f'\n[feedback]\nstore = "{a.store}"\n'
        if a.store_password_file:
            extra += f'store_password_file = "{Path(a.store_password_file).resolve()}"\n'
        cfg.write_text(cfg.read_text() + extra)
    if a.shaping:  # limits far above what 20 sessions reach: configured, never binding
        cfg.write_text(cfg.read_text() + SHAPING)
    if a.preload:
        t0 = time.perf_counter()
        asyncio.run(preload(work / "spool", a.preload))
        print(f"preloaded {a.preload} deferred messages in {time.perf_counter() - t0:.1f}s", flush=True)
    exe = Path(sys.executable).parent / "mailrelayd"
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(exe), "run", "-c", str(cfg), "--log-format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for raw in proc.stdout:
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        if ev.get("event") == "daemon.ready":
            break
    else:
        print("daemon did not start", file=sys.stderr)
        return 1
    print(f"daemon ready in {time.perf_counter() - t0:.2f}s (dkim={a.dkim}, preload={a.preload})", flush=True)
    # Keep draining the daemon's log so it never blocks on a full pipe.
    drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
    try:
        r = subprocess.run([sys.executable, a.compare, "--target", f"127.0.0.1:{a.port}",
                            "--messages", str(a.messages), "--pairs", str(a.pairs)], check=False)
        return r.returncode
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        drain.wait(10)
        if not a.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
